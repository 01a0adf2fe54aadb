"""Health. (Identity, `/api/auth/me`, lives with the other auth routes.)"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

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
    healthy = database == "connected" and nats_state == "connected" and all(s == "SERVING" for s in services.values())
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "timestamp": datetime.now(UTC).replace(tzinfo=None).isoformat(),
        "database": database,
        "nats": nats_state,
        "services": services,
    }
    return JSONResponse(body, status_code=200 if healthy else 503)
