"""Who is on a WebSocket, and for how long: `/ws/job/{job_id}` and `/ws/{user_id}` open,
authenticate and stay authenticated through this module.

A browser cannot set headers on a WebSocket, so a socket's token is taken from the first of:

1. `Authorization: Bearer <token>`, for clients that can set headers;
2. `Sec-WebSocket-Protocol`: the client offers two subprotocols, `bearer` and then the token
   itself (`new WebSocket(url, ["bearer", token])`); the socket is accepted with `bearer`,
   never with the token, since RFC 6455 has the server echo one of the offered values;
3. a first message `{"type": "auth", "token": "<token>"}` within AUTH_TIMEOUT_S (pings are
   answered meanwhile), as the scheduler guide has it. Where the operator opens a route to
   anonymous callers, a socket without 1 or 2 is anonymous at once: the bulk sender sends
   nothing and waits for its greeting.

`?token=` is not read: no deployed client sends one (shared/API_COMPAT.md), and URLs end up in
access logs. Ours print a socket's path without its query anyway (`%REQ_WITHOUT_QUERY%` in
Envoy's, `hide_tokens_from_logs` for uvicorn's, which also keeps credential headers and
received frames out of websockets' DEBUG lines), so a token sent there out of habit is not
written down either.

An open socket is only as good as its credential: it is closed with 4401 and the reason when
its JWT's `exp` passes (a timer, not a poll), and when its session ends or its API key is
revoked: at once if that went through this replica (`Authenticator.on_revoke`), else at the
next re-check, every `pregonero_socket_recheck_seconds`, answered from the authentication
cache, so at most that plus `pregonero_auth_cache_seconds` late. A re-check that cannot be
answered (accounts down) keeps the socket open: an outage must not drop every client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import WebSocket
from starlette.types import Message

from .auth import API_KEY, JWT, Authenticator, Principal, acting_for
from .errors import ApiError
from .socket_limit import admit, socket_client

log = logging.getLogger("pregonero.gateway.sockets")

BEARER_PROTOCOL = "bearer"
CLOSE_UNAUTHORIZED = 4401
AUTH_TIMEOUT_S = 10.0
# The reasons a socket is told, the same words as a refused request's.
ENDED = {JWT: "the session has ended; log in again", API_KEY: "invalid or revoked API key"}
EXPIRED = "token expired"


@dataclass(frozen=True)
class OpenSocket:
    """An accepted, authenticated socket: who, with which header (kept for re-checks), from where."""

    principal: Principal
    authorization: str | None
    client: str


def decoded(message: Message) -> dict[str, Any] | None:
    """A client's message as a JSON object; None for anything else."""
    try:
        data = json.loads(message.get("text") or (message.get("bytes") or b"").decode("utf-8", "replace"))
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


async def client_messages(websocket: WebSocket) -> AsyncIterator[dict[str, Any]]:
    """What the socket's client sends, as JSON objects (anything else is skipped), until it
    goes away."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = decoded(message)
        if data is not None:
            yield data


async def refuse(websocket: WebSocket, code: int, error: str, message: str) -> None:
    with contextlib.suppress(Exception):
        await websocket.send_json({"type": "error", "error": error, "message": message})
        await websocket.close(code)


def offered_bearer(websocket: WebSocket) -> tuple[str | None, str | None]:
    """(the subprotocol to accept, the token offered after it), each None when not offered."""
    offered = list(websocket.scope.get("subprotocols") or ())
    if BEARER_PROTOCOL not in offered:
        return None, None
    after = offered.index(BEARER_PROTOCOL) + 1
    return BEARER_PROTOCOL, offered[after] if after < len(offered) else None


async def first_message_token(websocket: WebSocket) -> str:
    """The token of a first `{"type": "auth", "token": ...}`; "" when none came in time."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(AUTH_TIMEOUT_S):
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return ""
                data = decoded(message)
                if data is not None and data.get("type") == "auth":
                    return str(data.get("token") or "")
                if data is not None and data.get("type") == "ping":
                    await websocket.send_json({"type": "pong", "timestamp": data.get("timestamp")})
    return ""


async def open_socket(websocket: WebSocket, *, allow_anonymous: bool = False) -> OpenSocket | None:
    """Admits, accepts and authenticates a socket; None when it was refused (told why, closed)."""
    client = socket_client(websocket)
    subprotocol, offered = offered_bearer(websocket)
    if not await admit(websocket, client, subprotocol=subprotocol):
        return None
    # Accepted before checking, so the client gets a reason instead of a bare handshake failure.
    await websocket.accept(subprotocol=subprotocol)
    auth: Authenticator = websocket.app.state.auth
    authorization = websocket.headers.get("authorization") or (f"Bearer {offered}" if offered else None)
    if authorization is None and not (allow_anonymous and auth.anonymous is not None):
        token = await first_message_token(websocket)
        if not token:
            await refuse(websocket, CLOSE_UNAUTHORIZED, "unauthorized", 'send {"type": "auth", "token": ...} first')
            return None
        authorization = f"Bearer {token}"
    try:
        principal = await auth.authenticate(authorization, allow_anonymous=allow_anonymous)
    except ApiError as exc:
        await refuse(websocket, CLOSE_UNAUTHORIZED, "unauthorized", exc.message)
        return None
    # The socket's handler runs in a task of its own: its backend calls act for this caller.
    acting_for(websocket, principal)
    return OpenSocket(principal, authorization, client)


class SocketWatch:
    """Ends the sockets whose credential has ended (see the module docstring)."""

    def __init__(
        self, auth: Authenticator, *, recheck_seconds: float, wall_clock: Callable[[], float] = time.time
    ) -> None:
        self.auth = auth
        self.recheck_seconds = recheck_seconds
        self.wall_clock = wall_clock  # a JWT's `exp` is wall-clock time
        # (kind, session or key id) → an event per open socket holding it.
        self._holders: dict[tuple[str, str], set[asyncio.Event]] = {}
        auth.on_revoke(self._revoked)

    def _revoked(self, kind: str, ident: str) -> None:
        for event in self._holders.get((kind, ident), ()):
            event.set()

    async def until_ended(self, sock: OpenSocket) -> str:
        """Returns the reason once the socket's credential no longer holds; never otherwise."""
        principal = sock.principal
        if principal.kind not in ENDED and principal.expires_at == math.inf:
            await asyncio.get_running_loop().create_future()  # operator tokens end with the process
        key = (principal.kind, principal.session_id or principal.key_id)
        revoked = asyncio.Event()
        self._holders.setdefault(key, set()).add(revoked)
        try:
            while True:
                left = principal.expires_at - self.wall_clock()
                if left <= 0:
                    return EXPIRED
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, self.recheck_seconds)):
                        await revoked.wait()
                if revoked.is_set():
                    return ENDED[principal.kind]
                try:
                    await self.auth.recheck(principal, sock.authorization)
                except ApiError as exc:
                    if exc.status == 401:
                        return exc.message
                    log.info("a socket's credential could not be checked again: %s", exc.message)
        finally:
            holders = self._holders.get(key, set())
            holders.discard(revoked)
            if not holders:
                self._holders.pop(key, None)

    async def hold(
        self, websocket: WebSocket, sock: OpenSocket, *work: asyncio.Future[Any], stop: Callable[[], Awaitable[None]]
    ) -> None:
        """Waits for the first of `work` to finish, or for the credential to end: then `stop`
        silences the socket's writer, and the client is told why and closed with 4401."""
        ended = asyncio.create_task(self.until_ended(sock), name="socket-credential")
        try:
            await asyncio.wait({ended, *work}, return_when=asyncio.FIRST_COMPLETED)
            if ended.done():
                await stop()
                await refuse(websocket, CLOSE_UNAUTHORIZED, "unauthorized", ended.result())
        finally:
            ended.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ended


# Request headers that carry a credential; websockets logs every header at DEBUG.
SECRET_HEADERS = frozenset({"authorization", "sec-websocket-protocol", "cookie"})


class _HideTokens(logging.Filter):
    """Rewrites uvicorn's and websockets' lines about a socket so that no token is in them: a
    path loses its query, a credential header its value, a received frame its content (the
    first message may be `auth`). The last two are DEBUG lines only."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple):
            return True
        if record.msg == "< %s: %s" and len(args) == 2 and str(args[0]).lower() in SECRET_HEADERS:
            record.args = (args[0], "[hidden]")
        elif record.msg == "< %s" and len(args) == 1 and hasattr(args[0], "data"):
            kind = getattr(getattr(args[0], "opcode", None), "name", "frame")
            record.args = (f"{kind} [{len(getattr(args[0], 'data', b''))} bytes, hidden]",)
        else:
            record.args = tuple(_without_query(arg) for arg in args)
        return True


def _without_query(arg: object) -> object:
    if isinstance(arg, str) and arg.startswith("/") and "?" in arg:
        return arg.partition("?")[0]
    return arg


_HIDE_TOKENS = _HideTokens()


def hide_tokens_from_logs() -> None:
    """uvicorn logs a socket's path with its query (`"WebSocket /ws/job/1?token=..." [accepted]`)
    and, at DEBUG, websockets its handshake headers and frames, both on uvicorn's loggers."""
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(_HIDE_TOKENS)
