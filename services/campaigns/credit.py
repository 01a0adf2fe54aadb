"""The feeder's side of the credit ledger: prices and holds, asked of accounts over gRPC.

Credit is reserved in blocks: one hold covers up to HOLD_BLOCK messages (or the whole rest
of the batch when that is less), so a million-recipient batch costs a few hundred ledger
calls, not one per window. What a block does not use is released when the batch settles."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any

import grpc
from pregonero.accounts.v1 import accounts_pb2, accounts_pb2_grpc

from services.runtime.identity import MEMBER, Caller
from services.runtime.rpc import outgoing_metadata

HOLD_BLOCK = 2000
RPC_TIMEOUT_S = 10.0
_PLACES = Decimal("0.0001")


class NoCredit(Exception):
    """Nothing can be reserved: the batch's remaining jobs wait, with this reason."""


class ChargesPending(Exception):
    """Accounts has not booked every charge of the batch yet: settle later."""


@dataclass(frozen=True, slots=True)
class AccountInfo:
    """What campaigns needs to know of an account to plan its calls."""

    account_id: str
    plan_type: str
    status: str
    timezone: str
    country: str
    max_concurrent_calls: int
    available: Decimal  # in `unit`
    unit: str  # credits | minutes
    cost_per_minute: Decimal
    cost_per_call_setup: Decimal
    # features.voice_agent_id / voice_caller_id: the account's own agent and calling number
    # ("" = the dispatcher's defaults).
    voice_agent_id: str = ""
    voice_caller_id: str = ""

    def per_call_estimate(self, max_call_duration_s: int) -> Decimal:
        """What one call may cost at most, in the account's unit: the call setup plus its
        longest allowed duration (the reference figures: 0.02 + 3 min × 0.15 = 0.47)."""
        minutes = Decimal(max_call_duration_s) / 60
        if self.unit == "minutes":
            return minutes.quantize(_PLACES, ROUND_CEILING)
        return (self.cost_per_call_setup + self.cost_per_minute * minutes).quantize(_PLACES, ROUND_CEILING)


@dataclass(frozen=True, slots=True)
class Price:
    each: Decimal  # one message or call, in the account's unit: credits, or minutes on minutes_based plans
    reserving: bool  # false: unlimited plan or free messages, nothing to reserve

    def affordable(self, amount: Decimal) -> int:
        """How many messages `amount` pays for."""
        return int(amount // self.each) if self.each > 0 else 0


def message_price(account: accounts_pb2.Account) -> Price:
    """A WhatsApp message's price in the unit the account's ledger counts in."""
    credits = Decimal(account.cost_per_whatsapp_message or "0")
    if account.plan_type == "unlimited":
        return Price(credits, reserving=False)
    if account.plan_type == "minutes_based":
        # Minutes plans pay messages in minutes at the account's own rate.
        per_minute = Decimal(account.cost_per_minute or "0")
        minutes = (credits / per_minute).quantize(_PLACES, ROUND_CEILING) if per_minute > 0 else Decimal(0)
        return Price(minutes, reserving=minutes > 0)
    return Price(credits, reserving=credits > 0)


class Credit:
    def __init__(self, stub: accounts_pb2_grpc.AccountsServiceStub) -> None:
        self.stub = stub

    @staticmethod
    def _as(account_id: str) -> tuple[tuple[str, str], ...]:
        # The feeder acts for the batch's account and nothing else: a member-scoped caller.
        return outgoing_metadata(Caller(role=MEMBER, account_id=account_id, user_id="campaigns-feeder"))

    async def account(self, account_id: str) -> AccountInfo:
        """The account as campaigns plans with it; NOT_FOUND when there is none."""
        account = await self.stub.GetAccount(
            accounts_pb2.GetAccountRequest(account_id=account_id), metadata=self._as(account_id), timeout=RPC_TIMEOUT_S
        )
        minutes = account.plan_type == "minutes_based"
        balance = account.balance
        features = json.loads(account.features_json or "{}")
        return AccountInfo(
            account_id=account.account_id,
            plan_type=account.plan_type,
            status=account.status,
            timezone=account.timezone or "America/Santiago",
            country=account.country or "CL",
            max_concurrent_calls=account.max_concurrent_calls,
            available=Decimal((balance.minutes_available if minutes else balance.credit_available) or "0"),
            unit="minutes" if minutes else "credits",
            cost_per_minute=Decimal(account.cost_per_minute or "0"),
            cost_per_call_setup=Decimal(account.cost_per_call_setup or "0"),
            voice_agent_id=str(features.get("voice_agent_id") or ""),
            voice_caller_id=str(features.get("voice_caller_id") or ""),
        )

    async def price(self, account_id: str) -> Price:
        try:
            account = await self.stub.GetAccount(
                accounts_pb2.GetAccountRequest(account_id=account_id),
                metadata=self._as(account_id),
                timeout=RPC_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NoCredit(f"account {account_id} does not exist") from exc
            raise
        if account.status != "active":
            why = f": {account.suspension_reason}" if account.suspension_reason else ""
            raise NoCredit(f"account {account_id} is {account.status}{why}")
        return message_price(account)

    async def hold(self, account_id: str, hold_id: str, amount: Decimal) -> Decimal:
        """Reserve up to `amount`; what was reserved (a replay returns the first hold)."""
        try:
            reply = await self.stub.Hold(
                accounts_pb2.HoldRequest(account_id=account_id, hold_id=hold_id, amount=str(amount), partial=True),
                metadata=self._as(account_id),
                timeout=RPC_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise NoCredit("insufficient credit: a top-up resumes the batch") from exc
            if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                raise NoCredit(exc.details() or "the account cannot reserve credit") from exc
            raise
        return Decimal(reply.amount or "0")

    async def release_batch(self, account_id: str, prefix: str, *, expected: Decimal, force: bool) -> Decimal:
        """Close the batch's holds (ids starting with `prefix`); what they had left."""
        try:
            reply = await self.stub.ReleaseHolds(
                accounts_pb2.ReleaseHoldsRequest(
                    account_id=account_id, hold_prefix=prefix, expected=str(expected), force=force
                ),
                metadata=self._as(account_id),
                timeout=RPC_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise ChargesPending(exc.details()) from exc
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return Decimal(0)  # the account is gone, and its holds with it
            raise
        return Decimal(reply.amount or "0")


@dataclass(frozen=True, slots=True)
class Cover:
    """What credit covers in one release: `count` jobs, charged against `hold_id` at
    `price` each, leaving `left` on the hold; `short` says why the rest must wait."""

    count: int
    hold_id: str
    price: Decimal
    left: Decimal
    short: str = ""


async def reserve(
    credit: Credit,
    repo: Any,
    conn: Any,
    batch: Any,
    *,
    want: int,
    remaining: int,
    quote: Callable[[], Awaitable[Price]],
    block: int = HOLD_BLOCK,
) -> Cover:
    """How many of `want` jobs the batch's credit pays for, taking a new hold (recorded in
    the caller's transaction through `repo.set_hold`) when the current one falls short.
    `quote` prices one job (a message, a call at its longest) when a new hold is needed."""
    seq = batch["hold_seq"]
    current = seq > batch["holds_settled_upto"]
    price = batch["unit_price"]
    hold_id = f"{batch['batch_id']}:{seq}"
    if current and batch["hold_unlimited"]:
        return Cover(count=want, hold_id=hold_id if price > 0 else "", price=price, left=Decimal(0))
    if current and price > 0 and batch["hold_left"] >= price * want:
        return Cover(count=want, hold_id=hold_id, price=price, left=batch["hold_left"] - price * want)
    # A new hold; what the current one has left is released when the batch settles.
    try:
        priced = await quote()
        seq += 1
        hold_id = f"{batch['batch_id']}:{seq}"
        if priced.each == 0:
            held = Decimal(0)  # free: no hold at all, nothing to capture
            hold_id = ""
        else:
            held = await credit.hold(batch["account_id"], hold_id, priced.each * max(want, min(block, remaining)))
    except NoCredit as exc:
        return Cover(count=0, hold_id="", price=price, left=batch["hold_left"], short=str(exc))
    await repo.set_hold(
        conn, batch_id=batch["batch_id"], seq=seq, left=held, unlimited=not priced.reserving, price=priced.each
    )
    if not priced.reserving:
        return Cover(count=want, hold_id=hold_id, price=priced.each, left=Decimal(0))
    count = min(want, priced.affordable(held))
    short = "" if count == want else "insufficient credit: a top-up resumes the batch"
    return Cover(count=count, hold_id=hold_id, price=priced.each, left=held - count * priced.each, short=short)
