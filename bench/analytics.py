"""The analytics over a million results (issue 15: p99 of 50 ms or less), through Envoy, as a
dashboard asks for them.

The account gets a month of activity: 1,000,000 WhatsApp recipients (bulk files, and scheduled
messages to 50 groups) and 1,000,000 calls. The recipients are inserted pending and then moved
as the product moves them, by UPDATE statements of a few thousand jobs (results, then delivery
reports), so the aggregates are the trigger's own work, and the figure `results_rows_per_s` is
what maintaining them lets those statements do. The calls are the hourly rows their results
would have booked (one upsert per call is the product's path; a million of them would take
the bench minutes and measure nothing of the reads). The aggregates are folded, as the service
folds them every few seconds, then each report is read many times.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench.voice_reads import _timed
from services.campaigns.analytics_repo import AnalyticsRepo
from services.runtime.db import create_pool
from services.runtime.devstack import Stack

ACCOUNT = "bench-analytics"
DAYS = 30
BULK_BATCHES = 80
GROUPS = 50
MESSAGES = 200
STATEMENT_ROWS = 5_000

BATCH = """
INSERT INTO campaigns.batches (account_id, channel, name, status, message_template, file_name, total_jobs,
                               message_id, template_syntax, created_at)
VALUES ($1, 'whatsapp', $2, 'completed', 'Hola @valor1', 'bench.csv', $3, $4, $5, now() - make_interval(days => $6))
RETURNING batch_id"""
JOBS = """
INSERT INTO campaigns.jobs (batch_id, job_id, phone, vals)
SELECT $1, g, '+569' || lpad(g::text, 8, '0'), ARRAY['Cliente ' || g] FROM generate_series(1, $2) g"""
# Nine in ten sent, the rest failed, over the batch's day (its jobs at a steady pace).
RESULTS = """
UPDATE campaigns.jobs SET status = CASE WHEN job_id % 10 = 0 THEN 'failed' ELSE 'sent' END, attempts = 1,
       finished_at = $4::timestamptz + make_interval(secs => job_id * 86400.0 / $5::int)
WHERE batch_id = $1 AND job_id BETWEEN $2 AND $3"""
# Of the sent, four in five delivered a few minutes later, half of those read within the hour.
DELIVERIES = """
UPDATE campaigns.jobs SET delivery = CASE WHEN job_id % 10 < 4 THEN 'read' ELSE 'delivered' END,
       delivered_at = finished_at + interval '3 minutes',
       read_at = CASE WHEN job_id % 10 < 4 THEN finished_at + interval '40 minutes' END
WHERE batch_id = $1 AND job_id BETWEEN $2 AND $3 AND status = 'sent' AND job_id % 10 < 8"""
GROUP = "INSERT INTO campaigns.contact_groups (account_id, name) VALUES ($1, $2) RETURNING group_id"
MESSAGE = """
INSERT INTO campaigns.messages (account_id, content, status, batch_id, started_at)
VALUES ($1, $2, 'sending', $3, now()) RETURNING message_id"""
MESSAGE_GROUP = "INSERT INTO campaigns.message_groups (message_id, group_id) VALUES ($1, $2)"
# A million calls in the hours they were booked: 20 campaigns, ten hours a day for a month.
CALL_HOURS = """
INSERT INTO campaigns.batch_hours (batch_id, hour, account_id, calls, completed, failed, no_answer, busy,
                                   voicemail, cost, seconds, promises, promised_amount)
SELECT b, date_trunc('day', now()) - make_interval(days => d) + make_interval(hours => 12 + h), $2,
       c, c * 45 / 100, c - c * 45 / 100, c * 30 / 100, c * 10 / 100, c * 10 / 100,
       c * 0.1325, c * 45, c * 12 / 100, c * 12 / 100 * 25000
FROM unnest($1::uuid[]) b, generate_series(1, $3) d, generate_series(0, 9) h, (SELECT $4::int AS c) per"""
VOICE_BATCH = """
INSERT INTO campaigns.batches (account_id, channel, name, status) VALUES ($1, 'voice', $2, 'completed')
RETURNING batch_id"""


async def _fill(database_url: str, recipients: int) -> dict[str, Any]:
    conn = await asyncpg.connect(database_url)
    try:
        scheduled_share = recipients // 5
        per_message = max(scheduled_share // MESSAGES, 1)
        per_bulk = max((recipients - per_message * MESSAGES) // BULK_BATCHES, 1)
        groups = [await conn.fetchval(GROUP, ACCOUNT, f"grupo {g}") for g in range(GROUPS)]
        batches: list[tuple[uuid.UUID, int, int]] = []  # (batch, jobs, days ago)
        for n in range(BULK_BATCHES):
            days_ago = 1 + n % DAYS  # whole days, all past
            batch = await conn.fetchval(BATCH, ACCOUNT, f"masivo {n}", per_bulk, None, "valor", days_ago)
            batches.append((batch, per_bulk, days_ago))
        for n in range(MESSAGES):
            days_ago = 1 + n % DAYS  # whole days, all past
            batch = await conn.fetchval(BATCH, ACCOUNT, f"mensaje {n}", per_message, None, "named", days_ago)
            message_id = await conn.fetchval(MESSAGE, ACCOUNT, f"Hola {{{{name}}}}, recordatorio {n}", batch)
            await conn.execute("UPDATE campaigns.batches SET message_id = $2 WHERE batch_id = $1", batch, message_id)
            await conn.execute(MESSAGE_GROUP, message_id, groups[n % GROUPS])
            batches.append((batch, per_message, days_ago))
        for batch, jobs, _ in batches:
            await conn.execute(JOBS, batch, jobs)
        total = sum(jobs for _, jobs, _ in batches)

        # The results and the delivery reports, statement by statement, through the trigger.
        started = time.perf_counter()
        statements = 0
        for query in (RESULTS, DELIVERIES):
            for batch, jobs, days_ago in batches:
                day = await conn.fetchval("SELECT date_trunc('day', now()) - make_interval(days => $1)", days_ago)
                for first in range(1, jobs + 1, STATEMENT_ROWS):
                    last = min(first + STATEMENT_ROWS - 1, jobs)
                    if query is RESULTS:
                        await conn.execute(query, batch, first, last, day, jobs)
                    else:
                        await conn.execute(query, batch, first, last)
                    statements += 1
        moved_s = time.perf_counter() - started
        deltas = await conn.fetchval("SELECT count(*) FROM campaigns.message_activity")

        voice = [await conn.fetchval(VOICE_BATCH, ACCOUNT, f"cobranza {n}") for n in range(20)]
        per_hour = 1_000_000 // (len(voice) * DAYS * 10)
        await conn.execute(CALL_HOURS, voice, ACCOUNT, DAYS, per_hour)
        await conn.execute("ANALYZE campaigns.jobs, campaigns.message_activity, campaigns.batch_hours")
        calls = await conn.fetchval("SELECT sum(calls) FROM campaigns.batch_hours WHERE account_id = $1", ACCOUNT)
    finally:
        await conn.close()

    # Folded as the campaigns service does every few seconds.
    pool = await create_pool(database_url, schema="campaigns")
    try:
        repo = AnalyticsRepo(pool)
        while await repo.fold(keys=5_000):
            pass
        rows = await pool.fetchval("SELECT count(*) FROM message_activity")
    finally:
        await pool.close()
    return {
        "recipients": total,
        "calls": int(calls),
        "result_statements": statements,
        "results_rows_per_s": round(2 * total / moved_s),  # each job moved twice: result, then delivery
        "deltas_before_fold": deltas,
        "aggregate_rows": rows,
    }


def measure(start: Callable[[bool, Path], Stack], headers: dict[str, str], recipients: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        stack = start(False, Path(tmp))
        try:
            base = f"http://127.0.0.1:{stack.http_port}"
            with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
                body = {"account_id": ACCOUNT, "account_name": "Bench analytics", "country": "CL"}
                client.post("/api/v1/accounts", json=body).raise_for_status()
                filled = time.perf_counter()
                figures = asyncio.run(_fill(stack.database_url, recipients))
                figures["fill_s"] = round(time.perf_counter() - filled, 1)
                # The whole month filled (a day more than the default 30 local days).
                month = {"account_id": ACCOUNT, "timezone": "America/Santiago", "from": _days_ago(DAYS + 2)}
                week = {**month, "bucket": "hour", "from": _days_ago(7)}
                messages = client.get("/api/analytics/messages", params=month).json()
                assert messages["totals"]["sent"] + messages["totals"]["failed"] == figures["recipients"], messages[
                    "totals"
                ]
                voice = client.get("/api/v1/reports/analytics", params=month).json()
                assert voice["totals"]["calls"] == figures["calls"], voice["totals"]
                return {
                    **figures,
                    "voice_month_by_day": _timed(client, "/api/v1/reports/analytics", 300, **month),
                    "voice_week_by_hour": _timed(client, "/api/v1/reports/analytics", 300, **week),
                    "messages_month_by_day": _timed(client, "/api/analytics/messages", 300, **month),
                    "messages_week_by_hour": _timed(client, "/api/analytics/messages", 300, **week),
                    "groups_month": _timed(client, "/api/analytics/groups", 300, **month),
                    "dashboard_month": _timed(client, "/api/analytics/dashboard", 300, **month),
                    "dashboard_all_accounts": _timed(client, "/api/analytics/dashboard", 300, timezone="UTC"),
                }
        finally:
            stack.stop()


def _days_ago(days: int) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).date().isoformat()
