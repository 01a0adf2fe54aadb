"""SQL of the offline operations a client syncs (`POST /api/sync`)."""

from __future__ import annotations

import asyncpg


class Q:
    # The claim: of two requests sending one operation at once, only one gets the row back.
    CLAIM = """
        INSERT INTO sync_operations (account_id, user_id, client_op_id, method, path, digest)
        VALUES ($1, $2, $3, $4, $5, $6)
        ON CONFLICT DO NOTHING
        RETURNING client_op_id"""
    OPERATION = """
        SELECT digest, status, body FROM sync_operations
        WHERE account_id = $1 AND user_id = $2 AND client_op_id = $3"""
    FINISH = """
        UPDATE sync_operations SET status = $4, body = $5, finished_at = now()
        WHERE account_id = $1 AND user_id = $2 AND client_op_id = $3 AND finished_at IS NULL
        RETURNING client_op_id"""
    RELEASE = """
        DELETE FROM sync_operations
        WHERE account_id = $1 AND user_id = $2 AND client_op_id = $3 AND finished_at IS NULL
        RETURNING client_op_id"""
    PURGE = "DELETE FROM sync_operations WHERE claimed_at < now() - $1::int * interval '1 second'"


class SyncRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def claim(
        self, *, account_id: str, user_id: str, client_op_id: str, method: str, path: str, digest: bytes
    ) -> bool:
        """True when this call made the claim; False when the operation was known already."""
        row = await self.pool.fetchval(Q.CLAIM, account_id, user_id, client_op_id, method, path, digest)
        return row is not None

    async def operation(self, *, account_id: str, user_id: str, client_op_id: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(Q.OPERATION, account_id, user_id, client_op_id)

    async def finish(self, *, account_id: str, user_id: str, client_op_id: str, status: int, body: str) -> bool:
        return await self.pool.fetchval(Q.FINISH, account_id, user_id, client_op_id, status, body) is not None

    async def release(self, *, account_id: str, user_id: str, client_op_id: str) -> bool:
        return await self.pool.fetchval(Q.RELEASE, account_id, user_id, client_op_id) is not None

    async def purge(self, *, older_than_seconds: int) -> None:
        await self.pool.execute(Q.PURGE, older_than_seconds)
