"""Every error leaves the gateway as {"detail", "message", "code"}: the dashboards show
`message`, the WhatsApp client reads `detail`. gRPC status codes map to HTTP here, and only here."""

from __future__ import annotations

import logging

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.runtime.errors import ERROR_REASON_KEY

log = logging.getLogger("pregonero.gateway")

GRPC_TO_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    501: "not_implemented",
    503: "unavailable",
    504: "timeout",
}


class ErrorBody(BaseModel):
    """The error envelope, as the OpenAPI document states it (a 422 adds `errors`, a 503 of a
    health check its components)."""

    model_config = ConfigDict(extra="allow")

    detail: str
    message: str
    code: str


# Every route's documented errors (app-wide, FastAPI's own 422 replaced): any 4xx comes in
# the envelope above, as JSON also where the route's own answer is not (a schema inline: a
# `model` would be filed under the route's media type).
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    "4XX": {
        "description": "The request was refused: `message` says why",
        "content": {"application/json": {"schema": ErrorBody.model_json_schema()}},
    }
}


class ApiError(Exception):
    """Raised by route code for errors the gateway itself decides (auth, bad form fields)."""

    def __init__(self, status: int, message: str, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or HTTP_CODES.get(status, "error")


def error_body(status: int, message: str, code: str = "", **extra: object) -> dict[str, object]:
    return {"detail": message, "message": message, "code": code or HTTP_CODES.get(status, "error"), **extra}


def error_response(
    status: int, message: str, code: str = "", headers: dict[str, str] | None = None, **extra: object
) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, **extra), status_code=status, headers=headers)


def status_for_rpc_error(exc: grpc.aio.AioRpcError) -> tuple[int, str]:
    status = GRPC_TO_HTTP.get(exc.code(), 500)
    reasons = dict((k, v) for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str))
    if reasons.get(ERROR_REASON_KEY) == "payload_too_large":
        status = 413
    message = exc.details() or exc.code().name.lower()
    if status == 500:
        message = "internal error"
    elif status == 503 and exc.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in message:
        message = "a backend service is unavailable"
    return status, message


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.message, exc.code, headers=headers)

    @app.exception_handler(grpc.aio.AioRpcError)
    async def _rpc_error(request: Request, exc: grpc.aio.AioRpcError) -> JSONResponse:
        status, message = status_for_rpc_error(exc)
        if status >= 500:
            log.warning("backend error %s on %s: %s", exc.code().name, request.url.path, exc.details())
        return error_response(status, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTP_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid request"))
        return error_response(
            422, message, errors=[{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in errors]
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal error")
