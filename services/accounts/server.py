"""gRPC servicer: proto in, domain call, proto out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import grpc
from pregonero.accounts.v1 import accounts_pb2, accounts_pb2_grpc

from services.runtime.errors import PermissionDenied
from services.runtime.identity import current_caller
from services.runtime.protos import to_timestamp

from .domain import Accounts
from .ledger import Balance, CaptureItem, Entry, Ledger, LedgerResult
from .ledger_export import LedgerExport


def dec(value: Decimal | None) -> str:
    """Amounts cross the wire as decimal strings with the ledger's 4 places."""
    return "" if value is None else f"{value:.4f}"


def balance_pb(b: Balance) -> accounts_pb2.Balance:
    """In the original data model's terms (added, charged, held, available): what clients read."""
    return accounts_pb2.Balance(
        account_id=b.account_id,
        plan_type=b.plan_type,
        credit_balance=dec(b.served_credit_balance),
        credit_reserved=dec(b.credit_reserved),
        credit_available=dec(b.credit_available),
        credit_used=dec(b.served_credit_used),
        minutes_purchased=dec(b.served_minutes_purchased),
        minutes_used=dec(b.served_minutes_used),
        minutes_reserved=dec(b.minutes_reserved),
        minutes_available=dec(b.minutes_available),
    )


def _jsonb(value: Any) -> dict[str, Any]:
    return json.loads(value) if isinstance(value, str) else dict(value)


def account_pb(row: asyncpg.Record) -> accounts_pb2.Account:
    features = _jsonb(row["features"])
    return accounts_pb2.Account(
        account_id=row["account_id"],
        object_id=row["object_id"],
        account_name=row["account_name"],
        status=row["status"],
        plan_type=row["plan_type"],
        country=row["country"],
        timezone=row["timezone"],
        max_concurrent_calls=int(features.get("max_concurrent_calls", 0) or 0),
        contact_name=row["contact_name"],
        contact_email=row["contact_email"],
        contact_phone=row["contact_phone"],
        balance=balance_pb(Balance.of(row)),
        features_json=json.dumps(features),
        settings_json=json.dumps(_jsonb(row["settings"])),
        is_active=row["status"] == "active",
        suspension_reason=row["suspension_reason"],
        cost_per_minute=dec(row["cost_per_minute"]),
        cost_per_call_setup=dec(row["cost_per_call_setup"]),
        cost_per_whatsapp_message=dec(row["cost_per_whatsapp_message"]),
        created_at=to_timestamp(row["created_at"]),
        updated_at=to_timestamp(row["updated_at"]),
    )


def reply_pb(r: LedgerResult) -> accounts_pb2.LedgerReply:
    return accounts_pb2.LedgerReply(
        balance=balance_pb(r.balance),
        entry_id="" if r.entry_id is None else str(r.entry_id),
        replayed=r.replayed,
        amount=dec(r.amount),
        unit=r.unit,
        balance_after=dec(r.balance_after),
        captures=[
            accounts_pb2.CaptureOutcome(
                attempt_id=c.attempt_id,
                hold_id=c.hold_id,
                requested=dec(c.requested),
                charged=dec(c.charged),
                status=c.status,
                entry_id="" if c.entry_id is None else str(c.entry_id),
            )
            for c in r.captures
        ],
    )


def transaction_pb(e: Entry) -> accounts_pb2.Transaction:
    return accounts_pb2.Transaction(
        entry_id=str(e.id),
        account_id=e.account_id,
        kind=e.kind,
        amount=dec(e.amount),
        cause=e.cause,
        balance_after=dec(e.balance_after),
        created_at=to_timestamp(e.created_at),
        unit=e.unit,
        held_change=dec(e.held_change),
        used_change=dec(e.used_change),
        held_after=dec(e.held_after),
        hold_id=e.hold_id,
        requested=dec(e.requested),
        note=e.note,
    )


_ACCOUNTS = "/pregonero.accounts.v1.AccountsService/"
# The RPCs another service than the gateway may call (runtime/service_auth.py). The ledger's
# hold flow belongs to campaigns, which holds credit before it releases work and gives back
# what was not spent: the gateway, and so no user, can hold, capture or release directly.
CALLERS = {
    _ACCOUNTS + "GetAccount": frozenset({"gateway", "campaigns"}),
    _ACCOUNTS + "Hold": frozenset({"campaigns"}),
    _ACCOUNTS + "Capture": frozenset({"campaigns"}),
    _ACCOUNTS + "Release": frozenset({"campaigns"}),
    _ACCOUNTS + "ReleaseHolds": frozenset({"campaigns"}),
    # Named although unlisted RPCs are the gateway's alone anyway: a download of every
    # account's ledger is for no other service.
    _ACCOUNTS + "ExportTransactions": frozenset({"gateway"}),
}


class AccountsServicer(accounts_pb2_grpc.AccountsServiceServicer):
    def __init__(self, accounts: Accounts, ledger: Ledger) -> None:
        self.accounts = accounts
        self.ledger = ledger
        self.ledger_export = LedgerExport(ledger.repo)

    async def GetAccount(
        self, request: accounts_pb2.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.Account:
        return account_pb(await self.accounts.get(current_caller(), request.account_id))

    async def ListAccounts(
        self, request: accounts_pb2.ListAccountsRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.ListAccountsResponse:
        rows, total = await self.accounts.list(
            current_caller(), status=request.status, limit=request.limit or 50, skip=request.skip
        )
        return accounts_pb2.ListAccountsResponse(accounts=[account_pb(r) for r in rows], total=total)

    async def UpdateAccount(
        self, request: accounts_pb2.UpdateAccountRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.Account:
        return account_pb(await self.accounts.update(current_caller(), request.account_id, request.patch_json))

    async def _create(self, request: accounts_pb2.CreateAccountRequest, *, exist_ok: bool) -> accounts_pb2.Account:
        if not current_caller().is_admin:
            raise PermissionDenied("only an admin creates accounts")
        row = await self.accounts.create(
            account_id=request.account_id,
            account_name=request.account_name,
            plan_type=request.plan_type,
            country=request.country,
            timezone=request.timezone,
            contact_name=request.contact_name,
            contact_email=request.contact_email,
            contact_phone=request.contact_phone,
            features_json=request.features_json,
            settings_json=request.settings_json,
            initial_credits=request.initial_credits,
            initial_minutes=request.initial_minutes,
            prices={
                "cost_per_minute": request.cost_per_minute,
                "cost_per_call_setup": request.cost_per_call_setup,
                "cost_per_whatsapp_message": request.cost_per_whatsapp_message,
            },
            exist_ok=exist_ok,
        )
        return account_pb(row)

    async def CreateAccount(
        self, request: accounts_pb2.CreateAccountRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.Account:
        return await self._create(request, exist_ok=False)

    async def EnsureAccount(
        self, request: accounts_pb2.CreateAccountRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.Account:
        return await self._create(request, exist_ok=True)

    async def GetBalance(
        self, request: accounts_pb2.GetBalanceRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.Balance:
        return balance_pb(await self.ledger.balance(current_caller(), request.account_id))

    async def _credit(
        self, kind: str, request: accounts_pb2.TopUpRequest | accounts_pb2.RefundRequest | accounts_pb2.AdjustRequest
    ) -> accounts_pb2.LedgerReply:
        result = await self.ledger.credit(
            current_caller(),
            kind,
            account_id=request.account_id,
            credits=request.credits,
            minutes=request.minutes,
            key=request.idempotency_key,
            fingerprint=request.fingerprint,
            reason=request.reason,
        )
        return reply_pb(result)

    async def TopUp(
        self, request: accounts_pb2.TopUpRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.LedgerReply:
        return await self._credit("topup", request)

    async def Refund(
        self, request: accounts_pb2.RefundRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.LedgerReply:
        return await self._credit("refund", request)

    async def Adjust(
        self, request: accounts_pb2.AdjustRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.LedgerReply:
        return await self._credit("adjustment", request)

    async def Hold(
        self, request: accounts_pb2.HoldRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.LedgerReply:
        return reply_pb(
            await self.ledger.hold(
                current_caller(),
                account_id=request.account_id,
                hold_id=request.hold_id,
                amount=request.amount,
                partial=request.partial,
            )
        )

    async def Capture(
        self, request: accounts_pb2.CaptureRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.LedgerReply:
        items = [CaptureItem(i.attempt_id, i.hold_id, i.amount) for i in request.items]
        return reply_pb(await self.ledger.capture(current_caller(), account_id=request.account_id, items=items))

    async def Release(
        self, request: accounts_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.LedgerReply:
        return reply_pb(
            await self.ledger.release(current_caller(), account_id=request.account_id, hold_id=request.hold_id)
        )

    async def ReleaseHolds(
        self, request: accounts_pb2.ReleaseHoldsRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.LedgerReply:
        return reply_pb(
            await self.ledger.release_holds(
                current_caller(),
                account_id=request.account_id,
                prefix=request.hold_prefix,
                expected=request.expected,
                force=request.force,
            )
        )

    async def ListTransactions(
        self, request: accounts_pb2.ListTransactionsRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.ListTransactionsResponse:
        entries, total = await self.ledger.transactions(
            current_caller(), account_id=request.account_id, limit=request.limit or 50, skip=request.skip
        )
        return accounts_pb2.ListTransactionsResponse(transactions=[transaction_pb(e) for e in entries], total=total)

    async def ExportTransactions(
        self, request: accounts_pb2.ExportTransactionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[accounts_pb2.ExportChunk]:
        export = await self.ledger_export.open(current_caller(), fmt=request.format, account_id=request.account_id)
        # Scoped and found: the name goes first, so the download starts before any entry is read.
        yield accounts_pb2.ExportChunk(file_name=export.file_name, content_type=export.content_type)
        async for data in export.chunks():
            if data:
                yield accounts_pb2.ExportChunk(data=data)
