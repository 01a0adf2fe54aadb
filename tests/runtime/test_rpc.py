"""The shared server interceptor: domain errors become status codes, unexpected errors do not
leak, the request id and caller travel with the call, and only a caller whose token checks
out, calling what its service may call, is served."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import grpc
import pytest

from services.runtime import errors, identity
from services.runtime.logs import REQUEST_ID_KEY, current_request_id
from services.runtime.rpc import outgoing_metadata
from services.runtime.service_auth import TOKEN_KEY, Keyring, new_signing_key
from tests import signing

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
    if what == "deadline":
        return _remaining(context)
    return b"ok"


def _remaining(context: grpc.aio.ServicerContext) -> bytes:
    """The seconds the caller gave the call, or `none`: what the handler sees of its deadline."""
    left = context.time_remaining()
    return b"none" if left is None or left > 10**6 else f"{left:.1f}".encode()


async def remaining_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield _remaining(context)


async def streaming(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    raise errors.NotFound("gone midway")


# The test service's own policy: "Internal" is for campaigns alone, the rest the gateway's.
POLICY = {"/test.Svc/Internal": frozenset({"campaigns"})}


@pytest.fixture
async def address() -> AsyncIterator[str]:
    """A server that verifies calls as the accounts service does."""
    server = signing.server("accounts", POLICY)
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, _identity, _identity),
        "Internal": grpc.unary_unary_rpc_method_handler(unary, _identity, _identity),
        "Stream": grpc.unary_stream_rpc_method_handler(streaming, _identity, _identity),
        "Remaining": grpc.unary_stream_rpc_method_handler(remaining_stream, _identity, _identity),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Svc", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@pytest.fixture
async def client(address: str) -> AsyncIterator[grpc.aio.Channel]:
    """The gateway's channel to it: every call signed."""
    channel = signing.channel(address, "accounts")
    try:
        yield channel
    finally:
        await channel.close()


def call(channel: grpc.aio.Channel, body: str, metadata: tuple[tuple[str, str], ...] = (), method: str = "Unary"):  # type: ignore[no-untyped-def]
    rpc = channel.unary_unary(f"/test.Svc/{method}", request_serializer=_identity, response_deserializer=_identity)
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


async def test_call_without_caller_reaches_the_handler_without_one(client: grpc.aio.Channel) -> None:
    # Signed by the gateway, acting for nobody (a login): the handler sees no caller.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(client, "whoami")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # A member without an account is no identity either.
    with pytest.raises(grpc.aio.AioRpcError):
        await call(client, "whoami", (("x-role", "member"),))


ADMIN_MD = identity.Caller(role=identity.ADMIN, account_id="default", user_id="op").metadata()


async def _refused(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = (), **kw: str) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(channel, "whoami", metadata, **kw)
    return info.value.code()


async def test_plain_admin_metadata_without_a_token_is_refused(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as raw:
        assert await _refused(raw, ADMIN_MD) == grpc.StatusCode.UNAUTHENTICATED
        # A token that is not one, beside the plain claims.
        assert await _refused(raw, (*ADMIN_MD, (TOKEN_KEY, "x.y.z"))) == grpc.StatusCode.UNAUTHENTICATED


async def test_tokens_from_unknown_keys_other_audiences_or_past_expiry_are_refused(address: str) -> None:
    private, public = new_signing_key()
    # A key of its own that calls itself "gateway": not the stack's gateway key.
    impostor = Keyring("gateway", signing_key=private, public_keys=f"gateway:{public}")
    # Signed for the dispatcher, replayed to accounts.
    other_audience = signing.RINGS["gateway"].token("dispatcher", identity.Caller(role=identity.ADMIN))
    stale_clock = Keyring(
        "gateway",
        signing_key=signing._KEYS["gateway"][0],
        public_keys=signing._PUBLIC,
        clock=lambda: 1_000_000.0,
    )
    expired = stale_clock.token("accounts", identity.Caller(role=identity.ADMIN))
    async with grpc.aio.insecure_channel(address) as raw:
        for token in (impostor.token("accounts", identity.Caller(role=identity.ADMIN)), other_audience, expired):
            assert await _refused(raw, ((TOKEN_KEY, token),)) == grpc.StatusCode.UNAUTHENTICATED


async def test_only_the_gateway_speaks_for_an_admin_and_policy_names_who_calls_what(address: str) -> None:
    member = identity.Caller(role=identity.MEMBER, account_id="acme", user_id="feeder").metadata()
    async with signing.channel(address, "accounts", caller="campaigns") as campaigns:
        assert await _refused(campaigns, ADMIN_MD, method="Internal") == grpc.StatusCode.PERMISSION_DENIED
        md = ((REQUEST_ID_KEY, "r"), *member)
        assert await call(campaigns, "whoami", md, method="Internal") == b"member|acme|r"
        # Unlisted RPCs are the gateway's alone.
        assert await _refused(campaigns, member) == grpc.StatusCode.PERMISSION_DENIED
    async with signing.channel(address, "accounts") as gateway:
        assert await _refused(gateway, ADMIN_MD, method="Internal") == grpc.StatusCode.PERMISSION_DENIED
        assert (await call(gateway, "whoami", ADMIN_MD)).startswith(b"admin|default|")


@contextlib.contextmanager
def serving(caller: identity.Caller | None, request_id: str) -> Iterator[None]:
    """As while a request is served: its caller and request id in the contextvars."""
    from services.runtime.logs import request_id_var

    tokens = identity.caller_var.set(caller), request_id_var.set(request_id)
    try:
        yield
    finally:
        identity.caller_var.reset(tokens[0])
        request_id_var.reset(tokens[1])


def bare(channel: grpc.aio.Channel, method: str = "Unary"):  # type: ignore[no-untyped-def]
    """A stub's call as the gateway's routes make it: no metadata, no deadline."""
    return channel.unary_unary(f"/test.Svc/{method}", request_serializer=_identity, response_deserializer=_identity)


async def test_a_call_without_metadata_carries_the_request_caller_id_and_a_deadline(client: grpc.aio.Channel) -> None:
    from services.runtime import rpc

    member = identity.Caller(role=identity.MEMBER, account_id="acme", user_id="u1")
    with serving(member, "req-ctx"):
        assert await bare(client)(b"whoami") == b"member|acme|req-ctx"
        assert float(await bare(client)(b"deadline")) == pytest.approx(rpc.DEFAULT_DEADLINE_S, abs=1.0)
        # A deadline of the call's own wins, longer or shorter.
        assert float(await bare(client)(b"deadline", timeout=60)) == pytest.approx(60, abs=1.0)
        # Streams (uploads, exports, watches) get no default: they last as long as they are given.
        remaining = client.unary_stream(
            "/test.Svc/Remaining", request_serializer=_identity, response_deserializer=_identity
        )
        assert [r async for r in remaining(b"")] == [b"none"]
        assert [r async for r in remaining(b"", timeout=300)] != [b"none"]
    # Outside a request (a login: nobody signed in) the call acts for nobody, and still has an id.
    with serving(None, "req-anon"), pytest.raises(grpc.aio.AioRpcError) as info:
        await bare(client)(b"whoami")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_caller_named_by_the_call_wins_over_the_requests(client: grpc.aio.Channel) -> None:
    from services.runtime import rpc

    admin = identity.Caller(role=identity.ADMIN, account_id="default", user_id="op")
    other = identity.Caller(role=identity.MEMBER, account_id="acme", user_id="webhook")
    with serving(admin, "req-named"):
        assert await bare(client)(b"whoami", metadata=other.metadata()) == b"member|acme|req-named"
        # A request id of the call's own wins too.
        named = ((REQUEST_ID_KEY, "req-own"), *other.metadata())
        assert await bare(client)(b"whoami", metadata=named) == b"member|acme|req-own"
        # One caller, never the request's beside the named one (the token would be ambiguous).
        md = rpc._in_context(other.metadata())
        assert [k for k, _ in md].count(identity.ACCOUNT_KEY) == 1 and dict(md)[identity.ACCOUNT_KEY] == "acme"
        assert dict(rpc.outgoing_metadata(other))[identity.ROLE_KEY] == identity.MEMBER


def test_outgoing_metadata_keeps_request_id() -> None:
    from services.runtime.logs import request_id_var

    token = request_id_var.set("abc")
    try:
        md = dict(outgoing_metadata(identity.Caller(role="admin", account_id="default")))
    finally:
        request_id_var.reset(token)
    assert md[REQUEST_ID_KEY] == "abc" and md["x-role"] == "admin"
    # The channel turns the plain description into a token for its one audience.
    signed = dict(signing.RINGS["gateway"].sign_metadata("accounts", tuple(md.items())))
    assert "x-role" not in signed and signed[REQUEST_ID_KEY] == "abc"
    verified = signing.RINGS["accounts"].verify(signed[TOKEN_KEY])
    assert verified.service == "gateway" and verified.caller == identity.Caller(role="admin", account_id="default")


def test_member_scope_never_reaches_other_accounts() -> None:
    member = identity.Caller(role=identity.MEMBER, account_id="acme")
    admin = identity.Caller(role=identity.ADMIN, account_id="default")
    assert member.account_scope("") == "acme"
    assert member.account_scope("acme") == "acme"
    with pytest.raises(errors.NotFound):
        member.account_scope("other")
    assert admin.account_scope("other") == "other"
    assert admin.account_scope("") == "default"


@pytest.mark.parametrize("environment", ["development", "production"])
async def test_reflection_is_served_outside_production_only(environment: str) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from services.runtime.lifecycle import add_health, grpc_server
    from services.runtime.settings import BaseServiceSettings

    settings = BaseServiceSettings(
        database_url="postgresql://unused/x", nats_url="nats://accounts:s3cret@nats:4222", environment=environment
    )
    server = grpc_server(settings, signing.RINGS["accounts"])
    add_health(server, settings, [])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as raw:
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            replies = reflection_pb2_grpc.ServerReflectionStub(raw).ServerReflectionInfo(iter([ask]), timeout=5)
            if environment == "development":
                listed = [s.name async for r in replies for s in r.list_services_response.service]
                assert "grpc.health.v1.Health" in listed
            else:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    [r async for r in replies]
                assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)


@pytest.mark.parametrize(
    "url", ["nats://nats:4222", "nats://campaigns:changeme@nats:4222", "nats://campaigns@nats:4222"]
)
def test_outside_development_a_service_needs_its_own_nats_login(url: str) -> None:
    from services.runtime.settings import BaseServiceSettings

    with pytest.raises(ValueError, match="NATS user and password") as refused:
        BaseServiceSettings(database_url="postgresql://unused/x", nats_url=url, environment="production")
    assert "changeme" not in str(refused.value)  # settings errors never echo what was given
    assert BaseServiceSettings(database_url="postgresql://unused/x", nats_url=url).nats_url == url


@pytest.mark.parametrize(
    ("target", "balanced"),
    [
        ("dns:///accounts:50051", True),  # a headless Service: every ready pod
        ("ipv4:127.0.0.1:50051,127.0.0.1:50061", True),
        ("accounts:50051", False),
        ("127.0.0.1:50051", False),
    ],
)
def test_targets_that_may_name_several_replicas_are_balanced(
    monkeypatch: pytest.MonkeyPatch, target: str, balanced: bool
) -> None:
    from services.runtime import rpc

    opened: list[list[tuple[str, Any]]] = []
    monkeypatch.setattr(rpc.grpc.aio, "insecure_channel", lambda _, options, interceptors: opened.append(options))
    rpc.channel(target, audience="accounts", keyring=signing.RINGS["gateway"])
    (options,) = opened
    # Not balanced: pick_first, the default, which reconnects a lone backend at once.
    assert set(rpc.BALANCED_OPTIONS) <= set(options) if balanced else not set(rpc.BALANCED_OPTIONS) & set(options)


def test_servers_end_connections_so_clients_find_new_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.runtime import lifecycle
    from services.runtime.settings import BaseServiceSettings

    created: list[dict[str, Any]] = []
    monkeypatch.setattr(lifecycle.grpc.aio, "server", lambda **kw: created.append(dict(kw["options"])))
    settings = BaseServiceSettings(database_url="postgresql://unused/x", nats_url="nats://accounts:s3cret@nats:4222")
    lifecycle.grpc_server(settings, signing.RINGS["accounts"])
    (options,) = created
    assert 0 < options["grpc.max_connection_age_ms"] <= 10 * 60_000
    # Uploads have 300 s: one begun just before the server asks to close must still finish.
    assert options["grpc.max_connection_age_grace_ms"] >= 300_000
