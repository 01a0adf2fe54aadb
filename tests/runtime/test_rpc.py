"""The shared server interceptor: domain errors become status codes, unexpected errors do not
leak, and the request id and caller travel with the call."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest

from services.runtime import errors, identity
from services.runtime.logs import REQUEST_ID_KEY, current_request_id
from services.runtime.rpc import ServerInterceptor, outgoing_metadata

RAISES = {
    "invalid": (errors.InvalidArgument("phone column missing"), grpc.StatusCode.INVALID_ARGUMENT),
    "missing": (errors.NotFound("batch b1 not found"), grpc.StatusCode.NOT_FOUND),
    "exists": (errors.AlreadyExists("account taken"), grpc.StatusCode.ALREADY_EXISTS),
    "state": (errors.Conflict("batch is finished"), grpc.StatusCode.FAILED_PRECONDITION),
    "denied": (errors.PermissionDenied("admins only"), grpc.StatusCode.PERMISSION_DENIED),
    "anon": (errors.Unauthenticated("no caller"), grpc.StatusCode.UNAUTHENTICATED),
    "broke": (errors.ResourceExhausted("no credit"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    "big": (errors.PayloadTooLarge("too many rows"), grpc.StatusCode.RESOURCE_EXHAUSTED),
}


def _identity(x: bytes) -> bytes:
    return x


async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    what = request.decode()
    if what in RAISES:
        raise RAISES[what][0]
    if what == "nul":
        raise asyncpg.exceptions.CharacterNotInRepertoireError('invalid byte sequence for encoding "UTF8": 0x00')
    if what == "crash":
        raise KeyError("secret internal detail")
    if what == "whoami":
        caller = identity.current_caller()
        return f"{caller.role}|{caller.account_id}|{current_request_id()}".encode()
    return b"ok"


async def streaming(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    raise errors.NotFound("gone midway")


@pytest.fixture
async def client() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[ServerInterceptor()])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, _identity, _identity),
        "Stream": grpc.unary_stream_rpc_method_handler(streaming, _identity, _identity),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Svc", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(0)


def call(channel: grpc.aio.Channel, body: str, metadata: tuple[tuple[str, str], ...] = ()):  # type: ignore[no-untyped-def]
    rpc = channel.unary_unary("/test.Svc/Unary", request_serializer=_identity, response_deserializer=_identity)
    return rpc(body.encode(), metadata=metadata, timeout=5)


@pytest.mark.parametrize("what", sorted(RAISES))
async def test_domain_errors_map_to_status_codes(client: grpc.aio.Channel, what: str) -> None:
    exc, code = RAISES[what]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(client, what)
    assert info.value.code() == code
    assert info.value.details() == exc.message


async def test_oversized_upload_reason_travels_in_trailers(client: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(client, "big")
    assert (errors.ERROR_REASON_KEY, "payload_too_large") in tuple(info.value.trailing_metadata())


async def test_unexpected_errors_are_internal_without_details(client: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(client, "crash")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (info.value.details() or "")


async def test_text_postgres_cannot_store_is_invalid_argument(client: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(client, "nul")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NUL" in (info.value.details() or "")


@pytest.mark.parametrize("bad", ["caf\u00e9", "\udb08x", "a b", "-lead", "x" * 65, "acme\n", "acme\x00"])
def test_an_admin_naming_an_id_no_account_can_have_finds_nothing(bad: str) -> None:
    admin = identity.Caller(role=identity.ADMIN, account_id="default", user_id="op")
    with pytest.raises(errors.NotFound):
        admin.account_scope(bad)
    assert admin.account_scope("acme-2.b_c") == "acme-2.b_c" and admin.account_scope() == "default"


async def test_errors_in_streams_are_mapped_too(client: grpc.aio.Channel) -> None:
    rpc = client.unary_stream("/test.Svc/Stream", request_serializer=_identity, response_deserializer=_identity)
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for item in rpc(b"", timeout=5):
            got.append(item)
    assert got == [b"first"]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_request_id_and_caller_travel_with_the_call(client: grpc.aio.Channel) -> None:
    caller = identity.Caller(role=identity.MEMBER, account_id="acme", user_id="u1")
    md = ((REQUEST_ID_KEY, "req-123"), *caller.metadata())
    assert await call(client, "whoami", md) == b"member|acme|req-123"


async def test_call_without_identity_is_unauthenticated(client: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(client, "whoami")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A member without an account is no identity either.
    with pytest.raises(grpc.aio.AioRpcError):
        await call(client, "whoami", (("x-role", "member"),))


def test_outgoing_metadata_keeps_request_id() -> None:
    from services.runtime.logs import request_id_var

    token = request_id_var.set("abc")
    try:
        md = dict(outgoing_metadata(identity.Caller(role="admin", account_id="default")))
    finally:
        request_id_var.reset(token)
    assert md[REQUEST_ID_KEY] == "abc" and md["x-role"] == "admin"


def test_member_scope_never_reaches_other_accounts() -> None:
    member = identity.Caller(role=identity.MEMBER, account_id="acme")
    admin = identity.Caller(role=identity.ADMIN, account_id="default")
    assert member.account_scope("") == "acme"
    assert member.account_scope("acme") == "acme"
    with pytest.raises(errors.NotFound):
        member.account_scope("other")
    assert admin.account_scope("other") == "other"
    assert admin.account_scope("") == "default"
