"""The WhatsApp aggregates against real PostgreSQL: whatever sequence of statements moves the
jobs (results, deliveries out of order, retries of failed ones, a cancel, a failed batch,
a deleted batch), the aggregates equal a count over the jobs themselves, before and after
folding. And the date ranges: bounds, zones, DST, every bucket present."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from services.campaigns.analytics import date_range
from services.campaigns.analytics_repo import AnalyticsRepo
from services.runtime.errors import InvalidArgument
from tests.conftest import service_pool

FIELDS = ("sent", "failed", "cancelled", "unknown", "delivered", "read", "undelivered")

# What the aggregates must equal: the same rules, counted over the jobs.
TRUTH = """
SELECT batch_id, hour, sum(sent) AS sent, sum(failed) AS failed, sum(cancelled) AS cancelled,
       sum(unknown) AS unknown, sum(delivered) AS delivered, sum(read) AS read, sum(undelivered) AS undelivered
FROM (
    SELECT batch_id, date_trunc('hour', finished_at) AS hour, (status = 'sent')::int AS sent,
           (status = 'failed')::int AS failed, (status = 'cancelled')::int AS cancelled,
           (status = 'unknown')::int AS unknown, 0 AS delivered, 0 AS read,
           (status = 'sent' AND delivery IS NOT DISTINCT FROM 'failed')::int AS undelivered
    FROM jobs WHERE finished_at IS NOT NULL
    UNION ALL
    SELECT batch_id, date_trunc('hour', coalesce(delivered_at, read_at, finished_at)), 0, 0, 0, 0, 1, 0, 0
    FROM jobs WHERE status = 'sent' AND delivery IN ('delivered', 'read')
    UNION ALL
    SELECT batch_id, date_trunc('hour', coalesce(read_at, delivered_at, finished_at)), 0, 0, 0, 0, 0, 1, 0
    FROM jobs WHERE status = 'sent' AND delivery = 'read'
) t GROUP BY 1, 2"""
KEPT = f"""
SELECT batch_id, hour, {", ".join(f"sum({f}) AS {f}" for f in FIELDS)} FROM message_activity GROUP BY 1, 2"""


def _table(rows: list[asyncpg.Record]) -> dict[tuple[Any, ...], tuple[int, ...]]:
    """Non-zero figures per batch and hour."""
    out = {}
    for r in rows:
        figures = tuple(int(r[f]) for f in FIELDS)
        if any(figures):
            out[(r["batch_id"], r["hour"])] = figures
    return out


@pytest.fixture
async def pool(fresh_db: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await service_pool(fresh_db, "campaigns")
    try:
        yield pool
    finally:
        await pool.close()


async def _batch(conn: asyncpg.Connection, account: str, jobs: int) -> uuid.UUID:
    batch_id: uuid.UUID = await conn.fetchval(
        "INSERT INTO batches (account_id, channel, status, total_jobs) VALUES ($1, 'whatsapp', 'processing', $2)"
        " RETURNING batch_id",
        account,
        jobs,
    )
    await conn.execute(
        "INSERT INTO jobs (batch_id, job_id, phone) SELECT $1, g, '+5691' || lpad(g::text, 7, '0')"
        " FROM generate_series(1, $2) g",
        batch_id,
        jobs,
    )
    return batch_id


async def test_the_aggregates_equal_the_jobs_whatever_moves_them(pool: asyncpg.Pool) -> None:
    rng = random.Random(15)
    base = datetime(2026, 12, 1, 9, tzinfo=UTC)

    def at() -> datetime:
        return base + timedelta(minutes=rng.randrange(0, 6 * 60))

    async with pool.acquire() as conn:
        batches = [await _batch(conn, f"acct-{i % 2}", 200) for i in range(3)]
        for _ in range(400):
            batch, first = rng.choice(batches), rng.randrange(1, 200)
            last = first + rng.randrange(0, 20)
            move = rng.choices(range(7), weights=(10, 5, 5, 2, 1, 1, 1))[0]
            if move == 0:  # results, as the applier writes them (a chunk of one status)
                await conn.execute(
                    "UPDATE jobs SET status = $4, finished_at = $5, attempts = attempts + 1"
                    " WHERE batch_id = $1 AND job_id BETWEEN $2 AND $3 AND status = 'pending'",
                    batch,
                    first,
                    last,
                    rng.choice(["sent", "sent", "sent", "failed", "unknown"]),
                    at(),
                )
            elif move in (1, 2):  # delivery reports, out of order, a read before its delivered, some untimed
                await conn.execute(
                    "UPDATE jobs SET delivery = $4,"
                    " delivered_at = CASE WHEN $4 = 'delivered' THEN least(delivered_at, $5) ELSE delivered_at END,"
                    " read_at = CASE WHEN $4 = 'read' THEN least(read_at, $5) ELSE read_at END"
                    " WHERE batch_id = $1 AND job_id BETWEEN $2 AND $3 AND status = 'sent'",
                    batch,
                    first,
                    last,
                    rng.choice(["delivered", "read", "failed"]),
                    at() if rng.random() < 0.8 else None,  # some reports carry no time
                )
            elif move == 3:  # retry the failed ones: they wait again
                await conn.execute(
                    "UPDATE jobs SET status = 'pending', error = NULL, finished_at = NULL"
                    " WHERE batch_id = $1 AND job_id BETWEEN $2 AND $3 AND status = 'failed'",
                    batch,
                    first,
                    last,
                )
            elif move == 4:  # cancel what is pending
                await conn.execute(
                    "UPDATE jobs SET status = 'cancelled', finished_at = $4"
                    " WHERE batch_id = $1 AND job_id BETWEEN $2 AND $3 AND status = 'pending'",
                    batch,
                    first,
                    last,
                    at(),
                )
            elif move == 5:  # an update that changes nothing counted
                await conn.execute(
                    "UPDATE jobs SET attempts = attempts + 1 WHERE batch_id = $1 AND job_id BETWEEN $2 AND $3",
                    batch,
                    first,
                    last,
                )
            else:  # a transaction rolled back leaves no trace
                tx = conn.transaction()
                await tx.start()
                await conn.execute("UPDATE jobs SET status = 'sent', finished_at = now() WHERE batch_id = $1", batch)
                await tx.rollback()
        truth = _table(await conn.fetch(TRUTH))
        # The sequence did a good part of everything.
        done = [sum(v[i] for v in truth.values()) for i in range(len(FIELDS))]
        assert all(n > 10 for n in done), dict(zip(FIELDS, done, strict=True))
        assert _table(await conn.fetch(KEPT)) == truth

        repo = AnalyticsRepo(pool)
        before = await conn.fetchval("SELECT count(*) FROM message_activity")
        while await repo.fold(keys=7):
            pass
        after = await conn.fetchval("SELECT count(*) FROM message_activity")
        assert after <= len(truth) < before
        assert await conn.fetchval("SELECT count(*) FROM message_activity WHERE NOT folded") == 0
        assert _table(await conn.fetch(KEPT)) == truth

        # The account and the message travel with each row; a batch deleted takes its rows along.
        rows = await conn.fetch("SELECT DISTINCT batch_id, account_id FROM message_activity")
        owners = {r["batch_id"]: r["account_id"] for r in await conn.fetch("SELECT batch_id, account_id FROM batches")}
        assert all(owners[r["batch_id"]] == r["account_id"] for r in rows)
        await conn.execute("DELETE FROM jobs WHERE batch_id = $1", batches[0])
        await conn.execute("DELETE FROM batches WHERE batch_id = $1", batches[0])
        assert await conn.fetchval("SELECT count(*) FROM message_activity WHERE batch_id = $1", batches[0]) == 0


async def test_a_fold_meets_new_deltas_and_loses_none(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        batch = await _batch(conn, "acct", 100)
        for job in range(1, 101):
            await conn.execute(
                "UPDATE jobs SET status = 'sent', finished_at = now() WHERE batch_id = $1 AND job_id = $2", batch, job
            )
            if job % 10 == 0:
                await AnalyticsRepo(pool).fold(keys=1)
        assert await conn.fetchval("SELECT sum(sent) FROM message_activity WHERE batch_id = $1", batch) == 100


NOW = datetime(2026, 12, 6, 15, 20, tzinfo=UTC)


def test_the_default_range_is_thirty_local_days_by_day() -> None:
    span = date_range(start="", end="", timezone="America/Santiago", bucket="", now=NOW)
    assert span.bucket == "day" and span.end == datetime(2026, 12, 6, 16, tzinfo=UTC)
    assert span.start == datetime(2026, 11, 7, 3, tzinfo=UTC)  # 7 Nov, midnight in Santiago (UTC-3)
    buckets = span.buckets()
    assert len(buckets) == 30 and buckets[0] == datetime(2026, 11, 7) and buckets[-1] == datetime(2026, 12, 6)
    assert span.label(buckets[0]) == "2026-11-07T00:00:00-03:00"


def test_dates_are_local_days_and_to_includes_its_day() -> None:
    span = date_range(start="2026-12-01", end="2026-12-02", timezone="America/Argentina/Buenos_Aires", bucket="day")
    assert (span.start, span.end) == (datetime(2026, 12, 1, 3, tzinfo=UTC), datetime(2026, 12, 3, 3, tzinfo=UTC))
    assert span.buckets() == [datetime(2026, 12, 1), datetime(2026, 12, 2)]
    # A time without an offset is in the zone; one with an offset is that instant; both widen to whole hours.
    span = date_range(start="2026-12-01T10:30", end="2026-12-01T12:10:00Z", timezone="UTC", bucket="hour")
    assert (span.start, span.end) == (datetime(2026, 12, 1, 10, tzinfo=UTC), datetime(2026, 12, 1, 13, tzinfo=UTC))
    assert len(span.buckets()) == 3


def test_weeks_start_on_monday() -> None:
    span = date_range(start="2026-12-02", end="2026-12-20", timezone="UTC", bucket="week")
    assert span.buckets() == [datetime(2026, 11, 30), datetime(2026, 12, 7), datetime(2026, 12, 14)]


def test_an_hour_series_across_a_dst_change_names_each_local_hour_once() -> None:
    # Santiago leaves summer time on 2026-04-05 at 00:00 (clocks back to 23:00 on the 4th).
    span = date_range(start="2026-04-04T21:00", end="2026-04-05T02:00", timezone="America/Santiago", bucket="hour")
    buckets = span.buckets()
    assert len(buckets) == len(set(buckets))
    assert buckets[0] == datetime(2026, 4, 4, 21) and buckets[-1] == datetime(2026, 4, 5, 1)
    assert (span.end - span.start) == timedelta(hours=6)  # 21, 22, 23, 23 again, 0, 1
    zone = ZoneInfo("America/Santiago")
    assert span.label(datetime(2026, 4, 5, 1)).endswith("-04:00") and span.zone == zone


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"bucket": "minute"}, "bucket must be one of"),
        ({"timezone": "Nowhere/Else"}, "timezone: unknown timezone"),
        ({"start": "2026-12-05", "end": "2026-12-01"}, "from must be before to"),
        ({"start": "05/12/2026"}, "from must be a date"),
        ({"start": "2026-12-01T00:00" + "0" * 40}, "from must be a date"),
        ({"start": "2020-01-01", "end": "2026-01-01", "bucket": "week"}, "at most 1098 days"),
        ({"start": "2026-01-01", "end": "2026-06-01", "bucket": "hour"}, "at most 2000 buckets"),
    ],
)
def test_bad_ranges_are_refused_with_their_reason(fields: dict[str, str], words: str) -> None:
    args = {"start": "", "end": "", "timezone": "UTC", "bucket": "day", **fields}
    with pytest.raises(InvalidArgument, match=words):
        date_range(**args, now=NOW)
