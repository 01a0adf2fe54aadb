"""How sockets authenticate (header, `Sec-WebSocket-Protocol`, first message; never
`?token=`, which stays out of the logs) and how they end with their credential: a logout or a
revoked key through this replica closes them at once, through another within the re-check,
and a JWT's expiry on its own. uvicorn and a real client; the accounts service faked."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from fastapi import FastAPI
from pregonero.events.v1 import events_pb2
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from services.accounts.auth import AccessTokens, signing_key_from_pem
from services.gateway import socket_auth
from services.gateway.auth import Authenticator, KeyOwner
from services.gateway.config import GatewaySettings
from services.gateway.job_socket import LiveHub
from services.gateway.routes import notifications, ws
from services.gateway.socket_auth import SocketWatch, hide_tokens_from_logs
from services.gateway.socket_limit import SocketLimit
from services.gateway.user_socket import NotificationHub
from services.runtime.identity import Caller
from tests.http_server import serving

pytestmark = pytest.mark.timeout(20)

JOB = "3f0c6c1e-8a51-4a6e-9d0b-6a1f4f3f2b10"
STATIC = "sockets-operator-token"
KEY = "pk_sockets_test_key"
RECHECK_S = 0.1


class WallClock:
    """The socket watch's clock; tokens are issued at its time, which starts as the real one
    (a JWT's claims are also checked against the real clock)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Accounts:
    """The accounts service as authentication asks it."""

    tokens: AccessTokens
    ended: set[str] = field(default_factory=set)
    keys: dict[str, KeyOwner] = field(default_factory=lambda: {KEY: KeyOwner(key_id="key-1", account_id="acme")})
    down: bool = False

    def _answer(self) -> None:
        if self.down:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")

    async def jwks(self) -> dict[str, Any]:
        return self.tokens.jwks()

    async def session_timezone(self, session_id: str) -> str | None:
        self._answer()
        return None if session_id in self.ended else "America/Santiago"

    async def api_key(self, secret: str) -> KeyOwner | None:
        self._answer()
        return self.keys.get(secret)

    async def account_timezone(self, caller: Caller) -> str:
        return ""


@dataclass
class Gateway:
    url: str
    auth: Authenticator
    accounts: Accounts
    wall: WallClock

    def jwt(self, session: str, *, ttl: int = 900) -> str:
        self.accounts.tokens.ttl_seconds = ttl
        return self.accounts.tokens.issue(user_id="usr-1", role="member", account_id="acme", session_id=session)


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    settings = GatewaySettings(
        database_url="postgresql://unused/x",
        pregonero_static_tokens=f"{STATIC}=admin",
        # Every re-check asks accounts: what another replica revoked is seen at the next one.
        pregonero_auth_cache_seconds=0,
    )
    pem = (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )
    wall = WallClock()
    tokens = AccessTokens(
        signing_key_from_pem(pem),
        issuer=settings.pregonero_jwt_issuer,
        audience=settings.pregonero_jwt_audience,
        ttl_seconds=900,
        clock=wall,
    )
    accounts = Accounts(tokens)
    auth = Authenticator(settings, directory=accounts)

    async def snapshot(batch_id: str, caller: Caller) -> events_pb2.BatchEvent:
        return events_pb2.BatchEvent(batch_id=batch_id, type="progress", sent=1, total=3)

    app = FastAPI()
    app.state.auth = auth
    app.state.socket_watch = SocketWatch(auth, recheck_seconds=RECHECK_S, wall_clock=wall)
    app.state.socket_limit = SocketLimit(per_second=100, burst=100)
    app.state.live = LiveHub()
    app.state.notifications = NotificationHub()
    app.include_router(ws.router)
    app.include_router(notifications.router)
    app.dependency_overrides[ws.snapshot_source] = lambda: snapshot
    async with serving(app) as address:
        yield Gateway(f"ws://{address}", auth, accounts, wall)


def bearer(token: str) -> Any:
    return ["bearer", token]


async def recv(conn: ClientConnection, within: float = 3) -> dict[str, Any]:
    async with asyncio.timeout(within):
        return json.loads(await conn.recv())  # type: ignore[no-any-return]


async def greeted(conn: ClientConnection) -> None:
    """Past the greeting of either route: the socket is open and authenticated."""
    first = await recv(conn)
    if first["type"] == "connected":
        assert [(await recv(conn))["type"] for _ in range(2)] == ["subscribed", "progress"]
    else:
        assert first["type"] == "authenticated", first


async def closed_for(conn: ClientConnection, within: float = 3) -> tuple[int | None, str]:
    """(close code, the reason told) of a socket its credential has left."""
    told = await recv(conn, within)
    assert (told["type"], told["error"]) == ("error", "unauthorized"), told
    async with asyncio.timeout(within):
        with pytest.raises(ConnectionClosed):
            await conn.recv()
    return conn.close_code, str(told["message"])


async def still_open(conn: ClientConnection) -> None:
    await conn.send(json.dumps({"type": "ping", "timestamp": 9}))
    assert await recv(conn) == {"type": "pong", "timestamp": 9}


PATHS = [f"/ws/job/{JOB}", "/ws/usr-1"]


@pytest.mark.parametrize("path", PATHS)
async def test_a_token_offered_as_a_subprotocol_is_accepted_with_bearer_only(gateway: Gateway, path: str) -> None:
    async with connect(gateway.url + path, subprotocols=bearer(gateway.jwt("s-1"))) as conn:
        assert conn.subprotocol == "bearer"  # echoed as RFC 6455 wants; the token never is
        await greeted(conn)
        await still_open(conn)
    async with connect(gateway.url + path, subprotocols=bearer("not-a-token")) as conn:
        assert conn.subprotocol == "bearer"
        assert (await closed_for(conn))[0] == 4401


@pytest.mark.parametrize("path", PATHS)
async def test_a_first_auth_message_is_the_other_way_in(gateway: Gateway, path: str) -> None:
    async with connect(gateway.url + path) as conn:
        await conn.send(json.dumps({"type": "ping", "timestamp": 1}))
        assert await recv(conn) == {"type": "pong", "timestamp": 1}
        await conn.send(json.dumps({"type": "auth", "token": STATIC}))
        await greeted(conn)


async def test_no_token_reaches_the_logs_and_a_query_token_is_not_read(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(socket_auth, "AUTH_TIMEOUT_S", 0.3)
    hide_tokens_from_logs()  # as the gateway's main() does
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    # uvicorn's socket lines, and at DEBUG websockets' handshake and frames, go to this logger.
    server_log = logging.getLogger("uvicorn.error")
    keep, level = Keep(), server_log.level
    server_log.addHandler(keep)
    server_log.setLevel(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pregonero")
    try:
        async with connect(f"{gateway.url}/ws/job/{JOB}?token={STATIC}") as conn:
            code, reason = await closed_for(conn)
        assert code == 4401 and "auth" in reason  # asked for a token: the query's was not taken
        async with connect(f"{gateway.url}/ws/job/{JOB}", subprotocols=bearer(STATIC)) as conn:
            await greeted(conn)
        async with connect(f"{gateway.url}/ws/usr-1") as conn:
            await conn.send(json.dumps({"type": "auth", "token": STATIC}))
            await greeted(conn)
    finally:
        server_log.removeHandler(keep)
        server_log.setLevel(level)
    assert any(f'"WebSocket /ws/job/{JOB}" [accepted]' in line for line in lines), lines
    assert "< sec-websocket-protocol: [hidden]" in [line.lower() for line in lines]
    assert not [line for line in lines + caplog.messages if STATIC in line]


async def test_a_logout_closes_the_sessions_sockets(gateway: Gateway) -> None:
    async with (
        connect(f"{gateway.url}/ws/job/{JOB}", subprotocols=bearer(gateway.jwt("s-out"))) as job,
        connect(f"{gateway.url}/ws/usr-1", subprotocols=bearer(gateway.jwt("s-out"))) as user,
        connect(f"{gateway.url}/ws/usr-1", subprotocols=bearer(gateway.jwt("s-other"))) as other,
    ):
        for conn in (job, user, other):
            await greeted(conn)
        gateway.auth.forget_session("s-out")  # what POST /api/auth/logout does on this replica
        for conn in (job, user):
            assert await closed_for(conn, within=1) == (4401, "the session has ended; log in again")
        await still_open(other)


async def test_a_session_ended_through_another_replica_closes_at_the_next_check(gateway: Gateway) -> None:
    async with connect(f"{gateway.url}/ws/usr-1", subprotocols=bearer(gateway.jwt("s-far"))) as conn:
        await greeted(conn)
        gateway.accounts.ended.add("s-far")
        assert await closed_for(conn, within=1 + RECHECK_S) == (4401, "the session has ended; log in again")


async def test_a_revoked_api_key_closes_its_sockets(gateway: Gateway) -> None:
    async with (
        connect(f"{gateway.url}/ws/job/{JOB}", subprotocols=bearer(KEY)) as here,
        connect(f"{gateway.url}/ws/usr-1", additional_headers={"Authorization": f"Bearer {KEY}"}) as header,
    ):
        await greeted(here)
        await greeted(header)
        del gateway.accounts.keys[KEY]
        gateway.auth.forget_api_key("key-1")  # DELETE /api/auth/api-keys/key-1 on this replica
        for conn in (here, header):
            assert await closed_for(conn, within=1) == (4401, "invalid or revoked API key")
    gateway.accounts.keys["pk_other"] = KeyOwner(key_id="key-2", account_id="acme")
    async with connect(f"{gateway.url}/ws/usr-1", subprotocols=bearer("pk_other")) as far:
        await greeted(far)
        del gateway.accounts.keys["pk_other"]  # revoked through another replica
        assert await closed_for(far, within=1 + RECHECK_S) == (4401, "invalid or revoked API key")


async def test_a_socket_closes_when_its_token_expires(gateway: Gateway) -> None:
    async with (
        connect(f"{gateway.url}/ws/job/{JOB}", subprotocols=bearer(gateway.jwt("s-exp", ttl=60))) as short,
        connect(f"{gateway.url}/ws/usr-1", subprotocols=bearer(gateway.jwt("s-long", ttl=900))) as long,
    ):
        await greeted(short)
        await greeted(long)
        gateway.wall.now += 59
        await asyncio.sleep(3 * RECHECK_S)
        await still_open(short)
        gateway.wall.now += 1
        assert await closed_for(short, within=1) == (4401, "token expired")
        await still_open(long)


async def test_sockets_outlive_an_accounts_outage_and_operator_tokens_need_no_check(gateway: Gateway) -> None:
    async with (
        connect(f"{gateway.url}/ws/usr-1", subprotocols=bearer(gateway.jwt("s-calm"))) as jwt_socket,
        connect(f"{gateway.url}/ws/job/{JOB}", subprotocols=bearer(STATIC)) as operator,
    ):
        await greeted(jwt_socket)
        await greeted(operator)
        gateway.accounts.down = True
        await asyncio.sleep(3 * RECHECK_S)
        await still_open(jwt_socket)
        await still_open(operator)
