"""SQL of the dispatcher service."""

from __future__ import annotations

import asyncpg


class Q:
    COUNT_ACTIVE = "SELECT count(*) FROM senders WHERE account_id = $1 AND status = 'active'"


class DispatcherRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
