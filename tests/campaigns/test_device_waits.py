"""A bulk send whose devices stop being able to send, end to end through campaigns and the
send engine on real PostgreSQL and NATS: the feeder, the results applier and the device-events
consumer of campaigns, the dispatcher's engine with a provider whose record the test reads.

When none of the batch's devices can send (disconnected, waiting for a QR scan), its
recipients are handed back unsent and the batch is suspended with the reason, not failed;
when one of its devices connects again it resumes and completes, every recipient reaching
the provider exactly once. Accounts is the feeder tests' in-memory ledger."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from services.campaigns.batch_publisher import Notifier
from services.campaigns.batches import Batches
from services.campaigns.device_events import DeviceEvents
from services.campaigns.feeder import Feeder
from services.campaigns.repo import NO_CONNECTED_DEVICES, CampaignsRepo
from services.campaigns.results_applier import ResultsApplier
from services.dispatcher.crypto import SecretBox
from services.dispatcher.device_states import DeviceStates
from services.dispatcher.engine import Engine, SenderCache
from services.dispatcher.providers.base import SendRequest, SendResult
from services.dispatcher.repo import AttemptsRepo, SendersRepo
from services.dispatcher.runstate import RunStates
from services.dispatcher.senders import Senders
from services.runtime.bus import BATCH_STATE_BUCKET
from services.runtime.identity import ADMIN, Caller
from tests.campaigns.test_feeder import FakeAccounts
from tests.conftest import bus_client, service_pool
from tests.dispatcher.test_engine import HeldProvider

ACCOUNT = "acc-1"
ADMIN_CALLER = Caller(role=ADMIN, account_id=ACCOUNT, user_id="operator")


@dataclass
class Stack:
    campaigns: asyncpg.Pool
    dispatcher: asyncpg.Pool
    nc: NATS
    js: JetStreamContext
    provider: HeldProvider
    senders: Senders
    engine: Engine
    repo: CampaignsRepo
    devices: DeviceEvents
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    async def device(self, token: str) -> int:
        row = await self.senders.create(
            ADMIN_CALLER, token=token, secret="s3cret", account_id=ACCOUNT, concurrency=2, rate_per_minute=0
        )
        return int(row["id"])

    async def batch(self, sender_ids: list[int], n: int) -> UUID:
        async with self.campaigns.acquire() as conn, conn.transaction():
            batch = await self.repo.insert_batch(
                conn,
                account_id=ACCOUNT,
                channel="whatsapp",
                name="device waits",
                template="Hola @valor1",
                devices_limit=len(sender_ids),
                sender_ids=sender_ids,
                window_size=20,
                file_name="",
            )
            batch_id: UUID = batch["batch_id"]
            records = [(batch_id, i, f"+5691{i:07d}", [str(i)]) for i in range(1, n + 1)]
            await self.repo.copy_jobs(conn, records=records)
            await self.repo.finish_ingest(conn, batch_id=batch_id, total=n, invalid=0, duplicates=0)
        return batch_id

    async def row(self, batch_id: UUID) -> asyncpg.Record:
        return await self.campaigns.fetchrow("SELECT * FROM batches WHERE batch_id = $1", batch_id)


async def until(what: str, probe: Any, within: float = 20.0) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = await probe()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not reached in {within}s")


@pytest.fixture
async def stack(fresh_db: str, own_nats: str) -> AsyncIterator[Stack]:
    campaigns = await service_pool(fresh_db, "campaigns")
    dispatcher = await service_pool(fresh_db, "dispatcher")
    nc, js = await bus_client(own_nats)
    kv = await js.key_value(BATCH_STATE_BUCKET)
    senders = Senders(SendersRepo(dispatcher), SecretBox("device-waits-key"))
    provider = HeldProvider()
    runstates = RunStates(kv)
    engine = Engine(
        js=js,
        attempts=AttemptsRepo(dispatcher),
        senders=SenderCache(senders.load_for_dispatch),
        providers={"simulated": provider},  # type: ignore[dict-item]
        runstates=runstates,
        ack_wait=2.0,
    )
    repo = CampaignsRepo(campaigns)
    notifier = Notifier(nc, js, kv)
    batches = Batches(repo, notifier)
    feeder = Feeder(repo, js, notifier, FakeAccounts(), batches, idle_wait=0.05)  # type: ignore[arg-type]
    results = ResultsApplier(repo, js, notifier, batches, None, on_applied=feeder.wake, on_call_ended=lambda: None)  # type: ignore[arg-type]
    devices = DeviceEvents(repo, batches, js, wake=feeder.wake)
    s = Stack(campaigns, dispatcher, nc, js, provider, senders, engine, repo, devices)
    for coro in (runstates.run(), engine.run(), feeder.run(), results.run(), devices.run()):
        s.tasks.append(asyncio.create_task(coro))
    try:
        yield s
    finally:
        provider.gate.set()
        engine.stopping = True
        for task in [*s.tasks, *engine.tasks]:
            task.cancel()
        for task in s.tasks:
            with contextlib.suppress(BaseException):
                await task
        await nc.close()
        await campaigns.close()
        await dispatcher.close()


async def test_a_batch_whose_devices_all_disconnect_waits_suspended_and_completes_once_one_connects(
    stack: Stack,
) -> None:
    a = await stack.device("a")
    b = await stack.device("b")
    gone: dict[int, int] = {}  # device → provider sends when it went away

    def disconnect(request: SendRequest) -> SendResult | None:
        # a goes away after 15 sends, b after 30: nothing is left that can send.
        for device, at in ((a, 15), (b, 30)):
            if len(stack.provider.sent) >= at and device not in gone:
                gone[device] = len(stack.provider.sent)
                stack.engine.sender_unavailable(device, "qr_needed")
        return None

    stack.provider.answer = disconnect
    batch_id = await stack.batch([a, b], 100)

    async def suspended() -> asyncpg.Record | None:
        row = await stack.row(batch_id)
        return row if row["status"] == "suspended" and row["queued_jobs"] == 0 else None

    row = await until("the batch waits, suspended", suspended)
    assert row["suspension_reason"] == NO_CONNECTED_DEVICES
    assert row["failed_jobs"] == 0 and row["error"] in ("", None)
    sent_while_away = len(stack.provider.sent)
    assert 30 <= sent_while_away < 100
    # Nothing went out through a device after it went away but the sends already at the
    # provider (one per worker).
    for device, at in gone.items():
        assert [s for _, s, _ in stack.provider.sent[at:]].count(device) <= 2
    await asyncio.sleep(0.5)
    assert len(stack.provider.sent) == sent_while_away, "a suspended batch went on sending"
    assert (await stack.row(batch_id))["status"] == "suspended"

    # b connects again: the connections watcher tells the engine and publishes the event.
    stack.engine.sender_available(b)
    await DeviceStates(stack.js).publish(account_id=ACCOUNT, sender_id=b, state="connected", reason="WORKING")

    async def completed() -> asyncpg.Record | None:
        row = await stack.row(batch_id)
        return row if row["status"] == "completed" else None

    row = await until("the batch completes", completed)
    assert (row["sent_jobs"], row["failed_jobs"], row["unknown_jobs"]) == (100, 0, 0)
    assert row["suspension_reason"] == ""
    sent = stack.provider.attempts()
    assert len(sent) == len(set(sent)) == 100, "a recipient reached the provider twice, or never"
    statuses = await stack.campaigns.fetch("SELECT status, count(*) FROM jobs WHERE batch_id = $1 GROUP BY 1", batch_id)
    assert {r["status"]: r["count"] for r in statuses} == {"sent": 100}
    # After the reconnection only b sends.
    assert {s for _, s, _ in stack.provider.sent[sent_while_away:]} == {b}


async def test_a_batch_resumes_only_for_a_device_of_its_own(stack: Stack) -> None:
    a = await stack.device("a")
    other = await stack.device("other")
    stack.engine.sender_unavailable(a, "disconnected")
    batch_id = await stack.batch([a], 10)

    async def suspended() -> bool:
        row = await stack.row(batch_id)
        return row["status"] == "suspended" and row["queued_jobs"] == 0

    await until("the batch waits, suspended", suspended)
    assert stack.provider.sent == []
    # Another device of the account connecting does not wake it.
    await DeviceStates(stack.js).publish(account_id=ACCOUNT, sender_id=other, state="connected")
    await asyncio.sleep(0.5)
    assert (await stack.row(batch_id))["status"] == "suspended"
    stack.engine.sender_available(a)
    await DeviceStates(stack.js).publish(account_id=ACCOUNT, sender_id=a, state="connected")

    async def completed() -> bool:
        return (await stack.row(batch_id))["status"] == "completed"

    await until("the batch completes", completed)
    assert sorted(stack.provider.attempts()) == sorted(f"{batch_id}:{j}:1" for j in range(1, 11))


async def test_a_batch_whose_device_event_was_lost_is_tried_again_after_a_while(stack: Stack) -> None:
    a = await stack.device("a")
    stack.engine.sender_unavailable(a, "disconnected")
    batch_id = await stack.batch([a], 10)

    async def suspended() -> bool:
        row = await stack.row(batch_id)
        return row["status"] == "suspended" and row["queued_jobs"] == 0

    await until("the batch waits, suspended", suspended)
    # Not waiting long yet: left alone.
    assert await stack.devices.retry_waiting() == 0
    # Its device came back, but the event never arrived (device events are best effort).
    stack.engine.sender_available(a)
    await stack.campaigns.execute(
        "UPDATE batches SET updated_at = now() - interval '10 minutes' WHERE batch_id = $1", batch_id
    )
    assert await stack.devices.retry_waiting() == 1

    async def completed() -> bool:
        return (await stack.row(batch_id))["status"] == "completed"

    await until("the batch completes", completed)
    assert sorted(stack.provider.attempts()) == sorted(f"{batch_id}:{j}:1" for j in range(1, 11))
