"""SpeechAI accounts under /api/v1/accounts, in the shapes the deployed dashboard reads
(API_COMPAT.md): plain arrays with X-Total-Count for lists, `_id` beside `account_id`,
numbers for amounts. The accounts service decides who may do what; this module only maps."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pregonero.accounts.v1 import accounts_pb2
from pregonero.campaigns.v1 import campaigns_pb2
from pydantic import BaseModel, Field, model_validator

from services.runtime.identity import Caller
from services.runtime.protos import from_timestamp, iso

from ..auth import require_caller
from ..values import number
from .batches import batch_json

router = APIRouter(prefix="/api/v1/accounts", tags=["accounts"])

CallerDep = Annotated[Caller, Depends(require_caller)]
AccountId = Annotated[str, Path(min_length=1, max_length=64, description="account_id")]
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=200, description="Same key and body: same reply; other body: 409"),
]
# numeric(18, 4) in the ledger.
Amount = Annotated[Decimal, Field(gt=0, max_digits=18, decimal_places=4)]
SignedAmount = Annotated[Decimal, Field(max_digits=18, decimal_places=4)]
Price = Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=4)]
Plan = Literal["credit_based", "minutes_based", "unlimited"]
Status = Literal["active", "suspended", "inactive"]
# Descriptions of entries without a note, as the dashboard's transaction list shows them.
DESCRIPTIONS = {
    "topup": "Recarga de créditos",
    "hold": "Reserva de créditos",
    "capture": "Cargo por intento",
    "release": "Liberación de reserva",
    "refund": "Reembolso",
    "adjustment": "Ajuste",
}


class Features(BaseModel, extra="allow"):
    max_concurrent_calls: int | None = Field(None, ge=0, le=2**31 - 1)


class AccountCreate(BaseModel):
    account_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="generated if absent"
    )
    account_name: str | None = Field(None, max_length=200)
    contact_name: str | None = Field(None, max_length=200)
    contact_email: str | None = Field(None, max_length=200)
    contact_phone: str | None = Field(None, max_length=50)
    plan_type: Plan | None = None
    country: Literal["CL", "AR"] | None = None
    timezone: str | None = Field(None, max_length=64)
    features: Features | None = None
    settings: dict[str, Any] | None = None
    initial_credits: Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=4)] | None = None
    initial_minutes: Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=4)] | None = None
    cost_per_minute: Price | None = Field(None, description="credits per voice minute (default 0.15)")
    cost_per_call_setup: Price | None = Field(None, description="credits per call placed (default 0.02)")
    cost_per_whatsapp_message: Price | None = Field(None, description="credits per WhatsApp message (default 0.01)")


class AccountPatch(BaseModel):
    """Any subset. Fields a client echoes back that cannot change (ids, balances) are ignored."""

    is_active: bool | None = None
    status: Status | None = None
    suspension_reason: str | None = Field(None, max_length=500)
    account_name: str | None = Field(None, max_length=200)
    contact_name: str | None = Field(None, max_length=200)
    contact_email: str | None = Field(None, max_length=200)
    contact_phone: str | None = Field(None, max_length=50)
    plan_type: Plan | None = None
    country: Literal["CL", "AR"] | None = None
    timezone: str | None = Field(None, max_length=64)
    features: Features | None = None
    settings: dict[str, Any] | None = None
    cost_per_minute: Price | None = None
    cost_per_call_setup: Price | None = None
    cost_per_whatsapp_message: Price | None = None


class StatusChange(BaseModel):
    reason: str | None = Field(None, max_length=500)


class Credit(BaseModel):
    """Exactly one of credits or minutes."""

    credits: Amount | None = None
    minutes: Amount | None = None
    reason: str | None = Field(None, max_length=500)

    @model_validator(mode="after")
    def _one_unit(self) -> Credit:
        if (self.credits is None) == (self.minutes is None):
            raise ValueError("give either credits or minutes")
        return self


class Adjustment(BaseModel):
    credits: SignedAmount | None = None
    minutes: SignedAmount | None = None
    reason: str = Field(..., min_length=1, max_length=500)

    @model_validator(mode="after")
    def _one_unit(self) -> Adjustment:
        if (self.credits is None) == (self.minutes is None):
            raise ValueError("give either credits or minutes")
        if (self.credits or self.minutes) == 0:
            raise ValueError("an adjustment must not be zero")
        return self


def _text(value: Decimal | None) -> str:
    return "" if value is None else format(value.normalize(), "f")


def balance_json(b: accounts_pb2.Balance) -> dict[str, Any]:
    """The original data model's balances (API_COMPAT.md): `credit_balance` is all credit ever
    added and `credit_used` all ever charged, so the dashboard's `credit_balance -
    credit_used` is what is left; `*_available` / `minutes_remaining` also take out what is held."""
    return {
        "account_id": b.account_id,
        "plan_type": b.plan_type,
        "credit_balance": number(b.credit_balance),
        "credit_available": number(b.credit_available),
        "credit_reserved": number(b.credit_reserved),
        "credit_used": number(b.credit_used),
        "minutes_purchased": number(b.minutes_purchased),
        "minutes_available": number(b.minutes_available),
        "minutes_remaining": number(b.minutes_available),
        "minutes_reserved": number(b.minutes_reserved),
        "minutes_used": number(b.minutes_used),
    }


def account_json(a: accounts_pb2.Account) -> dict[str, Any]:
    balance = balance_json(a.balance)
    del balance["account_id"], balance["plan_type"]
    return {
        "_id": a.object_id,
        "account_id": a.account_id,
        "account_name": a.account_name,
        "status": a.status,
        "is_active": a.is_active,
        "suspension_reason": a.suspension_reason,
        "plan_type": a.plan_type,
        "country": a.country,
        "timezone": a.timezone,
        "contact_name": a.contact_name,
        "contact_email": a.contact_email,
        "contact_phone": a.contact_phone,
        "max_concurrent_calls": a.max_concurrent_calls,
        "features": json.loads(a.features_json or "{}"),
        "settings": json.loads(a.settings_json or "{}"),
        **balance,
        "cost_per_minute": number(a.cost_per_minute),
        "cost_per_call_setup": number(a.cost_per_call_setup),
        "cost_per_whatsapp_message": number(a.cost_per_whatsapp_message),
        "created_at": iso(from_timestamp(a.created_at, present=a.HasField("created_at"))),
        "updated_at": iso(from_timestamp(a.updated_at, present=a.HasField("updated_at"))),
    }


def transaction_json(t: accounts_pb2.Transaction) -> dict[str, Any]:
    kind = "topup_minutes" if t.kind == "topup" and t.unit == "minutes" else t.kind
    kind = "topup_credits" if kind == "topup" else kind
    return {
        "transaction_id": t.entry_id,
        "type": kind,
        "kind": t.kind,
        "unit": t.unit,
        "amount": number(t.amount),
        # What the entry charged the account (a capture's cost), in `unit`; nothing else costs.
        "cost": number(t.used_change) if t.kind == "capture" else 0.0,
        "held_change": number(t.held_change),
        "used_change": number(t.used_change),
        "balance_after": number(t.balance_after),
        "held_after": number(t.held_after),
        "requested": number(t.requested) if t.requested else None,
        "cause": t.cause,
        "hold_id": t.hold_id or None,
        "description": t.note or DESCRIPTIONS.get(t.kind, t.kind),
        "created_at": iso(from_timestamp(t.created_at, present=t.HasField("created_at"))),
    }


def fingerprint(body: BaseModel) -> str:
    """The request as the ledger compares it on a reused Idempotency-Key: normalised, so
    `100` and `100.0` are the same body."""
    fields = {k: _text(v) if isinstance(v, Decimal) else v for k, v in body.model_dump().items() if v is not None}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def ledger_json(reply: accounts_pb2.LedgerReply, response: Response, *, key: str = "") -> dict[str, Any]:
    """The reply of a keyed operation: built only from its entry, so a replay is the same."""
    if reply.replayed and key:
        response.headers["Idempotent-Replayed"] = "true"
    return {
        "success": True,
        "transaction_id": reply.entry_id,
        "unit": reply.unit,
        "amount": number(reply.amount),
        "new_balance": number(reply.balance_after),
    }


def stub(request: Request) -> Any:
    return request.app.state.backends.accounts


@router.post("", summary="Create an account (admin)", status_code=200)
async def create_account(request: Request, caller: CallerDep, body: AccountCreate) -> dict[str, Any]:
    account = await stub(request).CreateAccount(
        accounts_pb2.CreateAccountRequest(
            account_id=body.account_id or "",
            account_name=body.account_name or "",
            plan_type=body.plan_type or "",
            country=body.country or "",
            timezone=body.timezone or "",
            contact_name=body.contact_name or "",
            contact_email=body.contact_email or "",
            contact_phone=body.contact_phone or "",
            features_json=json.dumps(body.features.model_dump(exclude_none=True) if body.features else {}),
            settings_json=json.dumps(body.settings or {}),
            initial_credits=_text(body.initial_credits),
            initial_minutes=_text(body.initial_minutes),
            cost_per_minute=_text(body.cost_per_minute),
            cost_per_call_setup=_text(body.cost_per_call_setup),
            cost_per_whatsapp_message=_text(body.cost_per_whatsapp_message),
        ),
    )
    return {
        "success": True,
        "account_id": account.account_id,
        "message": "Account created successfully",
        "account": account_json(account),
    }


@router.get("", summary="Accounts (admins: all; members: their own)")
async def list_accounts(
    request: Request,
    response: Response,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    skip: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    status: Status | None = None,
) -> list[dict[str, Any]]:
    reply = await stub(request).ListAccounts(
        accounts_pb2.ListAccountsRequest(limit=limit, skip=skip, status=status or ""),
    )
    response.headers["X-Total-Count"] = str(reply.total)
    return [account_json(a) for a in reply.accounts]


@router.get("/{account_id}", summary="One account")
async def get_account(request: Request, caller: CallerDep, account_id: AccountId) -> dict[str, Any]:
    account = await stub(request).GetAccount(accounts_pb2.GetAccountRequest(account_id=account_id))
    return account_json(account)


async def _update(request: Request, account_id: str, patch: dict[str, Any]) -> accounts_pb2.Account:
    return await stub(request).UpdateAccount(
        accounts_pb2.UpdateAccountRequest(account_id=account_id, patch_json=json.dumps(patch)),
    )


@router.patch("/{account_id}", summary="Change some fields (state, plan, limits and prices: admin)")
async def update_account(
    request: Request, caller: CallerDep, account_id: AccountId, body: AccountPatch
) -> dict[str, Any]:
    patch = {k: v for k, v in body.model_dump(exclude_unset=True, mode="json").items() if v is not None}
    if body.features is not None:
        patch["features"] = body.features.model_dump(exclude_none=True)
    return account_json(await _update(request, account_id, patch))


@router.put("/{account_id}/suspend", summary="Suspend (admin): no new work is released")
async def suspend_account(
    request: Request, caller: CallerDep, account_id: AccountId, body: StatusChange | None = None
) -> dict[str, Any]:
    reason = (body.reason if body else None) or "suspended by an operator"
    account = await _update(request, account_id, {"status": "suspended", "suspension_reason": reason})
    return {"success": True, "message": "Account suspended", "account": account_json(account)}


@router.put("/{account_id}/activate", summary="Activate (admin)")
async def activate_account(request: Request, caller: CallerDep, account_id: AccountId) -> dict[str, Any]:
    account = await _update(request, account_id, {"status": "active"})
    return {"success": True, "message": "Account activated", "account": account_json(account)}


@router.get("/{account_id}/balance", summary="Credit and minutes: balance, reserved, available, used")
async def get_balance(request: Request, caller: CallerDep, account_id: AccountId) -> dict[str, Any]:
    balance = await stub(request).GetBalance(accounts_pb2.GetBalanceRequest(account_id=account_id))
    return balance_json(balance)


async def _credit_call(
    request: Request,
    rpc: str,
    message: Any,
    account_id: str,
    body: Credit | Adjustment,
    idempotency_key: str | None,
) -> accounts_pb2.LedgerReply:
    """Top-up, refund and adjustment carry the same fields to their RPCs."""
    return await getattr(stub(request), rpc)(
        message(
            account_id=account_id,
            credits=_text(body.credits),
            minutes=_text(body.minutes),
            idempotency_key=idempotency_key or "",
            fingerprint=fingerprint(body),
            reason=body.reason or "",
        ),
    )


@router.post("/{account_id}/topup", summary="Add credits or minutes (admin); honours Idempotency-Key")
async def top_up(
    request: Request,
    response: Response,
    caller: CallerDep,
    account_id: AccountId,
    body: Credit,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    reply = await _credit_call(request, "TopUp", accounts_pb2.TopUpRequest, account_id, body, idempotency_key)
    return {**ledger_json(reply, response, key=idempotency_key or ""), "amount_added": number(reply.amount)}


@router.post("/{account_id}/refund", summary="Give back part of what was charged (admin)")
async def refund(
    request: Request,
    response: Response,
    caller: CallerDep,
    account_id: AccountId,
    body: Credit,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    reply = await _credit_call(request, "Refund", accounts_pb2.RefundRequest, account_id, body, idempotency_key)
    return ledger_json(reply, response, key=idempotency_key or "")


@router.post("/{account_id}/adjust", summary="Correct the balance by a signed amount (admin)")
async def adjust(
    request: Request,
    response: Response,
    caller: CallerDep,
    account_id: AccountId,
    body: Adjustment,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    reply = await _credit_call(request, "Adjust", accounts_pb2.AdjustRequest, account_id, body, idempotency_key)
    return ledger_json(reply, response, key=idempotency_key or "")


@router.get("/{account_id}/transactions", summary="Ledger entries, newest first")
async def list_transactions(
    request: Request,
    response: Response,
    caller: CallerDep,
    account_id: AccountId,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    skip: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> list[dict[str, Any]]:
    reply = await stub(request).ListTransactions(
        accounts_pb2.ListTransactionsRequest(account_id=account_id, limit=limit, skip=skip),
    )
    response.headers["X-Total-Count"] = str(reply.total)
    return [transaction_json(t) for t in reply.transactions]


@router.get("/{account_id}/batches", summary="The account's voice campaigns")
async def list_account_batches(
    request: Request,
    response: Response,
    caller: CallerDep,
    account_id: AccountId,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    skip: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> list[dict[str, Any]]:
    # The account must be the caller's to see (404 otherwise), then its batches of every channel.
    await stub(request).GetAccount(accounts_pb2.GetAccountRequest(account_id=account_id))
    reply = await request.app.state.backends.campaigns.ListBatches(
        campaigns_pb2.ListBatchesRequest(account_id=account_id, limit=limit, skip=skip),
    )
    response.headers["X-Total-Count"] = str(reply.total)
    return [batch_json(b) for b in reply.batches]
