"""SQL of voice-call campaigns. `scope` is the caller's account, or '' for an admin (all).

Job ids: the table's bigint `id`; the API shows it as `job-<id>` and as a 24-hex `_id`, so
both forms resolve to the primary key without another index."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

from services.runtime import tracing
from services.runtime.db import analyze_loaded

from .repo import ALL_FAILED, OPTED_OUT
from .repo import Q as CampaignsQ

JOB_COLUMNS = (
    "batch_id",
    "account_id",
    "debtor_key",
    "name",
    "dni",
    "phones",
    "payload",
    "max_attempts",
    "next_attempt_at",
    "estimated_cost",
)
ACTIVE_JOB = ("pending", "in_progress", "suspended")
# How far each side of the current minute's waiting jobs is counted in the index before the
# split is taken from the other side (10,000 entries: about 1.5 ms).
_SPLIT_BOUND = 10_000


def _status_is(param: str) -> str:
    """The job-status filter of the listings, on the listing's status parameter ('' = any)."""
    return (
        f"({param} = '' OR j.status = {param} AND ({param} <> 'pending' OR j.next_attempt_at <= now())"
        f" OR {param} = 'scheduled' AND j.status = 'pending' AND j.next_attempt_at > now())"
    )


class Q:
    INSERT_BATCH = """
        INSERT INTO batches (account_id, channel, name, status, description, priority, call_settings, use_case,
                             country, processing_type, allow_duplicates, file_name, window_size, origin)
        VALUES ($1, 'voice', $2, 'ingesting', $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12::jsonb)
        RETURNING *"""
    FINISH_INGEST = """
        UPDATE batches SET total_jobs = $2, invalid_rows = $3, duplicate_rows = $4, estimated_cost = $5,
               status = 'pending', updated_at = now()
        WHERE batch_id = $1 RETURNING *"""
    # Opted-out numbers are never called: they leave the new jobs' phones (in order), and a job
    # left with none ends cancelled at once, counted with the batch's cancelled ones. Each
    # phone is one look-up in the opt-outs' key; the last EXISTS is a one-time filter, so an
    # account without opt-outs does not even read its new jobs. ($1 batch, $2 account.)
    DROP_OPTED_OUT = """
        WITH hit AS (
            SELECT j.id,
                   ARRAY(SELECT u.p FROM unnest(j.phones) WITH ORDINALITY AS u(p, n)
                         WHERE NOT EXISTS (SELECT 1 FROM opt_outs o WHERE o.account_id = $2 AND o.phone = u.p)
                         ORDER BY u.n) AS kept
            FROM voice_jobs j
            WHERE j.batch_id = $1 AND j.status = 'pending'
              AND EXISTS (SELECT 1 FROM unnest(j.phones) AS u(p)
                          JOIN opt_outs o ON o.account_id = $2 AND o.phone = u.p)
              AND EXISTS (SELECT 1 FROM opt_outs WHERE account_id = $2)),
        upd AS (
            UPDATE voice_jobs j
            SET phones = CASE WHEN cardinality(hit.kept) = 0 THEN j.phones ELSE hit.kept END,
                status = CASE WHEN cardinality(hit.kept) = 0 THEN 'cancelled' ELSE j.status END,
                cancellation_reason = CASE WHEN cardinality(hit.kept) = 0 THEN $3 ELSE j.cancellation_reason END,
                finished_at = CASE WHEN cardinality(hit.kept) = 0 THEN now() ELSE j.finished_at END,
                updated_at = now()
            FROM hit WHERE j.id = hit.id
            RETURNING j.status)
        UPDATE batches
        SET cancelled_jobs = cancelled_jobs + (SELECT count(*) FROM upd WHERE status = 'cancelled'),
            updated_at = now()
        WHERE batch_id = $1
        RETURNING (SELECT count(*) FROM upd WHERE status = 'cancelled') AS cancelled,
                  (SELECT count(*) FROM upd) AS trimmed"""
    ACTIVE_DEBTORS = """
        SELECT DISTINCT debtor_key FROM voice_jobs
        WHERE account_id = $1 AND status IN ('pending', 'in_progress', 'suspended') AND debtor_key = ANY($2::text[])"""
    GET_BATCH_BY_OBJECT_ID = "SELECT * FROM batches WHERE object_id = $1 AND ($2 = '' OR account_id = $2)"
    UPDATE_BATCH = """
        UPDATE batches SET name = coalesce($3, name), description = coalesce($4, description),
               priority = coalesce($5, priority), call_settings = coalesce($6::jsonb, call_settings),
               updated_at = now()
        WHERE batch_id = $1 AND ($2 = '' OR account_id = $2) RETURNING *"""
    JOB_SELECT = """
        SELECT j.*, b.object_id AS batch_object_id FROM voice_jobs j LEFT JOIN batches b USING (batch_id)"""
    GET_JOB = JOB_SELECT + " WHERE j.id = $1 AND ($2 = '' OR j.account_id = $2)"
    # One query per way of listing, each walking its own index in order: a million-job
    # account never sorts. Newest first across an account; file order inside a batch.
    # `scheduled` is a stored `pending` job whose time has not come, `pending` one that is due.
    JOBS_OF_BATCH = (
        JOB_SELECT
        + """
        WHERE j.batch_id = $1 AND """
        + _status_is("$2")
        + " ORDER BY j.id LIMIT $3 OFFSET $4"
    )
    JOBS_OF_ACCOUNT = (
        JOB_SELECT
        + """
        WHERE j.account_id = $1 AND """
        + _status_is("$2")
        + " ORDER BY j.id DESC LIMIT $3 OFFSET $4"
    )
    JOBS_ALL = JOB_SELECT + " WHERE " + _status_is("$1") + " ORDER BY j.id DESC LIMIT $2 OFFSET $3"
    # Voice batches with jobs waiting (stored `pending`: due now or later), and how many.
    WAITING_BATCHES = """
        SELECT batch_id, total_jobs - sent_jobs - failed_jobs - cancelled_jobs - unknown_jobs - queued_jobs
                         - suspended_jobs AS waiting
        FROM batches
        WHERE channel = 'voice' AND status <> 'ingesting' AND ($1 = '' OR account_id = $1)
          AND ($2::uuid IS NULL OR batch_id = $2)
          AND total_jobs > sent_jobs + failed_jobs + cancelled_jobs + unknown_jobs + queued_jobs + suspended_jobs"""
    # Per batch: its pending jobs of the minutes after this one (the per-minute counts, see
    # migration 006), of this minute, and of this minute those still ahead and those due (the
    # last two from the due-jobs index, each counted only up to $2 entries).
    SPLIT_WAITING = """
        SELECT b.batch_id,
               (SELECT coalesce(sum(w.jobs), 0) FROM voice_waiting w
                WHERE w.batch_id = b.batch_id AND w.minute > date_trunc('minute', now())) AS later_minutes,
               (SELECT coalesce(sum(w.jobs), 0) FROM voice_waiting w
                WHERE w.batch_id = b.batch_id AND w.minute = date_trunc('minute', now())) AS this_minute,
               (SELECT count(*) FROM (SELECT 1 FROM voice_jobs j
                                      WHERE j.batch_id = b.batch_id AND j.status = 'pending'
                                        AND j.next_attempt_at > now()
                                        AND j.next_attempt_at < date_trunc('minute', now()) + interval '1 minute'
                                      LIMIT $2) s) AS ahead,
               (SELECT count(*) FROM (SELECT 1 FROM voice_jobs j
                                      WHERE j.batch_id = b.batch_id AND j.status = 'pending'
                                        AND j.next_attempt_at <= now()
                                        AND j.next_attempt_at >= date_trunc('minute', now())
                                      LIMIT $2) s) AS due
        FROM unnest($1::uuid[]) AS b(batch_id)"""
    AHEAD_THIS_MINUTE = """
        SELECT count(*) FROM voice_jobs
        WHERE batch_id = $1 AND status = 'pending' AND next_attempt_at > now()
          AND next_attempt_at < date_trunc('minute', now()) + interval '1 minute'"""
    # The per-minute deltas summed up, the minutes gone by dropped. Rows appended meanwhile by
    # other transactions are not in this statement's snapshot: they stay for the next fold.
    FOLD_WAITING = """
        WITH gone AS (DELETE FROM voice_waiting RETURNING batch_id, minute, jobs)
        INSERT INTO voice_waiting (batch_id, minute, jobs)
        SELECT batch_id, minute, sum(jobs) FROM gone WHERE minute >= date_trunc('minute', now())
        GROUP BY 1, 2 HAVING sum(jobs) <> 0"""
    # Totals come from the batch counters (kept by every change of a job), never from counting rows.
    JOB_COUNTERS = """
        SELECT coalesce(sum(total_jobs), 0) AS total, coalesce(sum(sent_jobs), 0) AS completed,
               coalesce(sum(failed_jobs), 0) AS failed, coalesce(sum(cancelled_jobs), 0) AS cancelled,
               coalesce(sum(suspended_jobs), 0) AS suspended, coalesce(sum(queued_jobs), 0) AS in_progress,
               coalesce(sum(called_jobs), 0) AS called
        FROM batches
        WHERE channel = 'voice' AND status <> 'ingesting' AND ($1 = '' OR account_id = $1)
          AND ($2::uuid IS NULL OR batch_id = $2)"""
    CANCEL_JOB = """
        UPDATE voice_jobs SET status = 'cancelled', cancellation_reason = $3, finished_at = now(), updated_at = now()
        WHERE id = $1 AND ($2 = '' OR account_id = $2) AND status IN ('pending', 'suspended')
        RETURNING *"""
    LOCK_JOB = "SELECT * FROM voice_jobs WHERE id = $1 AND ($2 = '' OR account_id = $2) FOR UPDATE"
    DELETE_JOB = "DELETE FROM voice_jobs WHERE id = $1"
    # A job being called is not deleted under its call: it is marked, and its result cancels it
    # (call_outcomes). A reason on a job in progress means exactly this (MARK_CALLING clears it).
    CANCEL_AFTER_CALL = "UPDATE voice_jobs SET cancellation_reason = $2, updated_at = now() WHERE id = $1 RETURNING *"
    RETRY_JOB = """
        UPDATE voice_jobs SET status = 'pending', attempts = 0, next_phone_index = 0, next_attempt_at = now(),
               finished_at = NULL, cancellation_reason = '', updated_at = now()
        WHERE id = $1 RETURNING *"""
    # The batch counters follow every change of a job's state, in the same transaction.
    # $2.. are deltas: total, completed (sent_jobs), failed, cancelled, suspended, called.
    MOVE_COUNTERS = """
        UPDATE batches SET total_jobs = total_jobs + $2, sent_jobs = sent_jobs + $3, failed_jobs = failed_jobs + $4,
               cancelled_jobs = cancelled_jobs + $5, suspended_jobs = suspended_jobs + $6,
               called_jobs = called_jobs + $7, updated_at = now()
        WHERE batch_id = $1 RETURNING *"""
    REOPEN_BATCH = """
        UPDATE batches SET status = 'processing', finished_at = NULL, updated_at = now()
        WHERE batch_id = $1 AND status = 'completed' RETURNING *"""
    DELETE_BATCH_JOBS = """
        WITH d AS (DELETE FROM voice_jobs WHERE batch_id = $1 RETURNING 1) SELECT count(*) FROM d"""
    DELETE_BATCH = "DELETE FROM batches WHERE batch_id = $1"
    DELETE_BATCH_HOURS = "DELETE FROM batch_hours WHERE batch_id = $1"
    HOURS = "SELECT * FROM batch_hours WHERE batch_id = $1 ORDER BY hour"
    # Counters only: a dashboard over millions of jobs reads a few rows per batch.
    DASHBOARD = """
        SELECT count(*) AS total_batches,
               count(*) FILTER (WHERE status IN ('pending', 'processing')) AS active_batches,
               count(*) FILTER (WHERE status = 'paused') AS paused_batches,
               count(*) FILTER (WHERE status = 'completed') AS completed_batches,
               count(*) FILTER (WHERE status = 'cancelled') AS cancelled_batches,
               coalesce(sum(total_jobs), 0) AS total_jobs,
               coalesce(sum(sent_jobs), 0) AS completed_jobs,
               coalesce(sum(failed_jobs), 0) AS failed_jobs,
               coalesce(sum(cancelled_jobs), 0) AS cancelled_jobs,
               coalesce(sum(suspended_jobs), 0) AS suspended_jobs,
               coalesce(sum(queued_jobs), 0) AS in_progress_jobs,
               coalesce(sum(total_cost), 0) AS total_cost,
               coalesce(sum(total_seconds), 0) AS total_seconds,
               -- A batch's jobs are created with it, in one transaction: the jobs created since $2.
               coalesce(sum(total_jobs) FILTER (WHERE created_at >= $2), 0) AS jobs_today
        FROM batches WHERE channel = 'voice' AND status <> 'ingesting' AND ($1 = '' OR account_id = $1)"""
    CALLS_SINCE = """
        SELECT coalesce(sum(h.calls), 0) FROM batch_hours h JOIN batches b USING (batch_id)
        WHERE h.hour >= $2 AND ($1 = '' OR b.account_id = $1)"""
    # Finished calls, newest first, along the call_ended_at indexes.
    CALLS_OF_ACCOUNT = (
        JOB_SELECT
        + """
        WHERE j.account_id = $1 AND j.call_ended_at IS NOT NULL
          AND ($2::uuid IS NULL OR j.batch_id = $2) AND ($3 = '' OR j.status = $3)
        ORDER BY j.call_ended_at DESC LIMIT $4 OFFSET $5"""
    )
    CALLS_ALL = (
        JOB_SELECT
        + """
        WHERE j.call_ended_at IS NOT NULL AND ($1::uuid IS NULL OR j.batch_id = $1) AND ($2 = '' OR j.status = $2)
        ORDER BY j.call_ended_at DESC LIMIT $3 OFFSET $4"""
    )
    # An export's page of a batch's jobs, along voice_jobs_batch. The outcome, summary and
    # sentiment are taken out of call_result here: a transcript never leaves the database.
    # The first phone has a cell of its own: a plain number, which a spreadsheet shows as is.
    EXPORT_JOBS = """
        SELECT 'job-' || id AS job_id, name, dni, phones[1] AS phone, array_to_string(phones[2:], ' ') AS other_phones,
               CASE WHEN status = 'pending' AND next_attempt_at > now() THEN 'scheduled' ELSE status END AS status,
               call_result #>> '{summary,call_status}' AS outcome, attempts, max_attempts,
               call_started_at, call_ended_at, call_duration_seconds, cost,
               call_result #>> '{summary,call_analysis,call_summary}' AS summary,
               call_result #>> '{summary,call_analysis,user_sentiment}' AS sentiment,
               fecha_pago_cliente, monto_pago_cliente, finished_at, cancellation_reason, id
        FROM voice_jobs WHERE batch_id = $1 AND id > $2
        ORDER BY id LIMIT $3"""
    COUNT_CALLS = """
        SELECT count(*) FROM voice_jobs j
        WHERE ($1 = '' OR j.account_id = $1) AND ($2::uuid IS NULL OR j.batch_id = $2) AND ($3 = '' OR j.status = $3)
          AND j.call_ended_at IS NOT NULL"""


class DialQ:
    # Running voice batches with a call due now, best priority first.
    DIALABLE = """
        SELECT b.batch_id, b.account_id FROM batches b
        WHERE b.channel = 'voice' AND b.status IN ('pending', 'processing')
          AND EXISTS (SELECT 1 FROM voice_jobs j
                      WHERE j.batch_id = b.batch_id AND j.status = 'pending' AND j.next_attempt_at <= now())
        ORDER BY b.priority, b.created_at LIMIT 500"""
    # One dialer at a time per account: the lines in use are read and taken under this lock.
    LOCK_ACCOUNT_LINES = "SELECT pg_advisory_xact_lock(hashtext('pregonero.dial.' || $1))"
    LOCK_DIALABLE = """
        SELECT * FROM batches
        WHERE batch_id = $1 AND channel = 'voice' AND status IN ('pending', 'processing') FOR UPDATE SKIP LOCKED"""
    CALLS_IN_FLIGHT = """
        SELECT coalesce(sum(queued_jobs), 0) FROM batches WHERE account_id = $1 AND channel = 'voice'"""
    DUE_JOBS = """
        SELECT * FROM voice_jobs
        WHERE batch_id = $1 AND status = 'pending' AND next_attempt_at <= $2
        ORDER BY next_attempt_at, id LIMIT $3 FOR UPDATE SKIP LOCKED"""
    LAST_ANSWERED = """
        SELECT debtor_key, max(answered_at) AS at FROM debtor_contacts
        WHERE account_id = $1 AND debtor_key = ANY($2::text[]) AND answered_at > now() - interval '7 days'
        GROUP BY debtor_key"""
    POSTPONE = """
        UPDATE voice_jobs j SET next_attempt_at = p.at, updated_at = now()
        FROM unnest($1::bigint[], $2::timestamptz[]) AS p(id, at) WHERE j.id = p.id"""
    MARK_CALLING = """
        UPDATE voice_jobs j SET status = 'in_progress', current_attempt = c.attempt, cancellation_reason = '',
               started_at = coalesce(j.started_at, $3), updated_at = now()
        FROM unnest($1::bigint[], $2::text[]) AS c(id, attempt) WHERE j.id = c.id"""


class ResultQ:
    LOCK_CALL = """
        SELECT * FROM voice_jobs WHERE id = $1 AND current_attempt = $2 AND status = 'in_progress' FOR UPDATE"""
    BOOK_CALL = """
        UPDATE voice_jobs SET status = $2, attempts = $3, next_phone_index = $4,
               next_attempt_at = coalesce($5, next_attempt_at), current_attempt = NULL, call_result = $6::jsonb,
               call_started_at = $7, call_ended_at = $8, call_duration_seconds = $9, cost = cost + $10,
               fecha_pago_cliente = coalesce($11, fecha_pago_cliente),
               monto_pago_cliente = coalesce($12, monto_pago_cliente),
               finished_at = CASE WHEN $2::text IN ('completed', 'failed', 'cancelled') THEN $8::timestamptz END,
               updated_at = now()
        WHERE id = $1"""
    HAND_BACK = "UPDATE voice_jobs SET status = 'pending', current_attempt = NULL, updated_at = now() WHERE id = $1"
    CANCEL_HANDED_BACK = """
        UPDATE voice_jobs SET status = 'cancelled', current_attempt = NULL, finished_at = now(), updated_at = now()
        WHERE id = $1"""
    # One ended call in its batch's hour: the analytics read these rows, never the jobs.
    # $7.. the account, then 1/0 for no answer, busy and voicemail (failed counts them too),
    # then the promise to pay the call collected (1/0 and its amount).
    ADD_HOUR = """
        INSERT INTO batch_hours AS h (batch_id, hour, calls, completed, failed, cost, seconds, account_id,
                                      no_answer, busy, voicemail, promises, promised_amount)
        VALUES ($1, $2, 1, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
        ON CONFLICT (batch_id, hour) DO UPDATE SET calls = h.calls + 1, completed = h.completed + $3,
               failed = h.failed + $4, cost = h.cost + $5, seconds = h.seconds + $6,
               no_answer = h.no_answer + $8, busy = h.busy + $9, voicemail = h.voicemail + $10,
               promises = h.promises + $11, promised_amount = h.promised_amount + $12"""
    ANSWERED = (
        "INSERT INTO debtor_contacts (account_id, debtor_key, answered_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
    )
    ADD_CALL_COUNTERS = """
        UPDATE batches SET sent_jobs = sent_jobs + $2, failed_jobs = failed_jobs + $3,
               cancelled_jobs = cancelled_jobs + $4, queued_jobs = greatest(queued_jobs - $5, 0),
               total_cost = total_cost + $6, total_seconds = total_seconds + $7, called_jobs = called_jobs + $8,
               updated_at = now()
        WHERE batch_id = $1 RETURNING *"""


# How a job's status moves the batch counters: (completed, failed, cancelled, suspended).
_COUNTED = {"completed": (1, 0, 0, 0), "failed": (0, 1, 0, 0), "cancelled": (0, 0, 1, 0), "suspended": (0, 0, 0, 1)}


_COUNTED_FIELDS = ("completed", "failed", "cancelled", "suspended", "in_progress")


def counted(status: str) -> tuple[int, int, int, int]:
    return _COUNTED.get(status, (0, 0, 0, 0))


class VoiceRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # --- ingestion, inside the caller's transaction ---

    async def insert_batch(self, conn: asyncpg.Connection, **fields: Any) -> asyncpg.Record:
        return await conn.fetchrow(
            Q.INSERT_BATCH,
            fields["account_id"],
            fields["name"],
            fields["description"],
            fields["priority"],
            fields["call_settings_json"],
            fields["use_case"],
            fields["country"],
            fields["processing_type"],
            fields["allow_duplicates"],
            fields["file_name"],
            fields["window_size"],
            tracing.stored(),  # the request creating it, for the dialer's releases later
        )

    async def copy_jobs(self, conn: asyncpg.Connection, *, records: Sequence[tuple[Any, ...]]) -> None:
        await conn.copy_records_to_table("voice_jobs", records=records, columns=JOB_COLUMNS)

    async def analyze_jobs(self, conn: asyncpg.Connection, *, rows: int) -> None:
        """After a load, in its transaction: see `analyze_loaded`."""
        await analyze_loaded(conn, table="voice_jobs", columns=("batch_id", "status"), rows=rows)

    async def finish_ingest(
        self, conn: asyncpg.Connection, *, batch_id: UUID, total: int, invalid: int, duplicates: int, cost: Decimal
    ) -> asyncpg.Record:
        return await conn.fetchrow(Q.FINISH_INGEST, batch_id, total, invalid, duplicates, cost)

    async def drop_opted_out(self, conn: asyncpg.Connection, *, batch_id: UUID, account_id: str) -> tuple[int, int]:
        """After a load, in its transaction: (jobs cancelled, as all their phones opted out;
        jobs that lost some of their phones)."""
        row = await conn.fetchrow(Q.DROP_OPTED_OUT, batch_id, account_id, OPTED_OUT)
        return row["cancelled"], row["trimmed"]

    async def active_debtors(self, *, account_id: str, keys: Sequence[str]) -> set[str]:
        rows = await self.pool.fetch(Q.ACTIVE_DEBTORS, account_id, list(keys))
        return {r["debtor_key"] for r in rows}

    # --- batches ---

    async def batch_by_object_id(self, *, object_id: str, scope: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(Q.GET_BATCH_BY_OBJECT_ID, object_id, scope)

    async def update_batch(
        self,
        *,
        batch_id: UUID,
        scope: str,
        name: str | None,
        description: str | None,
        priority: int | None,
        call_settings_json: str | None,
    ) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            Q.UPDATE_BATCH, batch_id, scope, name, description, priority, call_settings_json
        )

    async def delete_batch(self, *, batch_id: UUID, delete_jobs: bool, reason: str) -> tuple[int, int]:
        """(jobs deleted, jobs cancelled); the batch row goes in the same transaction."""
        async with self.pool.acquire() as conn, conn.transaction():
            deleted = cancelled = 0
            if delete_jobs:
                deleted = int(await conn.fetchval(Q.DELETE_BATCH_JOBS, batch_id))
            else:
                done = await conn.execute(CampaignsQ.CANCEL_VOICE_JOBS, batch_id, reason)
                cancelled = int(done.split()[-1])
            await conn.execute(Q.DELETE_BATCH_HOURS, batch_id)
            await conn.execute(Q.DELETE_BATCH, batch_id)
            return deleted, cancelled

    async def hours(self, *, batch_id: UUID) -> list[asyncpg.Record]:
        return await self.pool.fetch(Q.HOURS, batch_id)

    # --- jobs ---

    async def get_job(self, *, job_id: int, scope: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(Q.GET_JOB, job_id, scope)

    async def list_jobs(
        self, *, scope: str, batch_id: UUID | None, status: str, limit: int, skip: int
    ) -> tuple[list[asyncpg.Record], int]:
        if batch_id is not None:
            rows = await self.pool.fetch(Q.JOBS_OF_BATCH, batch_id, status, limit, skip)
        elif scope:
            rows = await self.pool.fetch(Q.JOBS_OF_ACCOUNT, scope, status, limit, skip)
        else:
            rows = await self.pool.fetch(Q.JOBS_ALL, status, limit, skip)
        c = await self.pool.fetchrow(Q.JOB_COUNTERS, scope, batch_id)
        others = c["completed"] + c["failed"] + c["cancelled"] + c["suspended"] + c["in_progress"]
        waiting = c["total"] - others  # pending and scheduled: the counters do not tell them apart
        if status in ("pending", "scheduled"):
            scheduled = await self.scheduled_in(scope=scope, batch_id=batch_id)
            return rows, scheduled if status == "scheduled" else int(waiting) - scheduled
        total = {"": c["total"], **{k: c[k] for k in _COUNTED_FIELDS}}.get(status)
        return rows, int(total if total is not None else 0)

    async def scheduled_in(self, *, scope: str, batch_id: UUID | None = None) -> int:
        """How many jobs wait for a later time over the voice batches of the scope (or the one)."""
        rows = await self.pool.fetch(Q.WAITING_BATCHES, scope, batch_id)
        return sum((await self.scheduled({r["batch_id"]: int(r["waiting"]) for r in rows})).values())

    async def scheduled(self, waiting: dict[UUID, int]) -> dict[UUID, int]:
        """How many of each batch's waiting jobs wait for a later time (their start, window or
        next round): `scheduled`, the rest being due. The minutes ahead come from the per-minute
        counts; only the current minute is looked up in the due-jobs index, and counted whole
        only when it holds many jobs on both sides of now."""
        if not waiting:
            return {}
        later: dict[UUID, int] = {}
        for r in await self.pool.fetch(Q.SPLIT_WAITING, list(waiting), _SPLIT_BOUND):
            batch_id, ahead = r["batch_id"], r["ahead"]
            if ahead >= _SPLIT_BOUND:
                if r["due"] < _SPLIT_BOUND:
                    ahead = r["this_minute"] - r["due"]
                else:
                    ahead = await self.pool.fetchval(Q.AHEAD_THIS_MINUTE, batch_id)
            later[batch_id] = max(0, min(int(r["later_minutes"] + ahead), waiting[batch_id]))
        return later

    async def fold_waiting(self) -> int:
        """Sum up the per-minute deltas (see migration 006); returns 0: nothing to hurry."""
        await self.pool.execute(Q.FOLD_WAITING)
        return 0

    async def export_jobs(self, *, batch_id: UUID, after: int, limit: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(Q.EXPORT_JOBS, batch_id, after, limit)

    async def cancel_job(self, *, job_id: int, scope: str, reason: str) -> asyncpg.Record | None:
        async with self.pool.acquire() as conn, conn.transaction():
            job = await conn.fetchrow(Q.LOCK_JOB, job_id, scope)
            if job is None or job["status"] not in ("pending", "suspended"):
                return job
            row = await conn.fetchrow(Q.CANCEL_JOB, job_id, scope, reason)
            _, _, _, suspended = counted(job["status"])
            await conn.fetchrow(Q.MOVE_COUNTERS, job["batch_id"], 0, 0, 0, 1, -suspended, 0)
            await self._finish_if_done(conn, job["batch_id"])
            return row

    async def delete_job(self, *, job_id: int, scope: str, reason: str) -> asyncpg.Record | None:
        """The deleted job (None when there is none); the counters follow in the same transaction.
        A job being called stays, marked to end cancelled with its call: the job as marked."""
        async with self.pool.acquire() as conn, conn.transaction():
            job = await conn.fetchrow(Q.LOCK_JOB, job_id, scope)
            if job is None:
                return None
            if job["status"] == "in_progress":
                return await conn.fetchrow(Q.CANCEL_AFTER_CALL, job_id, reason)
            await conn.execute(Q.DELETE_JOB, job_id)
            completed, failed, cancelled, suspended = counted(job["status"])
            called = int(job["call_ended_at"] is not None)
            await conn.fetchrow(
                Q.MOVE_COUNTERS, job["batch_id"], -1, -completed, -failed, -cancelled, -suspended, -called
            )
            await self._finish_if_done(conn, job["batch_id"])
            return job

    async def retry_job(self, *, job_id: int, scope: str) -> asyncpg.Record | None:
        async with self.pool.acquire() as conn, conn.transaction():
            job = await conn.fetchrow(Q.LOCK_JOB, job_id, scope)
            if job is None or job["status"] not in ("failed", "cancelled"):
                return job
            completed, failed, cancelled, suspended = counted(job["status"])
            await conn.fetchrow(Q.MOVE_COUNTERS, job["batch_id"], 0, -completed, -failed, -cancelled, -suspended, 0)
            await conn.fetchrow(Q.REOPEN_BATCH, job["batch_id"])
            return await conn.fetchrow(Q.RETRY_JOB, job_id)

    async def _finish_if_done(self, conn: asyncpg.Connection, batch_id: UUID) -> None:
        await conn.fetchrow(CampaignsQ.FINISH_IF_DONE, batch_id, ALL_FAILED)  # the one rule for when a batch is done

    # --- the dialer, inside its transaction ---

    async def dialable_batches(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(DialQ.DIALABLE)

    async def lock_dialable(
        self, conn: asyncpg.Connection, *, batch_id: UUID, account_id: str
    ) -> asyncpg.Record | None:
        await conn.execute(DialQ.LOCK_ACCOUNT_LINES, account_id)
        return await conn.fetchrow(DialQ.LOCK_DIALABLE, batch_id)

    async def calls_in_flight(self, conn: asyncpg.Connection, *, account_id: str) -> int:
        return int(await conn.fetchval(DialQ.CALLS_IN_FLIGHT, account_id))

    async def due_jobs(self, conn: asyncpg.Connection, *, batch_id: UUID, now: Any, limit: int) -> list[asyncpg.Record]:
        return await conn.fetch(DialQ.DUE_JOBS, batch_id, now, limit)

    async def last_answered(self, conn: asyncpg.Connection, *, account_id: str, keys: Sequence[str]) -> dict[str, Any]:
        return {r["debtor_key"]: r["at"] for r in await conn.fetch(DialQ.LAST_ANSWERED, account_id, list(keys))}

    async def postpone(self, conn: asyncpg.Connection, *, ids: Sequence[int], until: Sequence[Any]) -> None:
        await conn.execute(DialQ.POSTPONE, list(ids), list(until))

    async def mark_calling(
        self, conn: asyncpg.Connection, *, ids: Sequence[int], attempts: Sequence[str], now: Any
    ) -> None:
        await conn.execute(DialQ.MARK_CALLING, list(ids), list(attempts), now)

    async def suspend(self, conn: asyncpg.Connection, *, batch_id: UUID, reason: str) -> asyncpg.Record:
        return await conn.fetchrow(CampaignsQ.SUSPEND_VOICE, batch_id, reason)

    # --- call results, inside the results transaction ---

    async def lock_call(self, conn: asyncpg.Connection, *, job_id: int, attempt_id: str) -> asyncpg.Record | None:
        return await conn.fetchrow(ResultQ.LOCK_CALL, job_id, attempt_id)

    async def cancel_handed_back(self, conn: asyncpg.Connection, *, job_id: int) -> None:
        await conn.execute(ResultQ.CANCEL_HANDED_BACK, job_id)

    async def book_call(
        self,
        conn: asyncpg.Connection,
        *,
        job_id: int,
        status: str,
        state: Any,
        result: dict[str, Any] | None,
        now: datetime,
        cost: Decimal = Decimal(0),
        duration_s: Decimal = Decimal(0),
        promised_on: date | None = None,
        promised_amount: Decimal | None = None,
    ) -> None:
        if state is None:
            await conn.execute(ResultQ.HAND_BACK, job_id)
            return
        await conn.execute(
            ResultQ.BOOK_CALL,
            job_id,
            status,
            state.attempts,
            state.next_phone_index,
            state.next_attempt_at,
            json.dumps(result or {}),
            now - timedelta(seconds=float(duration_s)),
            now,
            duration_s,
            cost,
            promised_on,
            promised_amount,
        )

    async def add_hour(
        self,
        conn: asyncpg.Connection,
        job: asyncpg.Record,
        *,
        at: datetime,
        outcome: str,
        cost: Decimal,
        seconds: Decimal,
        promise: tuple[date | None, Decimal | None],
    ) -> None:
        """One ended call in its batch's hour: `outcome` is the call's (completed = answered;
        anything else failed), `promise` the date and amount the debtor promised, if any."""
        when, amount = promise
        await conn.execute(
            ResultQ.ADD_HOUR,
            job["batch_id"],
            at.replace(minute=0, second=0, microsecond=0),
            int(outcome == "completed"),
            int(outcome != "completed"),
            cost,
            seconds,
            job["account_id"],
            int(outcome == "no_answer"),
            int(outcome == "busy"),
            int(outcome == "voicemail"),
            int(when is not None or amount is not None),
            amount or 0,
        )

    async def answered(self, conn: asyncpg.Connection, *, account_id: str, debtor_key: str, at: datetime) -> None:
        await conn.execute(ResultQ.ANSWERED, account_id, debtor_key, at)

    async def add_call_counters(
        self,
        conn: asyncpg.Connection,
        *,
        batch_id: UUID,
        completed: int,
        failed: int,
        cancelled: int,
        ended: int,
        cost: Decimal,
        seconds: Decimal,
        first_calls: int,
    ) -> asyncpg.Record:
        return await conn.fetchrow(
            ResultQ.ADD_CALL_COUNTERS, batch_id, completed, failed, cancelled, ended, cost, seconds, first_calls
        )

    # --- dashboard ---

    async def dashboard(self, *, scope: str, today: datetime) -> asyncpg.Record:
        return await self.pool.fetchrow(Q.DASHBOARD, scope, today)

    async def calls_since(self, *, scope: str, since: Any) -> int:
        return int(await self.pool.fetchval(Q.CALLS_SINCE, scope, since))

    async def calls(
        self, *, scope: str, batch_id: UUID | None, status: str, limit: int, skip: int, count: bool = True
    ) -> tuple[list[asyncpg.Record], int]:
        if scope:
            rows = await self.pool.fetch(Q.CALLS_OF_ACCOUNT, scope, batch_id, status, limit, skip)
        else:
            rows = await self.pool.fetch(Q.CALLS_ALL, batch_id, status, limit, skip)
        if not count:
            return rows, 0
        if status:  # a filtered history is counted; the whole one comes from the counters
            return rows, int(await self.pool.fetchval(Q.COUNT_CALLS, scope, batch_id, status))
        return rows, int((await self.pool.fetchrow(Q.JOB_COUNTERS, scope, batch_id))["called"])
