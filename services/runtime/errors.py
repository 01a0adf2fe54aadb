"""Domain errors. Domain code raises these; the gRPC interceptor maps them to status codes
and the gateway maps status codes to HTTP, so no layer below the gateway speaks HTTP."""

from __future__ import annotations

import grpc


class DomainError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Conflict(DomainError):
    """The request is valid but the resource is in a state that forbids it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PayloadTooLarge(ResourceExhausted):
    """Oversized uploads: RESOURCE_EXHAUSTED with a detail the gateway turns into 413."""

    detail = "payload_too_large"


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE


# Trailing-metadata key carrying a finer reason than the status code (e.g. 413 vs 429).
ERROR_REASON_KEY = "x-error-reason"
