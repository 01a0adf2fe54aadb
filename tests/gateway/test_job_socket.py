"""Live job progress: the BatchEvent → socket mapping, the hub's backpressure, and the
WebSocket end to end over a real NATS server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
import nats
import pytest
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pregonero.campaigns.v1 import campaigns_pb2
from pregonero.events.v1 import events_pb2
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from services.gateway.auth import Authenticator
from services.gateway.config import GatewaySettings
from services.gateway.job_socket import LiveHub, Subscriber, batch_event, percentage, render, render_snapshot
from services.gateway.routes import ws
from services.gateway.socket_auth import SocketWatch
from services.gateway.socket_limit import SocketLimit
from services.runtime import identity
from services.runtime.identity import Caller
from tests.http_server import serving

pytestmark = pytest.mark.timeout(20)

BATCH = "3f0c6c1e-8a51-4a6e-9d0b-6a1f4f3f2b10"
TOKEN = "live-test-token"
# How a browser authenticates a socket (services/gateway/socket_auth.py).
AS_ADMIN: Any = ["bearer", TOKEN]


def outcome(to: str, status: str = "sent", sender: int = 1, error: str = "") -> events_pb2.JobOutcome:
    return events_pb2.JobOutcome(to=to, status=status, sender_id=sender, error=error)


def progress_event(
    sent: int, failed: int, total: int, *outcomes: events_pb2.JobOutcome, batch: str = BATCH
) -> events_pb2.BatchEvent:
    return events_pb2.BatchEvent(
        batch_id=batch, type="progress", sent=sent, failed=failed, total=total, outcomes=list(outcomes)
    )


def counters(sent: int, failed: int, total: int) -> dict[str, Any]:
    return {"sent": sent, "failed": failed, "total": total, "percentage": percentage(sent, failed, total)}


# --- the mapping ------------------------------------------------------------------------


def test_progress_expands_per_recipient_with_rising_counters() -> None:
    event = progress_event(
        10, 3, 20, outcome("+561", sender=4), outcome("+562", "failed", 5, "ConnectTimeout"), outcome("+563")
    )
    push = render(event)
    assert push is not None
    # A failed recipient is an `error` only: the app logs every `progress` as sent.
    assert [(m["type"], m.get("phone"), m.get("status")) for m in push.messages] == [
        ("progress", "+561", "sent"),
        ("error", "+562", None),
        ("progress", "+563", "sent"),
    ]
    rising = [counters(9, 2, 20), counters(9, 3, 20), counters(10, 3, 20)]
    assert [m["progress"] for m in push.messages] == rising
    assert push.messages[0] == {
        "type": "progress",
        "job_id": BATCH,
        "device_id": 4,
        "phone": "+561",
        "status": "sent",
        "progress": {"sent": 9, "failed": 2, "total": 20, "percentage": 55.0},
    }
    assert push.messages[1] == {
        "type": "error",
        "job_id": BATCH,
        "device_id": 5,
        "phone": "+562",
        "error": "ConnectTimeout",
        "progress": {"sent": 9, "failed": 3, "total": 20, "percentage": 60.0},
    }
    assert push.counters == {"type": "progress", "job_id": BATCH, "progress": counters(10, 3, 20)}


def test_progress_without_outcomes_is_a_counters_snapshot() -> None:
    push = render(progress_event(1, 0, 3, outcome("+1", "requeued")))
    assert push is not None
    assert push.messages == ({"type": "progress", "job_id": BATCH, "progress": counters(1, 0, 3)},)


def test_percentage() -> None:
    assert percentage(1, 0, 3) == 33.3
    assert percentage(500, 2, 1000) == 50.2
    assert percentage(0, 0, 0) == 0.0
    assert percentage(998, 2, 1000) == 100.0


def test_lifecycle_events() -> None:
    def only(**kw: Any) -> dict[str, Any]:
        push = render(events_pb2.BatchEvent(batch_id=BATCH, **kw))
        assert push is not None and len(push.messages) == 1
        return push.messages[0]

    assert only(type="job_started", total=1000) == {
        "type": "job_started",
        "job_id": BATCH,
        "message": "Iniciando envío masivo de 1000 mensajes",
    }
    assert only(type="chunk_processing", chunk_start=0, chunk_end=1000, total=5000) == {
        "type": "chunk_processing",
        "job_id": BATCH,
        "chunk_start": 0,
        "chunk_end": 1000,
        "total": 5000,
        "message": "Procesando chunk 0-1000 de 5000",
    }
    done = only(type="job_completed", sent=998, failed=2, total=1000, devices_used=3, parallel_workers=3)
    assert done == {
        "type": "job_completed",
        "job_id": BATCH,
        "status": "completed",
        "results": {"sent": 998, "failed": 2, "total": 1000, "devices_used": 3, "parallel_workers": 3},
    }
    assert only(type="job_completed", status="cancelled")["status"] == "cancelled"
    assert only(type="job_failed", error="No hay devices disponibles", message="sin devices") == {
        "type": "job_failed",
        "job_id": BATCH,
        "error": "No hay devices disponibles",
        "message": "sin devices",
    }
    assert only(type="paused")["type"] == "job_paused"
    assert only(type="resumed")["type"] == "job_resumed"
    assert only(type="cancelled", message="por el operador") == {
        "type": "job_cancelled",
        "job_id": BATCH,
        "message": "por el operador",
    }
    assert render(events_pb2.BatchEvent(batch_id=BATCH, type="something_new")) is None


def test_batch_snapshot_becomes_counters_or_the_end() -> None:
    progress = campaigns_pb2.Progress(sent=5, failed=1, total=9)
    waiting = batch_event(campaigns_pb2.Batch(batch_id=BATCH, status="pending", progress=progress))
    assert (waiting.type, waiting.sent, waiting.failed, waiting.total) == ("progress", 5, 1, 9)
    running = batch_event(
        campaigns_pb2.Batch(
            batch_id=BATCH,
            status="processing",
            progress=progress,
            last_sent=campaigns_pb2.Recipient(to="+565", sender_id=3),
            last_failed=campaigns_pb2.Recipient(to="+566", sender_id=4, error="x"),
        )
    )
    assert (running.type, running.sent, running.failed, running.total) == ("job_started", 5, 1, 9)
    push = render_snapshot(running)
    assert push is not None
    assert push.messages == (
        {"type": "job_started", "job_id": BATCH, "message": "Iniciando envío masivo de 9 mensajes"},
        # The last one sent, with the counters: the app drops a `progress` without `phone`.
        {
            "type": "progress",
            "job_id": BATCH,
            "device_id": 3,
            "phone": "+565",
            "status": "sent",
            "progress": counters(5, 1, 9),
        },
    )
    paused = campaigns_pb2.Batch(batch_id=BATCH, status="paused", progress=progress)
    paused.started_at.GetCurrentTime()
    only_failed = batch_event(paused)
    only_failed.outcomes.append(events_pb2.JobOutcome(status="failed", to="+566", sender_id=4, error="x"))
    push = render_snapshot(only_failed)
    assert push is not None
    assert [(m["type"], m.get("phone")) for m in push.messages] == [
        ("job_started", None),
        ("error", "+566"),
        ("job_paused", None),
    ]
    for status in ("completed", "cancelled"):
        batch = campaigns_pb2.Batch(batch_id=BATCH, status=status, progress=progress, devices_used=2, devices_limit=3)
        done = batch_event(batch)
        assert (done.type, done.status, done.devices_used, done.parallel_workers) == ("job_completed", status, 2, 3)
    failed = batch_event(campaigns_pb2.Batch(batch_id=BATCH, status="failed", error="sin saldo"))
    assert (failed.type, failed.error) == ("job_failed", "sin saldo")


async def test_snapshot_of_an_unknown_or_foreign_batch_is_none() -> None:
    class Stub:
        def __init__(self, code: grpc.StatusCode) -> None:
            self.code = code
            self.asked: dict[str, Any] = {}

        async def GetBatch(self, ref: campaigns_pb2.BatchRef, **kw: Any) -> campaigns_pb2.Batch:  # noqa: N802
            self.asked = kw
            raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), "nope")

    for code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
        stub = Stub(code)
        assert await ws.campaigns_snapshot(stub, BATCH) is None  # type: ignore[arg-type]
        # The socket's caller travels by the channel (runtime/rpc.py); the call sets only its deadline.
        assert stub.asked == {"timeout": ws.SNAPSHOT_TIMEOUT_S}
    with pytest.raises(grpc.aio.AioRpcError):
        await ws.campaigns_snapshot(Stub(grpc.StatusCode.UNAVAILABLE), BATCH)  # type: ignore[arg-type]


# --- the hub ----------------------------------------------------------------------------


@dataclass
class FakeSocket:
    """Records what it is sent; a closed gate makes it a client that reads nothing."""

    gate: asyncio.Event | None = None
    fail: bool = False
    sent: list[dict[str, Any]] = field(default_factory=list)
    closed: int | None = None

    async def send_json(self, data: Any) -> None:
        if self.fail:
            raise ConnectionResetError("client gone")
        if self.gate is not None:
            await self.gate.wait()
        self.sent.append(json.loads(json.dumps(data)))

    async def close(self, code: int) -> None:
        self.closed = code


def nats_msg(event: events_pb2.BatchEvent, msg_id: str = "") -> Msg:
    return Msg(
        _client=None,  # type: ignore[arg-type]
        subject=f"events.batch.{event.batch_id}",
        data=event.SerializeToString(),
        headers={"Nats-Msg-Id": msg_id} if msg_id else None,
    )


async def finish(*subs: Subscriber) -> None:
    async with asyncio.timeout(3):
        await asyncio.gather(*(s.task for s in subs if s.task is not None))


async def test_slow_client_is_bounded_and_coalesced_while_fast_client_gets_everything() -> None:
    hub = LiveHub(max_pending=32)
    fast_socket, slow_socket = FakeSocket(), FakeSocket(gate=asyncio.Event())
    fast, slow = hub.subscribe(BATCH, fast_socket), hub.subscribe(BATCH, slow_socket)
    fast.start([], None)
    slow.start([], None)

    total, sent, failed, per_recipient = 300, 0, 0, 0
    await hub.on_message(nats_msg(events_pb2.BatchEvent(batch_id=BATCH, type="job_started", total=total)))
    for chunk in range(100):
        sent, failed = sent + 2, failed + 1
        event = progress_event(
            sent,
            failed,
            total,
            outcome(f"+a{chunk}"),
            outcome(f"+b{chunk}", "failed", error="x"),
            outcome(f"+c{chunk}"),
        )
        # The publisher side never waits on a socket, however stuck the slow one is: the slow
        # socket's gate stays shut for the whole loop, so a publish that waited on it would
        # never finish and the timeout would fire (generous, so a busy host cannot trip it).
        await asyncio.wait_for(hub.on_message(nats_msg(event, msg_id=f"{BATCH}:p:{chunk}")), 5)
        per_recipient += 3
        assert slow.queued <= 32
        await asyncio.sleep(0)  # the network's pacing between messages: the fast writer gets a turn
    await hub.on_message(nats_msg(progress_event(sent, failed, total, outcome("+dup")), msg_id=f"{BATCH}:p:99"))
    done = events_pb2.BatchEvent(batch_id=BATCH, type="job_completed", sent=sent, failed=failed, total=total)
    await hub.on_message(nats_msg(done))

    await finish(fast)
    phones = [m["phone"] for m in fast_socket.sent if m["type"] in ("progress", "error") and "phone" in m]
    assert len(phones) == 300 and "+dup" not in phones  # every recipient once; the re-publish is dropped
    assert sum(1 for m in fast_socket.sent if m["type"] == "error") == 100
    assert fast.dropped == 0
    assert fast_socket.sent[0]["type"] == "job_started"
    assert fast_socket.sent[-2]["progress"] == counters(sent, failed, total)
    assert fast_socket.sent[-1]["type"] == "job_completed" and fast_socket.closed == 1000

    assert slow.dropped > 0 and slow_socket.closed is None
    slow_socket.gate.set()  # type: ignore[union-attr]
    await finish(slow)
    received = slow_socket.sent
    assert len(received) < per_recipient / 2
    # Every per-recipient event was either delivered or counted as dropped (job_started too).
    detail = sum(1 for m in received if "phone" in m or m["type"] == "job_started")
    assert detail + slow.dropped == per_recipient + 1
    assert received[-1]["type"] == "job_completed" and received[-1]["results"]["sent"] == sent
    assert received[-2] == {"type": "progress", "job_id": BATCH, "progress": counters(sent, failed, total)}
    assert slow_socket.closed == 1000
    assert hub.subscribers == {}


async def test_state_changes_and_pongs_under_pressure_keep_only_the_latest() -> None:
    hub = LiveHub(max_pending=2)
    socket = FakeSocket(gate=asyncio.Event())
    sub = hub.subscribe(BATCH, socket)
    sub.start([], None)
    for i in range(1, 6):
        hub.publish(progress_event(i, 0, 10, outcome(f"+{i}")))
    hub.publish(events_pb2.BatchEvent(batch_id=BATCH, type="paused"))
    hub.publish(events_pb2.BatchEvent(batch_id=BATCH, type="resumed"))
    sub.reply({"type": "pong", "timestamp": 1})
    hub.publish(events_pb2.BatchEvent(batch_id=BATCH, type="job_failed", error="sin devices"))
    hub.publish(progress_event(9, 0, 10, outcome("+late")))  # after the end: ignored
    assert sub.queued <= 2
    socket.gate.set()  # type: ignore[union-attr]
    await finish(sub)
    types = [m["type"] for m in socket.sent]
    assert "job_paused" not in types and types.count("job_resumed") == 1
    assert types[-1] == "job_failed" and "+late" not in json.dumps(socket.sent)
    assert socket.sent[-2] == {"type": "progress", "job_id": BATCH, "progress": counters(5, 0, 10)}
    assert socket.closed == 1000


async def test_a_socket_whose_send_fails_is_removed_and_the_others_go_on() -> None:
    hub = LiveHub()
    broken, healthy = FakeSocket(fail=True), FakeSocket()
    gone, ok = hub.subscribe(BATCH, broken), hub.subscribe(BATCH, healthy)
    gone.start([{"type": "connected"}], None)
    ok.start([], None)
    await finish(gone)
    assert hub.subscribers == {BATCH: {ok}}
    hub.publish(progress_event(1, 0, 1, outcome("+1")))
    hub.publish(events_pb2.BatchEvent(batch_id=BATCH, type="job_completed", sent=1, total=1))
    await finish(ok)
    assert [m["type"] for m in healthy.sent] == ["progress", "job_completed"]
    assert hub.subscribers == {}


# --- end to end: uvicorn, a real WebSocket client, real NATS -----------------------------


@dataclass
class Live:
    app: FastAPI
    url: str = ""
    snapshots: dict[str, events_pb2.BatchEvent] = field(default_factory=dict)
    callers: list[Caller] = field(default_factory=list)
    publisher: NATS | None = None
    during_snapshot: Callable[[], Awaitable[None]] | None = None

    async def publish(self, event: events_pb2.BatchEvent) -> None:
        """As campaigns does, minus JetStream: core subscribers see the same message."""
        assert self.publisher is not None
        await self.publisher.publish(f"events.batch.{event.batch_id}", event.SerializeToString())
        await self.publisher.flush()


@pytest.fixture
async def live(own_nats: str) -> AsyncIterator[Live]:
    async def fake_snapshot(batch_id: str, caller: Caller) -> events_pb2.BatchEvent | None:
        # The socket's caller, and the one its backend calls act for (open_socket set it).
        assert identity.caller_var.get() == caller
        live.callers.append(caller)
        if live.during_snapshot is not None:
            await live.during_snapshot()
        return live.snapshots.get(batch_id)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nc = await nats.connect(own_nats)
        app.state.live = LiveHub()
        await app.state.live.start(nc)
        try:
            yield
        finally:
            await app.state.live.stop()
            await nc.drain()

    app = FastAPI(lifespan=lifespan)
    app.state.auth = Authenticator(
        GatewaySettings(database_url="postgresql://unused/x", pregonero_static_tokens=f"{TOKEN}=admin")
    )
    app.state.socket_watch = SocketWatch(app.state.auth, recheck_seconds=5)
    app.state.socket_limit = SocketLimit(per_second=100, burst=100)
    app.include_router(ws.router)
    app.dependency_overrides[ws.snapshot_source] = lambda: fake_snapshot
    live = Live(app)

    live.publisher = await nats.connect(own_nats)
    try:
        async with serving(app, lifespan="on") as address:
            live.url = f"ws://{address}"
            yield live
    finally:
        await live.publisher.close()


async def recv(conn: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(3):
        return json.loads(await conn.recv())  # type: ignore[no-any-return]


async def close_code(conn: ClientConnection) -> int | None:
    async with asyncio.timeout(3):
        with pytest.raises(ConnectionClosed):
            await conn.recv()
    return conn.close_code


async def test_websocket_snapshot_ping_progress_and_completion(live: Live) -> None:
    live.snapshots[BATCH] = progress_event(1, 0, 3)
    async with connect(f"{live.url}/ws/job/{BATCH}", subprotocols=AS_ADMIN) as conn:
        assert await recv(conn) == {
            "type": "connected",
            "job_id": BATCH,
            "message": "Conectado a las actualizaciones en tiempo real",
        }
        assert await recv(conn) == {
            "type": "subscribed",
            "job_id": BATCH,
            "message": f"Suscrito a las actualizaciones del job {BATCH}",
        }
        assert await recv(conn) == {"type": "progress", "job_id": BATCH, "progress": counters(1, 0, 3)}
        assert live.callers[-1].is_admin

        await conn.send("not json")
        await conn.send(json.dumps({"type": "subscribe"}))
        await conn.send(json.dumps({"type": "ping", "timestamp": 1712345678901}))
        assert await recv(conn) == {"type": "pong", "timestamp": 1712345678901}

        await live.publish(progress_event(1, 1, 9, outcome("+other"), batch="another-batch"))
        await live.publish(progress_event(3, 0, 3, outcome("+562", sender=2), outcome("+563", sender=2)))
        first, second = await recv(conn), await recv(conn)
        assert (first["phone"], first["device_id"], first["progress"]) == ("+562", 2, counters(2, 0, 3))
        assert (second["phone"], second["progress"]) == ("+563", counters(3, 0, 3))

        await live.publish(events_pb2.BatchEvent(batch_id=BATCH, type="job_completed", sent=3, total=3))
        done = await recv(conn)
        assert done["type"] == "job_completed" and done["results"]["sent"] == 3
        assert await close_code(conn) == 1000


async def test_a_late_connection_to_a_finished_job_gets_the_end_at_once(live: Live) -> None:
    finished = "9b2d7f3a-0000-4000-8000-000000000001"
    live.snapshots[finished] = events_pb2.BatchEvent(
        batch_id=finished, type="job_completed", status="cancelled", sent=4, failed=1, total=9
    )
    async with connect(
        f"{live.url}/ws/job/{finished}", additional_headers={"Authorization": f"Bearer {TOKEN}"}
    ) as conn:
        assert [(await recv(conn))["type"] for _ in range(2)] == ["connected", "subscribed"]
        done = await recv(conn)
        assert (done["type"], done["status"], done["results"]["failed"]) == ("job_completed", "cancelled", 1)
        assert await close_code(conn) == 1000
    # The same client again: told already, it gets a neutral state and the socket stays open.
    async with connect(f"{live.url}/ws/job/{finished}", subprotocols=AS_ADMIN) as conn:
        assert [(await recv(conn))["type"] for _ in range(2)] == ["connected", "subscribed"]
        state = await recv(conn)
        assert (state["type"], state["status"], state["progress"]) == ("job_status", "cancelled", counters(4, 1, 9))
        await conn.send(json.dumps({"type": "ping", "timestamp": 5}))
        assert await recv(conn) == {"type": "pong", "timestamp": 5}


async def test_a_client_opening_sockets_too_fast_is_refused(live: Live) -> None:
    live.app.state.socket_limit = SocketLimit(per_second=0.001, burst=2)
    for _ in range(2):
        async with connect(f"{live.url}/ws/job/{BATCH}", subprotocols=["bearer", "wrong"]) as conn:
            assert (await recv(conn))["error"] == "unauthorized"
    async with connect(f"{live.url}/ws/job/{BATCH}", subprotocols=AS_ADMIN) as conn:
        refused = await recv(conn)
        assert (refused["type"], refused["error"]) == ("error", "too_many_connections")
        assert await close_code(conn) == 4429


async def test_unknown_job_is_4404_and_unknown_token_4401(live: Live) -> None:
    async with connect(f"{live.url}/ws/job/00000000-0000-4000-8000-000000000000", subprotocols=AS_ADMIN) as conn:
        assert (await recv(conn))["error"] == "not_found"
        assert await close_code(conn) == 4404
    async with connect(f"{live.url}/ws/job/{BATCH}", subprotocols=["bearer", "wrong"]) as conn:
        refused = await recv(conn)
        assert (refused["type"], refused["error"]) == ("error", "unauthorized")
        assert await close_code(conn) == 4401
    # Anonymous is off unless configured: a socket without a token is asked for one first.
    async with connect(f"{live.url}/ws/job/{BATCH}") as conn:
        await conn.send(json.dumps({"type": "ping", "timestamp": 1}))
        assert await recv(conn) == {"type": "pong", "timestamp": 1}
        await conn.send(json.dumps({"type": "auth", "token": "wrong"}))
        assert (await recv(conn))["error"] == "unauthorized"
        assert await close_code(conn) == 4401


async def test_events_published_while_the_snapshot_is_taken_are_not_lost(live: Live) -> None:
    job = "5d1e0c2b-1111-4000-8000-000000000002"

    async def meanwhile() -> None:
        await live.publish(progress_event(2, 0, 3, outcome("+meanwhile"), batch=job))
        hub: LiveHub = live.app.state.live
        async with asyncio.timeout(2):
            while not any(s.queued for s in hub.subscribers.get(job, ())):  # noqa: ASYNC110 - the hub's state
                await asyncio.sleep(0.01)

    live.snapshots[job] = progress_event(1, 0, 3, batch=job)
    live.during_snapshot = meanwhile
    async with connect(f"{live.url}/ws/job/{job}", subprotocols=AS_ADMIN) as conn:
        assert [(await recv(conn))["type"] for _ in range(2)] == ["connected", "subscribed"]
        assert (await recv(conn))["progress"] == counters(1, 0, 3)
        late = await recv(conn)
        assert (late["phone"], late["progress"]) == ("+meanwhile", counters(2, 0, 3))
