"""The WhatsApp send engine on real PostgreSQL and NATS JetStream, with a provider whose
answers the test holds back: devices edited, disabled and deleted while they send, a flush
that fails, a send whose outcome is unknown, a stop in the middle of a send, claims left by
a dead process, and two copies of the same work. In every case each recipient reaches the
provider at most once and the chunk ends acked or handed back, never stuck."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from pregonero.events.v1 import events_pb2

from services.dispatcher.crypto import SecretBox
from services.dispatcher.engine import Engine, SenderCache
from services.dispatcher.providers.base import SenderConfig, SendRequest, SendResult
from services.dispatcher.repo import AttemptsRepo, SendersRepo
from services.dispatcher.runstate import RunStates
from services.dispatcher.senders import Senders
from services.runtime import bus
from services.runtime.bus import BATCH_STATE_BUCKET, DISPATCH_STREAM
from services.runtime.identity import ADMIN, Caller
from tests.conftest import bus_client, collected, service_pool

ADMIN_CALLER = Caller(role=ADMIN, account_id="acc-1", user_id="operator")


@dataclass
class HeldProvider:
    """Sends wait at `gate`; `sent` is the provider's own record, in arrival order."""

    name: str = "simulated"
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    sent: list[tuple[str, int, str]] = field(default_factory=list)  # (attempt, sender, token)
    entered: int = 0
    answer: Callable[[SendRequest], SendResult | None] = lambda request: None
    # The n-th send waits at `held` (0: none does), the others only at `gate`.
    hold_at: int = 0
    held: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.gate.set()

    async def send(self, request: SendRequest) -> SendResult:
        self.entered += 1
        if self.entered == self.hold_at:
            await self.held.wait()
        await self.gate.wait()
        special = self.answer(request)
        if special is not None:
            return special
        self.sent.append((request.attempt_id, request.sender.id, request.sender.token))
        return SendResult(status="sent", provider_message_id=f"m-{request.attempt_id}")

    async def lookup(self, attempt_id: str, sender: SenderConfig) -> SendResult | None:
        if any(a == attempt_id for a, _, _ in self.sent):
            return SendResult(status="sent", provider_message_id=f"m-{attempt_id}")
        return None

    async def close(self) -> None:
        return None

    def attempts(self) -> list[str]:
        return [a for a, _, _ in self.sent]


class FlakyAttempts(AttemptsRepo):
    """Recording outcomes fails while `failing` is set."""

    failing = False
    failures = 0

    async def finish(self, *, batch_id: str, rows: Any) -> None:
        if self.failing:
            self.failures += 1
            raise asyncpg.CannotConnectNowError("the database system is starting up")
        await super().finish(batch_id=batch_id, rows=rows)


@dataclass
class Env:
    pool: asyncpg.Pool
    nc: NATS
    js: JetStreamContext
    results: list[events_pb2.ResultChunk]
    provider: HeldProvider
    senders: Senders
    engines: list[tuple[Engine, asyncio.Task[None]]] = field(default_factory=list)

    def outcomes(self) -> dict[str, str]:
        """The last reported status of each attempt."""
        return {o.attempt_id: o.status for chunk in self.results for o in chunk.outcomes}

    async def engine(self, *, attempts: AttemptsRepo | None = None, send_grace: float = 30.0) -> Engine:
        runstates = RunStates(await self.js.key_value(BATCH_STATE_BUCKET))
        engine = Engine(
            js=self.js,
            attempts=attempts or AttemptsRepo(self.pool),
            senders=SenderCache(self.senders.load_for_dispatch),
            providers={"simulated": self.provider},  # type: ignore[dict-item]
            runstates=runstates,
            ack_wait=2.0,
            send_grace=send_grace,
        )
        self.engines.append((engine, asyncio.create_task(engine.run())))
        return engine

    async def device(self, **fields: Any) -> int:
        row = await self.senders.create(
            ADMIN_CALLER, token=fields.pop("token", "tok"), secret="s3cret", account_id="acc-1", **fields
        )
        return int(row["id"])

    async def release(self, batch_id: str, sender_ids: list[int], n: int, *, seq: int = 1) -> list[str]:
        items = [
            events_pb2.WorkItem(
                job_id=j, attempt_no=1, attempt_id=f"{batch_id}:{j}:1", to=f"+5691000{j:04d}", text="Hola"
            )
            for j in range(1, n + 1)
        ]
        chunk = events_pb2.DispatchChunk(
            batch_id=batch_id, account_id="acc-1", channel="whatsapp", chunk_seq=seq, sender_ids=sender_ids, items=items
        )
        await bus.publish(self.js, "dispatch.whatsapp.acc-1", chunk, msg_id=f"{batch_id}:{seq}")
        return [i.attempt_id for i in items]

    async def waiting_chunks(self) -> int:
        return (await self.js.stream_info(DISPATCH_STREAM)).state.messages


async def until(what: str, probe: Callable[[], Any], within: float = 30.0) -> Any:
    """The first truthy answer of `probe` (bounds generous for a loaded machine)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what}: not reached in {within}s")


@pytest.fixture
async def env(fresh_db: str, own_nats: str) -> AsyncIterator[Env]:
    pool = await service_pool(fresh_db, "dispatcher")
    nc, js = await bus_client(own_nats)
    senders = Senders(SendersRepo(pool), SecretBox("engine-test-key"))
    try:
        async with collected(nc, "events.job.>", events_pb2.ResultChunk.FromString) as results:
            e = Env(pool, nc, js, results, HeldProvider(), senders)
            try:
                yield e
            finally:
                e.provider.gate.set()
                for engine, task in e.engines:
                    engine.stopping = True
                    task.cancel()
                    for worker in list(engine.tasks):
                        worker.cancel()
                    with contextlib.suppress(BaseException):
                        await task
    finally:
        await nc.close()
        await pool.close()


def assert_each_once(env: Env, attempt_ids: list[str]) -> None:
    sent = env.provider.attempts()
    assert len(sent) == len(set(sent)), "a recipient reached the provider twice"
    assert set(sent) <= set(attempt_ids)


async def test_device_edited_mid_send_keeps_the_send_in_flight_and_moves_the_queue(env: Env) -> None:
    device = await env.device(token="old", concurrency=1, rate_per_minute=0)
    engine = await env.engine()
    env.provider.gate.clear()
    ids = await env.release(str(uuid.uuid4()), [device], 6)
    await until("the first send is at the provider", lambda: env.provider.entered == 1)
    await env.senders.update(ADMIN_CALLER, device, '{"token": "new"}')
    env.provider.gate.set()
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 6)
    assert set(env.outcomes().values()) == {"sent"}
    assert_each_once(env, ids)
    tokens = [t for _, _, t in env.provider.sent]
    # The send that was out when the edit came is not taken back; the rest go with the edit.
    assert tokens == ["old"] + ["new"] * 5
    await until("the chunk is acked", lambda: _acked(env))
    assert engine.in_flight == 0


async def _acked(env: Env) -> bool:
    return await env.waiting_chunks() == 0


async def test_a_disabled_device_sends_nothing_once_the_api_has_answered(env: Env) -> None:
    a = await env.device(token="a", concurrency=1, rate_per_minute=0)
    b = await env.device(token="b", concurrency=1, rate_per_minute=0)
    await env.engine()
    env.provider.gate.clear()
    ids = await env.release(str(uuid.uuid4()), [a, b], 20)
    await until("both devices have a send at the provider", lambda: env.provider.entered == 2)
    await env.senders.update(ADMIN_CALLER, b, '{"status": "inactive"}')
    answered_at = len(env.provider.sent)
    env.provider.gate.set()
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 20)
    assert set(env.outcomes().values()) == {"sent"}
    assert_each_once(env, ids)
    assert len(env.provider.sent) == 20
    after = [s for _, s, _ in env.provider.sent[answered_at:]]
    # The one send already out through b finishes; nothing else goes through b.
    assert after.count(b) <= 1
    assert after.count(b) == 0 or after.index(b) < 2
    await until("the chunk is acked", lambda: _acked(env))


async def test_deleting_the_only_device_fails_what_it_had_not_sent(env: Env) -> None:
    device = await env.device(concurrency=1, rate_per_minute=0)
    await env.engine()
    env.provider.gate.clear()
    ids = await env.release(str(uuid.uuid4()), [device], 5)
    await until("the first send is at the provider", lambda: env.provider.entered == 1)
    await env.senders.delete(ADMIN_CALLER, device)
    env.provider.gate.set()
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 5)
    outcomes = env.outcomes()
    assert outcomes[ids[0]] == "sent"
    assert [outcomes[i] for i in ids[1:]] == ["failed"] * 4
    assert env.provider.attempts() == ids[:1]
    failed = {o.error for c in env.results for o in c.outcomes if o.status == "failed"}
    assert failed == {"no active device for this job"}
    await until("the chunk is acked", lambda: _acked(env))


async def test_a_chunk_whose_flush_fails_stops_sending_and_its_redelivery_sends_the_rest_once(env: Env) -> None:
    device = await env.device(concurrency=1, rate_per_minute=0)
    attempts = FlakyAttempts(env.pool)
    attempts.failing = True
    engine = await env.engine(attempts=attempts)
    # Let three through, hold the fourth at the provider until the flush has failed.
    env.provider.hold_at = 4
    held = env.provider.held
    ids = await env.release(str(uuid.uuid4()), [device], 10)
    await until("a flush has failed", lambda: attempts.failures > 0 and env.provider.entered == 4)
    held.set()
    broken = await until(
        "the broken chunk has set its unsent items aside",
        lambda: [c for c in engine.chunks if c.broken and c.dropped == 6],
    )
    assert broken
    assert len(env.provider.sent) == 4, "a broken chunk went on sending"
    attempts.failing = False
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 10)
    await until("all ten reached the provider", lambda: len(env.provider.sent) == 10)
    assert set(env.outcomes().values()) == {"sent"}
    assert_each_once(env, ids)
    await until("the redelivered chunk is acked", lambda: _acked(env))


async def test_an_unknown_outcome_is_reported_and_never_sent_again(env: Env) -> None:
    device = await env.device(concurrency=2, rate_per_minute=0)
    await env.engine()
    env.provider.answer = lambda r: SendResult(status="unknown", error="ReadTimeout") if r.to.endswith("0002") else None
    batch_id = str(uuid.uuid4())
    ids = await env.release(batch_id, [device], 3)
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 3)
    assert env.outcomes()[ids[1]] == "unknown"
    assert await env.pool.fetchval("SELECT status FROM attempts WHERE attempt_id = $1", ids[1]) == "unknown"
    await until("the chunk is acked", lambda: _acked(env))
    # The same work again (a job released twice): answered from the record, nothing sent.
    entered = env.provider.entered
    env.results.clear()
    await env.release(batch_id, [device], 3, seq=2)
    await until("the copy is answered", lambda: len(env.outcomes()) == 3)
    assert env.outcomes()[ids[1]] == "unknown"
    assert env.provider.entered == entered


async def test_a_stop_lets_the_send_in_flight_finish_and_hands_the_rest_over(env: Env) -> None:
    device = await env.device(concurrency=1, rate_per_minute=0)
    first = await env.engine()
    env.provider.gate.clear()
    ids = await env.release(str(uuid.uuid4()), [device], 5)
    await until("the first send is at the provider", lambda: env.provider.entered == 1)
    drain = asyncio.create_task(first.drain())
    await asyncio.sleep(0)
    assert not drain.done(), "the stop did not wait for the send at the provider"
    env.provider.gate.set()
    await asyncio.wait_for(drain, 10)
    assert env.outcomes() == {ids[0]: "sent"}
    assert await env.waiting_chunks() == 1, "the unfinished chunk was acked"
    await env.engine()
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 5)
    assert set(env.outcomes().values()) == {"sent"}
    assert_each_once(env, ids)
    assert len(env.provider.sent) == 5
    await until("the chunk is acked", lambda: _acked(env))


async def test_claims_left_by_a_dead_process_are_looked_up_before_anything_is_sent(env: Env) -> None:
    device = await env.device(concurrency=2, rate_per_minute=0)
    batch_id = str(uuid.uuid4())
    ids = [f"{batch_id}:{j}:1" for j in range(1, 5)]
    # The dead process claimed 1 and 2 a minute ago; the provider had got 1.
    await env.pool.execute(
        "INSERT INTO attempts (attempt_id, batch_id, job_id, sender_id, created_at)"
        " VALUES ($1, $3, 1, $4, now() - interval '1 minute'), ($2, $3, 2, $4, now() - interval '1 minute')",
        ids[0],
        ids[1],
        uuid.UUID(batch_id),
        device,
    )
    env.provider.sent.append((ids[0], device, "tok"))
    await env.engine()
    await env.release(batch_id, [device], 4)
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 4)
    assert set(env.outcomes().values()) == {"sent"}
    assert_each_once(env, ids)
    assert sorted(env.provider.attempts()) == sorted(ids)
    assert await env.pool.fetchval("SELECT count(*) FROM attempts WHERE status = 'sent'") == 4


async def test_two_copies_of_the_same_work_send_each_recipient_once(env: Env) -> None:
    device = await env.device(concurrency=4, rate_per_minute=0)
    await env.engine(send_grace=2.0)
    await env.engine(send_grace=2.0)
    batch_id = str(uuid.uuid4())
    ids = await env.release(batch_id, [device], 200, seq=1)
    await env.release(batch_id, [device], 200, seq=2)
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 200)
    await until("both copies are acked", lambda: _acked(env))
    assert set(env.outcomes().values()) == {"sent"}
    assert_each_once(env, ids)
    assert len(env.provider.sent) == 200


async def test_an_undecodable_chunk_is_dead_lettered_and_the_rest_goes_out(env: Env) -> None:
    device = await env.device(concurrency=2, rate_per_minute=0)
    await env.engine()
    await env.js.publish("dispatch.whatsapp.acc-1", b"\xff not a chunk", headers={"Nats-Msg-Id": "garbage-1"})
    ids = await env.release(str(uuid.uuid4()), [device], 3)
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 3)
    await until("nothing is left in DISPATCH", lambda: _acked(env))
    letters = await bus.list_dead_letters(env.js)
    assert [(d.subject, d.consumer) for d in letters] == [("dispatch.whatsapp.acc-1", "dispatch-whatsapp")]
    assert_each_once(env, ids)


class SlowAttempts(AttemptsRepo):
    """Recording outcomes waits at `gate`: a flush stays in the middle as long as the test likes."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.gate = asyncio.Event()
        self.calls = 0

    async def finish(self, *, batch_id: str, rows: Any) -> None:
        self.calls += 1
        await self.gate.wait()
        await super().finish(batch_id=batch_id, rows=rows)


async def test_the_last_outcome_arriving_during_a_flush_is_published_before_the_ack(env: Env) -> None:
    device = await env.device(concurrency=1, rate_per_minute=0)
    attempts = SlowAttempts(env.pool)
    engine = await env.engine(attempts=attempts)
    env.provider.hold_at = 2
    held = env.provider.held
    ids = await env.release(str(uuid.uuid4()), [device], 2)
    await until("the first outcome is being flushed", lambda: attempts.calls == 1 and env.provider.entered == 2)
    held.set()  # the last outcome comes while the flush is at the database
    await until("the last recipient is resolved", lambda: all(c.remaining == 0 for c in engine.chunks))
    attempts.gate.set()
    await until("the chunk is acked", lambda: _acked(env))
    await until("both outcomes are published", lambda: len(env.outcomes()) == 2)
    assert env.outcomes() == {ids[0]: "sent", ids[1]: "sent"}
    assert await env.pool.fetchval("SELECT count(*) FROM attempts WHERE status = 'sent'") == 2


class CountedClaims(AttemptsRepo):
    """Counts claim statements and the sends they claim."""

    statements = 0

    async def claim_sends(self, *, rows: Any) -> set[str]:
        self.statements += 1
        return await super().claim_sends(rows=rows)


async def _claims_in_flight(env: Env) -> int:
    return int(await env.pool.fetchval("SELECT count(*) FROM attempts WHERE status = 'sending'"))


async def test_a_fast_device_claims_ahead_and_a_stop_gives_back_what_it_did_not_send(env: Env) -> None:
    device = await env.device(concurrency=4, rate_per_minute=0)
    attempts = CountedClaims(env.pool)
    first = await env.engine(attempts=attempts)

    def stall_after_300(request: SendRequest) -> SendResult | None:
        if len(env.provider.sent) == 299:
            env.provider.gate.clear()  # the sends after this one wait at the provider
        return None

    env.provider.answer = stall_after_300
    ids = await env.release(str(uuid.uuid4()), [device], 2000)
    await until("300 sent and the next ones held at the provider", lambda: first.sending == 4)
    # A provider next door answers far faster than a claim: the lane claimed in groups.
    # (one send per statement per worker would take 75 statements for those 300)
    assert attempts.statements < 300 / 8
    assert await _claims_in_flight(env) > 4, "nothing was claimed ahead"
    drain = asyncio.create_task(first.drain())
    # Claims taken ahead and not sent are given back at once; the four at the provider stay.
    await until("only the sends at the provider hold a claim", lambda: _claims_in_flight_is(env, 4))
    env.provider.gate.set()
    await asyncio.wait_for(drain, 10)
    assert await env.waiting_chunks() == 1, "the unfinished chunk was acked"
    # The next dispatcher sends the rest at once, not after the grace of a lost claim (30 s).
    await env.engine()
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 2000, within=15)
    assert set(env.outcomes().values()) == {"sent"}
    assert_each_once(env, ids)
    assert len(env.provider.sent) == 2000


async def _claims_in_flight_is(env: Env, n: int) -> bool:
    return await _claims_in_flight(env) == n


async def test_a_pause_gives_back_claims_taken_ahead_and_the_resume_sends_them_once(env: Env) -> None:
    device = await env.device(concurrency=4, rate_per_minute=0)
    engine = await env.engine()
    batch_id = str(uuid.uuid4())

    def pause_at_300(request: SendRequest) -> SendResult | None:
        if len(env.provider.sent) == 299:
            engine.runstates.states[batch_id] = "paused"
        return None

    env.provider.answer = pause_at_300
    ids = await env.release(batch_id, [device], 2000)
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 2000)
    outcomes = env.outcomes()
    sent = [a for a, s in outcomes.items() if s == "sent"]
    handed_back = [a for a, s in outcomes.items() if s == "requeue"]
    assert len(sent) + len(handed_back) == 2000
    assert sorted(sent) == sorted(env.provider.attempts())
    assert len(sent) < 400, "the pause did not stop the device within a few sends"
    # Nothing handed back keeps a claim: the resume does not wait out any grace.
    assert await _claims_in_flight(env) == 0
    await until("the chunk is acked", lambda: _acked(env))
    del engine.runstates.states[batch_id]
    env.results.clear()
    by_id = {f"{batch_id}:{j}:1": j for j in range(1, 2001)}
    items = [
        events_pb2.WorkItem(job_id=by_id[a], attempt_no=1, attempt_id=a, to=f"+5691000{by_id[a]:04d}", text="Hola")
        for a in handed_back
    ]
    chunk = events_pb2.DispatchChunk(
        batch_id=batch_id, account_id="acc-1", channel="whatsapp", chunk_seq=2, sender_ids=[device], items=items
    )
    await bus.publish(env.js, "dispatch.whatsapp.acc-1", chunk, msg_id=f"{batch_id}:2")
    await until("the rest is sent", lambda: len(env.outcomes()) == len(handed_back), within=15)
    assert set(env.outcomes().values()) == {"sent"}
    assert_each_once(env, ids)
    assert len(env.provider.sent) == 2000
