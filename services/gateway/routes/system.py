"""Health, and the probes. (Identity, `/api/auth/me`, lives with the other auth routes.)

`/ready` and `/live` say whether this gateway can serve, whatever the backends say: were
readiness to ask them, one backend down would take every gateway out of the Service, and
every route of the others with it. `/health` tells operators which part is down."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.runtime import bus

from ..errors import error_response

router = APIRouter()


@router.get("/health", tags=["system"], summary="State of the suite and of each component")
async def health(request: Request) -> JSONResponse:
    rt = request.app.state.runtime
    backends = request.app.state.backends
    # As the backends reach it: the gateway holds no database credentials.
    database_ms, services = await asyncio.gather(backends.database(deadline_s=2), backends.health())
    database = "disconnected" if database_ms is None else "connected"
    nats_state = "connected" if rt.nc is not None and rt.nc.is_connected else "disconnected"
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


@router.get("/ready", tags=["system"], summary="This gateway can take requests (readiness probe)")
async def ready(request: Request) -> JSONResponse:
    # Started: the lifespan has opened NATS and the backends' channels. Asks nothing of them.
    if getattr(request.app.state, "backends", None) is None:
        return error_response(503, "the gateway is starting")
    return JSONResponse({"status": "ready"})


@router.get("/live", tags=["system"], summary="This gateway's event loop answers (liveness probe)")
async def live() -> dict[str, str]:
    return {"status": "alive"}
