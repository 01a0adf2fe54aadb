"""Health. (Identity, `/api/auth/me`, lives with the other auth routes.)"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.runtime import bus

router = APIRouter()


@router.get("/health", tags=["system"], summary="State of the suite and of each component")
async def health(request: Request) -> JSONResponse:
    rt = request.app.state.runtime
    database = "disconnected"
    try:
        async with asyncio.timeout(2):
            await rt.pool.fetchval("SELECT 1")
        database = "connected"
    except Exception:  # noqa: BLE001 - any failure means not connected
        pass
    nats_state = "connected" if rt.nc is not None and rt.nc.is_connected else "disconnected"
    services = await request.app.state.backends.health()
    # Work no consumer could handle, waiting for an admin (/api/v1/admin/dead-letters). It
    # does not make the suite unhealthy: the rest goes on. None when NATS cannot say.
    dead_letters = None
    if rt.js is not None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                dead_letters = await bus.count_dead_letters(rt.js)
    healthy = database == "connected" and nats_state == "connected" and all(s == "SERVING" for s in services.values())
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "timestamp": datetime.now(UTC).replace(tzinfo=None).isoformat(),
        "database": database,
        "nats": nats_state,
        "services": services,
        "dead_letters": dead_letters,
    }
    return JSONResponse(body, status_code=200 if healthy else 503)
