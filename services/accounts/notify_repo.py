"""SQL of notifications and the audit log."""

from __future__ import annotations

import json
from typing import Any

import asyncpg


class Q:
    # DO NOTHING on the source key: a redelivered event returns no row and makes no duplicate.
    INSERT_NOTIFICATION = """
        INSERT INTO notifications (account_id, user_id, kind, level, title, message, data, source_key)
        VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8)
        ON CONFLICT (source_key) DO NOTHING
        RETURNING *"""
    # Scope: $1 '' = every account (admin); $2 '' = account-wide and every user's, else the
    # account-wide ones and that user's own.
    LIST_NOTIFICATIONS = """
        SELECT * FROM notifications
        WHERE ($1 = '' OR account_id = $1) AND ($2 = '' OR user_id IS NULL OR user_id = $2)
          AND (NOT $3 OR read_at IS NULL)
        ORDER BY id DESC LIMIT $4 OFFSET $5"""
    COUNT_NOTIFICATIONS = """
        SELECT count(*) FROM notifications
        WHERE ($1 = '' OR account_id = $1) AND ($2 = '' OR user_id IS NULL OR user_id = $2)
          AND (NOT $3 OR read_at IS NULL)"""
    COUNT_UNREAD = """
        SELECT count(*) FROM notifications
        WHERE ($1 = '' OR account_id = $1) AND ($2 = '' OR user_id IS NULL OR user_id = $2)
          AND read_at IS NULL"""
    MARK_READ = """
        UPDATE notifications SET read_at = COALESCE(read_at, now())
        WHERE id = $3 AND ($1 = '' OR account_id = $1) AND ($2 = '' OR user_id IS NULL OR user_id = $2)
        RETURNING *"""
    MARK_ALL_READ = """
        UPDATE notifications SET read_at = now()
        WHERE ($1 = '' OR account_id = $1) AND ($2 = '' OR user_id IS NULL OR user_id = $2)
          AND read_at IS NULL"""
    DELETE_NOTIFICATION = """
        DELETE FROM notifications
        WHERE id = $3 AND ($1 = '' OR account_id = $1) AND ($2 = '' OR user_id IS NULL OR user_id = $2)
        RETURNING id"""
    ACCOUNT_EXISTS = "SELECT EXISTS (SELECT 1 FROM accounts WHERE account_id = $1)"

    INSERT_AUDIT = """
        INSERT INTO audit_log (actor_user_id, actor_role, actor_account, account_id, action, target, details,
                               source_key)
        VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8)
        ON CONFLICT (source_key) WHERE source_key IS NOT NULL DO NOTHING
        RETURNING *"""
    LIST_AUDIT = """
        SELECT * FROM audit_log
        WHERE ($1 = '' OR action = $1) AND ($2 = '' OR account_id = $2)
        ORDER BY id DESC LIMIT $3 OFFSET $4"""
    COUNT_AUDIT = "SELECT count(*) FROM audit_log WHERE ($1 = '' OR action = $1) AND ($2 = '' OR account_id = $2)"


class NotifyRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def insert_notification(
        self,
        *,
        account_id: str,
        user_id: str | None,
        kind: str,
        level: str,
        title: str,
        message: str,
        data: dict[str, Any],
        source_key: str,
    ) -> asyncpg.Record | None:
        return await self.pool.fetchrow(
            Q.INSERT_NOTIFICATION, account_id, user_id, kind, level, title, message, json.dumps(data), source_key
        )

    async def list_notifications(
        self, *, account_id: str, user_id: str, unread_only: bool, limit: int, offset: int = 0
    ) -> list[asyncpg.Record]:
        return list(await self.pool.fetch(Q.LIST_NOTIFICATIONS, account_id, user_id, unread_only, limit, offset))

    async def count_notifications(self, *, account_id: str, user_id: str, unread_only: bool) -> int:
        return int(await self.pool.fetchval(Q.COUNT_NOTIFICATIONS, account_id, user_id, unread_only))

    async def unread_count(self, *, account_id: str, user_id: str) -> int:
        return int(await self.pool.fetchval(Q.COUNT_UNREAD, account_id, user_id))

    async def mark_read(self, *, account_id: str, user_id: str, notification_id: int) -> asyncpg.Record | None:
        return await self.pool.fetchrow(Q.MARK_READ, account_id, user_id, notification_id)

    async def mark_all_read(self, *, account_id: str, user_id: str) -> int:
        status = await self.pool.execute(Q.MARK_ALL_READ, account_id, user_id)
        return int(status.split()[-1])

    async def delete_notification(self, *, account_id: str, user_id: str, notification_id: int) -> bool:
        return await self.pool.fetchval(Q.DELETE_NOTIFICATION, account_id, user_id, notification_id) is not None

    async def account_exists(self, *, account_id: str) -> bool:
        return bool(await self.pool.fetchval(Q.ACCOUNT_EXISTS, account_id))

    async def insert_audit(
        self,
        *,
        actor_user_id: str,
        actor_role: str,
        actor_account: str,
        account_id: str,
        action: str,
        target: str,
        details: dict[str, Any],
        source_key: str | None = None,
    ) -> asyncpg.Record | None:
        """The entry; None when one with the same source key exists."""
        return await self.pool.fetchrow(
            Q.INSERT_AUDIT,
            actor_user_id,
            actor_role,
            actor_account,
            account_id,
            action,
            target,
            json.dumps(details, default=str),
            source_key,
        )

    async def list_audit(
        self, *, action: str, account_id: str, limit: int, skip: int
    ) -> tuple[list[asyncpg.Record], int]:
        rows = await self.pool.fetch(Q.LIST_AUDIT, action, account_id, limit, skip)
        total = await self.pool.fetchval(Q.COUNT_AUDIT, action, account_id)
        return list(rows), int(total)
