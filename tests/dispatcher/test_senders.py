"""Senders through the real servicer (in-process grpc.aio server with the shared interceptor)
on a real PostgreSQL: secrets at rest, masking, validation, account isolation, soft delete,
and what the dispatch engine loads."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from cryptography.fernet import Fernet, InvalidToken
from pregonero.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc

from services.dispatcher.config import DispatcherSettings
from services.dispatcher.crypto import SecretBox, hint_of, masked
from services.dispatcher.repo import SenderQ, SendersRepo
from services.dispatcher.reseal import reseal, reseal_stored
from services.dispatcher.senders import Senders
from services.dispatcher.server import DispatcherServicer
from services.runtime.db import check_queries, create_pool
from services.runtime.identity import ADMIN, MEMBER, Caller
from tests import signing

KEY = "test-key-for-sender-secrets"
SECRET = "s3cr3t-api-key-9876"
ADMIN_CALLER = Caller(role=ADMIN, account_id="default", user_id="operator")
ACME = Caller(role=MEMBER, account_id="acme", user_id="u1")

Stub = dispatcher_pb2_grpc.DispatcherServiceStub


@pytest.fixture(scope="module")
async def module_pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database, schema="dispatcher", max_size=4)
    try:
        await check_queries(pool, SenderQ)  # the boot check: every query prepares
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def pool(module_pool: asyncpg.Pool) -> asyncpg.Pool:
    # Each test starts from no senders and id 1, as on a first start.
    await module_pool.execute("TRUNCATE senders RESTART IDENTITY CASCADE")
    return module_pool


@pytest.fixture
def senders(pool: asyncpg.Pool) -> Senders:
    return Senders(SendersRepo(pool), SecretBox(KEY))


@pytest.fixture
async def stub(senders: Senders) -> AsyncIterator[Stub]:
    server = signing.server("dispatcher")
    dispatcher_pb2_grpc.add_DispatcherServiceServicer_to_server(DispatcherServicer(senders), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = signing.channel(f"127.0.0.1:{port}", "dispatcher")
    try:
        yield Stub(channel)
    finally:
        await channel.close()
        await server.stop(0)


async def create(stub: Stub, caller: Caller = ADMIN_CALLER, **fields: Any) -> dispatcher_pb2.Sender:
    request = dispatcher_pb2.CreateSenderRequest(**{"token": "tok-1", "secret": SECRET, **fields})
    return await stub.CreateSender(request, metadata=caller.metadata(), timeout=5)


async def update(stub: Stub, sender_id: int, patch_json: str, caller: Caller = ADMIN_CALLER) -> dispatcher_pb2.Sender:
    request = dispatcher_pb2.UpdateSenderRequest(id=sender_id, patch_json=patch_json)
    return await stub.UpdateSender(request, metadata=caller.metadata(), timeout=5)


async def get(stub: Stub, sender_id: int, caller: Caller = ADMIN_CALLER) -> dispatcher_pb2.Sender:
    return await stub.GetSender(dispatcher_pb2.SenderRef(id=sender_id), metadata=caller.metadata(), timeout=5)


async def listing(stub: Stub, caller: Caller = ADMIN_CALLER, **fields: Any) -> dispatcher_pb2.ListSendersResponse:
    request = dispatcher_pb2.ListSendersRequest(**fields)
    return await stub.ListSenders(request, metadata=caller.metadata(), timeout=5)


async def test_secret_is_stored_encrypted_and_only_shown_masked(stub: Stub, pool: asyncpg.Pool) -> None:
    sender = await create(stub)
    assert sender.secret_masked == "••••••9876"
    assert SECRET not in str(sender)
    row = await pool.fetchrow("SELECT secret_enc, secret_hint FROM senders WHERE id = $1", sender.id)
    assert SECRET.encode() not in row["secret_enc"] and b"s3cr3t" not in row["secret_enc"]
    assert row["secret_hint"] == "9876"
    assert SecretBox(KEY).decrypt(row["secret_enc"]) == SECRET
    with pytest.raises(InvalidToken):
        SecretBox("another key").decrypt(row["secret_enc"])
    assert (await get(stub, sender.id)).secret_masked == "••••••9876"


def test_short_secrets_show_no_characters() -> None:
    assert masked(hint_of("abc")) == "••••"
    assert masked(hint_of("1234567")) == "••••"
    assert masked(hint_of("12345678")) == "••••••5678"


async def test_create_fills_defaults_and_numbers_unnamed_devices(stub: Stub, senders: Senders) -> None:
    first = await create(stub)
    second = await create(stub, phone="9 8123-4567")  # national: read in Chile, the operator's country
    named = await create(stub, device_name="  Ventas  ")
    assert (first.device_name, second.device_name, named.device_name) == ("Device 1", "Device 2", "Ventas")
    assert first.account_id == "default" and first.channel == "whatsapp" and first.provider == "simulated"
    assert first.status == "active" and first.rate_per_minute == 60 and first.jitter_ms == 0
    assert not first.is_receiver and first.provider_config_json == "{}"
    assert second.phone == "+56981234567"
    assert first.created_at.seconds > 0 and first.updated_at.seconds > 0
    assert (await senders.load_for_dispatch([first.id]))[first.id].concurrency == 4


CREATE_ERRORS = [
    ({"token": ""}, "token"),
    ({"token": "   "}, "token"),
    ({"token": "a\x00b"}, "NUL"),
    ({"secret": ""}, "secret"),
    ({"status": "paused"}, "status must be one of: active, inactive"),
    ({"rate_per_minute": 100_001}, "rate_per_minute must be between 0 and 100000"),
    ({"rate_per_minute": -1}, "rate_per_minute"),
    ({"jitter_ms": 60_001}, "jitter_ms"),
    ({"provider": "twilio"}, "provider must be one of: simulated, whatsapp_cloud"),
    ({"channel": "sms"}, "channel"),
    ({"phone": "call me"}, "phone"),
    ({"phone": "+56 9 1234 5678"}, "phone invalid for CL: not a valid number"),  # a range not allocated
    ({"phone": "12345678"}, "phone invalid for CL: too short"),
    ({"provider_config_json": "nope"}, "provider_config is not valid JSON"),
    ({"provider_config_json": "[1, 2]"}, "provider_config must be a JSON object"),
    ({"provider_config_json": '{"failure_ratio": 2}'}, "failure_ratio"),
    ({"provider_config_json": '{"latncy_ms": 5}'}, "latncy_ms"),
    ({"provider_config_json": '{"latency_ms": NaN}'}, "finite"),
]


@pytest.mark.parametrize(("fields", "expected"), CREATE_ERRORS)
async def test_invalid_create_is_refused_and_writes_nothing(
    stub: Stub, pool: asyncpg.Pool, fields: dict[str, Any], expected: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await create(stub, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (info.value.details() or "")
    assert await pool.fetchval("SELECT count(*) FROM senders") == 0


UPDATE_ERRORS = [
    ('{"colour": "red"}', "unknown fields: colour"),
    ("[]", "patch_json must be a JSON object"),
    ("not json", "patch_json is not valid JSON"),
    ('{"concurrency": 0}', "concurrency must be between 1 and 256"),
    ('{"concurrency": 257}', "concurrency"),
    ('{"rate_per_minute": "fast"}', "rate_per_minute must be an integer"),
    ('{"rate_per_minute": true}', "rate_per_minute must be an integer"),
    ('{"rate_per_minute": 1.5}', "rate_per_minute must be an integer"),
    ('{"jitter_ms": -5}', "jitter_ms"),
    ('{"status": "on"}', "status"),
    ('{"secret": ""}', "secret"),
    ('{"token": null}', "token must be a string"),
    ('{"device_name": ""}', "device_name"),
    ('{"is_receiver": "yes"}', "is_receiver"),
    ('{"provider": "meta"}', "provider must be one of: simulated, whatsapp_cloud"),
    ('{"provider_config": [1]}', "provider_config must be a JSON object"),
    ('{"provider_config": {"latency_ms": -1}}', "latency_ms"),
    ('{"provider_config": {"k": "\\u0000"}}', "NUL"),
    # One bad field spoils the whole patch: the good one is not applied either.
    ('{"device_name": "new", "rate_per_minute": 999999}', "rate_per_minute"),
]


@pytest.mark.parametrize(("patch", "expected"), UPDATE_ERRORS)
async def test_invalid_update_is_refused_and_changes_nothing(stub: Stub, patch: str, expected: str) -> None:
    sender = await create(stub, provider_config_json='{"latency_ms": 5}')
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await update(stub, sender.id, patch)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in (info.value.details() or "")
    assert await get(stub, sender.id) == sender


async def test_update_applies_a_partial_patch(stub: Stub, senders: Senders) -> None:
    sender = await create(stub, provider_config_json='{"latency_ms": 5, "seed": 1}')
    changed = await update(
        stub,
        sender.id,
        '{"secret": "brand-new-secret-4321", "device_name": "Cobranza", "status": "inactive", "is_receiver": true,'
        ' "phone": "+5491122334455", "rate_per_minute": 0, "jitter_ms": 250, "concurrency": 16,'
        ' "provider_config": {"failure_ratio": 0.1}}',
    )
    assert changed.secret_masked == "••••••4321" and changed.device_name == "Cobranza"
    assert changed.status == "inactive" and changed.is_receiver and changed.phone == "+5491122334455"
    assert changed.rate_per_minute == 0 and changed.jitter_ms == 250
    assert changed.provider_config_json == '{"failure_ratio": 0.1}'  # replaced, not merged
    assert changed.token == sender.token and changed.created_at == sender.created_at
    assert changed.updated_at.ToDatetime() >= sender.updated_at.ToDatetime()
    # An empty patch changes nothing; a token-only patch keeps the new secret.
    assert await update(stub, sender.id, "{}") == changed
    again = await update(stub, sender.id, '{"token": "tok-2", "status": "active"}')
    loaded = (await senders.load_for_dispatch([sender.id]))[sender.id]
    assert again.token == loaded.token == "tok-2"
    assert loaded.secret == "brand-new-secret-4321" and loaded.concurrency == 16 and loaded.rate_per_minute == 0


async def test_another_accounts_sender_is_not_found(stub: Stub) -> None:
    theirs = await create(stub)  # the admin's default account
    ref = dispatcher_pb2.SenderRef(id=theirs.id)
    for call in (
        stub.GetSender(ref, metadata=ACME.metadata(), timeout=5),
        stub.DeleteSender(ref, metadata=ACME.metadata(), timeout=5),
        update(stub, theirs.id, '{"device_name": "mine now"}', caller=ACME),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await listing(stub, ACME)).total == 0
    # A member cannot create into another account either; an admin may name one.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await create(stub, ACME, account_id="default")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    for_acme = await create(stub, ADMIN_CALLER, account_id="acme")
    assert [s.id for s in (await listing(stub, ACME)).senders] == [for_acme.id]
    assert (await get(stub, theirs.id)).device_name == "Device 1"  # untouched


async def test_calls_without_identity_are_unauthenticated(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListSenders(dispatcher_pb2.ListSendersRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_delete_is_soft(stub: Stub, pool: asyncpg.Pool, senders: Senders) -> None:
    gone = await create(stub)
    kept = await create(stub)
    reply = await stub.DeleteSender(dispatcher_pb2.SenderRef(id=gone.id), metadata=ADMIN_CALLER.metadata(), timeout=5)
    assert reply.deleted
    assert await pool.fetchval("SELECT deleted_at IS NOT NULL FROM senders WHERE id = $1", gone.id)
    for call in (
        get(stub, gone.id),
        update(stub, gone.id, '{"status": "active"}'),
        stub.DeleteSender(dispatcher_pb2.SenderRef(id=gone.id), metadata=ADMIN_CALLER.metadata(), timeout=5),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert [s.id for s in (await listing(stub)).senders] == [kept.id]
    assert await senders.load_for_dispatch([gone.id]) == {}
    # Names keep counting past deleted devices, so no two devices ever share a default name.
    assert (await create(stub)).device_name == "Device 3"


async def test_list_is_ordered_and_filters_active(stub: Stub, senders: Senders) -> None:
    a = await create(stub)
    b = await create(stub, status="inactive")
    c = await create(stub)
    everything = await listing(stub, channel="whatsapp")
    assert [s.id for s in everything.senders] == [a.id, b.id, c.id] and everything.total == 3
    active = await listing(stub, active_only=True)
    assert [s.id for s in active.senders] == [a.id, c.id] and active.total == 2
    assert (await listing(stub, channel="voice")).total == 0
    assert [r["id"] for r in await senders.list_active("default")] == [a.id, c.id]
    assert await senders.list_active("acme") == []


async def test_load_for_dispatch_decrypts_usable_senders_only(stub: Stub, pool: asyncpg.Pool, senders: Senders) -> None:
    usable = await create(
        stub, phone="+56981112222", rate_per_minute=30, jitter_ms=100, provider_config_json='{"seed": 7}'
    )
    other_account = await create(stub, account_id="acme", secret="acme-secret-0000")
    inactive = await create(stub, status="inactive")
    loaded = await senders.load_for_dispatch([usable.id, other_account.id, inactive.id, 999_999, usable.id])
    assert set(loaded) == {usable.id, other_account.id}  # not scoped to an account: internal
    cfg = loaded[usable.id]
    assert (cfg.id, cfg.account_id, cfg.provider, cfg.token, cfg.secret, cfg.phone) == (
        usable.id,
        "default",
        "simulated",
        "tok-1",
        SECRET,
        "+56981112222",
    )
    assert (cfg.rate_per_minute, cfg.jitter_ms, cfg.concurrency, cfg.config) == (30, 100, 4, {"seed": 7})
    assert loaded[other_account.id].secret == "acme-secret-0000"
    assert await senders.load_for_dispatch([]) == {}
    # A secret sealed under another key is left out (and logged), never sent garbled.
    rekeyed = Senders(SendersRepo(pool), SecretBox("rotated key"))
    assert await rekeyed.load_for_dispatch([usable.id]) == {}


def test_placeholder_secret_key_is_refused_outside_development() -> None:
    assert DispatcherSettings(database_url="postgresql://x/y").pregonero_secret_key.get_secret_value()
    with pytest.raises(ValueError, match="PREGONERO_SECRET_KEY"):
        DispatcherSettings(
            database_url="postgresql://x/y", nats_url="nats://dispatcher:s3cret@nats:4222", environment="production"
        )
    real = DispatcherSettings(
        database_url="postgresql://x/y",
        nats_url="nats://dispatcher:s3cret@nats:4222",
        environment="production",
        pregonero_secret_key="k" * 40,
        pregonero_demo=True,  # else the simulated voice line is refused (test_production_guards.py)
    )
    assert "k" * 40 not in repr(real)


async def test_marking_a_receiver_unmarks_the_previous_one(stub: Stub, pool: asyncpg.Pool) -> None:
    first = await create(stub, is_receiver=True)
    second = await create(stub, is_receiver=True)
    other_account = await create(stub, account_id="acme", is_receiver=True)
    assert not (await get(stub, first.id)).is_receiver and (await get(stub, second.id)).is_receiver
    assert (await update(stub, first.id, '{"is_receiver": true}')).is_receiver
    assert not (await get(stub, second.id)).is_receiver
    assert (await get(stub, other_account.id, ACME)).is_receiver  # another account keeps its own
    # Unmarking leaves none; the database refuses two receivers whatever the code does.
    assert not (await update(stub, first.id, '{"is_receiver": false}')).is_receiver
    await pool.execute("UPDATE senders SET is_receiver = true WHERE id = $1", first.id)
    with pytest.raises(asyncpg.UniqueViolationError):
        await pool.execute("UPDATE senders SET is_receiver = true WHERE id = $1", second.id)


async def test_concurrent_receiver_marks_leave_exactly_one(stub: Stub, pool: asyncpg.Pool) -> None:
    existing = [await create(stub) for _ in range(4)]
    for _ in range(3):
        await asyncio.gather(
            *(create(stub, is_receiver=True) for _ in range(4)),
            *(update(stub, s.id, '{"is_receiver": true}') for s in existing),
        )
        receivers = await pool.fetchval(
            "SELECT count(*) FROM senders WHERE account_id = 'default' AND is_receiver AND deleted_at IS NULL"
        )
        assert receivers == 1


async def test_reseal_moves_every_secret_onto_the_current_key(pool: asyncpg.Pool) -> None:
    legacy = Fernet(base64.urlsafe_b64encode(hashlib.sha256(KEY.encode()).digest())).encrypt(b"legacy")
    rotated = SecretBox("the new key", key_id="2", previous={"1": KEY})
    sealed = [legacy, SecretBox(KEY).encrypt("one"), SecretBox("lost", key_id="9").encrypt("x"), rotated.encrypt("two")]
    ids = [
        await pool.fetchval("INSERT INTO senders (account_id, secret_enc) VALUES ('acme', $1) RETURNING id", value)
        for value in sealed
    ]
    repo = SendersRepo(pool)
    done = await reseal(repo, rotated, page=2)
    assert (done.resealed, done.unreadable) == (2, [ids[2]])
    rows = {r["id"]: bytes(r["secret_enc"]) for r in await pool.fetch("SELECT id, secret_enc FROM senders")}
    only_new = SecretBox("the new key", key_id="2")
    assert [only_new.decrypt(rows[i]) for i in (ids[0], ids[1], ids[3])] == ["legacy", "one", "two"]
    assert rows[ids[2]] == sealed[2] and rows[ids[3]] == sealed[3]  # unreadable, or already current: untouched
    assert (await reseal(repo, rotated)).resealed == 0
    # A secret re-entered while it was being resealed stays as entered.
    assert not await repo.reseal_secret(sender_id=ids[2], sealed=b"1:stale", resealed=rotated.encrypt("x"))


async def test_the_reseal_command_takes_the_dispatchers_settings(pool: asyncpg.Pool, database: str) -> None:
    sender_id = await pool.fetchval(
        "INSERT INTO senders (account_id, secret_enc) VALUES ('acme', $1) RETURNING id", SecretBox(KEY).encrypt("one")
    )
    settings = DispatcherSettings(
        database_url=database,
        pregonero_secret_key="the new key",
        pregonero_secret_key_id="2",
        pregonero_previous_secret_keys=json.dumps({"1": KEY}),
    )
    assert (await reseal_stored(settings)).resealed == 1
    sealed = await pool.fetchval("SELECT secret_enc FROM senders WHERE id = $1", sender_id)
    assert SecretBox("the new key", key_id="2").decrypt(sealed) == "one"
