"""The dispatch engine sending through `wablas` devices, over HTTP to the local Wablas server
(real PostgreSQL and NATS): a job over two devices reaches every recipient once with Wablas's
message ids in the results (and kept for its status callbacks), and after a dispatcher died
with sends at Wablas, those Wablas has are resolved from its report (by the ref_id we sent)
and only the others are sent again."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pregonero.events.v1 import events_pb2

from services.dispatcher import wablas_messages
from services.dispatcher.crypto import SecretBox
from services.dispatcher.engine import Engine, SenderCache
from services.dispatcher.providers.wablas import WablasProvider
from services.dispatcher.repo import AttemptsRepo, ProviderMessagesRepo, SendersRepo
from services.dispatcher.runstate import RunStates
from services.dispatcher.senders import Senders
from services.runtime import bus
from services.runtime.bus import BATCH_STATE_BUCKET
from services.runtime.errors import InvalidArgument, PermissionDenied
from services.runtime.identity import ADMIN, MEMBER, Caller
from tests.conftest import bus_client, collected, service_pool
from tests.dispatcher.fake_wablas import SECRET, TOKEN, FakeWablas
from tests.http_server import running

pytestmark = pytest.mark.timeout(30)

ADMIN_CALLER = Caller(role=ADMIN, account_id="", user_id="wablas-engine-test")


async def until(what: str, probe: Callable[[], Any], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if probe():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not reached in {within}s")


@pytest.fixture
async def stack(fresh_db: str, own_nats: str) -> AsyncIterator[dict[str, Any]]:
    pool = await service_pool(fresh_db, "dispatcher")
    nc, js = await bus_client(own_nats)
    async with running(FakeWablas()) as fake:
        provider = WablasProvider(base_url=fake.url, timeout_s=2.0, messages=ProviderMessagesRepo(pool))
        senders = Senders(SendersRepo(pool), SecretBox("wablas-engine-key"))
        tasks: list[tuple[Engine, asyncio.Task[None]]] = []

        async def start() -> None:
            engine = Engine(
                js=js,
                attempts=AttemptsRepo(pool),
                senders=SenderCache(senders.load_for_dispatch),
                providers={"wablas": provider},
                runstates=RunStates(await js.key_value(BATCH_STATE_BUCKET)),
                ack_wait=2.0,
                send_grace=1.0,
            )
            tasks.append((engine, asyncio.create_task(engine.run())))

        try:
            async with collected(nc, "events.job.>", events_pb2.ResultChunk.FromString) as results:
                yield {"pool": pool, "js": js, "fake": fake, "senders": senders, "start": start, "results": results}
        finally:
            for engine, task in tasks:
                engine.stopping = True
                task.cancel()
                for worker in list(engine.tasks):
                    worker.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await provider.close()
            await nc.close()
            await pool.close()


async def device(stack: dict[str, Any], token: str, secret: str) -> int:
    row = await stack["senders"].create(
        ADMIN_CALLER,
        token=token,
        secret=secret,
        account_id="acc-1",
        provider="wablas",
        concurrency=2,
        rate_per_minute=0,
    )
    return int(row["id"])


async def release(stack: dict[str, Any], batch_id: str, sender_ids: list[int], n: int) -> list[str]:
    items = [
        events_pb2.WorkItem(job_id=j, attempt_no=1, attempt_id=f"{batch_id}:{j}:1", to=f"+5691000{j:04d}", text="Hola")
        for j in range(1, n + 1)
    ]
    chunk = events_pb2.DispatchChunk(
        batch_id=batch_id, account_id="acc-1", channel="whatsapp", chunk_seq=1, sender_ids=sender_ids, items=items
    )
    await bus.publish(stack["js"], "dispatch.whatsapp.acc-1", chunk, msg_id=f"{batch_id}:1")
    return [i.attempt_id for i in items]


def outcomes(stack: dict[str, Any]) -> dict[str, events_pb2.JobOutcome]:
    return {o.attempt_id: o for chunk in stack["results"] for o in chunk.outcomes}


async def test_a_job_over_two_wablas_devices_reaches_everyone_once(stack: dict[str, Any]) -> None:
    fake: FakeWablas = stack["fake"]
    fake.add_device("second-device-token", "other-secret")
    a = await device(stack, TOKEN, SECRET)
    b = await device(stack, "second-device-token", "other-secret")
    await stack["start"]()
    ids = await release(stack, str(uuid.uuid4()), [a, b], 20)
    await until("every recipient has an outcome", lambda: len(outcomes(stack)) == 20)
    done = outcomes(stack)
    assert {o.status for o in done.values()} == {"sent"}
    assert sorted(m["ref_id"] for m in fake.accepted) == sorted(ids)  # each once
    assert {m["device"] for m in fake.accepted} == {TOKEN, "second-device-token"}
    wablas_ids = {m["ref_id"]: m["id"] for m in fake.accepted}
    assert {a: o.provider_message_id for a, o in done.items()} == wablas_ids
    # Kept for the status callbacks, which name only Wablas's id.
    kept = await stack["pool"].fetch("SELECT message_id, attempt_id, sender_id FROM provider_messages")
    assert {r["attempt_id"]: r["message_id"] for r in kept} == wablas_ids
    assert {r["sender_id"] for r in kept} == {a, b}
    # What the webhook asks: a device's messages by Wablas's id, only that device's.
    messages = ProviderMessagesRepo(stack["pool"])
    of_a = {m["id"]: m["ref_id"] for m in fake.accepted if m["device"] == TOKEN}
    webhook = Caller(role=ADMIN, account_id="", user_id="wablas-webhook")
    assert (
        await wablas_messages.attempts(messages, webhook, session=str(a), message_ids=sorted(wablas_ids.values()))
        == of_a
    )
    with pytest.raises(PermissionDenied):
        await wablas_messages.attempts(
            messages, Caller(role=MEMBER, account_id="acc-1", user_id="u"), session=str(a), message_ids=[]
        )
    with pytest.raises(InvalidArgument, match="session"):
        await wablas_messages.attempts(messages, webhook, session="A5DOYJ", message_ids=["x"])


async def test_a_device_whose_quota_runs_out_mid_job_hands_its_recipients_to_the_other(stack: dict[str, Any]) -> None:
    fake: FakeWablas = stack["fake"]
    fake.device().quota = 5  # Wablas refuses its sixth: "quota is not enough"
    fake.add_device("second-device-token", "other-secret")
    a = await device(stack, TOKEN, SECRET)
    b = await device(stack, "second-device-token", "other-secret")
    await stack["start"]()
    ids = await release(stack, str(uuid.uuid4()), [a, b], 30)
    await until("every recipient has an outcome", lambda: len(outcomes(stack)) == 30)
    done = outcomes(stack)
    assert {o.status for o in done.values()} == {"sent"}  # none failed for the device's quota
    assert sorted(m["ref_id"] for m in fake.accepted) == sorted(ids)  # each once
    assert [m["device"] for m in fake.accepted].count(TOKEN) == 5
    assert {o.sender_id for o in done.values()} == {a, b}


async def test_a_lone_device_out_of_quota_hands_the_rest_back_to_wait(stack: dict[str, Any]) -> None:
    fake: FakeWablas = stack["fake"]
    fake.device().quota = 3
    a = await device(stack, TOKEN, SECRET)
    await stack["start"]()
    await release(stack, str(uuid.uuid4()), [a], 10)
    await until("every recipient has an outcome", lambda: len(outcomes(stack)) == 10)
    done = outcomes(stack)
    assert sorted(o.status for o in done.values()) == ["requeue"] * 7 + ["sent"] * 3
    assert {o.error for o in done.values() if o.status == "requeue"} == {bus.NO_CONNECTED_SENDER}
    assert len(fake.accepted) == 3
    # Nothing of the refused ones is left on record: released again, they are sent.
    assert await stack["pool"].fetchval("SELECT count(*) FROM attempts") == 3


async def test_sends_a_dead_dispatcher_left_at_wablas_are_looked_up_not_sent_again(stack: dict[str, Any]) -> None:
    fake: FakeWablas = stack["fake"]
    sender = await device(stack, TOKEN, SECRET)
    batch_id = str(uuid.uuid4())
    ids = [f"{batch_id}:{j}:1" for j in range(1, 5)]
    # The dead process claimed 1 and 2 a minute ago; Wablas had queued 1 (its reply was lost).
    await stack["pool"].execute(
        "INSERT INTO attempts (attempt_id, batch_id, job_id, sender_id, created_at)"
        " VALUES ($1, $3, 1, $4, now() - interval '1 minute'), ($2, $3, 2, $4, now() - interval '1 minute')",
        ids[0],
        ids[1],
        uuid.UUID(batch_id),
        sender,
    )
    fake.accepted.append(
        {
            "id": "wablas-msg-1",
            "phone": "56910000001",
            "message": "Hola",
            "status": "pending",
            "ref_id": ids[0],
            "device": TOKEN,
        }
    )
    await stack["start"]()
    await release(stack, batch_id, [sender], 4)
    await until("every recipient has an outcome", lambda: len(outcomes(stack)) == 4)
    done = outcomes(stack)
    assert {o.status for o in done.values()} == {"sent"}
    assert done[ids[0]].provider_message_id == "wablas-msg-1"
    assert sorted(m["ref_id"] for m in fake.accepted) == sorted(ids)  # 1 was not sent again
