"""gRPC servicer of notifications and the audit log, and the servicers of accounts and auth
with the audit entries and notifications their actions make."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg
import grpc
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from pregonero.accounts.v1 import accounts_pb2, auth_pb2, notifications_pb2, notifications_pb2_grpc
from pregonero.events.v1 import events_pb2

from services.runtime import bus, tracing
from services.runtime.errors import ResourceExhausted
from services.runtime.identity import Caller, caller_var, current_caller
from services.runtime.protos import to_timestamp

from .audit import Audit
from .auth_server import AuthServicer
from .ledger import unit_of
from .notifications import Notifications
from .server import AccountsServicer

log = logging.getLogger("pregonero.accounts.notify")

SUBJECT_PREFIX = "events.notification."


def _jsonb(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def notification_pb(row: asyncpg.Record) -> notifications_pb2.Notification:
    return notifications_pb2.Notification(
        id=str(row["id"]),
        account_id=row["account_id"],
        user_id=row["user_id"] or "",
        kind=row["kind"],
        level=row["level"],
        title=row["title"],
        message=row["message"],
        data_json=_jsonb(row["data"]),
        read=row["read_at"] is not None,
        created_at=to_timestamp(row["created_at"]),
        read_at=to_timestamp(row["read_at"]),
    )


def audit_pb(row: asyncpg.Record) -> notifications_pb2.AuditEntry:
    return notifications_pb2.AuditEntry(
        id=str(row["id"]),
        actor_user_id=row["actor_user_id"],
        actor_role=row["actor_role"],
        actor_account=row["actor_account"],
        account_id=row["account_id"],
        action=row["action"],
        target=row["target"],
        details_json=_jsonb(row["details"]),
        at=to_timestamp(row["at"]),
    )


AccountEvents = Callable[[str, str, str, str], Awaitable[None]]


def account_event_publisher(js: JetStreamContext) -> AccountEvents:
    """events.account.<id> through JetStream: campaigns resumes the account's suspended
    batches on a top-up, suspends its running ones on a suspension."""

    async def publish(account_id: str, kind: str, balance: str, key: str) -> None:
        now = to_timestamp(datetime.now(UTC))
        event = events_pb2.AccountEvent(account_id=account_id, type=kind, balance=balance, at=now)
        await bus.publish(js, f"events.account.{account_id}", event, msg_id=f"account:{account_id}:{kind}:{key}")

    return publish


def nats_publisher(nc: NATS) -> Callable[[asyncpg.Record], Awaitable[None]]:
    """Live pushes: core NATS on events.notification.<account_id> (the row is the record)."""

    async def publish(row: asyncpg.Record) -> None:
        data = notification_pb(row).SerializeToString()
        await nc.publish(SUBJECT_PREFIX + row["account_id"], data, headers=tracing.live_headers())

    return publish


class NotificationsServicer(notifications_pb2_grpc.NotificationsServiceServicer):
    def __init__(self, notifications: Notifications, audit: Audit) -> None:
        self.notifications = notifications
        self.audit = audit

    async def ListNotifications(
        self, request: notifications_pb2.ListNotificationsRequest, context: grpc.aio.ServicerContext
    ) -> notifications_pb2.ListNotificationsResponse:
        caller = current_caller()
        rows = await self.notifications.list(
            caller,
            account_id=request.account_id,
            unread_only=request.unread_only,
            limit=request.limit or 50,
            offset=request.offset,
        )
        total = await self.notifications.count(caller, account_id=request.account_id, unread_only=request.unread_only)
        return notifications_pb2.ListNotificationsResponse(
            notifications=[notification_pb(r) for r in rows], total=total
        )

    async def UnreadCount(
        self, request: notifications_pb2.UnreadCountRequest, context: grpc.aio.ServicerContext
    ) -> notifications_pb2.UnreadCountResponse:
        count = await self.notifications.unread_count(current_caller(), account_id=request.account_id)
        return notifications_pb2.UnreadCountResponse(count=count)

    async def MarkRead(
        self, request: notifications_pb2.NotificationRef, context: grpc.aio.ServicerContext
    ) -> notifications_pb2.Notification:
        return notification_pb(await self.notifications.mark_read(current_caller(), request.id))

    async def MarkAllRead(
        self, request: notifications_pb2.MarkAllReadRequest, context: grpc.aio.ServicerContext
    ) -> notifications_pb2.MarkAllReadResponse:
        updated = await self.notifications.mark_all_read(current_caller(), account_id=request.account_id)
        return notifications_pb2.MarkAllReadResponse(updated=updated)

    async def DeleteNotification(
        self, request: notifications_pb2.NotificationRef, context: grpc.aio.ServicerContext
    ) -> notifications_pb2.DeleteNotificationResponse:
        await self.notifications.delete(current_caller(), request.id)
        return notifications_pb2.DeleteNotificationResponse(id=request.id)

    async def ListAudit(
        self, request: notifications_pb2.ListAuditRequest, context: grpc.aio.ServicerContext
    ) -> notifications_pb2.ListAuditResponse:
        rows, total = await self.audit.list(
            current_caller(),
            action=request.action,
            account_id=request.account_id,
            limit=request.limit or 50,
            skip=request.skip,
        )
        return notifications_pb2.ListAuditResponse(entries=[audit_pb(r) for r in rows], total=total)


def _available(balance: accounts_pb2.Balance) -> Decimal | None:
    text = balance.minutes_available if balance.plan_type == "minutes_based" else balance.credit_available
    try:
        return Decimal(text)
    except (InvalidOperation, ValueError):
        return None


class AuditedAccountsServicer(AccountsServicer):
    """The accounts servicer; its ledger and status changes also write the audit log and
    the credit and suspension notifications."""

    def __init__(
        self, *args: Any, audit: Audit, notifications: Notifications, events: AccountEvents, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.audit = audit
        self.notifications = notifications
        self.events = events

    async def _announce(self, account_id: str, kind: str, balance: str, key: str) -> None:
        try:
            await self.events(account_id, kind, balance, key)
        except Exception:  # noqa: BLE001 - the change is booked; a batch can still be resumed by hand
            log.warning("account event %s for %s not published", kind, account_id, exc_info=True)

    async def _credited(self, action: str, request: Any, reply: accounts_pb2.LedgerReply) -> accounts_pb2.LedgerReply:
        if not reply.replayed:
            kind = {"credits.topup": "topped_up", "credits.refund": "refunded"}.get(action, "adjusted")
            await self._announce(request.account_id, kind, reply.balance_after, reply.entry_id)
            details = {
                "credits": request.credits,
                "minutes": request.minutes,
                "reason": request.reason,
                "entry_id": reply.entry_id,
                "idempotency_key": request.idempotency_key,
            }
            await self.audit.record(
                current_caller(), action, account_id=request.account_id, target=request.account_id, details=details
            )
        return reply

    async def TopUp(
        self, request: accounts_pb2.TopUpRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.LedgerReply:
        return await self._credited("credits.topup", request, await super().TopUp(request, context))

    async def Refund(
        self, request: accounts_pb2.RefundRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.LedgerReply:
        return await self._credited("credits.refund", request, await super().Refund(request, context))

    async def Adjust(
        self, request: accounts_pb2.AdjustRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.LedgerReply:
        reply = await self._credited("credits.adjustment", request, await super().Adjust(request, context))
        await self._check_level(request.account_id, reply.balance)
        return reply

    async def CreateAccount(
        self, request: accounts_pb2.CreateAccountRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.Account:
        account = await super().CreateAccount(request, context)
        details = {"initial_credits": request.initial_credits, "initial_minutes": request.initial_minutes}
        await self.audit.record(
            current_caller(),
            "account.created",
            account_id=account.account_id,
            target=account.account_id,
            details=details,
        )
        return account

    async def UpdateAccount(
        self, request: accounts_pb2.UpdateAccountRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.Account:
        caller = current_caller()
        before = await self.accounts.get(caller, request.account_id)
        account = await super().UpdateAccount(request, context)
        if account.status == before["status"]:
            # A new plan or price may let suspended batches go on.
            await self._announce(account.account_id, "updated", "", str(account.updated_at.ToMicroseconds()))
        else:
            action = {"suspended": "account.suspended", "active": "account.activated"}.get(
                account.status, "account.deactivated"
            )
            await self.audit.record(
                caller,
                action,
                account_id=account.account_id,
                target=account.account_id,
                details={"from": before["status"], "to": account.status, "reason": account.suspension_reason},
            )
            kind = "suspended" if account.status != "active" else "activated"
            await self._announce(account.account_id, kind, "", str(account.updated_at.ToMicroseconds()))
            if account.status == "suspended":
                await self.notifications.suspended(
                    account_id=account.account_id,
                    reason=account.suspension_reason,
                    changed_at=account.updated_at.ToDatetime(),
                )
        return account

    async def Hold(
        self, request: accounts_pb2.HoldRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.LedgerReply:
        try:
            reply = await super().Hold(request, context)
        except ResourceExhausted:
            with contextlib.suppress(Exception):
                balance = await self.ledger.balance(current_caller(), request.account_id)
                await self.notifications.credit_level(
                    account_id=request.account_id,
                    plan_type=balance.plan_type,
                    available=balance.available(unit_of(balance.plan_type)),
                )
            raise
        await self._check_level(request.account_id, reply.balance)
        return reply

    async def Capture(
        self, request: accounts_pb2.CaptureRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.LedgerReply:
        reply = await super().Capture(request, context)
        await self._check_level(request.account_id, reply.balance)
        return reply

    async def _check_level(self, account_id: str, balance: accounts_pb2.Balance) -> None:
        available = _available(balance)
        if available is None:
            return
        try:
            await self.notifications.credit_level(
                account_id=balance.account_id or account_id, plan_type=balance.plan_type, available=available
            )
        except (asyncpg.PostgresError, OSError):
            # The ledger change is booked; a lost notice must not fail (and replay) it.
            log.warning("credit notification for %s failed", account_id, exc_info=True)


class AuditedAuthServicer(AuthServicer):
    """The auth servicer; logins, users and API keys also write the audit log."""

    def __init__(self, *args: Any, audit: Audit, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.audit = audit

    async def Login(self, request: auth_pb2.LoginRequest, context: grpc.aio.ServicerContext) -> auth_pb2.TokenPair:
        try:
            pair = await super().Login(request, context)
        except Exception:
            await self.audit.record(
                None, "auth.login_failed", target=request.email[:254], details={"client_ip": request.client_ip}
            )
            raise
        user = pair.user
        await self.audit.record(
            Caller(role=user.role, account_id=user.account_id, user_id=user.user_id),
            "auth.login",
            account_id=user.account_id,
            target=user.user_id,
            details={"client_ip": request.client_ip, "session_id": pair.session_id},
        )
        return pair

    async def CreateUser(self, request: auth_pb2.CreateUserRequest, context: grpc.aio.ServicerContext) -> auth_pb2.User:
        user = await super().CreateUser(request, context)
        await self.audit.record(
            caller_var.get(),
            "user.created",
            account_id=user.account_id,
            target=user.user_id,
            details={"email": user.email, "role": user.role},
        )
        return user

    async def CreateApiKey(
        self, request: auth_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CreatedApiKey:
        created = await super().CreateApiKey(request, context)
        await self.audit.record(
            caller_var.get(),
            "api_key.created",
            account_id=created.key.account_id,
            target=created.key.key_id,
            details={"name": created.key.name, "prefix": created.key.prefix},
        )
        return created

    async def RevokeApiKey(
        self, request: auth_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ApiKey:
        key = await super().RevokeApiKey(request, context)
        await self.audit.record(
            caller_var.get(),
            "api_key.revoked",
            account_id=key.account_id,
            target=key.key_id,
            details={"name": key.name},
        )
        return key
