"""Bodies before authentication (issue 13): the gateway refuses an unauthenticated body, or
one over its route's cap, before pulling it from the server, and cuts a chunked body off at
the cap. Driven at the ASGI level, counting the bytes the application pulls from `receive`."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
import yaml
from fastapi import Depends, FastAPI, File, Request, UploadFile
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.types import ASGIApp, Message

from services.gateway import body_limits, errors
from services.gateway.app import create_app
from services.gateway.auth import Authenticator, caller_or_anonymous, require_caller
from services.gateway.body_limits import JSON_MAX_BYTES, BodyLimits, MiB
from services.gateway.config import GatewaySettings
from services.runtime.devstack import render_envoy_config
from services.runtime.identity import Caller

pytestmark = pytest.mark.timeout(20)

TOKEN = "body-limits-admin"
AUTH = [(b"authorization", f"Bearer {TOKEN}".encode())]
CHUNK = 64 * 1024
BOUNDARY = "b0undary"
K8S_EDGE = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "base" / "envoy-gateway.yaml"


def settings(**kw: Any) -> GatewaySettings:
    return GatewaySettings(database_url="postgresql://x/y", pregonero_static_tokens=f"{TOKEN}=admin", **kw)


def small_app(**kw: Any) -> FastAPI:
    """The middleware in front of routes that authenticate as the real ones do."""
    app = FastAPI()
    app.state.auth = Authenticator(settings(**kw))
    errors.install(app)
    app.add_middleware(BodyLimits)

    @app.post("/messages/send-bulk-file")
    async def upload(
        caller: Annotated[Caller, Depends(caller_or_anonymous)], file: Annotated[UploadFile, File()]
    ) -> dict[str, Any]:
        return {"account": caller.account_id, "size": len(await file.read())}

    @app.post("/api/things")
    async def things(caller: Annotated[Caller, Depends(require_caller)], body: dict[str, Any]) -> dict[str, Any]:
        return {"keys": sorted(body)}

    @app.post("/webhooks/whatsapp")
    async def webhook(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    return app


def multipart_head() -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode()


def multipart(content: bytes) -> bytes:
    return multipart_head() + content + f"\r\n--{BOUNDARY}--\r\n".encode()


class Exchange:
    """One request through the app: its body handed out in parts on demand, and counted."""

    def __init__(self, body: Iterator[bytes]) -> None:
        self.body = body
        self.coming = next(body, None)
        self.pulled = 0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.reply = b""

    async def receive(self) -> Message:
        await asyncio.sleep(0)  # as a server does while the next part arrives
        part, self.coming = self.coming, next(self.body, None)
        if part is None:
            return {"type": "http.disconnect"}
        self.pulled += len(part)
        return {"type": "http.request", "body": part, "more_body": self.coming is not None}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            self.reply += message.get("body", b"")

    def json(self) -> Any:
        return json.loads(self.reply)


def stream(total: int, head: bytes = b"") -> Iterator[bytes]:
    """`head`, then `total` bytes of filler in CHUNK parts."""
    if head:
        yield head
    filler = b"x" * CHUNK
    while total > 0:
        yield filler[: min(CHUNK, total)]
        total -= CHUNK


async def call(
    app: ASGIApp,
    path: str,
    body: Iterator[bytes],
    *,
    length: int | None,
    headers: list[tuple[bytes, bytes]] | None = None,
    content_type: str = "application/json",
) -> Exchange:
    raw = [(b"content-type", content_type.encode()), *(headers or [])]
    raw.append((b"content-length", str(length).encode()) if length is not None else (b"transfer-encoding", b"chunked"))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},  # as uvicorn says
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": raw,
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8080),
    }
    exchange = Exchange(body)
    await app(scope, exchange.receive, exchange.send)
    return exchange


async def whole(app: ASGIApp, path: str, body: bytes, **kw: Any) -> Exchange:
    """A body declared with its length and sent in one part."""
    return await call(app, path, iter([body]), length=len(body), **kw)


def assert_error(exchange: Exchange, status: int, code: str) -> None:
    assert exchange.status == status, exchange.reply
    body = exchange.json()
    assert body["code"] == code and body["message"] and body["detail"] == body["message"], body


FORTY_MIB = 40 * MiB


@pytest.mark.parametrize("headers", [[], [(b"authorization", b"Bearer not-a-token")], [(b"authorization", b"Basic x")]])
async def test_an_unauthenticated_40_mib_upload_is_refused_before_a_byte_is_read(
    headers: list[tuple[bytes, bytes]],
) -> None:
    app = small_app()
    declared = await call(
        app,
        "/messages/send-bulk-file",
        stream(FORTY_MIB, multipart_head()),
        length=FORTY_MIB,
        headers=headers,
        content_type=f"multipart/form-data; boundary={BOUNDARY}",
    )
    assert_error(declared, 401, "unauthorized")
    assert declared.pulled == 0
    assert declared.headers["www-authenticate"] == "Bearer"
    chunked = await call(
        app,
        "/messages/send-bulk-file",
        stream(FORTY_MIB, multipart_head()),
        length=None,
        headers=headers,
        content_type=f"multipart/form-data; boundary={BOUNDARY}",
    )
    assert_error(chunked, 401, "unauthorized")
    assert chunked.pulled == 0


async def test_the_real_app_refuses_before_reading_too() -> None:
    """Installed in create_app, under the request-id and CORS middleware."""
    app = create_app(settings())
    upload = await call(
        app,
        "/api/v1/batches/excel/create",
        stream(FORTY_MIB),
        length=FORTY_MIB,
        content_type=f"multipart/form-data; boundary={BOUNDARY}",
    )
    assert_error(upload, 401, "unauthorized")
    # At most what request_context's disconnect listener (BaseHTTPMiddleware) takes while the
    # refusal goes out; the application reads nothing.
    assert upload.pulled <= CHUNK
    assert "x-request-id" in upload.headers
    too_big = await call(app, "/api/v1/batches", stream(JSON_MAX_BYTES + 1), length=JSON_MAX_BYTES + 1, headers=AUTH)
    assert_error(too_big, 413, "payload_too_large")
    assert too_big.pulled <= CHUNK
    # The login takes no credentials: its body is capped, not refused.
    login = await call(app, "/api/auth/login", stream(2 * MiB), length=2 * MiB)
    assert_error(login, 413, "payload_too_large")
    assert login.pulled <= CHUNK


async def test_json_over_1_mib_is_413_at_once_and_chunked_json_is_cut_off_at_the_cap() -> None:
    app = small_app()
    declared = await call(app, "/api/things", stream(JSON_MAX_BYTES + 1), length=JSON_MAX_BYTES + 1, headers=AUTH)
    assert_error(declared, 413, "payload_too_large")
    assert declared.pulled == 0
    assert "1 MiB" in declared.json()["message"]
    chunked = await call(app, "/api/things", stream(FORTY_MIB), length=None, headers=AUTH)
    assert_error(chunked, 413, "payload_too_large")
    assert JSON_MAX_BYTES < chunked.pulled <= JSON_MAX_BYTES + CHUNK


async def test_a_chunked_upload_past_its_cap_is_cut_off_without_reading_the_rest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cap = 2 * MiB
    monkeypatch.setitem(body_limits.ROUTE_CAPS, "/messages/send-bulk-file", body_limits.file_cap(cap))
    app = small_app()
    exchange = await call(
        app,
        "/messages/send-bulk-file",
        stream(FORTY_MIB, multipart_head()),
        length=None,
        headers=AUTH,
        content_type=f"multipart/form-data; boundary={BOUNDARY}",
    )
    assert_error(exchange, 413, "payload_too_large")
    assert exchange.json()["message"] == "the file is larger than 2 MiB"
    cap += body_limits.FORM_SLACK_BYTES
    assert cap < exchange.pulled <= cap + CHUNK
    # Declared over the cap: refused before the first byte.
    declared = await call(
        app,
        "/messages/send-bulk-file",
        stream(FORTY_MIB, multipart_head()),
        length=FORTY_MIB,
        headers=AUTH,
        content_type=f"multipart/form-data; boundary={BOUNDARY}",
    )
    assert_error(declared, 413, "payload_too_large")
    assert declared.pulled == 0


async def test_authenticated_requests_within_their_caps_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(body_limits.ROUTE_CAPS, "/messages/send-bulk-file", body_limits.file_cap(2 * MiB))
    app = small_app()
    body = json.dumps({"b": 1, "a": "x" * (JSON_MAX_BYTES - 100)}).encode()
    things = await whole(app, "/api/things", body, headers=AUTH)
    assert things.status == 200, things.reply
    assert things.json() == {"keys": ["a", "b"]}
    content = b"+56911111111|ana\n" * 100_000  # 1.7 MB: over the JSON cap, within the upload's
    form = multipart(content)
    upload = await whole(
        app,
        "/messages/send-bulk-file",
        form,
        headers=AUTH,
        content_type=f"multipart/form-data; boundary={BOUNDARY}",
    )
    assert upload.status == 200, upload.reply
    assert upload.json() == {"account": "default", "size": len(content)}


async def test_the_bulk_sender_opened_to_anonymous_callers_still_uploads() -> None:
    app = small_app(pregonero_anonymous_account="lan")
    content = b"phone|@valor1\n+56911111111|ana\n"
    upload = await whole(
        app,
        "/messages/send-bulk-file",
        multipart(content),
        content_type=f"multipart/form-data; boundary={BOUNDARY}",
    )
    assert upload.status == 200, upload.reply
    assert upload.json() == {"account": "lan", "size": len(content)}
    # Still only with a JSON route's credentials: anonymous opens the bulk sender alone.
    things = await whole(app, "/api/things", b"{}")
    assert_error(things, 401, "unauthorized")
    assert things.pulled == 0


async def test_a_webhook_needs_no_credentials_but_its_body_is_capped() -> None:
    app = small_app()
    small = await whole(app, "/webhooks/whatsapp", b'{"entry": []}')
    assert small.status == 200 and small.json() == {"size": 13}
    cap = body_limits.ROUTE_CAPS["/webhooks/whatsapp"].max_bytes
    declared = await call(app, "/webhooks/whatsapp", stream(cap + 1), length=cap + 1)
    assert_error(declared, 413, "payload_too_large")
    assert declared.pulled == 0
    chunked = await call(app, "/webhooks/whatsapp", stream(FORTY_MIB), length=None)
    assert_error(chunked, 413, "payload_too_large")
    assert cap < chunked.pulled <= cap + CHUNK


def test_every_upload_route_has_its_cap_and_the_guards_follow_the_dependencies() -> None:
    app = create_app(settings())
    routes = {
        c.path: c.original_route for c in iter_route_contexts(app.routes) if isinstance(c.original_route, APIRoute)
    }
    multipart_paths = {
        path
        for path, item in app.openapi()["paths"].items()
        for op in item.values()
        if "multipart/form-data" in op.get("requestBody", {}).get("content", {})
    }
    assert multipart_paths and multipart_paths <= set(body_limits.ROUTE_CAPS), multipart_paths
    assert set(body_limits.ROUTE_CAPS) <= set(routes)
    guards = {path: body_limits.guard_of(routes[path]) for path in routes}
    assert guards["/messages/send-bulk-file"] == body_limits.OPENABLE
    assert guards["/api/v1/batches/excel/create"] == body_limits.REQUIRED
    assert guards["/api/contacts/import"] == body_limits.REQUIRED
    assert guards["/api/sync"] == body_limits.REQUIRED
    assert guards["/api/v1/accounts/{account_id}"] == body_limits.REQUIRED  # through require_admin
    for public in ("/api/auth/login", "/api/auth/refresh", "/webhooks/whatsapp", "/webhooks/waha", "/health"):
        assert guards[public] == body_limits.OPEN, public


def envoy_lua() -> str:
    config = yaml.safe_load(render_envoy_config(listen_host="127.0.0.1", listen_port=1, gateway_port=2, admin_port=3))
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (lua,) = [f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.lua"]
    return str(lua["typed_config"]["default_source_code"]["inline_string"])


def lua_pattern(path: str) -> str:
    """A route's path as the Lua pattern that matches it: `{param}` is one segment."""
    escaped = re.sub(r"([\^$()%.\[\]*+\-?])", r"%\1", re.sub(r"\{[^}]+\}", "\0", path))
    return "^" + escaped.replace("\0", "[^/]+") + "$"


def test_envoy_refuses_a_declared_length_over_the_same_caps() -> None:
    lua = envoy_lua()
    rules = re.findall(r'\{ "(\^[^"]*)", (\d+), "([^"]*)" \}', lua)
    assert {pattern: body_limits.Cap(int(n), message) for pattern, n, message in rules} == {
        lua_pattern(path): cap for path, cap in body_limits.ROUTE_CAPS.items()
    }
    default = re.search(r'local DEFAULT = \{ "", (\d+), "([^"]*)" \}', lua)
    assert default is not None and body_limits.Cap(int(default.group(1)), default.group(2)) == body_limits.JSON_CAP


def test_the_cluster_edge_runs_the_same_script() -> None:
    docs = list(yaml.safe_load_all(K8S_EDGE.read_text()))
    (policy,) = [d for d in docs if d["kind"] == "EnvoyExtensionPolicy" and d["metadata"]["name"] == "body-limits"]
    assert policy["spec"]["lua"] == [{"type": "Inline", "inline": envoy_lua()}]
    assert policy["spec"]["targetRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "pregonero"}
    ]
