"""SQL of scheduled messages. Every query names the account it runs for: a message, its
groups and its recipients are read only within their own account (an admin's export names
'', every account, and reads each message's groups within the message's account)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

# The recipients of a message: its groups' active contacts, each phone once, minus the
# account's opt-outs ($1 message, $2 account). Phones are unique per account, so one contact
# per phone; the lowest id wins should that ever change.
_RECIPIENTS = """
    SELECT DISTINCT ON (c.phone) c.phone, c.name, c.contact_id
    FROM message_groups mg
    JOIN contact_groups g ON g.group_id = mg.group_id AND g.account_id = $2
    JOIN group_members gm ON gm.group_id = mg.group_id
    JOIN contacts c ON c.contact_id = gm.contact_id AND c.account_id = $2
    WHERE mg.message_id = $1 AND c.is_active
      AND NOT EXISTS (SELECT 1 FROM opt_outs o WHERE o.account_id = $2 AND o.phone = c.phone)
    ORDER BY c.phone, c.contact_id"""


class Q:
    INSERT_MESSAGE = """
        INSERT INTO messages (account_id, created_by, content, scheduled_for)
        VALUES ($1, $2, $3, $4) RETURNING message_id"""
    GET_MESSAGE = "SELECT * FROM message_states WHERE message_id = $1 AND account_id = $2"
    LOCK_MESSAGE = "SELECT * FROM messages WHERE message_id = $1 AND account_id = $2 FOR UPDATE"
    LIST_MESSAGES = """
        SELECT * FROM message_states WHERE account_id = $1 AND ($2 = '' OR state = $2)
        ORDER BY message_id DESC LIMIT $3 OFFSET $4"""
    COUNT_MESSAGES = "SELECT count(*) FROM message_states WHERE account_id = $1 AND ($2 = '' OR state = $2)"
    UPDATE_MESSAGE = """
        UPDATE messages SET content = $3, scheduled_for = $4, updated_at = now()
        WHERE message_id = $1 AND account_id = $2"""
    # Transitions before the batch exists; $4 the statuses it may come from.
    SET_STATUS = """
        UPDATE messages SET status = $3, error = $5, updated_at = now()
        WHERE message_id = $1 AND account_id = $2 AND status = ANY($4::text[]) RETURNING message_id"""
    SCHEDULE = """
        UPDATE messages SET status = 'scheduled', scheduled_for = $3, error = '', updated_at = now()
        WHERE message_id = $1 AND account_id = $2 AND status = 'draft' RETURNING message_id"""
    DELETE_MESSAGE = "DELETE FROM messages WHERE message_id = $1 AND account_id = $2"
    # Groups named by a request that exist in the account.
    OWN_GROUPS = "SELECT group_id FROM contact_groups WHERE account_id = $1 AND group_id = ANY($2::bigint[])"
    CLEAR_GROUPS = "DELETE FROM message_groups WHERE message_id = $1"
    ADD_GROUPS = """
        INSERT INTO message_groups (message_id, group_id)
        SELECT $1, unnest($2::bigint[]) ON CONFLICT DO NOTHING"""
    GROUPS_OF = """
        SELECT mg.message_id, g.group_id, g.name, g.contact_count
        FROM message_groups mg JOIN contact_groups g ON g.group_id = mg.group_id AND g.account_id = $2
        WHERE mg.message_id = ANY($1::bigint[]) ORDER BY g.name"""
    COUNT_RECIPIENTS = f"SELECT count(*) FROM ({_RECIPIENTS}) r"
    FIRST_RECIPIENTS = f"SELECT phone, name FROM ({_RECIPIENTS}) r ORDER BY contact_id LIMIT $3"
    # Recipients of the messages of a page that has not started yet, per message.
    RECIPIENTS_OF = """
        SELECT mg.message_id, count(DISTINCT c.phone) AS n
        FROM message_groups mg
        JOIN contact_groups g ON g.group_id = mg.group_id AND g.account_id = $2
        JOIN group_members gm ON gm.group_id = mg.group_id
        JOIN contacts c ON c.contact_id = gm.contact_id AND c.account_id = $2
        WHERE mg.message_id = ANY($1::bigint[]) AND c.is_active
          AND NOT EXISTS (SELECT 1 FROM opt_outs o WHERE o.account_id = $2 AND o.phone = c.phone)
        GROUP BY mg.message_id"""
    # What the provider reported of the sent messages of these batches: one range scan of
    # each batch's jobs on their primary key.
    DELIVERY_OF = """
        SELECT batch_id,
               count(*) FILTER (WHERE delivery IN ('delivered', 'read')) AS delivered,
               count(*) FILTER (WHERE delivery = 'read') AS read,
               count(*) FILTER (WHERE delivery = 'failed') AS delivery_failed
        FROM jobs WHERE batch_id = ANY($1::uuid[]) AND status = 'sent' GROUP BY batch_id"""
    FIRST_JOBS = "SELECT phone, vals FROM jobs WHERE batch_id = $1 ORDER BY job_id LIMIT $2"

    # --- exports: $1 the account, or '' for an admin's every account ---
    # A page of messages along the primary key, their groups by name in one cell; the counts
    # are their batches' own counters (delivery would take a scan of each batch's jobs).
    EXPORT_MESSAGES = """
        SELECT m.message_id, m.account_id, m.content, m.state, m.scheduled_for, m.started_at, m.finished_at,
               m.late,
               array_to_string(array(SELECT g.name FROM message_groups mg
                                     JOIN contact_groups g ON g.group_id = mg.group_id AND g.account_id = m.account_id
                                     WHERE mg.message_id = m.message_id ORDER BY g.name), ', ') AS groups,
               m.total_jobs, m.sent_jobs, m.failed_jobs, m.cancelled_jobs,
               coalesce(nullif(m.error, ''), m.batch_error) AS error, m.created_at, m.updated_at
        FROM message_states m WHERE ($1 = '' OR m.account_id = $1) AND m.message_id > $2
        ORDER BY m.message_id LIMIT $3"""
    # The batch whose results are a message's (NULL before it started).
    EXPORT_MESSAGE = "SELECT message_id, batch_id FROM messages WHERE message_id = $1 AND ($2 = '' OR account_id = $2)"

    # --- the due loop ---
    # SKIP LOCKED: each due message is claimed by one replica; the others pass it by.
    CLAIM_DUE = """
        SELECT * FROM messages WHERE status = 'scheduled' AND scheduled_for <= now()
        ORDER BY scheduled_for LIMIT 1 FOR UPDATE SKIP LOCKED"""
    NEXT_DUE = "SELECT min(scheduled_for) FROM messages WHERE status = 'scheduled'"
    INSERT_BATCH = """
        INSERT INTO batches (account_id, channel, name, status, message_template, devices_limit,
                             sender_ids, window_size, message_id, template_syntax)
        VALUES ($1, 'whatsapp', $2, 'ingesting', $3, $4, $5, $6, $7, 'named')
        RETURNING batch_id"""
    # Jobs are numbered in contact order; vals = [name, phone] (template.NAMED_VARIABLES).
    INSERT_JOBS = f"""
        INSERT INTO jobs (batch_id, job_id, phone, vals)
        SELECT $3, row_number() OVER (ORDER BY contact_id), phone, ARRAY[name, phone]
        FROM ({_RECIPIENTS}) r"""
    OPEN_BATCH = """
        UPDATE batches SET total_jobs = $2, status = 'pending', updated_at = now() WHERE batch_id = $1"""
    DROP_BATCH = "DELETE FROM batches WHERE batch_id = $1"
    START = """
        UPDATE messages SET status = 'sending', batch_id = $2, late = $3, started_at = now(), updated_at = now()
        WHERE message_id = $1"""
    FAIL = "UPDATE messages SET status = 'failed', error = $2, updated_at = now() WHERE message_id = $1"

    # --- dashboard ---
    BY_STATE = "SELECT state, count(*) AS n FROM message_states WHERE account_id = $1 GROUP BY state"
    NEXT_HOURS = """
        SELECT * FROM message_states
        WHERE account_id = $1 AND status = 'scheduled' AND scheduled_for < now() + interval '24 hours'
        ORDER BY scheduled_for LIMIT 100"""
    SINCE = """
        SELECT count(*) AS messages, coalesce(sum(sent_jobs), 0) AS sent
        FROM message_states WHERE account_id = $1 AND started_at >= $2"""
    TOTALS = """
        SELECT coalesce(sum(sent_jobs), 0) AS sent, coalesce(sum(failed_jobs), 0) AS failed
        FROM message_states WHERE account_id = $1 AND batch_id IS NOT NULL"""
    DELIVERY_FAILED = """
        SELECT count(*) FROM messages m JOIN jobs j ON j.batch_id = m.batch_id
        WHERE m.account_id = $1 AND j.status = 'sent' AND j.delivery = 'failed'"""
    ACTIVE_GROUPS = """
        SELECT count(*) FROM contact_groups g WHERE g.account_id = $1 AND EXISTS (
            SELECT 1 FROM group_members gm JOIN contacts c ON c.contact_id = gm.contact_id
            WHERE gm.group_id = g.group_id AND c.is_active)"""
    ACTIVE_CONTACTS = "SELECT count(*) FROM contacts WHERE account_id = $1 AND is_active"


class MessagesRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def insert(
        self,
        conn: asyncpg.Connection,
        *,
        account_id: str,
        created_by: str,
        content: str,
        scheduled_for: datetime | None,
    ) -> int:
        return int(await conn.fetchval(Q.INSERT_MESSAGE, account_id, created_by, content, scheduled_for))

    async def get(self, *, message_id: int, account_id: str, conn: Any = None) -> asyncpg.Record | None:
        return await (conn or self.pool).fetchrow(Q.GET_MESSAGE, message_id, account_id)

    async def lock(self, conn: asyncpg.Connection, *, message_id: int, account_id: str) -> asyncpg.Record | None:
        return await conn.fetchrow(Q.LOCK_MESSAGE, message_id, account_id)

    async def list_messages(
        self, *, account_id: str, state: str, limit: int, offset: int
    ) -> tuple[list[asyncpg.Record], int]:
        rows = await self.pool.fetch(Q.LIST_MESSAGES, account_id, state, limit, offset)
        total = await self.pool.fetchval(Q.COUNT_MESSAGES, account_id, state)
        return rows, int(total)

    async def update(
        self,
        conn: asyncpg.Connection,
        *,
        message_id: int,
        account_id: str,
        content: str,
        scheduled_for: datetime | None,
    ) -> None:
        await conn.execute(Q.UPDATE_MESSAGE, message_id, account_id, content, scheduled_for)

    async def set_status(
        self,
        *,
        message_id: int,
        account_id: str,
        status: str,
        from_statuses: Sequence[str],
        error: str = "",
        conn: Any = None,
    ) -> bool:
        row = await (conn or self.pool).fetchrow(
            Q.SET_STATUS, message_id, account_id, status, list(from_statuses), error
        )
        return row is not None

    async def schedule(
        self, conn: asyncpg.Connection, *, message_id: int, account_id: str, scheduled_for: datetime
    ) -> bool:
        return await conn.fetchrow(Q.SCHEDULE, message_id, account_id, scheduled_for) is not None

    async def delete(self, conn: asyncpg.Connection, *, message_id: int, account_id: str) -> None:
        await conn.execute(Q.DELETE_MESSAGE, message_id, account_id)

    async def own_groups(self, conn: Any, *, account_id: str, group_ids: Sequence[int]) -> set[int]:
        rows = await conn.fetch(Q.OWN_GROUPS, account_id, list(group_ids))
        return {r["group_id"] for r in rows}

    async def set_groups(self, conn: asyncpg.Connection, *, message_id: int, group_ids: Sequence[int]) -> None:
        await conn.execute(Q.CLEAR_GROUPS, message_id)
        await conn.execute(Q.ADD_GROUPS, message_id, list(group_ids))

    async def add_groups(self, conn: asyncpg.Connection, *, message_id: int, group_ids: Sequence[int]) -> None:
        await conn.execute(Q.ADD_GROUPS, message_id, list(group_ids))

    async def groups_of(self, *, message_ids: Sequence[int], account_id: str, conn: Any = None) -> list[asyncpg.Record]:
        return await (conn or self.pool).fetch(Q.GROUPS_OF, list(message_ids), account_id)

    async def count_recipients(self, *, message_id: int, account_id: str, conn: Any = None) -> int:
        return int(await (conn or self.pool).fetchval(Q.COUNT_RECIPIENTS, message_id, account_id))

    async def first_recipients(self, *, message_id: int, account_id: str, limit: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(Q.FIRST_RECIPIENTS, message_id, account_id, limit)

    async def recipients_of(self, *, message_ids: Sequence[int], account_id: str) -> dict[int, int]:
        rows = await self.pool.fetch(Q.RECIPIENTS_OF, list(message_ids), account_id)
        return {r["message_id"]: r["n"] for r in rows}

    async def delivery_of(self, *, batch_ids: Sequence[UUID]) -> dict[UUID, asyncpg.Record]:
        if not batch_ids:
            return {}
        return {r["batch_id"]: r for r in await self.pool.fetch(Q.DELIVERY_OF, list(batch_ids))}

    async def first_jobs(self, *, batch_id: UUID, limit: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(Q.FIRST_JOBS, batch_id, limit)

    async def export_messages(self, *, scope: str, after: int, limit: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(Q.EXPORT_MESSAGES, scope, after, limit)

    async def export_message(self, *, message_id: int, scope: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(Q.EXPORT_MESSAGE, message_id, scope)

    # --- the due loop: called inside its transaction ---

    async def claim_due(self, conn: asyncpg.Connection) -> asyncpg.Record | None:
        return await conn.fetchrow(Q.CLAIM_DUE)

    async def next_due(self) -> datetime | None:
        value: datetime | None = await self.pool.fetchval(Q.NEXT_DUE)
        return value

    async def create_batch(
        self,
        conn: asyncpg.Connection,
        *,
        message: asyncpg.Record,
        sender_ids: Sequence[int],
        window_size: int,
    ) -> tuple[UUID, int]:
        """The message's batch and its jobs, one per recipient as they are now; (batch, 0)
        and no batch left behind when there is nobody to send to."""
        message_id, account_id = message["message_id"], message["account_id"]
        batch_id: UUID = await conn.fetchval(
            Q.INSERT_BATCH,
            account_id,
            f"Mensaje programado {message_id}",
            message["content"],
            len(sender_ids),
            list(sender_ids),
            window_size,
            message_id,
        )
        done = await conn.execute(Q.INSERT_JOBS, message_id, account_id, batch_id)
        total = int(done.split()[-1])
        if total == 0:
            await conn.execute(Q.DROP_BATCH, batch_id)
            return batch_id, 0
        await conn.execute(Q.OPEN_BATCH, batch_id, total)
        return batch_id, total

    async def start(self, conn: asyncpg.Connection, *, message_id: int, batch_id: UUID, late: bool) -> None:
        await conn.execute(Q.START, message_id, batch_id, late)

    async def fail(self, conn: asyncpg.Connection, *, message_id: int, reason: str) -> None:
        await conn.execute(Q.FAIL, message_id, reason)

    # --- dashboard ---

    async def dashboard(self, *, account_id: str, today: datetime) -> dict[str, Any]:
        async with self.pool.acquire() as conn:
            by_state = {r["state"]: r["n"] for r in await conn.fetch(Q.BY_STATE, account_id)}
            upcoming = await conn.fetch(Q.NEXT_HOURS, account_id)
            since = await conn.fetchrow(Q.SINCE, account_id, today)
            totals = await conn.fetchrow(Q.TOTALS, account_id)
            delivery_failed = await conn.fetchval(Q.DELIVERY_FAILED, account_id)
            groups = await conn.fetchval(Q.ACTIVE_GROUPS, account_id)
            contacts = await conn.fetchval(Q.ACTIVE_CONTACTS, account_id)
        return {
            "by_state": by_state,
            "upcoming": upcoming,
            "messages_today": since["messages"],
            "sent_today": since["sent"],
            "sent": totals["sent"],
            "failed": totals["failed"],
            "delivery_failed": delivery_failed,
            "active_groups": groups,
            "active_contacts": contacts,
        }
