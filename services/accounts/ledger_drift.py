"""Ledger drift, watched: `pregonero_ledger_drift` counts the accounts (per unit) whose cached
balance, reservation or usage differs from the sum of their ledger entries. It must read 0;
the database keeps it so (002_ledger.sql), and this gauge is how anyone would see otherwise.

Summing every entry every round would read the whole ledger each time (millions of rows), so
the sums are kept here and brought up to date with the entries since the last round:

- Each round reads, in one repeatable-read snapshot, the entries after the watermark (the
  primary key's tail: what was written since), the cached columns of every account (one row
  each), and compares the two.
- Entries are folded into the kept sums only up to the last one written SETTLE_S ago. An id is
  taken when a row is inserted, not when it commits, so a transaction still open can commit
  an entry below newer ones: past the watermark it would be missed. Entries newer than that
  are compared, not folded, and read again next round.
- An account that still looks drifted (an entry that committed later than SETTLE_S, the very
  first round) is summed again in full, through its own index, in the same snapshot; that
  sum replaces the kept one. So a false alarm heals itself, and a real drift stays.

The first round reads the whole ledger once; after it a round costs the entries written
since the last one plus one row per account (see the report in tests/accounts/test_ledger_drift.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal

import asyncpg
from prometheus_client import Gauge, Histogram

from services.runtime.metrics import LATENCY_BUCKETS

log = logging.getLogger("pregonero.accounts.drift")

EVERY_S = 15.0
# Longer than any ledger transaction stays open (each holds its account's row lock).
SETTLE_S = 5.0

LEDGER_DRIFT = Gauge(
    "pregonero_ledger_drift",
    "Accounts (per unit) whose cached balance, reservation or usage differs from the sum of their ledger entries.",
)
DRIFT_CHECKED = Gauge(
    "pregonero_ledger_drift_checked_timestamp_seconds", "When the ledger drift was last checked (Unix time)."
)
DRIFT_CHECK_SECONDS = Histogram(
    "pregonero_ledger_drift_check_seconds", "Time one ledger drift check took.", buckets=LATENCY_BUCKETS
)


class Q:
    # The last entry written SETTLE_S ago or earlier, past the watermark (the primary key's tail).
    SETTLED_UPTO = """
        SELECT max(id) FROM ledger_entries
        WHERE id > $1 AND created_at < now() - make_interval(secs => $2)"""
    # The tail per account and unit: the settled part (id <= $2, folded) and all of it (compared).
    TAIL_SUMS = """
        SELECT account_id, unit,
               coalesce(sum(amount) FILTER (WHERE id <= $2), 0) AS settled_amount,
               coalesce(sum(held_change) FILTER (WHERE id <= $2), 0) AS settled_held,
               coalesce(sum(used_change) FILTER (WHERE id <= $2), 0) AS settled_used,
               sum(amount) AS amount, sum(held_change) AS held, sum(used_change) AS used
        FROM ledger_entries WHERE id > $1 GROUP BY account_id, unit"""
    # Per unit, the cached values the entries must add up to (see 002_ledger.sql).
    CACHED = """
        SELECT account_id, credit_balance, credit_reserved, credit_used,
               minutes_purchased - minutes_used AS minutes_balance, minutes_reserved, minutes_used
        FROM accounts"""
    # Whole sums of a few accounts up to the watermark (ledger_entries_account_idx).
    ACCOUNT_SUMS = """
        SELECT account_id, unit, sum(amount) AS amount, sum(held_change) AS held, sum(used_change) AS used
        FROM ledger_entries WHERE account_id = ANY($1::text[]) AND id <= $2 GROUP BY account_id, unit"""


Key = tuple[str, str]  # account, unit
Sums = tuple[Decimal, Decimal, Decimal]  # balance, reserved, used
ZERO: Sums = (Decimal(0), Decimal(0), Decimal(0))


def _add(a: Sums, b: Sums) -> Sums:
    return (a[0] + b[0], a[1] + b[1], a[2] + b[2])


class LedgerDrift:
    def __init__(self, pool: asyncpg.Pool, *, settle_s: float = SETTLE_S) -> None:
        self.pool = pool
        self.settle_s = settle_s
        self.watermark = 0
        self.sums: dict[Key, Sums] = {}

    async def check(self) -> int:
        """One round: the number of drifted account-units, also set on the gauge."""
        started = time.perf_counter()
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            settled = await conn.fetchval(Q.SETTLED_UPTO, self.watermark, self.settle_s) or self.watermark
            unsettled: dict[Key, Sums] = {}
            for r in await conn.fetch(Q.TAIL_SUMS, self.watermark, settled):
                key = (r["account_id"], r["unit"])
                part = (r["settled_amount"], r["settled_held"], r["settled_used"])
                self.sums[key] = _add(self.sums.get(key, ZERO), part)
                unsettled[key] = (r["amount"] - part[0], r["held"] - part[1], r["used"] - part[2])
            self.watermark = settled
            cached: dict[Key, Sums] = {}
            for r in await conn.fetch(Q.CACHED):
                cached[(r["account_id"], "credits")] = (r["credit_balance"], r["credit_reserved"], r["credit_used"])
                cached[(r["account_id"], "minutes")] = (r["minutes_balance"], r["minutes_reserved"], r["minutes_used"])

            def drifted() -> list[Key]:
                keys = cached.keys() | self.sums.keys()
                return [k for k in keys if cached.get(k, ZERO) != _add(self.sums.get(k, ZERO), unsettled.get(k, ZERO))]

            suspects = drifted()
            if suspects:
                accounts = sorted({account for account, _ in suspects})
                for account in accounts:
                    for unit in ("credits", "minutes"):
                        self.sums.pop((account, unit), None)
                for r in await conn.fetch(Q.ACCOUNT_SUMS, accounts, self.watermark):
                    self.sums[(r["account_id"], r["unit"])] = (r["amount"], r["held"], r["used"])
                suspects = drifted()
        LEDGER_DRIFT.set(len(suspects))
        DRIFT_CHECKED.set_to_current_time()
        DRIFT_CHECK_SECONDS.observe(time.perf_counter() - started)
        if suspects:
            log.error("ledger drift: %d account-units differ from their entries: %s", len(suspects), suspects[:10])
        return len(suspects)

    async def run(self, every: float = EVERY_S) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the database away: the next round tries again
                log.warning("ledger drift check failed", exc_info=True)
            await asyncio.sleep(every)
