"""The ledger's invariants, read straight from the tables: what the state machine and the
concurrency test check. Each query returns the rows that break one rule."""

from __future__ import annotations

import asyncpg

CHECKS = {
    "cached balance, reservation and usage equal the sums of the entries": """
        WITH sums AS (
            SELECT account_id, unit, sum(amount) AS amount, sum(held_change) AS held, sum(used_change) AS used
            FROM ledger_entries GROUP BY account_id, unit)
        SELECT a.account_id, u.unit FROM accounts a
        CROSS JOIN (VALUES ('credits'), ('minutes')) AS u(unit)
        LEFT JOIN sums s ON s.account_id = a.account_id AND s.unit = u.unit
        WHERE ($1 = '' OR a.account_id = $1) AND CASE u.unit
            WHEN 'credits' THEN (a.credit_balance, a.credit_reserved, a.credit_used)
                IS DISTINCT FROM (coalesce(s.amount, 0), coalesce(s.held, 0), coalesce(s.used, 0))
            ELSE (a.minutes_purchased - a.minutes_used, a.minutes_reserved, a.minutes_used)
                IS DISTINCT FROM (coalesce(s.amount, 0), coalesce(s.held, 0), coalesce(s.used, 0))
        END""",
    "no negative balance; available = balance - reserved >= 0": """
        SELECT account_id FROM accounts
        WHERE ($1 = '' OR account_id = $1)
          AND (credit_balance < 0 OR credit_reserved < 0 OR credit_used < 0
               OR credit_balance - credit_reserved < 0
               OR minutes_used < 0 OR minutes_reserved < 0
               OR minutes_purchased - minutes_used - minutes_reserved < 0)""",
    "each entry's balance_after and held_after follow the entries before it": """
        SELECT id FROM (
            SELECT id, account_id, balance_after, held_after,
                   sum(amount) OVER w AS running, sum(held_change) OVER w AS running_held
            FROM ledger_entries
            WINDOW w AS (PARTITION BY account_id, unit ORDER BY id)) e
        WHERE ($1 = '' OR account_id = $1) AND (balance_after <> running OR held_after <> running_held)""",
    "a hold's captured and released amounts equal its entries; it is never overdrawn": """
        SELECT h.hold_id FROM holds h
        LEFT JOIN LATERAL (
            SELECT coalesce(sum(used_change) FILTER (WHERE kind = 'capture'), 0) AS captured,
                   coalesce(-sum(held_change) FILTER (WHERE kind = 'release'), 0) AS released,
                   coalesce(sum(held_change), 0) AS held_now
            FROM ledger_entries e WHERE e.hold_id = h.hold_id) e ON true
        WHERE ($1 = '' OR h.account_id = $1)
          AND (e.captured <> h.amount_captured OR e.released <> h.amount_released
               OR (h.reserving AND (h.amount_captured + h.amount_released > h.amount_held
                                    OR e.held_now <> h.amount_held - h.amount_captured - h.amount_released))
               OR (h.status = 'released' AND h.reserving AND e.held_now <> 0))""",
    "what is reserved equals what is left of the open holds": """
        SELECT a.account_id FROM accounts a
        LEFT JOIN LATERAL (
            SELECT coalesce(sum(amount_held - amount_captured - amount_released)
                            FILTER (WHERE unit = 'credits'), 0) AS credits,
                   coalesce(sum(amount_held - amount_captured - amount_released)
                            FILTER (WHERE unit = 'minutes'), 0) AS minutes
            FROM holds h WHERE h.account_id = a.account_id AND h.status = 'open' AND h.reserving) h ON true
        WHERE ($1 = '' OR a.account_id = $1)
          AND (a.credit_reserved <> h.credits OR a.minutes_reserved <> h.minutes)""",
    "what was refunded equals the refund entries": """
        SELECT a.account_id FROM accounts a
        LEFT JOIN LATERAL (
            SELECT coalesce(sum(amount) FILTER (WHERE unit = 'credits'), 0) AS credits,
                   coalesce(sum(amount) FILTER (WHERE unit = 'minutes'), 0) AS minutes
            FROM ledger_entries e WHERE e.account_id = a.account_id AND e.kind = 'refund') r ON true
        WHERE ($1 = '' OR a.account_id = $1)
          AND (a.credit_refunded <> r.credits OR a.minutes_refunded <> r.minutes)""",
    "a capture never charges more than was asked": """
        SELECT id FROM ledger_entries
        WHERE ($1 = '' OR account_id = $1) AND kind = 'capture' AND used_change > requested""",
}


async def violations(conn: asyncpg.Connection | asyncpg.Pool, account_id: str = "") -> dict[str, list[object]]:
    """{rule: offending keys} for every broken rule; empty when the ledger is sound."""
    found: dict[str, list[object]] = {}
    for rule, sql in CHECKS.items():
        rows = await conn.fetch(sql, account_id)
        if rows:
            found[rule] = [tuple(r.values()) for r in rows[:10]]
    return found
