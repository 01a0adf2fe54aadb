"""SQL of the accounts service: tenants and the credit ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal

import asyncpg


class Q:
    GET_ACCOUNT = "SELECT * FROM accounts WHERE account_id = $1"
    # ON CONFLICT DO NOTHING: replicas ensuring the same default account at start don't race.
    INSERT_ACCOUNT = """
        INSERT INTO accounts (account_id, account_name, plan_type, country, timezone,
                              contact_name, contact_email, contact_phone, features, settings,
                              cost_per_minute, cost_per_call_setup, cost_per_whatsapp_message)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb,
                COALESCE($11::numeric, 0.15), COALESCE($12::numeric, 0.02), COALESCE($13::numeric, 0.01))
        ON CONFLICT (account_id) DO NOTHING
        RETURNING *"""
    # '' = no filter: a member's scope is its own account, an admin's is every account.
    LIST_ACCOUNTS = """
        SELECT * FROM accounts
        WHERE ($1 = '' OR account_id = $1) AND ($2 = '' OR status = $2)
        ORDER BY created_at, account_id LIMIT $3 OFFSET $4"""
    COUNT_ACCOUNTS = """
        SELECT count(*) FROM accounts WHERE ($1 = '' OR account_id = $1) AND ($2 = '' OR status = $2)"""
    # PATCH: NULL keeps a column; features and settings merge key by key.
    UPDATE_ACCOUNT = """
        UPDATE accounts SET
            account_name = COALESCE($2, account_name),
            status = COALESCE($3, status),
            suspension_reason = COALESCE($4, suspension_reason),
            plan_type = COALESCE($5, plan_type),
            country = COALESCE($6, country),
            timezone = COALESCE($7, timezone),
            contact_name = COALESCE($8, contact_name),
            contact_email = COALESCE($9, contact_email),
            contact_phone = COALESCE($10, contact_phone),
            features = features || COALESCE($11::jsonb, '{}'::jsonb),
            settings = settings || COALESCE($12::jsonb, '{}'::jsonb),
            cost_per_minute = COALESCE($13::numeric, cost_per_minute),
            cost_per_call_setup = COALESCE($14::numeric, cost_per_call_setup),
            cost_per_whatsapp_message = COALESCE($15::numeric, cost_per_whatsapp_message),
            updated_at = now()
        WHERE account_id = $1
        RETURNING *"""

    # Every ledger change starts here: the account row lock serialises all changes of one
    # account, so the checks made under it hold until commit.
    LOCK_ACCOUNT = "SELECT * FROM accounts WHERE account_id = $1 FOR UPDATE"
    # The ledger_apply trigger checks balance_after / held_after and moves the cached balance.
    INSERT_ENTRY = """
        INSERT INTO ledger_entries (account_id, kind, unit, amount, held_change, used_change,
                                    requested, cause, hold_id, fingerprint, note, balance_after, held_after)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
        RETURNING id, balance_after, held_after, created_at"""
    # The entries in input order (so each balance_after follows the one before) and what they
    # add to their holds, in one statement.
    INSERT_CAPTURES = """
        WITH entries AS (
            INSERT INTO ledger_entries (account_id, kind, unit, amount, held_change, used_change,
                                        requested, cause, hold_id, balance_after, held_after)
            SELECT $1, 'capture', c.unit, c.amount, c.amount, c.used, c.requested, c.cause, c.hold_id,
                   c.balance_after, c.held_after
            FROM unnest($2::text[], $3::text[], $4::numeric[], $5::numeric[], $6::numeric[], $7::text[],
                        $8::numeric[], $9::numeric[])
                 WITH ORDINALITY AS c(cause, unit, amount, used, requested, hold_id, balance_after, held_after, n)
            ORDER BY c.n
            RETURNING id, cause),
        holds_charged AS (
            UPDATE holds SET amount_captured = amount_captured + u.charged,
                   amount_requested = amount_requested + u.requested, updated_at = now()
            FROM unnest($10::text[], $11::numeric[], $12::numeric[]) AS u(hold_id, charged, requested)
            WHERE holds.hold_id = u.hold_id AND holds.account_id = $1)
        SELECT id, cause FROM entries"""
    FIND_ENTRY = "SELECT * FROM ledger_entries WHERE account_id = $1 AND kind = $2 AND cause = $3"
    GET_HOLD = "SELECT * FROM holds WHERE hold_id = $1"
    # The holds a capture batch names and its attempts already charged, in one round trip.
    # No row locks: every change of a hold happens under its account's lock, held here.
    CAPTURE_CONTEXT = """
        SELECT 'hold' AS what, hold_id AS key, unit, reserving, amount_held, amount_captured,
               amount_released, NULL::bigint AS entry_id, NULL::text AS entry_hold,
               NULL::numeric AS used, NULL::numeric AS requested
        FROM holds WHERE account_id = $1 AND hold_id = ANY($2::text[])
        UNION ALL
        SELECT 'capture', attempt_id, NULL, NULL, NULL, NULL, NULL, entry_id, hold_id, charged, requested
        FROM capture_attempts WHERE account_id = $1 AND attempt_id = ANY($3::text[])"""
    INSERT_CAPTURE_ATTEMPTS = """
        INSERT INTO capture_attempts (account_id, attempt_id, hold_id, entry_id, requested, charged)
        SELECT $1, a.attempt_id, a.hold_id, a.entry_id, a.requested, a.charged
        FROM unnest($2::text[], $3::text[], $4::bigint[], $5::numeric[], $6::numeric[])
             AS a(attempt_id, hold_id, entry_id, requested, charged)"""
    # One statement: the hold and its entry exist together or not at all. A hold id taken by
    # another account meanwhile inserts nothing (no row back).
    INSERT_HOLD = """
        WITH h AS (
            INSERT INTO holds (hold_id, account_id, unit, reserving, amount_held)
            VALUES ($2, $1, $3, true, $4)
            ON CONFLICT (hold_id) DO NOTHING
            RETURNING hold_id)
        INSERT INTO ledger_entries (account_id, kind, unit, amount, held_change, cause, hold_id,
                                    balance_after, held_after)
        SELECT $1, 'hold', $3, 0, $4, h.hold_id, h.hold_id, $5, $6 FROM h
        RETURNING id, balance_after, held_after, created_at"""
    # Unlimited plans: a hold that reserves nothing, so captures still find it.
    INSERT_FREE_HOLD = """
        INSERT INTO holds (hold_id, account_id, unit, reserving, amount_held)
        VALUES ($2, $1, 'credits', false, 0)
        ON CONFLICT (hold_id) DO NOTHING
        RETURNING hold_id"""
    # Closes the hold and books what was left of it (no entry when nothing was).
    RELEASE_HOLD = """
        WITH closed AS (
            UPDATE holds SET amount_released = amount_released + $3, status = 'released', updated_at = now()
            WHERE hold_id = $2 AND account_id = $1
            RETURNING hold_id, unit)
        INSERT INTO ledger_entries (account_id, kind, unit, amount, held_change, cause, hold_id,
                                    balance_after, held_after)
        SELECT $1, 'release', closed.unit, 0, -$3::numeric, closed.hold_id, closed.hold_id, $4, $5
        FROM closed WHERE $3::numeric > 0
        RETURNING id"""
    # A batch's holds: the prefix is matched literally (LIKE wildcards in it are escaped).
    HOLDS_BY_PREFIX = """
        SELECT * FROM holds
        WHERE account_id = $1
          AND hold_id LIKE replace(replace(replace($2, '\\', '\\\\'), '%', '\\%'), '_', '\\_') || '%'
        ORDER BY hold_id"""
    LIST_ENTRIES = """
        SELECT * FROM ledger_entries WHERE account_id = $1
        ORDER BY id DESC LIMIT $2 OFFSET $3"""
    COUNT_ENTRIES = "SELECT count(*) FROM ledger_entries WHERE account_id = $1"
    # An export's page of entries along their id ($1 the account, '' for every account): the
    # primary key for an admin's every account, ledger_entries_account_idx for one.
    EXPORT_ENTRIES = """
        SELECT id, account_id, created_at, kind, unit, amount, held_change, used_change, balance_after,
               held_after, requested, cause, hold_id, note
        FROM ledger_entries WHERE ($1 = '' OR account_id = $1) AND id > $2
        ORDER BY id LIMIT $3"""


@dataclass(frozen=True, slots=True)
class NewEntry:
    kind: str
    unit: str
    amount: Decimal
    cause: str
    held_change: Decimal = Decimal(0)
    used_change: Decimal = Decimal(0)
    requested: Decimal | None = None
    hold_id: str | None = None
    fingerprint: str = ""
    note: str = ""
    # The account's balance and reservation in `unit` once this entry is booked.
    balance_after: Decimal = Decimal(0)
    held_after: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class CapturedAttempt:
    attempt_id: str
    hold_id: str
    requested: Decimal
    charged: Decimal


@dataclass(frozen=True, slots=True)
class NewCapture:
    """One ledger entry charging a batch of attempts against one hold; its cause is the
    first of those attempts."""

    cause: str
    unit: str
    amount: Decimal  # change of the balance (and of the reservation): -charged, or 0
    used: Decimal
    requested: Decimal
    hold_id: str
    balance_after: Decimal
    held_after: Decimal


class AccountsRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def get(self, *, account_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(Q.GET_ACCOUNT, account_id)

    async def insert(
        self,
        *,
        account_id: str,
        account_name: str,
        plan_type: str,
        country: str,
        timezone: str,
        contact_name: str = "",
        contact_email: str = "",
        contact_phone: str = "",
        features_json: str = "{}",
        settings_json: str = "{}",
        prices: Sequence[Decimal | None] = (None, None, None),
        initial: Sequence[NewEntry] = (),
    ) -> asyncpg.Record | None:
        """The new row (after its initial entries), or None when the id is taken."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                Q.INSERT_ACCOUNT,
                account_id,
                account_name,
                plan_type,
                country,
                timezone,
                contact_name,
                contact_email,
                contact_phone,
                features_json,
                settings_json,
                *prices,
            )
            if row is None or not initial:
                return row
            for entry in initial:
                await _insert_entry(conn, account_id=account_id, entry=entry)
            return await conn.fetchrow(Q.GET_ACCOUNT, account_id)

    async def list(self, *, scope: str, status: str, limit: int, skip: int) -> tuple[list[asyncpg.Record], int]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(Q.LIST_ACCOUNTS, scope, status, limit, skip)
            total = await conn.fetchval(Q.COUNT_ACCOUNTS, scope, status)
        return rows, int(total)

    async def update(
        self,
        *,
        account_id: str,
        account_name: str | None = None,
        status: str | None = None,
        suspension_reason: str | None = None,
        plan_type: str | None = None,
        country: str | None = None,
        timezone: str | None = None,
        contact_name: str | None = None,
        contact_email: str | None = None,
        contact_phone: str | None = None,
        features_json: str | None = None,
        settings_json: str | None = None,
        cost_per_minute: Decimal | None = None,
        cost_per_call_setup: Decimal | None = None,
        cost_per_whatsapp_message: Decimal | None = None,
    ) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            Q.UPDATE_ACCOUNT,
            account_id,
            account_name,
            status,
            suspension_reason,
            plan_type,
            country,
            timezone,
            contact_name,
            contact_email,
            contact_phone,
            features_json,
            settings_json,
            cost_per_minute,
            cost_per_call_setup,
            cost_per_whatsapp_message,
        )


async def _insert_entry(conn: asyncpg.Connection, *, account_id: str, entry: NewEntry) -> asyncpg.Record:
    return await conn.fetchrow(
        Q.INSERT_ENTRY,
        account_id,
        entry.kind,
        entry.unit,
        entry.amount,
        entry.held_change,
        entry.used_change,
        entry.requested,
        entry.cause,
        entry.hold_id,
        entry.fingerprint,
        entry.note,
        entry.balance_after,
        entry.held_after,
    )


class LedgerTx:
    """One account's ledger inside a transaction that holds the account row lock."""

    def __init__(self, conn: asyncpg.Connection, account: asyncpg.Record) -> None:
        self.conn = conn
        self.account = account

    @property
    def account_id(self) -> str:
        return str(self.account["account_id"])

    async def find_entry(self, *, kind: str, cause: str) -> asyncpg.Record | None:
        return await self.conn.fetchrow(Q.FIND_ENTRY, self.account_id, kind, cause)

    async def insert_entry(self, *, entry: NewEntry) -> asyncpg.Record:
        return await _insert_entry(self.conn, account_id=self.account_id, entry=entry)

    async def get_hold(self, *, hold_id: str) -> asyncpg.Record | None:
        """The hold whatever its account (the caller checks whose it is)."""
        return await self.conn.fetchrow(Q.GET_HOLD, hold_id)

    async def insert_hold(
        self, *, hold_id: str, unit: str, amount: Decimal, balance_after: Decimal, held_after: Decimal
    ) -> asyncpg.Record | None:
        """The hold entry, or None when the id is taken."""
        return await self.conn.fetchrow(
            Q.INSERT_HOLD, self.account_id, hold_id, unit, amount, balance_after, held_after
        )

    async def insert_free_hold(self, *, hold_id: str) -> bool:
        return await self.conn.fetchval(Q.INSERT_FREE_HOLD, self.account_id, hold_id) is not None

    async def capture_context(
        self, *, hold_ids: Sequence[str], attempt_ids: Sequence[str]
    ) -> tuple[dict[str, asyncpg.Record], dict[str, asyncpg.Record]]:
        """(hold id → hold, attempt id → its capture entry) of this account."""
        rows = await self.conn.fetch(Q.CAPTURE_CONTEXT, self.account_id, list(hold_ids), list(attempt_ids))
        holds = {r["key"]: r for r in rows if r["what"] == "hold"}
        return holds, {r["key"]: r for r in rows if r["what"] == "capture"}

    async def insert_captures(
        self,
        *,
        captures: Sequence[NewCapture],
        charged: dict[str, tuple[Decimal, Decimal]],
        attempts: Sequence[CapturedAttempt],
    ) -> dict[str, int]:
        """Book the capture entries (one per hold), add to their holds what was charged and
        what was asked (hold id → (charged, requested)) and record each attempt with its
        entry; returns hold id → entry id."""
        rows = await self.conn.fetch(
            Q.INSERT_CAPTURES,
            self.account_id,
            [c.cause for c in captures],
            [c.unit for c in captures],
            [c.amount for c in captures],
            [c.used for c in captures],
            [c.requested for c in captures],
            [c.hold_id for c in captures],
            [c.balance_after for c in captures],
            [c.held_after for c in captures],
            list(charged),
            [c for c, _ in charged.values()],
            [r for _, r in charged.values()],
        )
        by_cause = {r["cause"]: r["id"] for r in rows}
        entries = {c.hold_id: by_cause[c.cause] for c in captures}
        await self.conn.execute(
            Q.INSERT_CAPTURE_ATTEMPTS,
            self.account_id,
            [a.attempt_id for a in attempts],
            [a.hold_id for a in attempts],
            [entries[a.hold_id] for a in attempts],
            [a.requested for a in attempts],
            [a.charged for a in attempts],
        )
        return entries

    async def holds_by_prefix(self, *, prefix: str) -> list[asyncpg.Record]:
        return await self.conn.fetch(Q.HOLDS_BY_PREFIX, self.account_id, prefix)

    async def release_hold(
        self, *, hold_id: str, released: Decimal, balance_after: Decimal, held_after: Decimal
    ) -> int | None:
        """Close the hold; the id of the release entry, None when nothing was left."""
        return await self.conn.fetchval(Q.RELEASE_HOLD, self.account_id, hold_id, released, balance_after, held_after)


class LedgerRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @asynccontextmanager
    async def locked(self, *, account_id: str) -> AsyncIterator[LedgerTx | None]:
        """A transaction holding the account row lock; None when there is no such account."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(Q.LOCK_ACCOUNT, account_id)
            yield None if row is None else LedgerTx(conn, row)

    async def account(self, *, account_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(Q.GET_ACCOUNT, account_id)

    async def entries(self, *, account_id: str, limit: int, skip: int) -> tuple[list[asyncpg.Record], int]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(Q.LIST_ENTRIES, account_id, limit, skip)
            total = await conn.fetchval(Q.COUNT_ENTRIES, account_id)
        return rows, int(total)

    async def export_entries(self, *, scope: str, after: int, limit: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(Q.EXPORT_ENTRIES, scope, after, limit)
