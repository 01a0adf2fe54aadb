"""Request bodies: bounded per route, and refused before a byte is read when the caller may
not send them.

For an HTTP request that declares a body (Content-Length above 0, or Transfer-Encoding), in
this order and before the application pulls any of it:
1. A route that needs a caller (its dependencies include `require_caller`,
   `require_principal`, or `caller_or_anonymous` while no anonymous account is configured)
   gets its Authorization header checked by the gateway's Authenticator, whose caches make
   the route's own check that follows cheap: none, or one not accepted, is answered at once
   (401, or 503 when accounts cannot say), and the body is never read.
2. A declared Content-Length over the route's cap is a 413, the body unread.
3. The body is counted as the application pulls it: past the cap the pull raises a 413, so a
   chunked body (or one longer than it declared) is refused without reading the rest.
Pure ASGI rather than BaseHTTPMiddleware, so this layer never touches the body itself. Envoy
applies the same caps to a declared length at the edge (deploy/envoy/envoy.yaml); only this
layer can count a chunked body and knows who is calling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi.routing import APIRoute, iter_route_contexts
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import Authenticator, caller_or_anonymous, require_caller, require_principal
from .errors import ApiError, error_response
from .routes import address_book, batches, sync

MiB = 1024 * 1024
# Every body that is not one of the uploads below: JSON objects of a few fields.
JSON_MAX_BYTES = MiB
# Multipart framing and the form's other fields (call_settings_json is 20,000 characters at
# most) ride on top of the file.
FORM_SLACK_BYTES = MiB
# The bulk-send guide's "tamaño de archivo recomendado: hasta 100MB".
BULK_FILE_MAX_BYTES = 100 * MiB


def describe(n: int) -> str:
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n // 1024} KiB"


@dataclass(frozen=True)
class Cap:
    max_bytes: int
    message: str


def body_cap(max_bytes: int) -> Cap:
    return Cap(max_bytes, f"the request body is larger than {describe(max_bytes)}")


def file_cap(file_bytes: int) -> Cap:
    """An upload's documented limit, said as the route says it, with room for the form."""
    return Cap(file_bytes + FORM_SLACK_BYTES, f"the file is larger than {describe(file_bytes)}")


JSON_CAP = body_cap(JSON_MAX_BYTES)
# By route path (as declared). Envoy refuses a declared length over the same caps with the
# same messages (deploy/envoy/envoy.yaml; tests/gateway/test_body_limits.py compares them).
ROUTE_CAPS: dict[str, Cap] = {
    "/messages/send-bulk-file": file_cap(BULK_FILE_MAX_BYTES),
    "/api/v1/batches/excel/create": file_cap(batches.MAX_UPLOAD_BYTES),
    "/api/v1/batches/excel/preview": file_cap(batches.MAX_UPLOAD_BYTES),
    "/api/v1/batches/chile/{use_case}": file_cap(batches.MAX_UPLOAD_BYTES),
    "/api/v1/batches/argentina/{use_case}": file_cap(batches.MAX_UPLOAD_BYTES),
    "/api/contacts/import": file_cap(address_book.MAX_IMPORT_BYTES),
    # Up to MAX_OPERATIONS operations of a body of MAX_BODY_BYTES each, with their ids and paths.
    "/api/sync": body_cap(sync.MAX_OPERATIONS * (sync.MAX_BODY_BYTES + 8 * 1024)),
    # Meta documents a webhook delivery of at most 3 MB; its signature is checked over this much.
    "/webhooks/whatsapp": body_cap(3 * MiB),
}

OPEN, REQUIRED, OPENABLE = "open", "required", "openable"


@dataclass(frozen=True)
class Rule:
    guard: str
    cap: Cap


DEFAULT_RULE = Rule(OPEN, JSON_CAP)


def guard_of(route: APIRoute) -> str:
    """Who may send this route a body, from the authentication its dependencies ask for."""
    calls: set[Any] = set()
    pending = [route.dependant]
    while pending:
        dependant = pending.pop()
        calls.add(dependant.call)
        pending.extend(dependant.dependencies)
    if caller_or_anonymous in calls:
        return OPENABLE
    if calls & {require_caller, require_principal}:
        return REQUIRED
    return OPEN


class BodyLimits:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._rules: list[tuple[Any, Rule]] | None = None

    def rule(self, scope: Scope) -> Rule:
        if self._rules is None:
            # Built at the first request: the routes are all included by then. Each context is
            # a route as included (its full path), matched as the router matches it.
            self._rules = [
                (context, Rule(guard_of(context.original_route), ROUTE_CAPS.get(context.path or "", JSON_CAP)))
                for context in iter_route_contexts(scope["app"].routes)
                if isinstance(context.original_route, APIRoute)
            ]
        for context, rule in self._rules:
            if context.matches(scope)[0] is Match.FULL:
                return rule
        return DEFAULT_RULE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"").strip()
        length = int(declared) if declared.isdigit() else None
        if length == 0 or (not declared and b"transfer-encoding" not in headers):
            # No body to bound (HTTP/1.1: neither header, no body): most requests, no route lookup.
            await self.app(scope, receive, send)
            return
        rule = self.rule(scope)
        if rule.guard != OPEN:
            auth: Authenticator = scope["app"].state.auth
            authorization = headers.get(b"authorization", b"").decode("latin-1") or None
            try:
                await auth.authenticate(authorization, allow_anonymous=rule.guard == OPENABLE)
            except ApiError as exc:
                extra = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
                await error_response(exc.status, exc.message, exc.code, headers=extra)(scope, receive, send)
                return
        cap = rule.cap
        if length is not None and length > cap.max_bytes:
            await error_response(413, cap.message)(scope, receive, send)
            return
        pulled = 0

        async def counted() -> Message:
            nonlocal pulled
            message = await receive()
            if message["type"] == "http.request":
                pulled += len(message.get("body", b""))
                if pulled > cap.max_bytes:
                    # FastAPI passes an HTTPException raised while it reads the body on as it
                    # is; the gateway's handler turns it into the suite's error body.
                    raise HTTPException(413, cap.message)
            return message

        await self.app(scope, counted, send)
