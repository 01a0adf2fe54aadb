"""The feeder against real PostgreSQL and NATS: chunks bounded by bytes, a job too large for
any chunk failed alone, and batches that do not share one fate (a failing release or
settlement backs off that batch only, on a fake clock).

The accounts service is replaced by a small in-memory ledger (the feeder's one dependency on
another service); a publish failure is injected on one subject of the real JetStream context."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
import grpc
import pytest
from nats.aio.client import Client as NATS
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from pregonero.events.v1 import events_pb2

from services.campaigns import feeder as feeder_module
from services.campaigns.batch_publisher import Notifier
from services.campaigns.batches import Batches
from services.campaigns.credit import NoCredit, Price
from services.campaigns.feeder import CHUNK_BYTES, Backoff, Feeder, pack
from services.campaigns.repo import CampaignsRepo
from services.runtime.bus import BATCH_STATE_BUCKET, DISPATCH_STREAM
from tests.conftest import bus_client, service_pool


@dataclass
class FakeAccounts:
    """The credit client's surface the feeder uses (price, hold, release_batch) over in-memory
    balances. Accounts named in `down` are unreachable, as when the accounts service is."""

    each: Decimal = Decimal("0.01")
    available: Decimal = Decimal(1000)
    holds: dict[str, Decimal] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)
    releases: Counter[str] = field(default_factory=Counter)

    def _reach(self, account_id: str) -> None:
        if account_id in self.down:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, details="accounts unavailable")

    async def price(self, account_id: str) -> Price:
        self._reach(account_id)
        return Price(self.each, reserving=True)

    async def hold(self, account_id: str, hold_id: str, amount: Decimal) -> Decimal:
        self._reach(account_id)
        if hold_id in self.holds:
            return self.holds[hold_id]
        held = min(amount, self.available)
        if held <= 0:
            raise NoCredit("insufficient credit: a top-up resumes the batch")
        self.available -= held
        self.holds[hold_id] = held
        return held

    async def release_batch(self, account_id: str, prefix: str, *, expected: Decimal, force: bool) -> Decimal:
        self.releases[account_id] += 1
        self._reach(account_id)
        # Nothing was charged in these tests: every hold is freed whole.
        freed = sum((self.holds.pop(h) for h in list(self.holds) if h.startswith(prefix)), Decimal(0))
        self.available += freed
        return freed


class FlakyPublish:
    """The real JetStream context, except that a publish on `subject` fails while `failing` is
    set, as it does when the server does not acknowledge it in time."""

    def __init__(self, js: JetStreamContext, subject: str) -> None:
        self._js, self.subject = js, subject
        self.failing = True
        self.tries = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def publish(self, subject: str, payload: bytes = b"", **options: Any) -> Any:
        if subject == self.subject:
            self.tries += 1
            if self.failing:
                raise NatsTimeout
        return await self._js.publish(subject, payload, **options)


@dataclass
class Env:
    pool: asyncpg.Pool
    repo: CampaignsRepo
    nc: NATS
    js: JetStreamContext
    notifier: Notifier
    batches: Batches

    def feeder(
        self, accounts: FakeAccounts, *, js: Any = None, clock: list[float] | None = None, **opts: Any
    ) -> Feeder:
        now = clock if clock is not None else [0.0]
        return Feeder(
            self.repo,
            js or self.js,
            self.notifier,
            accounts,  # type: ignore[arg-type]
            self.batches,
            clock=lambda: now[0],
            **opts,
        )


@pytest.fixture
async def env(fresh_db: str, own_nats: str) -> AsyncIterator[Env]:
    pool = await service_pool(fresh_db, "campaigns")
    nc, js = await bus_client(own_nats)
    notifier = Notifier(nc, js, await js.key_value(BATCH_STATE_BUCKET))
    repo = CampaignsRepo(pool)
    try:
        yield Env(pool, repo, nc, js, notifier, Batches(repo, notifier))
    finally:
        await nc.close()
        await pool.close()


def new_account() -> str:
    return f"feed-{uuid.uuid4().hex[:8]}"


async def make_batch(env: Env, account_id: str, texts: list[str], *, window: int = 1000) -> UUID:
    """A running bulk send whose job i (1-based) renders as texts[i - 1]."""
    async with env.pool.acquire() as conn, conn.transaction():
        batch = await env.repo.insert_batch(
            conn,
            account_id=account_id,
            channel="whatsapp",
            name="feeder test",
            template="@valor1",
            devices_limit=1,
            sender_ids=[1],
            window_size=window,
            file_name="",
        )
        batch_id: UUID = batch["batch_id"]
        records = [(batch_id, i, f"+5691{i:07d}", [text]) for i, text in enumerate(texts, start=1)]
        await env.repo.copy_jobs(conn, records=records)
        await env.repo.finish_ingest(conn, batch_id=batch_id, total=len(texts), invalid=0, duplicates=0)
    return batch_id


async def stopped_with_open_hold(env: Env, accounts: FakeAccounts, account_id: str) -> UUID:
    """A paused batch with nothing in flight and one hold still open in accounts."""
    batch_id = await make_batch(env, account_id, ["hola"])
    accounts.holds[f"{batch_id}:1"] = Decimal(5)
    await env.pool.execute(
        "UPDATE batches SET status = 'paused', hold_seq = 1, hold_left = 5, unit_price = 0.01 WHERE batch_id = $1",
        batch_id,
    )
    return batch_id


async def dispatched(env: Env, *, budget: int = CHUNK_BYTES) -> list[tuple[str, events_pb2.DispatchChunk]]:
    """Every chunk on DISPATCH (this test's own server), its Nats-Msg-Id and its size within
    `budget` checked. A release returns once its chunks are acknowledged: they are all stored."""
    info = await env.js.stream_info(DISPATCH_STREAM)
    chunks = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await env.js.get_msg(DISPATCH_STREAM, seq)
        assert msg.data is not None and msg.headers is not None
        assert len(msg.data) <= budget, f"chunk of {len(msg.data)} bytes"
        chunk = events_pb2.DispatchChunk.FromString(msg.data)
        assert msg.headers["Nats-Msg-Id"] == f"{chunk.batch_id}:{chunk.chunk_seq}"
        chunks.append((msg.subject or "", chunk))
    return chunks


def job_ids(chunks: list[tuple[str, events_pb2.DispatchChunk]], batch_id: UUID) -> list[int]:
    return [item.job_id for _, c in chunks if c.batch_id == str(batch_id) for item in c.items]


async def batch_row(env: Env, batch_id: UUID) -> asyncpg.Record:
    return await env.pool.fetchrow("SELECT * FROM batches WHERE batch_id = $1", batch_id)


# --- pure parts ------------------------------------------------------------------------------


def test_pack_splits_greedily_in_order_by_bytes_and_by_count() -> None:
    assert pack([40, 40, 40, 10, 90, 5], room=100, max_items=10) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert pack([1] * 7, room=100, max_items=3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert pack([100, 100], room=100, max_items=10) == [slice(0, 1), slice(1, 2)]
    assert pack([], room=100, max_items=10) == []


def test_backoff_doubles_up_to_a_minute_and_is_forgotten_on_success() -> None:
    now = [0.0]
    backoff = Backoff(clock=lambda: now[0])
    assert [backoff.failed("b") for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert not backoff.ready("b")
    now[0] = 59.0
    assert not backoff.ready("b")
    now[0] = 60.0
    assert backoff.ready("b")
    backoff.succeeded("b")
    assert backoff.failed("b") == 1, "a success starts the doubling again"
    backoff.keep_only(["other"])
    assert backoff.ready("b"), "a batch no longer listed is forgotten"


def test_the_template_cache_drops_the_least_recently_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feeder_module, "TEMPLATE_CACHE", 2)
    feeder = Feeder(None, None, None, None, None)  # type: ignore[arg-type]
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    first = feeder._template(a, "A @valor1")
    feeder._template(b, "B @valor1")
    assert feeder._template(a, "A @valor1") is first  # a is now the most recently used
    feeder._template(c, "C @valor1")
    assert list(feeder._templates) == [a, c], "the least recently used went, not the whole cache"


# --- chunks bounded by bytes -----------------------------------------------------------------


async def test_long_messages_go_out_in_chunks_under_the_byte_budget_each_job_once(env: Env) -> None:
    account_id = new_account()
    texts = [f"{i:04d} " + "x" * 4000 for i in range(1, 501)]
    batch_id = await make_batch(env, account_id, texts)
    feeder = env.feeder(FakeAccounts())

    assert await feeder.round() == 500
    chunks = await dispatched(env)
    # 500 messages of 4 KB are about 2 MB: more than one NATS message may carry (1 MiB).
    assert sum(c.ByteSize() for _, c in chunks) > env.nc.max_payload
    assert len(chunks) >= 4
    assert {subject for subject, _ in chunks} == {f"dispatch.whatsapp.{account_id}"}
    assert len({c.chunk_seq for _, c in chunks}) == len(chunks)
    assert job_ids(chunks, batch_id) == list(range(1, 501)), "every job once, in order"
    texts_out = {item.job_id: item.text for _, c in chunks for item in c.items}
    assert all(texts_out[i] == texts[i - 1] for i in range(1, 501))
    row = await batch_row(env, batch_id)
    assert (row["released_upto"], row["queued_jobs"], row["status"]) == (500, 500, "processing")


async def test_a_job_too_large_for_any_chunk_fails_alone(env: Env) -> None:
    account_id = new_account()
    huge = "y" * 100_000
    mixed = await make_batch(env, account_id, ["hola 1", huge, "hola 3"])
    only_huge = await make_batch(env, account_id, [huge])
    feeder = env.feeder(FakeAccounts(), chunk_bytes=64 * 1024)

    assert await feeder.round() == 4
    chunks = await dispatched(env, budget=64 * 1024)
    assert job_ids(chunks, mixed) == [1, 3]
    assert job_ids(chunks, only_huge) == []
    jobs = await env.pool.fetch("SELECT job_id, status, error FROM jobs WHERE batch_id = $1 ORDER BY job_id", mixed)
    assert [j["status"] for j in jobs] == ["pending", "failed", "pending"]  # 1 and 3 are in flight
    assert "too large" in jobs[1]["error"]
    row = await batch_row(env, mixed)
    assert (row["released_upto"], row["queued_jobs"], row["failed_jobs"]) == (3, 2, 1)
    # A batch of nothing but unsendable jobs ends, failed (none was sent): it must not wait for
    # results that never come.
    row = await batch_row(env, only_huge)
    assert (row["status"], row["failed_jobs"], row["queued_jobs"]) == ("failed", 1, 0)
    assert row["error"] == "Todos los envíos fallaron"
    assert row["finished_at"] is not None
    assert await feeder.round() == 0, "nothing left to release"


# --- batches do not share one fate -----------------------------------------------------------


async def test_a_failing_publish_backs_off_its_batch_while_the_others_are_released_and_settled(env: Env) -> None:
    bad, good, stopped = new_account(), new_account(), new_account()
    accounts = FakeAccounts()
    failing = await make_batch(env, bad, ["a", "b"])  # created first: the first one tried
    running = await make_batch(env, good, ["c", "d", "e"])
    paused = await stopped_with_open_hold(env, accounts, stopped)
    flaky = FlakyPublish(env.js, f"dispatch.whatsapp.{bad}")
    clock = [100.0]
    feeder = env.feeder(accounts, js=flaky, clock=clock)

    assert await feeder.round() == 3, "the good batch went out in the same round"
    assert flaky.tries == 1
    assert job_ids(await dispatched(env), running) == [1, 2, 3]
    row = await batch_row(env, failing)
    assert (row["released_upto"], row["queued_jobs"]) == (0, 0), "the failed release left nothing behind"
    # Settlement ran all the same: the paused batch's hold is released.
    row = await batch_row(env, paused)
    assert row["holds_settled_upto"] == row["hold_seq"] == 1
    assert f"{paused}:1" not in accounts.holds

    # Backed off: not tried again every round, but after 1 s, then 2 s.
    for now, tries in ((100.5, 1), (101.0, 2), (102.9, 2), (103.0, 3)):
        clock[0] = now
        assert await feeder.round() == 0
        assert flaky.tries == tries, f"at {now}"
    assert job_ids(await dispatched(env), failing) == []


async def test_the_back_off_is_forgotten_once_the_batch_is_released(env: Env) -> None:
    account_id = new_account()
    batch_id = await make_batch(env, account_id, [f"m{i}" for i in range(6)], window=2)
    flaky = FlakyPublish(env.js, f"dispatch.whatsapp.{account_id}")
    clock = [0.0]
    feeder = env.feeder(FakeAccounts(), js=flaky, clock=clock)
    for now in (0.0, 1.0, 3.0):  # fails, waits 1 s, fails, waits 2 s, fails: next try at 7 s
        clock[0] = now
        await feeder.round()
    assert flaky.tries == 3

    flaky.failing = False
    clock[0] = 7.0
    assert await feeder.round() == 2
    assert job_ids(await dispatched(env), batch_id) == [1, 2]

    # Room again in the window, and the next publish fails: the back-off starts over at 1 s
    # (were it not forgotten, the next try would be 8 s later, not 1 s).
    await env.pool.execute("UPDATE batches SET queued_jobs = 0 WHERE batch_id = $1", batch_id)
    flaky.failing = True
    assert await feeder.round() == 0
    assert flaky.tries == 5
    clock[0] = 8.0
    await feeder.round()
    assert flaky.tries == 6
    flaky.failing = False
    clock[0] = 10.0
    assert await feeder.round() == 2
    assert job_ids(await dispatched(env), batch_id) == [1, 2, 3, 4]


async def test_one_batch_failing_to_settle_does_not_keep_the_others_holds(env: Env) -> None:
    unreachable, reachable = new_account(), new_account()
    accounts = FakeAccounts(down={unreachable})
    first = await stopped_with_open_hold(env, accounts, unreachable)
    second = await stopped_with_open_hold(env, accounts, reachable)
    # The settlement scan goes oldest first: the failing batch comes first.
    await env.pool.execute("UPDATE batches SET updated_at = now() - interval '1 minute' WHERE batch_id = $1", first)
    clock = [0.0]
    feeder = env.feeder(accounts, clock=clock)

    await feeder.round()
    assert (await batch_row(env, second))["holds_settled_upto"] == 1
    assert (await batch_row(env, first))["holds_settled_upto"] == 0
    assert accounts.releases[unreachable] == 1

    await feeder.round()
    assert accounts.releases[unreachable] == 1, "backed off, not asked again every round"
    accounts.down.clear()
    clock[0] = 1.0
    await feeder.round()
    assert accounts.releases[unreachable] == 2
    assert (await batch_row(env, first))["holds_settled_upto"] == 1
    assert f"{first}:1" not in accounts.holds
