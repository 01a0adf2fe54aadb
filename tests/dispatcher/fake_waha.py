"""A local server speaking the part of WAHA's HTTP API the `waha` adapter calls: sessions
(create, get, start, stop, restart, logout, delete), the QR (`GET /api/{session}/auth/qr`,
a PNG, or base64 in JSON for `Accept: application/json`) and `POST /api/sendText`, behind
`X-Api-Key`. A session goes STARTING → SCAN_QR_CODE on start; the test "scans" it with
`link`. Replies as WAHA does: 422 with the session's status when it is not WORKING, 404 for a
session it does not have. Failure modes: a session that fails after n sends, throttling
(429), a send that never answers. It signs webhooks (`X-Webhook-Hmac`, sha512 of the raw
body) to the URL a session was configured with, by itself on every status change when
`auto_webhooks`, or when the test calls `webhook`."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

API_KEY = "waha-api-key-for-tests"
HMAC_KEY = "waha-webhook-hmac-key-for-tests"


def tiny_png() -> bytes:
    """A valid 1x1 PNG (signature, IHDR, IDAT, IEND): what a QR image is, in miniature."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)  # 1x1, 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b"")
    )


QR_PNG = tiny_png()


def signed(body: bytes, key: str = HMAC_KEY) -> dict[str, str]:
    """The headers WAHA puts on a webhook it signs."""
    return {
        "Content-Type": "application/json",
        "X-Webhook-Request-Id": secrets.token_hex(8),
        "X-Webhook-Timestamp": str(int(time.time() * 1000)),
        "X-Webhook-Hmac": hmac.new(key.encode(), body, hashlib.sha512).hexdigest(),
        "X-Webhook-Hmac-Algorithm": "sha512",
    }


@dataclass
class FakeSession:
    name: str
    config: dict[str, Any]
    status: str = "STOPPED"
    sends: int = 0
    fail_after: int | None = None  # FAILED (the phone unlinked it) once this many were sent


@dataclass
class FakeWaha:
    sessions: dict[str, FakeSession] = field(default_factory=dict)
    sent: list[dict[str, Any]] = field(default_factory=list)  # accepted sendText bodies, with "id"
    calls: list[str] = field(default_factory=list)  # "POST /api/sessions/x/logout", ...
    throttled: int = 0  # the next this many sends answer 429
    hang_s: float = 0.0  # sends answer only after this long (longer than the client waits)
    auto_webhooks: bool = False
    webhooks_sent: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    # --- what the test does ---

    def link(self, name: str) -> None:
        """The phone scanned the QR: the session works."""
        self._set(name, "WORKING")

    def fail(self, name: str) -> None:
        """WhatsApp dropped the session (the phone unlinked it, the account was logged out)."""
        self._set(name, "FAILED")

    def event(self, name: str, event: str, payload: dict[str, Any]) -> bytes:
        """The raw body WAHA would post for that event of that session."""
        body = {
            "id": f"evt_{secrets.token_hex(13)}",
            "timestamp": int(time.time() * 1000),
            "event": event,
            "session": name,
            "metadata": self.sessions[name].config.get("metadata") if name in self.sessions else None,
            "payload": payload,
            "engine": "WEBJS",
            "environment": {"tier": "PLUS", "version": "2026.11.1"},
        }
        return json.dumps(body).encode()

    def webhook(self, name: str, event: str, payload: dict[str, Any]) -> httpx.Response:
        """Post one event, signed, to the session's webhook (synchronously: e2e tests)."""
        url, key = self._hook(name)
        body = self.event(name, event, payload)
        self.webhooks_sent.append(json.loads(body))
        return httpx.post(url, content=body, headers=signed(body, key), timeout=10)

    def _hook(self, name: str) -> tuple[str, str]:
        hooks = self.sessions[name].config.get("webhooks") or []
        hook = hooks[0]
        return hook["url"], (hook.get("hmac") or {}).get("key", "")

    def _set(self, name: str, status: str) -> None:
        session = self.sessions[name]
        session.status = status
        if self.auto_webhooks and session.config.get("webhooks"):
            url, key = self._hook(name)
            body = self.event(name, "session.status", {"status": status})
            self.webhooks_sent.append(json.loads(body))
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # called by a synchronous test, off the server's loop
                httpx.post(url, content=body, headers=signed(body, key), timeout=10)
                return
            task = loop.create_task(self._post(url, body, key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _post(self, url: str, body: bytes, key: str) -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            try:
                await http.post(url, content=body, headers=signed(body, key))
            except httpx.HTTPError:
                pass  # WAHA would retry; the tests look at what arrived

    def __post_init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    # --- the API ---

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def api_key(request: Request, call_next: Any) -> Response:
            self.calls.append(f"{request.method} {request.url.path}")
            if request.headers.get("x-api-key") != API_KEY:
                return JSONResponse({"message": "Unauthorized", "statusCode": 401}, status_code=401)
            response: Response = await call_next(request)
            return response

        def missing(name: str) -> JSONResponse:
            return JSONResponse({"statusCode": 404, "message": f"Session '{name}' not found"}, status_code=404)

        def not_as_expected(session: FakeSession, expected: list[str]) -> JSONResponse:
            return JSONResponse(
                {
                    "error": "Session status is not as expected. Try again later or restart the session",
                    "session": session.name,
                    "status": session.status,
                    "expected": expected,
                },
                status_code=422,
            )

        def shown(session: FakeSession) -> dict[str, Any]:
            return {
                "name": session.name,
                "status": session.status,
                "config": session.config,
                "engine": {"engine": "WEBJS"},
            }

        def start(session: FakeSession) -> None:
            # A real session shows STARTING for a moment, then the QR to scan.
            session.status = "STARTING"
            self._set(session.name, "SCAN_QR_CODE")

        @app.post("/api/sessions")
        async def create(request: Request) -> JSONResponse:
            body = await request.json()
            name = body["name"]
            if name in self.sessions:
                return JSONResponse({"statusCode": 422, "message": f"Session '{name}' already exists"}, status_code=422)
            session = self.sessions[name] = FakeSession(name, body.get("config") or {})
            if body.get("start", True):
                start(session)
            return JSONResponse(shown(session), status_code=201)

        @app.put("/api/sessions/{name}")
        async def update(name: str, request: Request) -> JSONResponse:
            if name not in self.sessions:
                return missing(name)
            self.sessions[name].config = (await request.json()).get("config") or {}
            return JSONResponse(shown(self.sessions[name]))

        @app.get("/api/sessions/{name}")
        async def get(name: str) -> JSONResponse:
            return JSONResponse(shown(self.sessions[name])) if name in self.sessions else missing(name)

        @app.post("/api/sessions/{name}/{action}")
        async def act(name: str, action: str) -> JSONResponse:
            session = self.sessions.get(name)
            if session is None:
                return missing(name)
            if action == "start":
                if session.status in ("STOPPED", "FAILED"):
                    start(session)
            elif action == "stop":
                self._set(name, "STOPPED")
            elif action in ("restart", "logout"):
                start(session)  # logout also unlinks the phone: a new QR either way
            else:
                return JSONResponse({"statusCode": 404, "message": "Cannot POST"}, status_code=404)
            return JSONResponse(shown(session), status_code=201)

        @app.delete("/api/sessions/{name}")
        async def delete(name: str) -> Response:
            if self.sessions.pop(name, None) is None:
                return missing(name)
            return Response(status_code=200)

        @app.get("/api/{name}/auth/qr")
        async def qr(name: str, request: Request) -> Response:
            session = self.sessions.get(name)
            if session is None:
                return missing(name)
            if session.status != "SCAN_QR_CODE":
                return not_as_expected(session, ["SCAN_QR_CODE"])
            if "application/json" in request.headers.get("accept", ""):
                return JSONResponse({"mimetype": "image/png", "data": base64.b64encode(QR_PNG).decode()})
            return Response(QR_PNG, media_type="image/png")

        @app.post("/api/sendText")
        async def send_text(request: Request) -> JSONResponse:
            body = await request.json()
            session = self.sessions.get(str(body.get("session")))
            if session is None:
                return missing(str(body.get("session")))
            if session.status != "WORKING":
                return not_as_expected(session, ["WORKING"])
            chat = str(body.get("chatId", ""))
            if not chat.endswith("@c.us") or not chat[: -len("@c.us")].isdigit() or not body.get("text"):
                return JSONResponse({"statusCode": 400, "message": ["chatId must be <digits>@c.us"]}, status_code=400)
            if self.throttled > 0:
                self.throttled -= 1
                return JSONResponse(
                    {"statusCode": 429, "message": "Too Many Requests"},
                    status_code=429,
                    headers={"Retry-After": "0.05"},
                )
            if self.hang_s:
                await asyncio.sleep(self.hang_s)
                return JSONResponse({"statusCode": 504, "message": "late"}, status_code=504)
            short = secrets.token_hex(10).upper()
            serialized = f"true_{chat}_{short}"
            self.sent.append({**body, "id": serialized})
            session.sends += 1
            if session.fail_after is not None and session.sends >= session.fail_after:
                self._set(session.name, "FAILED")
            # WEBJS's reply: the message, whose id the acks name by its serialized form.
            return JSONResponse(
                {
                    "id": {"fromMe": True, "remote": chat, "id": short, "_serialized": serialized},
                    "body": body["text"],
                    "ack": 1,
                    "timestamp": int(time.time()),
                },
                status_code=201,
            )

        return app
