"""WebSocket /ws/job/{job_id}: live progress of a WhatsApp bulk job, as the bulk sender reads it.
How a socket authenticates, and when it is closed for its credential: ../socket_auth.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated

import grpc
from fastapi import APIRouter, Depends, WebSocket
from pregonero.campaigns.v1 import campaigns_pb2, campaigns_pb2_grpc
from pregonero.events.v1 import events_pb2

from services.runtime.identity import Caller
from services.runtime.logs import REQUEST_ID_KEY, new_request_id, request_id_var

from ..job_socket import LiveHub, Subscriber, batch_event
from ..socket_auth import SocketWatch, client_messages, open_socket, refuse

log = logging.getLogger("pregonero.gateway.ws")

router = APIRouter()

# The state of a batch as seen by a caller; None when it does not exist for that caller.
Snapshot = Callable[[str, Caller], Awaitable[events_pb2.BatchEvent | None]]

SNAPSHOT_TIMEOUT_S = 5.0


async def campaigns_snapshot(
    stub: campaigns_pb2_grpc.CampaignsServiceStub, batch_id: str
) -> events_pb2.BatchEvent | None:
    try:
        # Its own deadline: the socket waits for it to open, so a slow backend fails it soon.
        batch = await stub.GetBatch(campaigns_pb2.BatchRef(batch_id=batch_id), timeout=SNAPSHOT_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        # Another tenant's batch is NOT_FOUND too, so ids cannot be probed.
        if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            return None
        raise
    return batch_event(batch)


def snapshot_source(websocket: WebSocket) -> Snapshot:
    """Dependency (tests override it): the batch snapshot from the campaigns service."""

    async def snapshot(batch_id: str, caller: Caller) -> events_pb2.BatchEvent | None:
        # As `caller`, the socket's: open_socket made it the caller this task's calls act for.
        return await campaigns_snapshot(websocket.app.state.backends.campaigns, batch_id)

    return snapshot


async def _read(websocket: WebSocket, sub: Subscriber) -> None:
    """Client messages: ping → pong; anything else, malformed or not, is ignored."""
    async for data in client_messages(websocket):
        if data.get("type") == "ping":
            sub.reply({"type": "pong", "timestamp": data.get("timestamp")})


@router.websocket("/ws/job/{job_id}")
async def job_updates(
    websocket: WebSocket,
    job_id: str,
    snapshot: Annotated[Snapshot, Depends(snapshot_source)],
) -> None:
    request_id_var.set(websocket.headers.get(REQUEST_ID_KEY) or new_request_id())
    sock = await open_socket(websocket, allow_anonymous=True)
    if sock is None:
        return
    caller = sock.principal.caller

    hub: LiveHub = websocket.app.state.live
    # Subscribed before the snapshot is taken, so no event falls between the two.
    sub = hub.subscribe(job_id, websocket, client=sock.client)
    reader: asyncio.Task[None] | None = None
    try:
        try:
            event = await snapshot(job_id, caller)
        except Exception:  # noqa: BLE001 - a backend failure closes this socket only
            log.warning("snapshot of batch %s failed", job_id, exc_info=True)
            await refuse(websocket, 1011, "unavailable", "no se pudo leer el estado del job")
            return
        if event is None:
            await refuse(websocket, 4404, "not_found", f"job {job_id} not found")
            return
        batch_id = event.batch_id or job_id
        if batch_id != job_id:
            hub.rekey(sub, batch_id)
        prelude = [
            {"type": "connected", "job_id": batch_id, "message": "Conectado a las actualizaciones en tiempo real"},
            {"type": "subscribed", "job_id": batch_id, "message": f"Suscrito a las actualizaciones del job {batch_id}"},
        ]
        sub.start(prelude, hub.opening(sub, event))
        assert sub.task is not None
        reader = asyncio.create_task(_read(websocket, sub), name=f"live-reader-{batch_id}")
        # Ends when the client leaves, when the writer has closed the socket (job over) or lost
        # it, or when the socket's credential has ended.
        watch: SocketWatch = websocket.app.state.socket_watch
        await watch.hold(websocket, sock, reader, sub.task, stop=sub.stop)
    finally:
        hub.unsubscribe(sub)
        await sub.stop()
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
