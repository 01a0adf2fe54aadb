"""Notifications: made from events (batch finished or failed, credit low or exhausted,
account suspended), one per source event, read within the caller's account."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
from cachetools import LRUCache
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pregonero.events.v1 import events_pb2

from services.runtime import bus
from services.runtime.errors import InvalidArgument, NotFound
from services.runtime.identity import Caller

from .audit import Audit
from .ledger import Balance, unit_of
from .notify_repo import NotifyRepo

log = logging.getLogger("pregonero.accounts.notifications")
# Credit notices created today by this process, remembered to spare the database an insert.
DONE_KEYS = 10_000

# Below this many credits (or minutes) available an account is told its credit is low.
LOW_CREDIT = Decimal(10)
BATCH_DURABLE = "accounts-notifications"
FETCH = 256
# Deep pages cost a scan of what they skip; past this a client should filter instead.
MAX_OFFSET = 100_000

Published = Callable[[asyncpg.Record], Awaitable[None]]


_NOUNS = {"voice": ("Campaña de llamadas", "a", "completadas"), "whatsapp": ("Envío masivo", "o", "enviados")}


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


class Notifications:
    def __init__(self, repo: NotifyRepo, *, on_created: Published | None = None) -> None:
        self.repo = repo
        self.on_created = on_created
        # Credit-level keys already written: a capture on a low account costs no query.
        # Keys of the day's credit notices already created here (the database's unique key is
        # the guarantee; this spares it the insert): the oldest go first when it is full.
        self._done: LRUCache[str, bool] = LRUCache(maxsize=DONE_KEYS)

    async def create(
        self,
        *,
        account_id: str,
        kind: str,
        level: str,
        title: str,
        message: str,
        source_key: str,
        data: dict[str, Any] | None = None,
        user_id: str | None = None,
    ) -> asyncpg.Record | None:
        """The new notification, or None when its source event already made one."""
        if not await self.repo.account_exists(account_id=account_id):
            return None  # an event of an account that is gone: nobody to tell
        row = await self.repo.insert_notification(
            account_id=account_id,
            user_id=user_id,
            kind=kind,
            level=level,
            title=title,
            message=message,
            data=data or {},
            source_key=source_key,
        )
        if row is not None and self.on_created is not None:
            try:
                await self.on_created(row)
            except Exception:  # noqa: BLE001 - the row is kept; only the live push is lost
                log.warning("publishing notification %s failed", row["id"], exc_info=True)
        return row

    # --- from events --------------------------------------------------------------------

    async def batch_event(self, event: events_pb2.BatchEvent) -> asyncpg.Record | None:
        if event.type not in ("job_completed", "job_failed", "suspended") or not event.account_id:
            return None
        data = {"job_id": event.batch_id, "sent": event.sent, "failed": event.failed, "total": event.total}
        key = f"batch:{event.batch_id}:{event.type}"
        # A voice batch counts completed calls where a bulk send counts sent messages; its
        # noun is feminine ("suspendida").
        noun, g, done = _NOUNS.get(event.channel, _NOUNS["whatsapp"])
        if event.type == "suspended":
            return await self.create(
                account_id=event.account_id,
                kind="batch_suspended",
                level="warning",
                title=f"{noun} suspendid{g}",
                message=f"{event.sent} de {event.total} {done}; {event.error}",
                # One per suspension: a batch may be suspended again after a top-up.
                source_key=f"{key}:{event.at.seconds}",
                data={**data, "reason": event.error},
            )
        if event.type == "job_failed":
            return await self.create(
                account_id=event.account_id,
                kind="batch_failed",
                level="error",
                title=f"{noun} fallid{g}",
                message=event.message or event.error or f"{noun} {event.batch_id}: falló",
                source_key=key,
                data={**data, "error": event.error},
            )
        cancelled = event.status == "cancelled"
        return await self.create(
            account_id=event.account_id,
            kind="batch_cancelled" if cancelled else "batch_completed",
            level="info" if cancelled else "success",
            title=f"{noun} {'cancelad' if cancelled else 'completad'}{g}",
            message=f"{event.sent} {done}, {event.failed} fallidos de {event.total}",
            source_key=key,
            data={**data, "channel": event.channel or "whatsapp"},
        )

    async def credit_level(self, *, account_id: str, plan_type: str, available: Decimal) -> asyncpg.Record | None:
        """Credit low / exhausted, at most once a day per account and kind."""
        if plan_type == "unlimited" or available >= LOW_CREDIT:
            return None
        unit = "minutos" if plan_type == "minutes_based" else "créditos"
        if available <= 0:
            kind, level, title = "credit_exhausted", "error", "Saldo agotado"
            message = f"La cuenta no tiene {unit} disponibles"
        else:
            kind, level, title = "credit_low", "warning", "Saldo bajo"
            message = f"Quedan {available:.2f} {unit} disponibles"
        key = f"{kind}:{account_id}:{_today()}"
        if key in self._done:
            return None
        row = await self.create(
            account_id=account_id,
            kind=kind,
            level=level,
            title=title,
            message=message,
            source_key=key,
            data={"available": str(available)},
        )
        self._done[key] = True
        return row

    async def balance_level(self, balance: Balance) -> None:
        """credit_level for a balance just changed by the ledger; a lost notice is only logged
        (the change is booked and must not be replayed for it)."""
        try:
            await self.credit_level(
                account_id=balance.account_id,
                plan_type=balance.plan_type,
                available=balance.available(unit_of(balance.plan_type)),
            )
        except (asyncpg.PostgresError, OSError):
            log.warning("credit notification for %s failed", balance.account_id, exc_info=True)

    async def suspended(self, *, account_id: str, reason: str, changed_at: datetime) -> asyncpg.Record | None:
        return await self.create(
            account_id=account_id,
            kind="account_suspended",
            level="error",
            title="Cuenta suspendida",
            message=reason or "La cuenta fue suspendida",
            source_key=f"suspended:{account_id}:{changed_at.isoformat()}",
            data={"reason": reason},
        )

    # --- reading ------------------------------------------------------------------------

    @staticmethod
    def _scope(caller: Caller, account_id: str) -> tuple[str, str]:
        """(account, user) filters: a member sees its account's and its own; an admin all."""
        account = caller.account_scope(account_id) if not caller.is_admin else account_id
        return account, "" if caller.is_admin else caller.user_id

    async def list(
        self, caller: Caller, *, account_id: str = "", unread_only: bool = False, limit: int = 50, offset: int = 0
    ) -> list[asyncpg.Record]:
        if not 1 <= limit <= 500:
            raise InvalidArgument("limit must be between 1 and 500")
        if not 0 <= offset <= MAX_OFFSET:
            raise InvalidArgument(f"offset must be between 0 and {MAX_OFFSET}")
        account, user = self._scope(caller, account_id)
        return await self.repo.list_notifications(
            account_id=account, user_id=user, unread_only=unread_only, limit=limit, offset=offset
        )

    async def count(self, caller: Caller, *, account_id: str = "", unread_only: bool = False) -> int:
        """How many `list` pages through (its total, whatever the page)."""
        account, user = self._scope(caller, account_id)
        return await self.repo.count_notifications(account_id=account, user_id=user, unread_only=unread_only)

    async def unread_count(self, caller: Caller, *, account_id: str = "") -> int:
        account, user = self._scope(caller, account_id)
        return await self.repo.unread_count(account_id=account, user_id=user)

    async def mark_read(self, caller: Caller, notification_id: str) -> asyncpg.Record:
        account, user = self._scope(caller, "")
        row = await self.repo.mark_read(account_id=account, user_id=user, notification_id=_id(notification_id))
        if row is None:
            raise NotFound(f"notification {notification_id} not found")
        return row

    async def mark_all_read(self, caller: Caller, *, account_id: str = "") -> int:
        account, user = self._scope(caller, account_id)
        return await self.repo.mark_all_read(account_id=account, user_id=user)

    async def delete(self, caller: Caller, notification_id: str) -> None:
        account, user = self._scope(caller, "")
        if not await self.repo.delete_notification(
            account_id=account, user_id=user, notification_id=_id(notification_id)
        ):
            raise NotFound(f"notification {notification_id} not found")


def _id(text: str) -> int:
    # A malformed id names nothing: 'not found', like another account's.
    if not text.isdigit() or len(text) > 18:
        raise NotFound(f"notification {text} not found")
    return int(text)


async def consume_batch_events(js: JetStreamContext, notifications: Notifications, audit: Audit) -> None:
    """Durable consumer of the batch lifecycle events: a notification per finished or
    suspended batch, an audit entry per cancellation. A failed batch of events is
    redelivered; notifications and audit entries are deduplicated by their source key.
    Older events were never notified, so a first start skips them."""

    async def handle(msgs: list[Msg]) -> None:
        for msg in msgs:
            # Undecodable, it fails the batch: the consumer dead-letters it, not the others.
            event = events_pb2.BatchEvent.FromString(msg.data)
            await notifications.batch_event(event)
            if event.type == "cancelled":
                actor = Caller(role=event.actor_role, account_id=event.actor_account, user_id=event.actor_user_id)
                await audit.record(
                    actor if event.actor_role else None,
                    "batch.cancelled",
                    account_id=event.account_id,
                    target=event.batch_id,
                    details={"reason": event.error, "sent": event.sent, "total": event.total},
                    source_key=f"batch:{event.batch_id}:cancelled",
                )

    await bus.consume(js, "events.batch.>", durable=BATCH_DURABLE, handle=handle, fetch=FETCH, deliver_new=True)
