"""The gateway's own metrics: HTTP requests by method, route template and status code, their
latency, and the WebSockets open. A plain ASGI middleware, outermost, so every answer is
counted (CORS preflights and refusals before the body included); the route is the matched
template (`/jobs/{job_id}`), never the raw path, so the series stay a bounded set."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.runtime.metrics import LATENCY_BUCKETS

HTTP_REQUESTS = Counter(
    "pregonero_http_requests",
    "HTTP requests the gateway answered, by method, route template and status code.",
    ["method", "route", "code"],
)
HTTP_SECONDS = Histogram(
    "pregonero_http_request_duration_seconds",
    "Time the gateway took to answer an HTTP request, body included.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
WEBSOCKETS = Gauge("pregonero_websocket_connections", "WebSockets open on this gateway.", ["route"])

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"  # no route: 404s and 405s of made-up paths share one series


def _route(scope: Scope) -> str:
    return str(getattr(scope.get("route"), "path", "") or UNMATCHED)


class RequestMetrics:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._socket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client meets when the app fails before answering

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            method = scope["method"] if scope["method"] in METHODS else "OTHER"
            route = _route(scope)
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_SECONDS.labels(method, route).observe(time.perf_counter() - started)

    async def _socket(self, scope: Scope, receive: Receive, send: Send) -> None:
        opened: Any = None

        async def counted(message: Message) -> None:
            nonlocal opened
            if message["type"] == "websocket.accept" and opened is None:
                opened = WEBSOCKETS.labels(_route(scope))
                opened.inc()
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            if opened is not None:
                opened.dec()
