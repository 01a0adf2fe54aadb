"""The dialer against real PostgreSQL and NATS, on a fake clock: a calling window that opens
and closes, the account's lines, Chile's weekly contact limit, and credit running out.

The accounts service is replaced by a small in-memory ledger (the dialer's one dependency
on another service); everything else is the real thing."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from pregonero.events.v1 import events_pb2

from services.campaigns import voice_repo
from services.campaigns.batch_publisher import Notifier
from services.campaigns.credit import AccountInfo, NoCredit
from services.campaigns.dialer import Dialer
from services.campaigns.repo import CampaignsRepo
from services.campaigns.voice_repo import VoiceRepo
from tests.conftest import bus_client, collected, service_pool

SANTIAGO = "America/Santiago"


@dataclass
class FakeAccounts:
    """The credit client's surface, over an in-memory balance."""

    info: AccountInfo
    holds: dict[str, Decimal] = field(default_factory=dict)

    async def account(self, account_id: str) -> AccountInfo:
        return self.info

    async def hold(self, account_id: str, hold_id: str, amount: Decimal) -> Decimal:
        if hold_id in self.holds:
            return self.holds[hold_id]
        held = min(amount, self.info.available)
        if held <= 0:
            raise NoCredit("insufficient credit: a top-up resumes the batch")
        self.info = replace(self.info, available=self.info.available - held)
        self.holds[hold_id] = held
        return held


def account(**changes: Any) -> AccountInfo:
    base = AccountInfo(
        account_id=f"dial-{uuid.uuid4().hex[:6]}",
        plan_type="credit_based",
        status="active",
        timezone=SANTIAGO,
        country="CL",
        max_concurrent_calls=3,
        available=Decimal(1000),
        unit="credits",
        cost_per_minute=Decimal("0.15"),
        cost_per_call_setup=Decimal("0.02"),
    )
    return replace(base, **changes)


@dataclass
class Env:
    pool: asyncpg.Pool
    voice: VoiceRepo
    campaigns: CampaignsRepo
    js: Any
    nc: Any
    released: list[events_pb2.DispatchChunk]


@pytest.fixture
async def env(fresh_db: str, own_nats: str) -> AsyncIterator[Env]:
    pool = await service_pool(fresh_db, "campaigns")
    nc, js = await bus_client(own_nats)
    try:
        async with collected(nc, "dispatch.voice.>", events_pb2.DispatchChunk.FromString) as released:
            yield Env(pool, VoiceRepo(pool), CampaignsRepo(pool), js, nc, released)
    finally:
        await nc.close()
        await pool.close()


async def make_batch(env: Env, info: AccountInfo, *, jobs: int, settings: dict[str, Any], use_case: str) -> Any:
    async with env.pool.acquire() as conn, conn.transaction():
        batch = await env.voice.insert_batch(
            conn,
            account_id=info.account_id,
            name="dial test",
            description="",
            priority=1,
            call_settings_json=json.dumps(settings),
            use_case=use_case,
            country="CL",
            processing_type="basic",
            allow_duplicates=True,
            file_name="",
            window_size=10,
        )
        start = datetime(2026, 1, 1, tzinfo=UTC)
        records = [
            (
                batch["batch_id"],
                info.account_id,
                f"debtor-{i}",
                f"Deudor {i}",
                "",
                [f"+5691234{i:04d}", f"+5622345{i:04d}"],
                json.dumps({"debt_amount": 1000 + i, "company_name": "ACME"}),
                3,
                start,
                Decimal("0.47"),
            )
            for i in range(jobs)
        ]
        await env.voice.copy_jobs(conn, records=records)
        return await env.voice.finish_ingest(
            conn, batch_id=batch["batch_id"], total=jobs, invalid=0, duplicates=0, cost=Decimal(0)
        )


def santiago(day: int, hour: int, minute: int = 0) -> datetime:
    """A local time in Santiago in January 2026 (summer: UTC-3), as UTC. 2026-01-05 is a Monday."""
    from zoneinfo import ZoneInfo

    return datetime(2026, 1, day, hour, minute, tzinfo=ZoneInfo(SANTIAGO)).astimezone(UTC)


def dialer(env: Env, accounts: FakeAccounts, clock: list[datetime]) -> Dialer:
    notifier = Notifier(env.nc, env.js, None)  # type: ignore[arg-type]
    return Dialer(env.voice, env.campaigns, env.js, accounts, notifier, clock=lambda: clock[0])  # type: ignore[arg-type]


async def wait_released(env: Env, n: int) -> None:
    import asyncio

    for _ in range(100):
        if sum(len(c.items) for c in env.released) >= n:
            return
        await asyncio.sleep(0.02)


async def test_a_window_that_opens_and_closes_and_the_accounts_lines(env: Env) -> None:
    info = account(max_concurrent_calls=3)
    accounts = FakeAccounts(info)
    window = {
        "allowed_hours": {"start": "09:00", "end": "10:00"},
        "days_of_week": [1, 2, 3, 4, 5],
        "timezone": SANTIAGO,
    }
    batch = await make_batch(env, info, jobs=8, settings=window, use_case="marketing")
    clock = [santiago(5, 8, 59)]
    d = dialer(env, accounts, clock)

    assert await d.release(batch["batch_id"], info) == 0, "called before the window opened"
    clock[0] = santiago(5, 9, 0)
    assert await d.release(batch["batch_id"], info) == 3, "the window opened: one call per line"
    assert await d.release(batch["batch_id"], info) == 0, "all lines are busy"
    await wait_released(env, 3)
    items = [i for c in env.released for i in c.items]
    assert len(items) == 3 and all(i.attempt_id.endswith(":1.0") for i in items)  # round 1, first phone
    variables = json.loads(items[0].variables_json)
    assert variables["variables"]["nombre"].startswith("Deudor") and variables["variables"]["hora_actual"] == "09:00"

    # Two calls end: two lines are free again.
    async with env.pool.acquire() as conn:
        await conn.execute("UPDATE batches SET queued_jobs = queued_jobs - 2 WHERE batch_id = $1", batch["batch_id"])
    assert await d.release(batch["batch_id"], info) == 2

    async with env.pool.acquire() as conn:
        await conn.execute("UPDATE batches SET queued_jobs = 0 WHERE batch_id = $1", batch["batch_id"])
    clock[0] = santiago(5, 10, 0)
    assert await d.release(batch["batch_id"], info) == 0, "called after the window closed"
    clock[0] = santiago(4, 9, 30)  # a Sunday
    assert await d.release(batch["batch_id"], info) == 0, "called on a day the batch excludes"
    async with env.pool.acquire() as conn:
        waiting = await conn.fetchval(
            "SELECT count(*) FROM voice_jobs WHERE batch_id = $1 AND status = 'pending' AND attempts = 0",
            batch["batch_id"],
        )
    assert waiting == 3, "jobs outside their window wait without spending an attempt"


async def test_calls_go_out_with_the_accounts_own_agent_and_number(env: Env) -> None:
    own = account(voice_agent_id="agent_acme_cobranza", voice_caller_id="+56229998877")
    platform = account()
    all_day = {"allowed_hours": {"start": "00:00", "end": "23:59"}, "days_of_week": list(range(7))}
    clock = [santiago(5, 9, 0)]
    for info in (own, platform):
        batch = await make_batch(env, info, jobs=1, settings=all_day, use_case="marketing")
        assert await dialer(env, FakeAccounts(info), clock).release(batch["batch_id"], info) == 1
    await wait_released(env, 2)
    specs = {c.account_id: json.loads(c.items[0].variables_json) for c in env.released}
    assert (specs[own.account_id]["agent_id"], specs[own.account_id]["from_number"]) == (
        "agent_acme_cobranza",
        "+56229998877",
    )
    # Without its own, the dispatcher's defaults apply.
    assert (specs[platform.account_id]["agent_id"], specs[platform.account_id]["from_number"]) == ("", "")


async def test_chilean_debt_collection_keeps_the_legal_hours_and_one_contact_a_week(env: Env) -> None:
    info = account(max_concurrent_calls=10)
    accounts = FakeAccounts(info)
    # The batch asks for 07:00-22:00 every day; the law allows Monday-Saturday 08:00-20:00.
    wide = {"allowed_hours": {"start": "07:00", "end": "22:00"}, "days_of_week": [0, 1, 2, 3, 4, 5, 6]}
    batch = await make_batch(env, info, jobs=4, settings=wide, use_case="debt_collection")
    clock = [santiago(5, 7, 30)]
    d = dialer(env, accounts, clock)
    assert await d.release(batch["batch_id"], info) == 0, "called before 08:00"
    clock[0] = santiago(4, 12, 0)  # Sunday
    assert await d.release(batch["batch_id"], info) == 0, "called on a Sunday"

    # Debtor 0 answered another batch's call two days ago: not before a week has passed.
    async with env.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO debtor_contacts (account_id, debtor_key, answered_at) VALUES ($1, 'debtor-0', $2)",
            info.account_id,
            datetime.now(UTC) - timedelta(days=2),
        )
    clock[0] = santiago(5, 12, 0)
    assert await d.release(batch["batch_id"], info) == 3
    async with env.pool.acquire() as conn:
        later = await conn.fetchval(
            "SELECT next_attempt_at FROM voice_jobs WHERE batch_id = $1 AND debtor_key = 'debtor-0'",
            batch["batch_id"],
        )
    assert later >= datetime.now(UTC) + timedelta(days=4, hours=23)


async def test_calls_beyond_the_credit_are_suspended(env: Env) -> None:
    # 0.02 + 5 min x 0.15 = 0.77 per call at most: 1.60 pays for two.
    info = account(max_concurrent_calls=10, available=Decimal("1.60"))
    accounts = FakeAccounts(info)
    open_all_day = {
        "allowed_hours": {"start": "00:00", "end": "23:59"},
        "days_of_week": [0, 1, 2, 3, 4, 5, 6],
        "max_call_duration": 300,
    }
    batch = await make_batch(env, info, jobs=5, settings=open_all_day, use_case="marketing")
    clock = [santiago(5, 12, 0)]
    d = dialer(env, accounts, clock)
    assert await d.release(batch["batch_id"], info) == 2
    async with env.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT status, suspended_jobs, suspension_reason FROM batches WHERE batch_id = $1", batch["batch_id"]
        )
    assert row["status"] == "suspended" and row["suspended_jobs"] == 3 and "credit" in row["suspension_reason"]


async def test_listings_tell_jobs_waiting_for_their_time_from_due_ones(env: Env) -> None:
    info = account()
    batch = await make_batch(env, info, jobs=6, settings={}, use_case="marketing")  # due since 2026-01-01
    rows, total = await env.voice.list_jobs(scope=info.account_id, batch_id=None, status="pending", limit=100, skip=0)
    assert (len(rows), total) == (6, 6)
    later = datetime.now(UTC) + timedelta(days=2)
    async with env.pool.acquire() as conn:
        await env.voice.postpone(conn, ids=[r["id"] for r in rows[:4]], until=[later] * 4)
    for status, expected in (("scheduled", 4), ("pending", 2), ("", 6)):
        rows, total = await env.voice.list_jobs(
            scope=info.account_id, batch_id=batch["batch_id"], status=status, limit=100, skip=0
        )
        assert (len(rows), total) == (expected, expected), status
    rows, total = await env.voice.list_jobs(scope="", batch_id=batch["batch_id"], status="pending", limit=1, skip=0)
    assert (len(rows), total) == (1, 2)


async def test_the_scheduled_count_follows_every_change_of_the_jobs(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    info = account()
    batch = await make_batch(env, info, jobs=8, settings={}, use_case="marketing")  # due since 2026-01-01
    key = batch["batch_id"]

    async def scheduled() -> int:
        counted = await env.voice.scheduled_in(scope=info.account_id, batch_id=key)
        truth = await env.pool.fetchval(
            "SELECT count(*) FROM voice_jobs WHERE batch_id = $1 AND status = 'pending' AND next_attempt_at > now()",
            key,
        )
        assert counted == truth
        return counted

    assert await scheduled() == 0
    rows, _ = await env.voice.list_jobs(scope=info.account_id, batch_id=key, status="", limit=100, skip=0)
    ids = sorted(r["id"] for r in rows)
    now = datetime.now(UTC)
    # Tomorrow's round for three, one in a few hours, and two within the minute or the next.
    until = [now + timedelta(days=1)] * 3 + [now + timedelta(hours=3)] + [now + timedelta(seconds=40)] * 2
    async with env.pool.acquire() as conn:
        await env.voice.postpone(conn, ids=ids[:6], until=until)
    assert await scheduled() == 6
    # However the current minute is counted in the index (whole, from its due side, or ahead).
    for bound in (1, 2, 1000):
        monkeypatch.setattr(voice_repo, "_SPLIT_BOUND", bound)
        assert await scheduled() == 6
    # Folded: one row per minute that has jobs, and the same count.
    await env.voice.fold_waiting()
    assert await env.pool.fetchval("SELECT count(*) FROM voice_waiting WHERE batch_id = $1", key) <= 3
    assert await scheduled() == 6
    # Cancelled, deleted and retried jobs move it; the batch deleted leaves nothing behind.
    await env.voice.cancel_job(job_id=ids[0], scope=info.account_id, reason="no")
    assert await scheduled() == 5
    await env.voice.delete_job(job_id=ids[1], scope=info.account_id, reason="deleted")
    assert await scheduled() == 4
    await env.voice.retry_job(job_id=ids[0], scope=info.account_id)  # due again at once
    assert await scheduled() == 4
    await env.voice.delete_batch(batch_id=key, delete_jobs=True, reason="")
    await env.voice.fold_waiting()
    assert await env.pool.fetchval("SELECT count(*) FROM voice_waiting WHERE batch_id = $1", key) == 0
