"""gRPC status → HTTP status, and the error body every client reads."""

from __future__ import annotations

import grpc
import pytest

from services.gateway.errors import error_body, status_for_rpc_error
from services.runtime.errors import ERROR_REASON_KEY


def rpc_error(code: grpc.StatusCode, details: str, trailers: tuple = ()) -> grpc.aio.AioRpcError:  # type: ignore[type-arg]
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details)


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.UNAUTHENTICATED, 401),
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.ALREADY_EXISTS, 409),
        (grpc.StatusCode.ABORTED, 409),
        (grpc.StatusCode.FAILED_PRECONDITION, 409),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    ],
)
def test_status_codes_map_to_http(code: grpc.StatusCode, status: int) -> None:
    assert status_for_rpc_error(rpc_error(code, "why")) == (status, "why")


def test_oversized_upload_is_413() -> None:
    exc = rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many", ((ERROR_REASON_KEY, "payload_too_large"),))
    assert status_for_rpc_error(exc) == (413, "too many")


def test_internal_errors_hide_their_details() -> None:
    assert status_for_rpc_error(rpc_error(grpc.StatusCode.INTERNAL, "stack trace here")) == (500, "internal error")


def test_error_body_has_detail_message_and_code() -> None:
    assert error_body(404, "batch x not found") == {
        "detail": "batch x not found",
        "message": "batch x not found",
        "code": "not_found",
    }
