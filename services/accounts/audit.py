"""The audit log: an append-only record of critical actions, read by admins."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from services.runtime.errors import InvalidArgument, PermissionDenied
from services.runtime.identity import Caller

from .notify_repo import NotifyRepo

log = logging.getLogger("pregonero.accounts.audit")


class Audit:
    def __init__(self, repo: NotifyRepo) -> None:
        self.repo = repo

    async def record(
        self,
        caller: Caller | None,
        action: str,
        *,
        account_id: str = "",
        target: str = "",
        details: dict[str, Any] | None = None,
        source_key: str | None = None,
    ) -> None:
        """Never fails the action it records: the action has already happened. With a
        source key (an event's), a second record of the same action writes nothing."""
        try:
            await self.repo.insert_audit(
                actor_user_id=caller.user_id if caller else "",
                actor_role=caller.role if caller else "",
                actor_account=caller.account_id if caller else "",
                account_id=account_id,
                action=action,
                target=target,
                details=details or {},
                source_key=source_key,
            )
        except (asyncpg.PostgresError, OSError):
            log.error("audit entry %s for %s not written", action, target, exc_info=True)

    async def list(
        self, caller: Caller, *, action: str = "", account_id: str = "", limit: int = 50, skip: int = 0
    ) -> tuple[list[asyncpg.Record], int]:
        if not caller.is_admin:
            raise PermissionDenied("only an admin reads the audit log")
        if not 1 <= limit <= 500:
            raise InvalidArgument("limit must be between 1 and 500")
        if skip < 0:
            raise InvalidArgument("skip must not be negative")
        return await self.repo.list_audit(action=action, account_id=account_id, limit=limit, skip=skip)
