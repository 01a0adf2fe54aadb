"""Health as the WhatsApp scheduler guide names it (`/api/health`, `/db`, `/whatsapp`,
`/redis`), plus `/queue`. Each answers 200 when what it checks works and 503, with the
error body's `detail`/`message`/`code` beside the findings, when it does not. Only
`/whatsapp` needs a caller (it shows the caller's account's devices); the others tell no
account's data, like `/health`.

The suite has no Redis: its queue is NATS JetStream, so `/redis` answers with the queue's
state and says so."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from typing import Annotated, Any

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pregonero.dispatcher.v1 import dispatcher_pb2

from services.runtime import bus
from services.runtime.identity import Caller

from ..auth import require_caller
from ..errors import error_body

router = APIRouter(tags=["health"])

# A probe's own deadline, shorter than a call's default: a slow backend is reported, not waited for.
CHECK_TIMEOUT_S = 2.0
QUEUE = "nats_jetstream"
# The streams the guide's "queue" is: work for the dispatcher, and what comes back from it.
STREAMS = (bus.DISPATCH_STREAM, bus.EVENTS_STREAM)
WHATSAPP = "whatsapp"
# A device's connection as the dispatcher states it (device_states.state_of): only an
# active device sends.
CONNECTED, DISCONNECTED = "connected", "disconnected"

Body = dict[str, Any]


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _answer(body: Body, problems: list[str]) -> JSONResponse:
    body = {"status": "unhealthy" if problems else "healthy", "timestamp": _now(), **body}
    if problems:
        return JSONResponse({**body, **error_body(503, "; ".join(problems))}, status_code=503)
    return JSONResponse(body)


async def database(request: Request) -> tuple[Body, list[str]]:
    """The PostgreSQL server every service keeps its schema in, as the backends reach it (the
    gateway holds no database credentials); latency_ms includes the hop to the backend."""
    latency_ms = await request.app.state.backends.database(deadline_s=CHECK_TIMEOUT_S)
    if latency_ms is None:
        return {"status": "disconnected", "error": "no backend service reaches it"}, ["database unreachable"]
    return {"status": "connected", "latency_ms": round(latency_ms, 1)}, []


async def services(request: Request) -> tuple[Body, list[str]]:
    states: dict[str, str] = await request.app.state.backends.health(deadline_s=CHECK_TIMEOUT_S)
    return dict(states), [f"{name} is {state}" for name, state in sorted(states.items()) if state != "SERVING"]


async def queue(request: Request) -> tuple[Body, list[str]]:
    """JetStream: connected, and each stream's messages and its consumers' backlog."""
    rt = request.app.state.runtime
    body: Body = {"backend": QUEUE, "connected": bool(rt.nc is not None and rt.nc.is_connected)}
    if not body["connected"] or rt.js is None:
        return body, ["NATS is not connected"]
    streams: Body = {}
    problems: list[str] = []
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            for name in STREAMS:
                info = await rt.js.stream_info(name)
                consumers = await rt.js.consumers_info(name)
                streams[name] = {
                    "messages": info.state.messages,
                    "bytes": info.state.bytes,
                    "consumers": {
                        c.name: {
                            "pending": c.num_pending or 0,
                            "ack_pending": c.num_ack_pending or 0,
                            "redelivered": c.num_redelivered or 0,
                        }
                        for c in consumers
                    },
                }
            body["dead_letters"] = await bus.count_dead_letters(rt.js)
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        problems.append(f"JetStream did not answer ({type(exc).__name__})")
    body["streams"] = streams
    return body, problems


@router.get("/api/health", summary="Overall: the database, the queue and every backend service")
async def health(request: Request) -> JSONResponse:
    (db, db_problems), (svc, svc_problems), (q, q_problems) = await asyncio.gather(
        database(request), services(request), queue(request)
    )
    return _answer({"database": db, "queue": q, "services": svc}, db_problems + svc_problems + q_problems)


@router.get("/api/health/db", summary="The database, and the services that own its schemas")
async def health_db(request: Request) -> JSONResponse:
    (db, db_problems), (svc, svc_problems) = await asyncio.gather(database(request), services(request))
    return _answer({"database": db, "services": svc}, db_problems + svc_problems)


@router.get("/api/health/queue", summary="NATS JetStream: streams' messages and consumers' backlog")
async def health_queue(request: Request) -> JSONResponse:
    q, problems = await queue(request)
    return _answer({"queue": q}, problems)


@router.get("/api/health/redis", summary="No Redis here: the queue is NATS JetStream, and this is its state")
async def health_redis(request: Request) -> JSONResponse:
    q, problems = await queue(request)
    note = "this suite has no Redis; its queue and cache role is NATS JetStream, whose state follows"
    return _answer({"redis": None, "note": note, "queue": q}, problems)


@router.get("/api/health/whatsapp", summary="The caller's account's WhatsApp devices, by state")
async def health_whatsapp(request: Request, caller: Annotated[Caller, Depends(require_caller)]) -> JSONResponse:
    try:
        reply = await request.app.state.backends.dispatcher.ListSenders(
            dispatcher_pb2.ListSendersRequest(channel=WHATSAPP),
            timeout=CHECK_TIMEOUT_S,
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise
        return _answer({"whatsapp": {"account_id": caller.account_id}}, ["the dispatcher did not answer"])
    devices = [
        {"id": s.id, "device_name": s.device_name, "status": s.status, "connection": _connection(s.status)}
        for s in reply.senders
    ]
    by_state = Counter(d["connection"] for d in devices)
    whatsapp = {
        "account_id": caller.account_id,
        # The account can send while one device is connected; none is a state, not an outage.
        "status": CONNECTED if by_state[CONNECTED] else DISCONNECTED,
        "total": len(devices),
        "by_state": {state: by_state[state] for state in (CONNECTED, DISCONNECTED)},
        "devices": devices,
    }
    return _answer({"whatsapp": whatsapp}, [])


def _connection(status: str) -> str:
    return CONNECTED if status == "active" else DISCONNECTED
