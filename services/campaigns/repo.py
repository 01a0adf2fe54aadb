"""SQL of the campaigns service. `scope` is the caller's account, or '' for an admin (all)."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

from services.runtime import tracing
from services.runtime.db import analyze_loaded

JOB_COLUMNS = ("batch_id", "job_id", "phone", "vals")
# The error of a job whose number opted out of the account's messages (never sent).
OPTED_OUT = "opted out"
# The reason a WhatsApp batch none of whose recipients could be sent ends failed with.
ALL_FAILED = "Todos los envíos fallaron"
# The reason a WhatsApp batch waits, suspended, while none of its devices can send for now
# (disconnected, waiting for a QR scan, at its daily cap): a device connecting resumes it.
NO_CONNECTED_DEVICES = "Ningún device conectado o con cupo diario: el envío sigue cuando uno vuelva"


class Q:
    INSERT_BATCH = """
        INSERT INTO batches (account_id, channel, name, status, message_template, devices_limit,
                             sender_ids, window_size, file_name, origin)
        VALUES ($1, $2, $3, 'ingesting', $4, $5, $6, $7, $8, $9::jsonb)
        RETURNING *"""
    FINISH_INGEST = """
        UPDATE batches SET total_jobs = $2, invalid_rows = $3, duplicate_rows = $4,
               status = 'pending', updated_at = now()
        WHERE batch_id = $1 RETURNING *"""
    # Numbers that opted out of the account's messages are never sent: their jobs end
    # cancelled as they are loaded, counted with the batch's cancelled ones. The EXISTS is a
    # one-time filter, so an account without opt-outs does not even read its new jobs.
    CANCEL_OPTED_OUT = """
        WITH c AS (
            UPDATE jobs j SET status = 'cancelled', error = $3, finished_at = now()
            FROM opt_outs o
            WHERE j.batch_id = $1 AND j.status = 'pending' AND o.account_id = $2 AND o.phone = j.phone
              AND EXISTS (SELECT 1 FROM opt_outs WHERE account_id = $2)
            RETURNING j.job_id)
        UPDATE batches SET cancelled_jobs = cancelled_jobs + (SELECT count(*) FROM c), updated_at = now()
        WHERE batch_id = $1
        RETURNING (SELECT count(*) FROM c)"""
    GET_BATCH = "SELECT * FROM batches WHERE batch_id = $1 AND ($2 = '' OR account_id = $2)"
    LIST_BATCHES = """
        SELECT * FROM batches
        WHERE ($1 = '' OR account_id = $1) AND ($2 = '' OR channel = $2) AND status <> 'ingesting'
          AND ($3 = '' OR status = $3 OR ($3 = 'active' AND status IN ('pending', 'processing')))
        ORDER BY created_at DESC LIMIT $4 OFFSET $5"""
    COUNT_BATCHES = """
        SELECT count(*) FROM batches
        WHERE ($1 = '' OR account_id = $1) AND ($2 = '' OR channel = $2) AND status <> 'ingesting'
          AND ($3 = '' OR status = $3 OR ($3 = 'active' AND status IN ('pending', 'processing')))"""
    RUNNABLE_BATCHES = """
        SELECT batch_id FROM batches
        WHERE status IN ('pending', 'processing') AND queued_jobs < window_size AND channel = 'whatsapp'
        ORDER BY created_at LIMIT 200"""
    # SKIP LOCKED: two feeder replicas never release the same batch at once.
    LOCK_FOR_RELEASE = """
        SELECT * FROM batches
        WHERE batch_id = $1 AND status IN ('pending', 'processing') FOR UPDATE SKIP LOCKED"""
    REQUEUED_JOBS = """
        SELECT j.job_id, j.phone, j.vals, j.attempts FROM requeued r JOIN jobs j USING (batch_id, job_id)
        WHERE r.batch_id = $1 ORDER BY r.job_id LIMIT $2"""
    UNREQUEUE = """
        WITH gone AS (DELETE FROM requeued WHERE batch_id = $1 AND job_id = ANY($2::bigint[]) RETURNING job_id)
        UPDATE jobs SET status = 'pending' FROM gone WHERE jobs.batch_id = $1 AND jobs.job_id = gone.job_id"""
    NEXT_JOBS = """
        SELECT job_id, phone, vals, attempts FROM jobs
        WHERE batch_id = $1 AND job_id > $2 AND status = 'pending' ORDER BY job_id LIMIT $3"""
    # Serialises result batches of one batch with its cancel, so a cancel is seen by both.
    LOCK_BATCH_STATUS = (
        "SELECT batch_id, status, channel, country, use_case, call_settings FROM batches WHERE batch_id = $1 FOR UPDATE"
    )
    NEXT_CHUNK_SEQ = "SELECT nextval('chunk_seq')"
    MARK_RELEASED = """
        UPDATE batches SET released_upto = greatest(released_upto, $2), queued_jobs = queued_jobs + $3,
               status = 'processing', started_at = coalesce(started_at, now()), updated_at = now(),
               hold_left = $4
        WHERE batch_id = $1"""
    SET_HOLD = """
        UPDATE batches SET hold_seq = $2, hold_left = $3, hold_unlimited = $4, unit_price = $5 WHERE batch_id = $1"""
    # Jobs the credit does not cover wait as `suspended`: the unreleased ones, the handed
    # back ones, and those of this round the hold fell short of ($3).
    SUSPEND = """
        WITH s AS (
            UPDATE jobs SET status = 'suspended'
            WHERE batch_id = $1 AND ((status = 'pending' AND job_id > $2) OR status = 'requeue'
                                     OR (status = 'pending' AND job_id = ANY($3::bigint[])))
            RETURNING job_id),
        d AS (DELETE FROM requeued WHERE batch_id = $1)
        UPDATE batches SET status = 'suspended', suspension_reason = $4,
               suspended_jobs = suspended_jobs + (SELECT count(*) FROM s), updated_at = now()
        WHERE batch_id = $1 RETURNING *"""
    # Voice: pending calls wait as `suspended` (calls in progress end on their own).
    SUSPEND_VOICE = """
        WITH s AS (
            UPDATE voice_jobs SET status = 'suspended', updated_at = now()
            WHERE batch_id = $1 AND status = 'pending' RETURNING 1)
        UPDATE batches SET status = 'suspended', suspension_reason = $2,
               suspended_jobs = suspended_jobs + (SELECT count(*) FROM s), updated_at = now()
        WHERE batch_id = $1 RETURNING *"""
    UNSUSPEND_VOICE_JOBS = """
        UPDATE voice_jobs SET status = 'pending', updated_at = now() WHERE batch_id = $1 AND status = 'suspended'"""
    LOCK_SUSPENDED = """
        SELECT * FROM batches WHERE batch_id = $1 AND status = 'suspended' AND ($2 = '' OR account_id = $2)
        FOR UPDATE"""
    # Suspended jobs go back where they came from: released ones to the requeued list.
    UNSUSPEND_JOBS = """
        WITH s AS (
            UPDATE jobs SET status = CASE WHEN job_id <= $2 THEN 'requeue' ELSE 'pending' END
            WHERE batch_id = $1 AND status = 'suspended'
            RETURNING job_id, status)
        INSERT INTO requeued (batch_id, job_id) SELECT $1, job_id FROM s WHERE status = 'requeue'
        ON CONFLICT DO NOTHING"""
    RESUME_SUSPENDED = """
        UPDATE batches SET status = CASE WHEN started_at IS NULL THEN 'pending' ELSE 'processing' END,
               suspended_jobs = 0, suspension_reason = '', updated_at = now()
        WHERE batch_id = $1 RETURNING *"""
    SUSPENDED_BATCHES = "SELECT batch_id FROM batches WHERE account_id = $1 AND status = 'suspended'"
    # Batches suspended for the reason $2 (none of their devices could send) that one of the
    # devices $3 may now send for.
    WAITING_FOR_DEVICES = """
        SELECT batch_id FROM batches
        WHERE account_id = $1 AND status = 'suspended' AND suspension_reason = $2 AND sender_ids && $3::bigint[]"""
    # Batches that have waited for their devices ($1) longer than $2 seconds: tried again
    # whatever the device events said (one may have been lost).
    LONG_WAITING_FOR_DEVICES = """
        SELECT batch_id FROM batches
        WHERE status = 'suspended' AND suspension_reason = $1 AND updated_at < now() - make_interval(secs => $2)
        ORDER BY updated_at LIMIT 100"""
    RUNNING_BATCHES = """
        SELECT batch_id FROM batches WHERE account_id = $1 AND status IN ('pending', 'processing')"""
    LOCK_RUNNING = """
        SELECT * FROM batches WHERE batch_id = $1 AND status IN ('pending', 'processing') FOR UPDATE"""
    # Holds are settled (released in accounts) once the batch has nothing in flight and is
    # not running; a running batch keeps its current hold for the next releases.
    UNSETTLED = """
        SELECT batch_id FROM batches
        WHERE holds_settled_upto < hold_seq AND queued_jobs = 0
          AND status NOT IN ('pending', 'processing', 'ingesting')
        ORDER BY updated_at LIMIT 100"""
    LOCK_FOR_SETTLE = """
        SELECT * FROM batches
        WHERE batch_id = $1 AND holds_settled_upto < hold_seq AND queued_jobs = 0
          AND status NOT IN ('pending', 'processing', 'ingesting')
        FOR UPDATE SKIP LOCKED"""
    MARK_SETTLED = "UPDATE batches SET holds_settled_upto = hold_seq, hold_left = 0 WHERE batch_id = $1"
    # One attempt's outcome applies once: the job must still be unresolved and at the
    # attempt before this one, so a redelivered result changes nothing.
    APPLY_OUTCOMES = """
        WITH r AS (
            SELECT * FROM unnest($2::bigint[], $3::text[], $4::bigint[], $5::text[], $6::int[])
                AS r(job_id, status, sender_id, error, attempt_no)),
        upd AS (
            UPDATE jobs j
            SET status = CASE WHEN r.status = 'requeue' AND $7 THEN 'cancelled' ELSE r.status END,
                attempts = CASE WHEN r.status = 'requeue' THEN j.attempts ELSE r.attempt_no END,
                sender_id = nullif(r.sender_id, 0),
                error = nullif(r.error, ''),
                finished_at = CASE WHEN r.status = 'requeue' AND NOT $7 THEN NULL ELSE now() END
            FROM r
            WHERE j.batch_id = $1 AND j.job_id = r.job_id AND j.status = 'pending'
              AND j.attempts = r.attempt_no - 1
            RETURNING j.job_id, j.status),
        parked AS (
            INSERT INTO requeued (batch_id, job_id) SELECT $1, job_id FROM upd WHERE status = 'requeue'
            ON CONFLICT DO NOTHING)
        SELECT job_id, status FROM upd"""
    # $9.. the last recipient sent and the last failed of these results ('' = none among them).
    ADD_COUNTERS = """
        UPDATE batches SET sent_jobs = sent_jobs + $2, failed_jobs = failed_jobs + $3, total_cost = total_cost + $8,
               cancelled_jobs = cancelled_jobs + $4, unknown_jobs = unknown_jobs + $5,
               queued_jobs = greatest(queued_jobs - $6, 0),
               devices_used = greatest(devices_used, $7), updated_at = now(),
               last_sent_to = CASE WHEN $9 = '' THEN last_sent_to ELSE $9 END,
               last_sent_sender_id = CASE WHEN $9 = '' THEN last_sent_sender_id ELSE $10 END,
               last_failed_to = CASE WHEN $11 = '' THEN last_failed_to ELSE $11 END,
               last_failed_sender_id = CASE WHEN $11 = '' THEN last_failed_sender_id ELSE $12 END,
               last_failed_error = CASE WHEN $11 = '' THEN last_failed_error ELSE $13 END
        WHERE batch_id = $1 RETURNING *"""
    # A batch is done when every job is resolved; a cancelled or failed one once nothing is in
    # flight. A WhatsApp batch none of whose recipients could be sent ends failed, with $2 as
    # the reason (voice counts conversations, not sends: a batch of unanswered calls completed).
    FINISH_IF_DONE = """
        UPDATE batches
        SET status = CASE WHEN status IN ('cancelled', 'failed') THEN status
                          WHEN channel = 'whatsapp' AND sent_jobs = 0 AND failed_jobs > 0 THEN 'failed'
                          ELSE 'completed' END,
            error = CASE WHEN status NOT IN ('cancelled', 'failed') AND channel = 'whatsapp'
                              AND sent_jobs = 0 AND failed_jobs > 0 THEN $2 ELSE error END,
            finished_at = now(), updated_at = now()
        WHERE batch_id = $1 AND finished_at IS NULL AND status IN ('processing', 'pending', 'cancelled', 'failed')
          AND sent_jobs + failed_jobs + cancelled_jobs + unknown_jobs >= total_jobs
          AND queued_jobs = 0
        RETURNING *"""
    # A WhatsApp batch that can no longer proceed (none of its devices is active) fails: the
    # jobs not released, handed back or suspended fail now with the reason; released ones
    # resolve as their dispatcher hands them back.
    FAIL_BATCH = """
        WITH f AS (
            UPDATE jobs SET status = 'failed', error = $2, finished_at = now()
            WHERE batch_id = $1
              AND (status IN ('requeue', 'suspended')
                   OR (status = 'pending' AND job_id > (SELECT released_upto FROM batches WHERE batch_id = $1)))
            RETURNING job_id),
        d AS (DELETE FROM requeued WHERE batch_id = $1)
        UPDATE batches SET status = 'failed', error = $2, suspended_jobs = 0,
               failed_jobs = failed_jobs + (SELECT count(*) FROM f), updated_at = now()
        WHERE batch_id = $1 AND status IN ('pending', 'processing', 'paused', 'suspended')
        RETURNING *"""
    SET_STATUS = """
        UPDATE batches SET status = $3, updated_at = now()
        WHERE batch_id = $1 AND ($2 = '' OR account_id = $2) AND status = ANY($4::text[])
        RETURNING *"""
    CANCEL_BATCH = """
        UPDATE batches SET status = 'cancelled', error = $3, suspended_jobs = 0, updated_at = now()
        WHERE batch_id = $1 AND ($2 = '' OR account_id = $2)
          AND status IN ('pending', 'processing', 'paused', 'suspended')
        RETURNING *"""
    # Jobs never released, or handed back, are cancelled at once; released ones resolve as
    # their dispatcher hands them back.
    CANCEL_JOBS = """
        UPDATE jobs SET status = 'cancelled', finished_at = now()
        WHERE batch_id = $1 AND (status IN ('requeue', 'suspended') OR (status = 'pending' AND job_id > $2))"""
    CANCEL_REQUEUED = "DELETE FROM requeued WHERE batch_id = $1"
    # Voice: jobs not being called are cancelled now; calls in progress end on their own.
    CANCEL_VOICE_JOBS = """
        UPDATE voice_jobs SET status = 'cancelled', cancellation_reason = $2, finished_at = now(), updated_at = now()
        WHERE batch_id = $1 AND status IN ('pending', 'suspended')"""
    ADD_CANCELLED = """
        UPDATE batches SET cancelled_jobs = cancelled_jobs + $2, updated_at = now()
        WHERE batch_id = $1 RETURNING *"""
    REQUEUE_FAILED = """
        WITH f AS (
            UPDATE jobs SET status = 'requeue', error = NULL, finished_at = NULL
            WHERE batch_id = $1 AND status = 'failed' RETURNING job_id)
        INSERT INTO requeued (batch_id, job_id) SELECT $1, job_id FROM f ON CONFLICT DO NOTHING"""
    REOPEN_FOR_RETRY = """
        UPDATE batches SET failed_jobs = failed_jobs - $2, status = 'processing', finished_at = NULL,
               error = CASE WHEN status = 'failed' THEN '' ELSE error END, updated_at = now()
        WHERE batch_id = $1 RETURNING *"""
    LIST_RESULTS = """
        SELECT job_id, phone, status, sender_id, error, attempts, finished_at,
               delivery, delivered_at, read_at, delivery_error FROM jobs
        WHERE batch_id = $1 AND job_id > $2 AND ($3 = '' OR status = $3)
        ORDER BY job_id LIMIT $4"""
    # An export's page of a batch's results, along the primary key. The recipient's values
    # come padded or cut to the $4 the template uses, so every row has as many cells.
    EXPORT_RESULTS = """
        SELECT job_id, phone, status, sender_id, error, attempts, finished_at,
               delivery, delivered_at, read_at, delivery_error,
               (vals || array_fill(''::text, ARRAY[$4::int]))[1:$4] AS vals
        FROM jobs WHERE batch_id = $1 AND job_id > $2
        ORDER BY job_id LIMIT $3"""

    # A report only moves a sent message forward (delivered → read, or failed) and keeps the
    # earliest time of each step: reports come out of order and repeated, and a late
    # `delivered` must not undo a `read` (though it may tell when the delivery happened).
    APPLY_DELIVERY = """
        UPDATE jobs j
        SET delivery = CASE WHEN r.rank > coalesce(array_position(ARRAY['delivered', 'read', 'failed'], j.delivery), 0)
                            THEN r.status ELSE j.delivery END,
            delivered_at = least(j.delivered_at, r.delivered_at),
            read_at = least(j.read_at, r.read_at),
            delivery_error = coalesce(j.delivery_error, r.error)
        FROM (SELECT u.*, array_position(ARRAY['delivered', 'read', 'failed'], u.status) AS rank
              FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::text[])
                   AS u(batch_id, job_id, status, delivered_at, read_at, error)) r
        WHERE j.batch_id = r.batch_id AND j.job_id = r.job_id AND j.status = 'sent'
          AND (r.rank > coalesce(array_position(ARRAY['delivered', 'read', 'failed'], j.delivery), 0)
               OR r.delivered_at < j.delivered_at OR r.read_at < j.read_at)"""


class CampaignsRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def insert_batch(
        self,
        conn: asyncpg.Connection,
        *,
        account_id: str,
        channel: str,
        name: str,
        template: str,
        devices_limit: int,
        sender_ids: Sequence[int],
        window_size: int,
        file_name: str,
    ) -> asyncpg.Record:
        # The request creating it (its id, its trace), for the feeder's releases later.
        origin = tracing.stored()
        return await conn.fetchrow(
            Q.INSERT_BATCH,
            account_id,
            channel,
            name,
            template,
            devices_limit,
            list(sender_ids),
            window_size,
            file_name,
            origin,
        )

    async def copy_jobs(self, conn: asyncpg.Connection, *, records: Sequence[tuple[Any, ...]]) -> None:
        await conn.copy_records_to_table("jobs", records=records, columns=JOB_COLUMNS)

    async def analyze_jobs(self, conn: asyncpg.Connection, *, rows: int) -> None:
        """After a load, in its transaction: see `analyze_loaded`."""
        await analyze_loaded(conn, table="jobs", columns=("batch_id", "status"), rows=rows)

    async def finish_ingest(
        self, conn: asyncpg.Connection, *, batch_id: UUID, total: int, invalid: int, duplicates: int
    ) -> asyncpg.Record:
        return await conn.fetchrow(Q.FINISH_INGEST, batch_id, total, invalid, duplicates)

    async def cancel_opted_out(self, conn: asyncpg.Connection, *, batch_id: UUID, account_id: str) -> int:
        """After a load, in its transaction: how many of the new jobs were opted-out numbers."""
        return int(await conn.fetchval(Q.CANCEL_OPTED_OUT, batch_id, account_id, OPTED_OUT))

    async def get_batch(self, *, batch_id: UUID, scope: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(Q.GET_BATCH, batch_id, scope)

    async def list_batches(
        self, *, scope: str, channel: str, status: str, limit: int, skip: int
    ) -> tuple[list[asyncpg.Record], int]:
        rows = await self.pool.fetch(Q.LIST_BATCHES, scope, channel, status, limit, skip)
        total = await self.pool.fetchval(Q.COUNT_BATCHES, scope, channel, status)
        return rows, int(total)

    async def runnable_batches(self) -> list[UUID]:
        return [r["batch_id"] for r in await self.pool.fetch(Q.RUNNABLE_BATCHES)]

    async def set_status(
        self, *, batch_id: UUID, scope: str, status: str, from_statuses: Sequence[str]
    ) -> asyncpg.Record | None:
        return await self.pool.fetchrow(Q.SET_STATUS, batch_id, scope, status, list(from_statuses))

    async def cancel(self, *, batch_id: UUID, scope: str, reason: str) -> asyncpg.Record | None:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(Q.CANCEL_BATCH, batch_id, scope, reason)
            if row is None:
                return None
            if row["channel"] == "voice":
                done = await conn.execute(Q.CANCEL_VOICE_JOBS, batch_id, reason)
            else:
                done = await conn.execute(Q.CANCEL_JOBS, batch_id, row["released_upto"])
                await conn.execute(Q.CANCEL_REQUEUED, batch_id)
            count = int(done.split()[-1])
            row = await conn.fetchrow(Q.ADD_CANCELLED, batch_id, count)
            return await conn.fetchrow(Q.FINISH_IF_DONE, batch_id, ALL_FAILED) or row

    async def retry_failed(self, *, batch_id: UUID) -> asyncpg.Record:
        async with self.pool.acquire() as conn, conn.transaction():
            done = await conn.execute(Q.REQUEUE_FAILED, batch_id)
            return await conn.fetchrow(Q.REOPEN_FOR_RETRY, batch_id, int(done.split()[-1]))

    async def list_results(self, *, batch_id: UUID, after: int, status: str, limit: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(Q.LIST_RESULTS, batch_id, after, status, limit)

    async def export_results(self, *, batch_id: UUID, after: int, limit: int, values: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(Q.EXPORT_RESULTS, batch_id, after, limit, values)

    async def apply_delivery(self, *, rows: Sequence[tuple[UUID, int, str, Any, Any, str | None]]) -> int:
        """rows: (batch_id, job_id, status, delivered_at, read_at, error), one per job."""
        if not rows:
            return 0
        columns = list(zip(*rows, strict=True))
        done = await self.pool.execute(Q.APPLY_DELIVERY, *(list(c) for c in columns))
        return int(done.split()[-1])

    # --- feeder and results: called inside the caller's transaction ---

    async def lock_for_release(self, conn: asyncpg.Connection, *, batch_id: UUID) -> asyncpg.Record | None:
        return await conn.fetchrow(Q.LOCK_FOR_RELEASE, batch_id)

    async def requeued_jobs(self, conn: asyncpg.Connection, *, batch_id: UUID, limit: int) -> list[asyncpg.Record]:
        rows = await conn.fetch(Q.REQUEUED_JOBS, batch_id, limit)
        if rows:
            await conn.execute(Q.UNREQUEUE, batch_id, [r["job_id"] for r in rows])
        return rows

    async def next_jobs(
        self, conn: asyncpg.Connection, *, batch_id: UUID, after: int, limit: int
    ) -> list[asyncpg.Record]:
        return await conn.fetch(Q.NEXT_JOBS, batch_id, after, limit)

    async def next_chunk_seq(self, conn: asyncpg.Connection) -> int:
        return int(await conn.fetchval(Q.NEXT_CHUNK_SEQ))

    async def mark_released(
        self,
        conn: asyncpg.Connection,
        *,
        batch_id: UUID,
        upto: int,
        count: int,
        left: Decimal,
    ) -> None:
        await conn.execute(Q.MARK_RELEASED, batch_id, upto, count, left)

    async def set_hold(
        self, conn: asyncpg.Connection, *, batch_id: UUID, seq: int, left: Decimal, unlimited: bool, price: Decimal
    ) -> None:
        await conn.execute(Q.SET_HOLD, batch_id, seq, left, unlimited, price)

    async def suspend(
        self, conn: asyncpg.Connection, *, batch_id: UUID, upto: int, also: Sequence[int], reason: str
    ) -> asyncpg.Record:
        return await conn.fetchrow(Q.SUSPEND, batch_id, upto, list(also), reason)

    async def unsuspend(self, *, batch_id: UUID, scope: str) -> asyncpg.Record | None:
        async with self.pool.acquire() as conn, conn.transaction():
            batch = await conn.fetchrow(Q.LOCK_SUSPENDED, batch_id, scope)
            if batch is None:
                return None
            if batch["channel"] == "voice":
                await conn.execute(Q.UNSUSPEND_VOICE_JOBS, batch_id)
            else:
                await conn.execute(Q.UNSUSPEND_JOBS, batch_id, batch["released_upto"])
            return await conn.fetchrow(Q.RESUME_SUSPENDED, batch_id)

    async def suspend_running(self, *, batch_id: UUID, reason: str) -> asyncpg.Record | None:
        async with self.pool.acquire() as conn, conn.transaction():
            batch = await conn.fetchrow(Q.LOCK_RUNNING, batch_id)
            if batch is None:
                return None
            if batch["channel"] == "voice":
                return await conn.fetchrow(Q.SUSPEND_VOICE, batch_id, reason)
            return await conn.fetchrow(Q.SUSPEND, batch_id, batch["released_upto"], [], reason)

    async def running_batches(self, *, account_id: str) -> list[UUID]:
        return [r["batch_id"] for r in await self.pool.fetch(Q.RUNNING_BATCHES, account_id)]

    async def suspended_batches(self, *, account_id: str) -> list[UUID]:
        return [r["batch_id"] for r in await self.pool.fetch(Q.SUSPENDED_BATCHES, account_id)]

    async def suspend_locked(self, conn: asyncpg.Connection, *, batch_id: UUID, reason: str) -> asyncpg.Record | None:
        """Inside a transaction that holds the batch's row: suspends it if it is running."""
        batch = await conn.fetchrow(Q.LOCK_RUNNING, batch_id)
        if batch is None:
            return None
        return await conn.fetchrow(Q.SUSPEND, batch_id, batch["released_upto"], [], reason)

    async def waiting_for_devices(self, *, account_id: str, reason: str, sender_ids: Sequence[int]) -> list[UUID]:
        rows = await self.pool.fetch(Q.WAITING_FOR_DEVICES, account_id, reason, list(sender_ids))
        return [r["batch_id"] for r in rows]

    async def long_waiting_for_devices(self, *, reason: str, older_than_s: float) -> list[UUID]:
        return [r["batch_id"] for r in await self.pool.fetch(Q.LONG_WAITING_FOR_DEVICES, reason, older_than_s)]

    async def unsettled_batches(self) -> list[UUID]:
        return [r["batch_id"] for r in await self.pool.fetch(Q.UNSETTLED)]

    async def lock_for_settle(self, conn: asyncpg.Connection, *, batch_id: UUID) -> asyncpg.Record | None:
        return await conn.fetchrow(Q.LOCK_FOR_SETTLE, batch_id)

    async def mark_settled(self, conn: asyncpg.Connection, *, batch_id: UUID) -> None:
        await conn.execute(Q.MARK_SETTLED, batch_id)

    async def apply_outcomes(
        self,
        conn: asyncpg.Connection,
        *,
        batch_id: UUID,
        job_ids: list[int],
        statuses: list[str],
        sender_ids: list[int],
        errors: list[str],
        attempt_nos: list[int],
        cancelled: bool,
    ) -> list[asyncpg.Record]:
        return await conn.fetch(
            Q.APPLY_OUTCOMES, batch_id, job_ids, statuses, sender_ids, errors, attempt_nos, cancelled
        )

    async def add_counters(
        self,
        conn: asyncpg.Connection,
        *,
        batch_id: UUID,
        sent: int,
        failed: int,
        cancelled: int,
        unknown: int,
        resolved: int,
        devices_used: int,
        cost: Decimal,
        last_sent: tuple[str, int] = ("", 0),
        last_failed: tuple[str, int, str] = ("", 0, ""),
    ) -> asyncpg.Record:
        """last_sent: (to, sender_id); last_failed: (to, sender_id, error); to '' = none."""
        return await conn.fetchrow(
            Q.ADD_COUNTERS, batch_id, sent, failed, cancelled, unknown, resolved, devices_used, cost,
            *last_sent, *last_failed,
        )  # fmt: skip

    async def finish_if_done(self, conn: asyncpg.Connection, *, batch_id: UUID) -> asyncpg.Record | None:
        return await conn.fetchrow(Q.FINISH_IF_DONE, batch_id, ALL_FAILED)

    async def fail_batch(self, conn: asyncpg.Connection, *, batch_id: UUID, reason: str) -> asyncpg.Record | None:
        """None when the batch is no longer running (already failed, cancelled or finished)."""
        return await conn.fetchrow(Q.FAIL_BATCH, batch_id, reason)

    async def lock_batch(self, conn: asyncpg.Connection, *, batch_id: UUID) -> asyncpg.Record | None:
        return await conn.fetchrow(Q.LOCK_BATCH_STATUS, batch_id)
