"""Device states on NATS when a WhatsApp sender is created, (de)activated or deleted (real
PostgreSQL and NATS), a device edit that stands when NATS is away, and the look-up of a
business number's senders that the inbound webhook uses."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import nats
import pytest
from pregonero.events.v1 import events_pb2

from services.dispatcher.crypto import SecretBox
from services.dispatcher.device_states import DeviceStates
from services.dispatcher.repo import SendersRepo
from services.dispatcher.senders import Senders
from services.runtime.devstack import Stack
from services.runtime.errors import InvalidArgument
from services.runtime.identity import ADMIN, MEMBER, Caller
from tests.conftest import bus_client, collected, service_pool

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
async def pool(infra: Stack) -> AsyncIterator[asyncpg.Pool]:
    pool = await service_pool(infra.database_url, "dispatcher")
    try:
        yield pool
    finally:
        await pool.close()


def member() -> Caller:
    # An account of the test's own: the shared database keeps other tests' senders.
    return Caller(role=MEMBER, account_id=f"ds-{uuid.uuid4().hex[:10]}", user_id="u1")


async def test_state_changes_are_published_and_other_edits_are_not(infra: Stack, pool: asyncpg.Pool) -> None:
    nc, js = await bus_client(infra.nats_url)
    senders = Senders(SendersRepo(pool), SecretBox("k"), DeviceStates(js))
    caller = member()
    try:
        async with collected(nc, f"events.device.{caller.account_id}", events_pb2.DeviceEvent.FromString) as seen:
            row = await senders.create(caller, token="t", secret="secret-1")
            await senders.update(caller, row["id"], '{"device_name": "Ventas"}')
            await senders.update(caller, row["id"], '{"status": "inactive"}')
            await senders.update(caller, row["id"], '{"status": "inactive"}')
            await senders.update(caller, row["id"], '{"status": "active"}')
            await senders.delete(caller, row["id"])
            await senders.create(caller, token="t", secret="secret-1", channel="voice")  # not a device
            await nc.flush()
        assert [(e.status, e.reason) for e in seen] == [
            ("connected", "created"),
            ("disconnected", "deactivated"),
            ("connected", "activated"),
            ("disconnected", "deleted"),
        ]
        assert {(e.account_id, e.sender_id) for e in seen} == {(caller.account_id, row["id"])}
        assert all(e.at.seconds > 0 and not e.qr_code for e in seen)
    finally:
        await nc.close()


async def test_an_edit_stands_when_its_state_cannot_be_published(infra: Stack, pool: asyncpg.Pool) -> None:
    nc = await nats.connect(infra.nats_url)
    js = nc.jetstream()
    await nc.close()  # every publish now fails
    senders = Senders(SendersRepo(pool), SecretBox("k"), DeviceStates(js))
    caller = member()
    row = await senders.create(caller, token="t", secret="secret-1", status="inactive")
    assert (await senders.update(caller, row["id"], '{"status": "active"}'))["status"] == "active"
    await senders.delete(caller, row["id"])


async def test_a_business_numbers_senders_by_account(pool: asyncpg.Pool) -> None:
    senders = Senders(SendersRepo(pool), SecretBox("k"))
    acme, other = member(), member()
    number = str(uuid.uuid4().int % 10**15)
    config = f'{{"phone_number_id": "{number}"}}'
    mine = await senders.create(acme, token="t", secret="s", provider="whatsapp_cloud", provider_config_json=config)
    theirs = await senders.create(other, token="t", secret="s", provider="whatsapp_cloud", provider_config_json=config)
    gone = await senders.create(acme, token="t", secret="s", provider="whatsapp_cloud", provider_config_json=config)
    await senders.delete(acme, gone["id"])

    def ids(rows: list[asyncpg.Record]) -> list[int]:
        return [r["id"] for r in rows]

    find = senders.find_by_number
    assert ids(await find(acme, provider="whatsapp_cloud", phone_number_id=number)) == [mine["id"]]
    everyone = Caller(role=ADMIN, account_id="", user_id="whatsapp-webhook")
    assert ids(await find(everyone, provider="whatsapp_cloud", phone_number_id=number)) == [mine["id"], theirs["id"]]
    assert await find(everyone, provider="whatsapp_cloud", phone_number_id="1" + number) == []
    for provider, number_id in (("simulated", number), ("whatsapp_cloud", "12a"), ("whatsapp_cloud", "")):
        with pytest.raises(InvalidArgument):
            await find(everyone, provider=provider, phone_number_id=number_id)
