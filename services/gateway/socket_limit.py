"""How fast one client may open WebSockets: a token bucket per client address, in this
process. A client past it gets a reason and close code 4429, which the bulk sender's app does
not reconnect on (it reconnects on 1001 and 1006 only), so a reconnecting client cannot loop."""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable

from fastapi import WebSocket

from .auth import Authenticator

CLOSE_TOO_MANY = 4429
# Clients remembered at most; the least recently seen is forgotten first (it had a full bucket
# again long ago, or will have one by the time it comes back).
MAX_CLIENTS = 50_000


class SocketLimit:
    def __init__(self, *, per_second: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second, self.burst, self.clock = per_second, burst, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client → (tokens, at)

    def take(self, client: str) -> bool:
        now = self.clock()
        tokens, at = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.per_second)
        allowed = tokens >= 1.0
        self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        return allowed


def socket_client(websocket: WebSocket) -> str:
    auth: Authenticator = websocket.app.state.auth
    return auth.client_address(websocket)


async def admit(websocket: WebSocket, client: str, *, subprotocol: str | None = None) -> bool:
    """True when `client` may open this socket; else it is refused (accepted with `subprotocol`,
    which a browser that offered one requires, told, closed)."""
    limit: SocketLimit = websocket.app.state.socket_limit
    if limit.take(client):
        return True
    with contextlib.suppress(Exception):
        await websocket.accept(subprotocol=subprotocol)
        message = "demasiadas conexiones: espere unos segundos antes de volver a conectar"
        await websocket.send_json({"type": "error", "error": "too_many_connections", "message": message})
        await websocket.close(CLOSE_TOO_MANY)
    return False
