"""The analytics' SQL: sums over the maintained aggregates of migration 011 (message_activity
for WhatsApp, batch_hours for calls), never over jobs, so a reply costs a few rows per batch
and hour in range whatever the number of recipients.

Every query takes the same leading parameters: $1 the account ('' = every account, an
admin's view), $2 and $3 the range's UTC bounds [from, to), and, where it buckets, $4 the
bucket ('hour' | 'day' | 'week') and $5 the IANA zone buckets are cut in."""

from __future__ import annotations

from datetime import datetime

import asyncpg

_MESSAGE_SUMS = """
    sum(sent)::bigint AS sent, sum(failed)::bigint AS failed, sum(cancelled)::bigint AS cancelled,
    sum(unknown)::bigint AS unknown, sum(delivered)::bigint AS delivered, sum(read)::bigint AS read,
    sum(undelivered)::bigint AS undelivered"""
_MESSAGE_RANGE = "($1 = '' OR account_id = $1) AND hour >= $2 AND hour < $3"

_CALL_SUMS = """
    sum(calls)::bigint AS calls, sum(completed)::bigint AS answered, sum(no_answer)::bigint AS no_answer,
    sum(busy)::bigint AS busy, sum(voicemail)::bigint AS voicemail,
    sum(failed - no_answer - busy - voicemail)::bigint AS failed, sum(seconds) AS seconds, sum(cost) AS cost,
    sum(promises)::bigint AS promises, sum(promised_amount) AS promised_amount"""


class Q:
    # The local bucket a UTC hour falls in: a timestamp without zone, the bucket's wall-clock start.
    MESSAGE_SERIES = f"""
        SELECT date_trunc($4::text, hour AT TIME ZONE $5) AS bucket, message_id IS NOT NULL AS scheduled,
               {_MESSAGE_SUMS}
        FROM message_activity WHERE {_MESSAGE_RANGE}
        GROUP BY 1, 2 ORDER BY 1"""
    # The batches that did the most in range, with what the reply names them by.
    MESSAGE_TOP = f"""
        SELECT a.*, b.name, b.status, b.created_at, b.object_id, m.content
        FROM (SELECT batch_id, message_id, {_MESSAGE_SUMS}
              FROM message_activity WHERE {_MESSAGE_RANGE}
              GROUP BY batch_id, message_id) a
        JOIN batches b ON b.batch_id = a.batch_id
        LEFT JOIN messages m ON m.message_id = a.message_id
        ORDER BY a.sent + a.failed DESC, b.created_at DESC LIMIT $4"""
    # Each group with what the scheduled messages naming it did in range (a message sent to two
    # groups counts for both: each group's figures are the messages its members were sent).
    GROUPS = """
        SELECT g.group_id, g.name, g.contact_count,
               count(DISTINCT a.message_id)::bigint AS messages,
               coalesce(sum(a.sent), 0)::bigint AS sent, coalesce(sum(a.failed), 0)::bigint AS failed,
               coalesce(sum(a.delivered), 0)::bigint AS delivered, coalesce(sum(a.read), 0)::bigint AS read,
               coalesce(sum(a.undelivered), 0)::bigint AS undelivered
        FROM contact_groups g
        LEFT JOIN message_groups mg ON mg.group_id = g.group_id
        LEFT JOIN messages m ON m.message_id = mg.message_id
        LEFT JOIN message_activity a ON a.batch_id = m.batch_id AND a.hour >= $2 AND a.hour < $3
        WHERE ($1 = '' OR g.account_id = $1)
        GROUP BY g.group_id
        ORDER BY sent DESC, g.name, g.group_id LIMIT $4"""
    CALL_SERIES = f"""
        SELECT date_trunc($4::text, hour AT TIME ZONE $5) AS bucket, {_CALL_SUMS}
        FROM batch_hours WHERE {_MESSAGE_RANGE}
        GROUP BY 1 ORDER BY 1"""
    # Answer rate by the local hour of day: when debtors pick up.
    CALL_HOURS = """
        SELECT extract(hour FROM hour AT TIME ZONE $4)::int AS local_hour,
               sum(calls)::bigint AS calls, sum(completed)::bigint AS answered
        FROM batch_hours WHERE ($1 = '' OR account_id = $1) AND hour >= $2 AND hour < $3
        GROUP BY 1 ORDER BY 1"""
    # The dashboard's counts of things that are not events: messages by state, groups.
    MESSAGE_STATES = """
        SELECT state, count(*)::bigint AS n FROM message_states WHERE ($1 = '' OR account_id = $1) GROUP BY state"""
    GROUP_COUNT = "SELECT count(*)::bigint FROM contact_groups WHERE ($1 = '' OR account_id = $1)"
    # Folds the deltas of a bounded set of batch-hours into one row each (see migration 011).
    # Deltas appended meanwhile are not in the statement's snapshot: they wait for the next fold.
    FOLD_LOCK = "SELECT pg_try_advisory_xact_lock(hashtext('campaigns.message_activity.fold'))"
    FOLD = """
        WITH keys AS (SELECT DISTINCT batch_id, hour FROM message_activity WHERE NOT folded LIMIT $1),
        gone AS (
            DELETE FROM message_activity a USING keys k WHERE a.batch_id = k.batch_id AND a.hour = k.hour
            RETURNING a.*),
        kept AS (
            INSERT INTO message_activity (account_id, batch_id, message_id, hour, folded, sent, failed, cancelled,
                                          unknown, delivered, read, undelivered)
            SELECT account_id, batch_id, message_id, hour, true, sum(sent), sum(failed), sum(cancelled),
                   sum(unknown), sum(delivered), sum(read), sum(undelivered)
            FROM gone GROUP BY account_id, batch_id, message_id, hour
            HAVING (sum(sent), sum(failed), sum(cancelled), sum(unknown), sum(delivered), sum(read),
                    sum(undelivered)) <> (0, 0, 0, 0, 0, 0, 0))
        SELECT count(*) FROM keys"""


class AnalyticsRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def message_series(
        self, *, account: str, start: datetime, end: datetime, bucket: str, zone: str
    ) -> list[asyncpg.Record]:
        return await self.pool.fetch(Q.MESSAGE_SERIES, account, start, end, bucket, zone)

    async def message_top(self, *, account: str, start: datetime, end: datetime, limit: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(Q.MESSAGE_TOP, account, start, end, limit)

    async def groups(self, *, account: str, start: datetime, end: datetime, limit: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(Q.GROUPS, account, start, end, limit)

    async def call_series(
        self, *, account: str, start: datetime, end: datetime, bucket: str, zone: str
    ) -> list[asyncpg.Record]:
        return await self.pool.fetch(Q.CALL_SERIES, account, start, end, bucket, zone)

    async def call_hours(self, *, account: str, start: datetime, end: datetime, zone: str) -> list[asyncpg.Record]:
        return await self.pool.fetch(Q.CALL_HOURS, account, start, end, zone)

    async def message_states(self, *, account: str) -> dict[str, int]:
        return {r["state"]: r["n"] for r in await self.pool.fetch(Q.MESSAGE_STATES, account)}

    async def group_count(self, *, account: str) -> int:
        return int(await self.pool.fetchval(Q.GROUP_COUNT, account))

    async def fold(self, *, keys: int = 5_000) -> int:
        """One fold of up to `keys` batch-hours; how many it folded (0: nothing to fold, or
        another replica is folding)."""
        async with self.pool.acquire() as conn, conn.transaction():
            if not await conn.fetchval(Q.FOLD_LOCK):
                return 0
            return int(await conn.fetchval(Q.FOLD, keys))
