"""Offline operations a client syncs (`POST /api/sync`), each applied once per user.

The order of steps is what keeps "once": the gateway claims an operation (a row keyed by the
caller's account, user and the client's id) before it runs it, and writes its outcome after.
A repeat finds the row: with an outcome it gets that outcome back; without one (being applied
now, or the gateway stopped between running it and recording it) it is not run again, since
it may have taken effect. A refusal before the operation could start (429, 503) gives the
claim back, so the client may try again later. Outcomes are kept for RETENTION_S; an id sent
again after that runs again."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import asyncpg

from services.runtime.errors import InvalidArgument, NotFound
from services.runtime.identity import Caller

from .sync_repo import SyncRepo

log = logging.getLogger("pregonero.accounts.sync")

CLAIMED, FINISHED, PENDING, CONFLICT = "claimed", "finished", "pending", "conflict"
METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_ID = 128
MAX_PATH = 2048
# A stored outcome's body (JSON text); the scheduler's replies are far smaller.
MAX_BODY = 1024 * 1024
RETENTION_S = 30 * 24 * 3600


@dataclass(frozen=True)
class Claim:
    state: str
    status: int = 0
    body: str = ""


class SyncOperations:
    def __init__(self, repo: SyncRepo) -> None:
        self.repo = repo

    @staticmethod
    def _key(caller: Caller, client_op_id: str) -> dict[str, str]:
        if not caller.user_id:
            raise InvalidArgument("syncing needs a caller with a user id")
        if not 1 <= len(client_op_id) <= MAX_ID or not client_op_id.isprintable():
            raise InvalidArgument(f"client_op_id must be 1 to {MAX_ID} printable characters")
        return {"account_id": caller.account_scope(), "user_id": caller.user_id, "client_op_id": client_op_id}

    async def claim(self, caller: Caller, *, client_op_id: str, method: str, path: str, digest: bytes) -> Claim:
        key = self._key(caller, client_op_id)
        if method not in METHODS:
            raise InvalidArgument(f"method must be one of {', '.join(sorted(METHODS))}")
        if not path.startswith("/") or len(path) > MAX_PATH:
            raise InvalidArgument(f"path must start with / and have at most {MAX_PATH} characters")
        if len(digest) != 32:
            raise InvalidArgument("digest must be a SHA-256 (32 bytes)")
        if await self.repo.claim(**key, method=method, path=path, digest=digest):
            return Claim(CLAIMED)
        row = await self.repo.operation(**key)
        if row is None:  # released between the two statements: it is the client's to send again
            return Claim(PENDING)
        if bytes(row["digest"]) != digest:
            return Claim(CONFLICT)
        if row["status"] is None:
            return Claim(PENDING)
        return Claim(FINISHED, row["status"], row["body"])

    async def finish(self, caller: Caller, *, client_op_id: str, status: int, body: str) -> None:
        if not 100 <= status <= 599:
            raise InvalidArgument("status must be an HTTP status")
        if len(body) > MAX_BODY:
            raise InvalidArgument(f"body must have at most {MAX_BODY} characters")
        if not await self.repo.finish(**self._key(caller, client_op_id), status=status, body=body):
            raise NotFound(f"no claimed operation {client_op_id} without an outcome")

    async def release(self, caller: Caller, *, client_op_id: str) -> bool:
        return await self.repo.release(**self._key(caller, client_op_id))

    async def purge_forever(self, *, every_seconds: float = 3600.0) -> None:
        while True:
            try:
                await self.repo.purge(older_than_seconds=RETENTION_S)
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("sync purge failed: %s", exc)  # the next round tries again
            await asyncio.sleep(every_seconds)
