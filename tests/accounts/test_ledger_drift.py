"""The drift gauge (services/accounts/ledger_drift.py) on a real database: 0 on a sound ledger,
the drifted accounts when a balance is changed behind the ledger's back (the guards off, as a
restore or a manual fix could), and no false alarm from an entry that commits below entries
already folded."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest
from prometheus_client import REGISTRY

from services.accounts.ledger_drift import LedgerDrift, Q
from services.runtime.db import check_queries
from tests.conftest import service_pool

pytestmark = pytest.mark.timeout(60)

TOP_UP = """
    INSERT INTO ledger_entries (account_id, kind, unit, amount, cause, balance_after, held_after)
    SELECT account_id, 'topup', 'credits', $2, $3, credit_balance + $2, credit_reserved
    FROM accounts WHERE account_id = $1"""


@pytest.fixture
async def pool(fresh_db: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await service_pool(fresh_db, "accounts")
    await check_queries(pool, Q)
    await pool.executemany("INSERT INTO accounts (account_id, account_name) VALUES ($1, $1)", [("a",), ("b",)])
    try:
        yield pool
    finally:
        await pool.close()


def gauge() -> float | None:
    return REGISTRY.get_sample_value("pregonero_ledger_drift")


async def top_up(conn: asyncpg.Connection | asyncpg.Pool, account: str, amount: str, cause: str) -> None:
    await conn.execute(TOP_UP, account, Decimal(amount), cause)


async def test_sound_then_drifted_then_sound(pool: asyncpg.Pool) -> None:
    drift = LedgerDrift(pool, settle_s=0)
    assert await drift.check() == 0
    await top_up(pool, "a", "10", "t1")
    await top_up(pool, "b", "5", "t2")
    assert await drift.check() == 0 and gauge() == 0
    async with pool.acquire() as conn:
        # The guards off: what a restore or a hand-made fix could leave behind.
        await conn.execute("SET session_replication_role = replica")
        await conn.execute("UPDATE accounts SET credit_balance = credit_balance + 1 WHERE account_id = 'a'")
        assert await drift.check() == 1 and gauge() == 1
        assert await drift.check() == 1, "a real drift stays"
        await conn.execute("UPDATE accounts SET credit_balance = credit_balance - 1 WHERE account_id = 'a'")
    assert await drift.check() == 0
    # A fresh watcher (a restart) sums the whole ledger once and agrees.
    assert await LedgerDrift(pool).check() == 0


async def test_an_entry_committed_below_the_watermark_is_no_false_alarm(pool: asyncpg.Pool) -> None:
    drift = LedgerDrift(pool, settle_s=0)
    late = await pool.acquire()
    try:
        async with late.transaction():
            await top_up(late, "a", "7", "late")  # takes its id first, commits last
            await top_up(pool, "b", "3", "early")
            assert await drift.check() == 0
        # The watermark is past the late entry now: its account is summed again, not alarmed on.
        assert await drift.check() == 0
        await top_up(pool, "a", "1", "next")
        assert await drift.check() == 0
    finally:
        await pool.release(late)
