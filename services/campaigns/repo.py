"""SQL of the campaigns service."""

from __future__ import annotations

import asyncpg


class Q:
    COUNT_BATCHES = "SELECT count(*) FROM batches WHERE account_id = $1"


class CampaignsRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
