"""The scheduler's live events on `/ws/{user_id}` over a real NATS server: message transitions
to the account's sockets, progress only to the sockets that follow the message (paced, the
final one always), device states, and what a socket may ask."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import nats
import pytest
from fastapi import FastAPI
from google.protobuf.message import Message as ProtoMessage
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client as NATS
from pregonero.events.v1 import events_pb2
from websockets.asyncio.client import ClientConnection, connect

from services.gateway.auth import Authenticator
from services.gateway.config import GatewaySettings
from services.gateway.routes import notifications
from services.gateway.socket_auth import SocketWatch
from services.gateway.socket_limit import SocketLimit
from services.gateway.user_socket import MAX_MESSAGE_ID, MAX_WATCHED, NotificationHub
from tests.http_server import serving

pytestmark = pytest.mark.timeout(30)

ADMIN, ACME, OTHER = "nl-admin-token", "nl-acme-token", "nl-other-token"


@dataclass
class Bus:
    url: str
    nc: NATS

    async def message(self, account: str, message_id: str, **fields: Any) -> None:
        await self._publish(
            f"events.message.{account}", events_pb2.MessageEvent(account_id=account, message_id=message_id, **fields)
        )

    async def device(self, account: str, **fields: Any) -> None:
        await self._publish(f"events.device.{account}", events_pb2.DeviceEvent(account_id=account, **fields))

    async def _publish(self, subject: str, event: ProtoMessage) -> None:
        await self.nc.publish(subject, event.SerializeToString())
        await self.nc.flush()


@pytest.fixture
async def bus(own_nats: str) -> AsyncIterator[Bus]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nc = await nats.connect(own_nats)
        app.state.notifications = NotificationHub()
        await app.state.notifications.start(nc)
        try:
            yield
        finally:
            await app.state.notifications.stop()
            await nc.drain()

    app = FastAPI(lifespan=lifespan)
    tokens = f"{ADMIN}=admin,{ACME}=account:acme,{OTHER}=account:other"
    app.state.auth = Authenticator(
        GatewaySettings(database_url="postgresql://unused/x", pregonero_static_tokens=tokens)
    )
    app.state.socket_watch = SocketWatch(app.state.auth, recheck_seconds=5)
    app.state.socket_limit = SocketLimit(per_second=100, burst=100)
    app.include_router(notifications.router)
    publisher = await nats.connect(own_nats)
    try:
        async with serving(app, lifespan="on") as address:
            yield Bus(f"ws://{address}", publisher)
    finally:
        await publisher.close()


@asynccontextmanager
async def socket(bus: Bus, token: str) -> AsyncIterator[ClientConnection]:
    async with connect(f"{bus.url}/ws/someone") as conn:
        await conn.send(json.dumps({"type": "auth", "token": token}))
        assert (await recv(conn))["type"] == "authenticated"
        yield conn


async def recv(conn: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(3):
        return json.loads(await conn.recv())  # type: ignore[no-any-return]


async def ask(conn: ClientConnection, kind: str, message_id: Any) -> dict[str, Any]:
    await conn.send(json.dumps({"type": kind, "message_id": message_id}))
    return await recv(conn)


def at(seconds: int) -> Timestamp:
    return Timestamp(seconds=seconds)


async def test_transitions_reach_the_accounts_sockets_only(bus: Bus) -> None:
    async with socket(bus, ACME) as acme, socket(bus, OTHER) as other, socket(bus, ADMIN) as admin:
        await bus.message("acme", "41", type="status", status="sending", at=at(1_767_225_600), late=True)
        expected = {
            "type": "message_status_update",
            "message_id": "41",
            "status": "sending",
            "timestamp": "2026-01-01T00:00:00Z",
            "late": True,
        }
        assert await recv(acme) == expected
        assert await recv(admin) == expected  # admins see every account's, as with notifications
        await bus.message("other", "77", type="status", status="sent", at=at(1_767_225_601))
        # acme's socket skipped other's transition: the next thing it gets is its own.
        await bus.message("acme", "41", type="status", status="sent", at=at(1_767_225_602))
        assert await recv(acme) == {
            "type": "message_status_update",
            "message_id": "41",
            "status": "sent",
            "timestamp": "2026-01-01T00:00:02Z",
        }
        assert (await recv(other))["message_id"] == "77"
        # Progress is not a transition: nobody who did not ask for it gets it.
        await bus.message("acme", "41", type="progress", sent=1, total=2)
        await bus.device("acme", sender_id=5, status="qr_needed", qr_code="iVBORw0KGgo=")
        assert await recv(acme) == {
            "type": "whatsapp_status",
            "status": "qr_needed",
            "device_id": 5,
            "qr_code": "iVBORw0KGgo=",
        }
        await bus.device("acme", sender_id=5, status="connected", qr_code="stale")
        assert await recv(acme) == {"type": "whatsapp_status", "status": "connected", "device_id": 5}
        # Garbage on the subjects is skipped; the socket goes on.
        await bus.nc.publish("events.message.acme", b"\xff\x00not a proto")
        await bus.device("acme", sender_id=6, status="disconnected")
        assert (await recv(acme))["device_id"] == 6


async def test_progress_goes_to_followers_once_a_second_and_the_final_at_once(bus: Bus) -> None:
    async with socket(bus, ACME) as acme, socket(bus, ACME) as bystander, socket(bus, OTHER) as other:
        assert await ask(acme, "subscribe_message", 41) == {"type": "subscribed", "message_id": "41"}
        # Another account's socket following the same id gets nothing of acme's message.
        assert await ask(other, "subscribe_message", "41") == {"type": "subscribed", "message_id": "41"}
        started = time.monotonic()
        for sent in range(1, 11):
            await bus.message("acme", "41", type="progress", sent=sent, failed=0, total=100)
        first = await recv(acme)
        assert first == {"type": "message_progress", "message_id": "41", "sent": 1, "total": 100, "failed": 0}
        # The nine others came within the second: only the latest of them, when it is up.
        second = await recv(acme)
        assert second["sent"] == 10 and time.monotonic() - started >= 0.9
        await bus.message("acme", "41", type="progress", sent=99, failed=1, total=100, final=True)
        assert await recv(acme) == {
            "type": "message_progress",
            "message_id": "41",
            "sent": 99,
            "total": 100,
            "failed": 1,
        }
        assert time.monotonic() - started < 1.9  # the final one did not wait for its second

        assert await ask(acme, "unsubscribe_message", "41") == {"type": "unsubscribed", "message_id": "41"}
        await bus.message("acme", "41", type="progress", sent=100, total=100, final=True)
        await bus.message("acme", "41", type="status", status="sent")
        assert (await recv(acme))["type"] == "message_status_update"  # and no progress before it
        for conn in (bystander, other):
            await conn.send(json.dumps({"type": "ping", "timestamp": 3}))
        assert (await recv(bystander))["type"] == "message_status_update"
        assert await recv(bystander) == {"type": "pong", "timestamp": 3}
        assert await recv(other) == {"type": "pong", "timestamp": 3}


async def test_what_a_socket_may_ask_is_bounded(bus: Bus) -> None:
    async with socket(bus, ACME) as acme:
        refused = await ask(acme, "subscribe_message", "x" * (MAX_MESSAGE_ID + 1))
        assert refused["type"] == "error" and refused["message"].startswith("message_id:")
        refused = await ask(acme, "subscribe_message", "")
        assert refused["type"] == "error" and refused["message"].startswith("message_id:")
        await acme.send(json.dumps({"type": "subscribe_message", "message_id": "1", "extra": 1}))
        assert (await recv(acme))["message"].startswith("extra:")
        await acme.send(json.dumps({"type": "subscribe_message", "message_id": ["1"]}))
        assert (await recv(acme))["type"] == "error"
        for n in range(MAX_WATCHED):
            await acme.send(json.dumps({"type": "subscribe_message", "message_id": str(n)}))
        for n in range(MAX_WATCHED):
            assert await recv(acme) == {"type": "subscribed", "message_id": str(n)}
        over = await ask(acme, "subscribe_message", "one-more")
        assert over["error"] == "too_many_subscriptions" and over["message_id"] == "one-more"
        # Following one again is no new subscription; freeing one makes room.
        assert (await ask(acme, "subscribe_message", "7"))["type"] == "subscribed"
        assert (await ask(acme, "unsubscribe_message", "7"))["type"] == "unsubscribed"
        assert (await ask(acme, "subscribe_message", "one-more"))["type"] == "subscribed"
        await bus.message("acme", "one-more", type="progress", sent=1, total=1, final=True)
        assert (await recv(acme))["message_id"] == "one-more"
