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

from services.dispatcher import engine as engine_module
from services.dispatcher.connections import DAILY_LIMIT_REASON
from services.dispatcher.crypto import SecretBox
from services.dispatcher.engine import CLAIM_AHEAD, Engine, SenderCache
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


# --- devices that cannot send for now: disconnected, waiting for a QR scan, at their cap ---


async def release_jobs(env: Env, batch_id: str, sender_ids: list[int], job_ids: list[int], *, seq: int) -> None:
    """The same work items as `Env.release`, for the jobs named only (what campaigns releases
    again after a hand-back)."""
    items = [
        events_pb2.WorkItem(job_id=j, attempt_no=1, attempt_id=f"{batch_id}:{j}:1", to=f"+5691000{j:04d}", text="Hola")
        for j in job_ids
    ]
    chunk = events_pb2.DispatchChunk(
        batch_id=batch_id, account_id="acc-1", channel="whatsapp", chunk_seq=seq, sender_ids=sender_ids, items=items
    )
    await bus.publish(env.js, "dispatch.whatsapp.acc-1", chunk, msg_id=f"{batch_id}:{seq}")


def errors_of(env: Env, status: str) -> set[str]:
    return {o.error for c in env.results for o in c.outcomes if o.status == status}


def sends_through(env: Env, sender_id: int, *, after: int = 0) -> int:
    return [s for _, s, _ in env.provider.sent[after:]].count(sender_id)


async def test_a_device_that_disconnects_hands_its_unsent_work_to_the_other_device(env: Env) -> None:
    a = await env.device(token="a", concurrency=1, rate_per_minute=0)
    b = await env.device(token="b", concurrency=1, rate_per_minute=0)
    engine = await env.engine()
    env.provider.gate.clear()
    ids = await env.release(str(uuid.uuid4()), [a, b], 20)
    await until("both devices have a send at the provider", lambda: env.provider.entered == 2)
    engine.sender_unavailable(a, "qr_needed")
    env.provider.gate.set()
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 20)
    assert set(env.outcomes().values()) == {"sent"}
    assert_each_once(env, ids)
    assert len(env.provider.sent) == 20
    # The send that was at the provider through a when it went away finishes; nothing more.
    assert sends_through(env, a) == 1
    await until("the chunk is acked", lambda: _acked(env))
    assert await _claims_in_flight(env) == 0


class CountedReleases(AttemptsRepo):
    """Counts the claims given back unsent."""

    released = 0

    async def release(self, *, attempt_ids: Any) -> None:
        self.released += len(attempt_ids)
        await super().release(attempt_ids=attempt_ids)


async def test_a_fast_device_that_disconnects_gives_back_what_it_claimed_ahead(env: Env) -> None:
    a = await env.device(token="a", concurrency=4, rate_per_minute=0)
    b = await env.device(token="b", concurrency=4, rate_per_minute=0)
    attempts = CountedReleases(env.pool)
    engine = await env.engine(attempts=attempts)
    gone_at: list[int] = []

    def disconnect_a_at_300(request: SendRequest) -> SendResult | None:
        if len(env.provider.sent) == 300 and not gone_at:
            gone_at.append(300)
            engine.sender_unavailable(a, "disconnected")
        return None

    env.provider.answer = disconnect_a_at_300
    ids = await env.release(str(uuid.uuid4()), [a, b], 2000)
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 2000, within=20)
    assert set(env.outcomes().values()) == {"sent"}
    assert_each_once(env, ids)
    assert len(env.provider.sent) == 2000
    # Only the sends already at the provider (at most one per worker) went through a after
    # it went away; what it had claimed ahead was given back and sent through b.
    assert sends_through(env, a, after=300) <= 4
    assert sends_through(env, b, after=300) >= 1700 - 4
    assert attempts.released > 0, "a had nothing claimed ahead: the case is not exercised"
    await until("the chunk is acked", lambda: _acked(env))
    assert await _claims_in_flight(env) == 0
    via_a = await env.pool.fetchval("SELECT count(*) FROM attempts WHERE sender_id = $1", a)
    assert via_a == sends_through(env, a)


async def test_with_no_device_able_to_send_the_work_is_handed_back_unsent_until_one_connects(env: Env) -> None:
    a = await env.device(concurrency=1, rate_per_minute=0)
    engine = await env.engine()
    env.provider.gate.clear()
    batch_id = str(uuid.uuid4())
    ids = await env.release(batch_id, [a], 5)
    await until("the first send is at the provider", lambda: env.provider.entered == 1)
    engine.sender_unavailable(a, "disconnected")
    env.provider.gate.set()
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 5)
    outcomes = env.outcomes()
    assert outcomes[ids[0]] == "sent"
    assert [outcomes[i] for i in ids[1:]] == ["requeue"] * 4
    # Waiting, not failed: campaigns suspends the batch on this mark (a device deactivated by
    # its user still fails the job: NO_ACTIVE_SENDER).
    assert errors_of(env, "requeue") == {bus.NO_CONNECTED_SENDER}
    assert env.provider.attempts() == ids[:1]
    await until("the chunk is acked", lambda: _acked(env))
    assert await _claims_in_flight(env) == 0

    # Work that comes while it is still away is handed back whole, unsent.
    env.results.clear()
    await release_jobs(env, batch_id, [a], [2, 3], seq=2)
    await until("the second chunk is handed back", lambda: len(env.outcomes()) == 2)
    assert set(env.outcomes().values()) == {"requeue"}

    # Connected again: what was handed back goes out, each once.
    engine.sender_available(a)
    env.results.clear()
    await release_jobs(env, batch_id, [a], [2, 3, 4, 5], seq=3)
    await until("the rest is sent", lambda: len(env.outcomes()) == 4)
    assert set(env.outcomes().values()) == {"sent"}
    assert_each_once(env, ids)
    assert sorted(env.provider.attempts()) == sorted(ids)
    await until("every chunk is acked", lambda: _acked(env))


async def _sent_today(env: Env, sender_id: int) -> int:
    return int(
        await env.pool.fetchval("SELECT coalesce(sum(sent), 0) FROM sender_days WHERE sender_id = $1", sender_id)
    )


async def test_a_device_at_its_daily_limit_sends_exactly_that_many_and_the_rest_goes_to_the_other(env: Env) -> None:
    a = await env.device(token="a", concurrency=4, rate_per_minute=0, daily_limit=50)
    b = await env.device(token="b", concurrency=4, rate_per_minute=0)
    await env.engine()
    ids = await env.release(str(uuid.uuid4()), [a, b], 1000)
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 1000, within=20)
    assert set(env.outcomes().values()) == {"sent"}
    assert_each_once(env, ids)
    assert len(env.provider.sent) == 1000
    # The claims a had taken ahead when the record refused it more were within the cap: sent.
    assert sends_through(env, a) == 50
    assert await _sent_today(env, a) == 50
    await until("the chunk is acked", lambda: _acked(env))
    assert await _claims_in_flight(env) == 0


async def test_a_device_at_its_daily_limit_alone_makes_the_rest_wait_for_its_next_day(env: Env) -> None:
    a = await env.device(concurrency=2, rate_per_minute=0, daily_limit=3)
    engine = await env.engine()
    batch_id = str(uuid.uuid4())
    ids = await env.release(batch_id, [a], 10)
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 10)
    sent = sorted(i for i, s in env.outcomes().items() if s == "sent")
    waiting = sorted(i for i, s in env.outcomes().items() if s == "requeue")
    assert len(sent) == 3 and len(waiting) == 7
    assert errors_of(env, "requeue") == {bus.NO_CONNECTED_SENDER}
    assert sorted(env.provider.attempts()) == sent
    await until("the chunk is acked", lambda: _acked(env))

    # The connections watcher holds it out for the day, and lets it back in at its local
    # midnight (here: the day's count becomes yesterday's). The batches waiting for it hear so.
    engine.sender_unavailable(a, DAILY_LIMIT_REASON)
    await env.pool.execute("UPDATE sender_days SET day = day - 1 WHERE sender_id = $1", a)
    async with collected(env.nc, "events.device.>", events_pb2.DeviceEvent.FromString) as heard:
        engine.sender_available(a)
        await until("the new day is announced", lambda: heard)
    assert [(e.account_id, e.sender_id, e.status) for e in heard] == [("acc-1", a, "connected")]

    env.results.clear()
    job_of = {f"{batch_id}:{j}:1": j for j in range(1, 11)}
    await release_jobs(env, batch_id, [a], [job_of[i] for i in waiting], seq=2)
    await until("the waiting ones have an outcome", lambda: len(env.outcomes()) == 7)
    assert list(env.outcomes().values()).count("sent") == 3
    assert_each_once(env, ids)
    assert len(env.provider.sent) == 6
    assert await _sent_today(env, a) == 6  # 3 yesterday, 3 today


async def test_a_device_told_out_for_its_daily_limit_still_sends_the_claims_it_holds(env: Env) -> None:
    a = await env.device(token="a", concurrency=4, rate_per_minute=0, daily_limit=1000)
    b = await env.device(token="b", concurrency=4, rate_per_minute=0)
    attempts = CountedReleases(env.pool)
    engine = await env.engine(attempts=attempts)
    told: list[int] = []

    def cap_a_at_200(request: SendRequest) -> SendResult | None:
        if sends_through(env, a) >= 200 and not told:
            told.append(len(env.provider.sent))
            engine.sender_unavailable(a, DAILY_LIMIT_REASON)  # as the watcher does at the cap
        return None

    env.provider.answer = cap_a_at_200
    ids = await env.release(str(uuid.uuid4()), [a, b], 2000)
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 2000, within=20)
    assert set(env.outcomes().values()) == {"sent"}
    assert_each_once(env, ids)
    # What a had claimed counts against its day: none of it is given back unsent.
    assert attempts.released == 0
    assert sends_through(env, a) == await _sent_today(env, a)
    assert sends_through(env, a, after=told[0]) <= CLAIM_AHEAD * 4 + 4
    await until("the chunk is acked", lambda: _acked(env))


# --- a device that refuses a send because it cannot send now (SendResult.device_unavailable) ---


def device_down(retry_after: float = 30.0) -> SendResult:
    """What a device gateway answers for a device that cannot send (wablas.py, waha.py)."""
    return SendResult(
        status="rate_limited", error="test: device unavailable: disconnected", retry_after=retry_after,
        device_unavailable=True,
    )  # fmt: skip


def test_only_a_refusal_can_say_the_device_is_unavailable() -> None:
    for status in ("sent", "unknown", "failed"):
        with pytest.raises(ValueError, match="device_unavailable"):
            SendResult(status=status, device_unavailable=True)  # type: ignore[arg-type]


async def _sender_of(env: Env, attempt_id: str) -> int:
    return int(await env.pool.fetchval("SELECT sender_id FROM attempts WHERE attempt_id = $1", attempt_id))


async def test_a_device_that_refuses_sends_mid_job_gives_them_to_the_other_device_each_once(env: Env) -> None:
    a = await env.device(token="a", concurrency=4, rate_per_minute=0)
    b = await env.device(token="b", concurrency=4, rate_per_minute=0)
    attempts = CountedReleases(env.pool)
    engine = await env.engine(attempts=attempts)
    asked: list[int] = []

    async def ask_device(sender: SenderConfig) -> None:
        asked.append(sender.id)

    async def device_state(sender: SenderConfig) -> None:
        raise AssertionError("the engine asks connections.py, not the provider")

    engine.ask_device = ask_device
    env.provider.device_state = device_state  # type: ignore[attr-defined]  # a provider with device states
    refused: list[str] = []

    def a_goes_away_after_100(request: SendRequest) -> SendResult | None:
        if request.sender.id == a and sends_through(env, a) >= 100:
            refused.append(request.attempt_id)
            return device_down()
        return None

    env.provider.answer = a_goes_away_after_100
    ids = await env.release(str(uuid.uuid4()), [a, b], 1000)
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 1000, within=20)
    # Nobody failed, nobody twice: what a refused went out through b.
    assert set(env.outcomes().values()) == {"sent"}
    assert_each_once(env, ids)
    assert len(env.provider.sent) == 1000
    assert sends_through(env, a) == 100
    assert refused, "a never refused: the case is not exercised"
    # Only the sends at the provider when a first refused (one per worker) reached it.
    assert len(refused) <= 4
    assert set(refused) <= set(env.provider.attempts())
    assert {await _sender_of(env, r) for r in refused} == {b}
    # a is out at once (for a while), and its state was asked for once.
    assert not engine.can_send(a) and engine.can_send(b)
    assert asked == [a]
    await until("the chunk is acked", lambda: _acked(env))
    assert await _claims_in_flight(env) == 0
    via_a = await env.pool.fetchval("SELECT count(*) FROM attempts WHERE sender_id = $1", a)
    assert via_a == 100


async def test_a_lone_device_that_refuses_sends_hands_them_back_to_wait_not_failed(env: Env) -> None:
    a = await env.device(concurrency=2, rate_per_minute=0)
    engine = await env.engine()
    env.provider.answer = lambda request: device_down() if sends_through(env, a) >= 3 else None
    batch_id = str(uuid.uuid4())
    ids = await env.release(batch_id, [a], 10)
    await until("every recipient has an outcome", lambda: len(env.outcomes()) == 10)
    sent = sorted(i for i, s in env.outcomes().items() if s == "sent")
    waiting = sorted(i for i, s in env.outcomes().items() if s == "requeue")
    assert len(sent) == 3 and len(waiting) == 7
    # Waiting for a device, not failed: campaigns suspends the batch on this mark.
    assert errors_of(env, "requeue") == {bus.NO_CONNECTED_SENDER}
    assert sorted(env.provider.attempts()) == sent
    await until("the chunk is acked", lambda: _acked(env))
    # The refused claims were given back: only what went out is on record.
    assert await _claims_in_flight(env) == 0
    assert await env.pool.fetchval("SELECT count(*) FROM attempts") == 3

    # Connected again (connections.py says so): what was handed back goes out, each once.
    env.provider.answer = lambda request: None
    engine.sender_available(a)
    env.results.clear()
    job_of = {f"{batch_id}:{j}:1": j for j in range(1, 11)}
    await release_jobs(env, batch_id, [a], [job_of[i] for i in waiting], seq=2)
    await until("the waiting ones have an outcome", lambda: len(env.outcomes()) == 7)
    assert set(env.outcomes().values()) == {"sent"}
    assert_each_once(env, ids)
    assert sorted(env.provider.attempts()) == sorted(ids)
    await until("every chunk is acked", lambda: _acked(env))


async def test_a_device_that_refused_once_is_tried_again_after_its_rest(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # WAHA restarting for a moment: nobody ever says the device was out, so nobody says it is back.
    monkeypatch.setattr(engine_module, "DEVICE_REST_S", 0.3)
    a = await env.device(concurrency=1, rate_per_minute=0)
    engine = await env.engine()
    refusals = [device_down(retry_after=0.1)]
    env.provider.answer = lambda request: refusals.pop() if refusals else None
    batch_id = str(uuid.uuid4())
    ids = await env.release(batch_id, [a], 1)
    await until("the item is handed back", lambda: env.outcomes() == {ids[0]: "requeue"})
    assert errors_of(env, "requeue") == {bus.NO_CONNECTED_SENDER}
    await until("the device is tried again", lambda: engine.can_send(a), within=5)
    env.results.clear()
    await release_jobs(env, batch_id, [a], [1], seq=2)
    await until("it is sent", lambda: env.outcomes() == {ids[0]: "sent"})
    assert env.provider.attempts() == ids
    await until("every chunk is acked", lambda: _acked(env))
