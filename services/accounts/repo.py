"""SQL of the accounts service."""

from __future__ import annotations

import asyncpg


class Q:
    GET_ACCOUNT = "SELECT * FROM accounts WHERE account_id = $1"
    # ON CONFLICT DO NOTHING: replicas ensuring the same default account at start don't race.
    INSERT_ACCOUNT = """
        INSERT INTO accounts (account_id, account_name, plan_type, country, timezone,
                              contact_name, contact_email, contact_phone, features, settings)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10::jsonb)
        ON CONFLICT (account_id) DO NOTHING
        RETURNING *"""


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
    ) -> asyncpg.Record | None:
        """The new row, or None when the id is taken."""
        return await self.pool.fetchrow(
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
        )
