"""The credit ledger: top-ups, holds, captures, releases, refunds and adjustments.

Every change runs in one transaction that first locks the account row (`LedgerRepo.locked`),
so the checks below hold until commit; the database enforces the same invariants again
(CHECKs, the entry trigger, unique causes), so a bug here is refused, not booked.

Captures clamp: a capture charges at most what is left of its hold. The real cost beyond it
is not charged; the entry keeps the requested amount, so the shortfall stays visible."""

from __future__ import annotations

import functools
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import NoReturn

import asyncpg
from prometheus_client import Counter

from services.runtime.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from services.runtime.identity import Caller

from .repo import CapturedAttempt, LedgerRepo, LedgerTx, NewCapture, NewEntry

# Committed changes only, in the account's unit (credits or minutes); replays count nothing.
CREDIT_HELD = Counter("pregonero_credit_held", "Credit reserved by holds for work about to be released.", ["unit"])
CREDIT_CAPTURED = Counter("pregonero_credit_captured", "Credit charged against holds for work done.", ["unit"])

CREDITS = "credits"
MINUTES = "minutes"
ZERO = Decimal(0)
_PLACES = Decimal("0.0001")
_LIMIT = Decimal(10) ** 14  # numeric(18, 4)
MAX_CAPTURE_ITEMS = 5000
MAX_CAUSE_LEN = 200


def unit_of(plan_type: str) -> str:
    return MINUTES if plan_type == "minutes_based" else CREDITS


@functools.lru_cache(maxsize=4096)  # a result batch repeats the same few prices thousands of times
def parse_amount(text: str, *, field: str, allow_zero: bool = False, signed: bool = False) -> Decimal:
    """A decimal string with at most 4 places; positive unless told otherwise."""
    try:
        value = Decimal(text.strip())
    except (InvalidOperation, AttributeError) as exc:
        raise InvalidArgument(f"{field} must be a decimal number") from exc
    if not value.is_finite() or abs(value) >= _LIMIT:
        raise InvalidArgument(f"{field} is out of range")
    if value != value.quantize(_PLACES):
        raise InvalidArgument(f"{field} has more than 4 decimal places")
    if signed:
        if value == 0:
            raise InvalidArgument(f"{field} must not be zero")
    elif value < 0 or (value == 0 and not allow_zero):
        raise InvalidArgument(f"{field} must be {'zero or more' if allow_zero else 'positive'}")
    return value


def one_amount(credits: str, minutes: str, *, signed: bool = False) -> tuple[str, Decimal]:
    """Exactly one of credits / minutes: (unit, amount)."""
    if bool(credits) == bool(minutes):
        raise InvalidArgument("give either credits or minutes")
    unit, text = (CREDITS, credits) if credits else (MINUTES, minutes)
    return unit, parse_amount(text, field=unit, signed=signed)


def _cause(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    if len(value) > MAX_CAUSE_LEN:
        raise InvalidArgument(f"{field} is longer than {MAX_CAUSE_LEN} characters")
    return value


@dataclass(frozen=True, slots=True)
class Balance:
    """The ledger's view: `credit_balance` is what is left (net of use), `credit_used` is net
    of refunds, and minutes keep `purchased - used` as their balance. What clients are
    served (`served_*`) is the original data model's: all ever added, all ever charged."""

    account_id: str
    plan_type: str
    credit_balance: Decimal
    credit_reserved: Decimal
    credit_used: Decimal
    minutes_purchased: Decimal
    minutes_used: Decimal
    minutes_reserved: Decimal
    credit_refunded: Decimal
    minutes_refunded: Decimal

    @classmethod
    def of(cls, row: asyncpg.Record) -> Balance:
        return cls(
            account_id=row["account_id"],
            plan_type=row["plan_type"],
            credit_balance=row["credit_balance"],
            credit_reserved=row["credit_reserved"],
            credit_used=row["credit_used"],
            minutes_purchased=row["minutes_purchased"],
            minutes_used=row["minutes_used"],
            minutes_reserved=row["minutes_reserved"],
            credit_refunded=row["credit_refunded"],
            minutes_refunded=row["minutes_refunded"],
        )

    @property
    def credit_available(self) -> Decimal:
        return self.credit_balance - self.credit_reserved

    @property
    def minutes_available(self) -> Decimal:
        return self.minutes_purchased - self.minutes_used - self.minutes_reserved

    # A refund gives credit back without undoing the charge it compensates: served, it is
    # added (balance) and the charge stays (used), so balance - used - reserved = available.
    @property
    def served_credit_used(self) -> Decimal:
        return self.credit_used + self.credit_refunded

    @property
    def served_credit_balance(self) -> Decimal:
        return self.credit_balance + self.served_credit_used

    @property
    def served_minutes_used(self) -> Decimal:
        return self.minutes_used + self.minutes_refunded

    @property
    def served_minutes_purchased(self) -> Decimal:
        return self.minutes_purchased + self.minutes_refunded

    def available(self, unit: str) -> Decimal:
        return self.credit_available if unit == CREDITS else self.minutes_available

    def used(self, unit: str) -> Decimal:
        return self.credit_used if unit == CREDITS else self.minutes_used

    def level(self, unit: str) -> tuple[Decimal, Decimal]:
        """(balance, reserved) in one unit: what an entry records as balance_after, held_after."""
        if unit == CREDITS:
            return self.credit_balance, self.credit_reserved
        return self.minutes_purchased - self.minutes_used, self.minutes_reserved

    def book(self, entry: NewEntry) -> tuple[NewEntry, Balance]:
        """The entry with its after-values, and the balance once it is booked."""
        refunded = entry.amount if entry.kind == "refund" else ZERO
        after = self.apply(
            entry.unit, amount=entry.amount, held=entry.held_change, used=entry.used_change, refunded=refunded
        )
        balance_after, held_after = after.level(entry.unit)
        return replace(entry, balance_after=balance_after, held_after=held_after), after

    def apply(
        self,
        unit: str,
        *,
        amount: Decimal = ZERO,
        held: Decimal = ZERO,
        used: Decimal = ZERO,
        refunded: Decimal = ZERO,
    ) -> Balance:
        """The balance after one entry: the same arithmetic as the ledger_apply trigger."""
        if unit == CREDITS:
            return replace(
                self,
                credit_balance=self.credit_balance + amount,
                credit_reserved=self.credit_reserved + held,
                credit_used=self.credit_used + used,
                credit_refunded=self.credit_refunded + refunded,
            )
        return replace(
            self,
            minutes_purchased=self.minutes_purchased + amount + used,
            minutes_reserved=self.minutes_reserved + held,
            minutes_used=self.minutes_used + used,
            minutes_refunded=self.minutes_refunded + refunded,
        )


@dataclass(frozen=True, slots=True)
class CaptureItem:
    attempt_id: str
    hold_id: str
    amount: str


@dataclass(frozen=True, slots=True)
class CaptureOutcome:
    attempt_id: str
    hold_id: str
    requested: Decimal
    charged: Decimal
    status: str  # captured | replayed | hold_not_found
    entry_id: int | None = None


@dataclass(frozen=True, slots=True)
class LedgerResult:
    balance: Balance
    unit: str
    amount: Decimal  # what the operation moved (added, held, released, charged)
    entry_id: int | None = None
    replayed: bool = False
    balance_after: Decimal | None = None
    captures: list[CaptureOutcome] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    account_id: str
    kind: str
    unit: str
    amount: Decimal
    held_change: Decimal
    used_change: Decimal
    balance_after: Decimal
    held_after: Decimal
    cause: str
    hold_id: str
    requested: Decimal | None
    note: str
    created_at: datetime


def _entry(row: asyncpg.Record) -> Entry:
    return Entry(
        id=row["id"],
        account_id=row["account_id"],
        kind=row["kind"],
        unit=row["unit"],
        amount=row["amount"],
        held_change=row["held_change"],
        used_change=row["used_change"],
        balance_after=row["balance_after"],
        held_after=row["held_after"],
        cause=row["cause"],
        hold_id=row["hold_id"] or "",
        requested=row["requested"],
        note=row["note"],
        created_at=row["created_at"],
    )


def _levels(balance: Balance, unit: str) -> dict[str, Decimal]:
    balance_after, held_after = balance.level(unit)
    return {"balance_after": balance_after, "held_after": held_after}


def _taken(hold_id: str) -> NoReturn:
    raise AlreadyExists(f"hold id {hold_id} is taken by another account")


class Ledger:
    def __init__(self, repo: LedgerRepo) -> None:
        self.repo = repo

    async def balance(self, caller: Caller, account_id: str) -> Balance:
        scoped = caller.account_scope(account_id)
        row = await self.repo.account(account_id=scoped)
        if row is None:
            raise NotFound(f"account {account_id} not found")
        return Balance.of(row)

    async def credit(
        self,
        caller: Caller,
        kind: str,
        *,
        account_id: str,
        credits: str = "",
        minutes: str = "",
        key: str = "",
        fingerprint: str = "",
        reason: str = "",
    ) -> LedgerResult:
        """A top-up, a refund (gives back part of what was charged: `used` goes down by as
        much) or an adjustment (signed), each retried safely under an idempotency key."""
        unit, amount = one_amount(credits, minutes, signed=kind == "adjustment")
        used = -amount if kind == "refund" else ZERO
        entry = NewEntry(kind=kind, unit=unit, amount=amount, used_change=used, cause="", note=reason)
        return await self._keyed(caller, account_id, key=key, fingerprint=fingerprint, entry=entry)

    top_up = functools.partialmethod(credit, kind="topup")
    refund = functools.partialmethod(credit, kind="refund")
    adjust = functools.partialmethod(credit, kind="adjustment")

    async def _keyed(
        self, caller: Caller, account_id: str, *, key: str, fingerprint: str, entry: NewEntry
    ) -> LedgerResult:
        """Admin operations that a client may retry with an idempotency key."""
        scoped = caller.account_scope(account_id)
        if not caller.is_admin:
            raise PermissionDenied(f"only an admin makes a {entry.kind}")
        cause = _cause(key, "idempotency key") if key else f"auto-{uuid.uuid4().hex}"
        entry = replace(entry, cause=cause, fingerprint=fingerprint)
        async with self._locked(scoped) as tx:
            before = Balance.of(tx.account)
            prior = await tx.find_entry(kind=entry.kind, cause=cause) if key else None
            if prior is not None:
                same = prior["unit"] == entry.unit and prior["amount"] == entry.amount
                if not same or (fingerprint and prior["fingerprint"] and prior["fingerprint"] != fingerprint):
                    raise AlreadyExists(f"idempotency key {key!r} was used with another request")
                return LedgerResult(
                    balance=before,
                    unit=entry.unit,
                    amount=prior["amount"],
                    entry_id=prior["id"],
                    replayed=True,
                    balance_after=prior["balance_after"],
                )
            if entry.kind == "refund" and entry.amount > before.used(entry.unit):
                raise Conflict(f"a refund of {entry.amount} exceeds the {before.used(entry.unit)} {entry.unit} used")
            if entry.kind == "adjustment" and entry.amount < 0 and -entry.amount > before.available(entry.unit):
                raise Conflict(
                    f"an adjustment of {entry.amount} exceeds the {before.available(entry.unit)} {entry.unit} available"
                )
            entry, after = before.book(entry)
            row = await tx.insert_entry(entry=entry)
            return LedgerResult(
                balance=after,
                unit=entry.unit,
                amount=entry.amount,
                entry_id=row["id"],
                balance_after=row["balance_after"],
            )

    async def hold(
        self, caller: Caller, *, account_id: str, hold_id: str, amount: str, partial: bool = False
    ) -> LedgerResult:
        """Reserve credit for work about to be released; a replay returns the same hold."""
        result = await self._hold(caller, account_id=account_id, hold_id=hold_id, amount=amount, partial=partial)
        if not result.replayed:  # committed: counted once
            CREDIT_HELD.labels(result.unit).inc(float(result.amount))
        return result

    async def _hold(self, caller: Caller, *, account_id: str, hold_id: str, amount: str, partial: bool) -> LedgerResult:
        scoped = caller.account_scope(account_id)
        hold_id = _cause(hold_id, "hold_id")
        want = parse_amount(amount, field="amount")
        async with self._locked(scoped) as tx:
            before = Balance.of(tx.account)
            # The usual case costs one insert; a replay is found when something stands in the
            # way (the id is taken, the account is suspended or short of credit).
            status = tx.account["status"]
            if status != "active":
                if replay := await self._replayed_hold(tx, hold_id, before):
                    return replay
                raise Conflict(f"account {scoped} is {status}: it cannot hold credit")
            if before.plan_type == "unlimited":
                if await tx.insert_free_hold(hold_id=hold_id):
                    return LedgerResult(balance=before, unit=CREDITS, amount=ZERO)
                return await self._replayed_hold(tx, hold_id, before) or _taken(hold_id)
            unit = unit_of(before.plan_type)
            available = before.available(unit)
            held = want
            if available < want:
                if not partial or available <= 0:
                    if replay := await self._replayed_hold(tx, hold_id, before):
                        return replay
                    raise ResourceExhausted(f"not enough {unit}: {available} available, {want} needed")
                held = available
            after = before.apply(unit, held=held)
            balance_after, held_after = after.level(unit)
            row = await tx.insert_hold(
                hold_id=hold_id, unit=unit, amount=held, balance_after=balance_after, held_after=held_after
            )
            if row is None:
                return await self._replayed_hold(tx, hold_id, before) or _taken(hold_id)
            return LedgerResult(balance=after, unit=unit, amount=held, entry_id=row["id"])

    async def _replayed_hold(self, tx: LedgerTx, hold_id: str, balance: Balance) -> LedgerResult | None:
        """The answer to a replayed hold; None when there is no such hold."""
        existing = await tx.get_hold(hold_id=hold_id)
        if existing is None:
            return None
        if existing["account_id"] != tx.account_id:
            _taken(hold_id)
        prior = await tx.find_entry(kind="hold", cause=hold_id)
        return LedgerResult(
            balance=balance,
            unit=existing["unit"],
            amount=existing["amount_held"],
            entry_id=prior["id"] if prior else None,
            replayed=True,
        )

    async def capture(self, caller: Caller, *, account_id: str, items: Sequence[CaptureItem]) -> LedgerResult:
        """Charge attempts against their holds, in one transaction; idempotent per attempt id."""
        result = await self._capture(caller, account_id=account_id, items=items)
        if not result.replayed:  # committed: counted once
            CREDIT_CAPTURED.labels(result.unit).inc(float(result.amount))
        return result

    async def _capture(self, caller: Caller, *, account_id: str, items: Sequence[CaptureItem]) -> LedgerResult:
        scoped = caller.account_scope(account_id)
        if not items:
            raise InvalidArgument("a capture needs at least one item")
        if len(items) > MAX_CAPTURE_ITEMS:
            raise InvalidArgument(f"at most {MAX_CAPTURE_ITEMS} items per capture")
        parsed = [
            (
                _cause(i.attempt_id, "attempt_id"),
                _cause(i.hold_id, "hold_id"),
                parse_amount(i.amount, field="amount", allow_zero=True),
            )
            for i in items
        ]
        async with self._locked(scoped) as tx:
            balance = Balance.of(tx.account)
            holds, done = await tx.capture_context(
                hold_ids=list({p[1] for p in parsed}), attempt_ids=list({p[0] for p in parsed})
            )
            charged_by_hold: dict[str, Decimal] = defaultdict(Decimal)
            requested_by_hold: dict[str, Decimal] = defaultdict(Decimal)
            first_attempt: dict[str, str] = {}  # hold id → the cause of its entry
            outcomes: list[CaptureOutcome] = []
            first: dict[str, CaptureOutcome] = {}
            attempts: list[CapturedAttempt] = []
            for attempt_id, hold_id, requested in parsed:
                if attempt_id in first:  # the same attempt twice in one batch
                    outcomes.append(replace(first[attempt_id], status="replayed"))
                    continue
                prior = done.get(attempt_id)
                hold = holds.get(hold_id)
                if prior is not None:
                    outcome = CaptureOutcome(
                        attempt_id,
                        prior["entry_hold"],
                        prior["requested"],
                        prior["used"],
                        "replayed",
                        prior["entry_id"],
                    )
                elif hold is None:
                    outcomes.append(CaptureOutcome(attempt_id, hold_id, requested, ZERO, "hold_not_found"))
                    continue
                else:
                    charged = requested
                    if hold["reserving"]:
                        left = (
                            hold["amount_held"]
                            - hold["amount_captured"]
                            - hold["amount_released"]
                            - charged_by_hold[hold_id]
                        )
                        charged = min(requested, left)
                    charged_by_hold[hold_id] += charged
                    requested_by_hold[hold_id] += requested
                    first_attempt.setdefault(hold_id, attempt_id)
                    attempts.append(CapturedAttempt(attempt_id, hold_id, requested, charged))
                    outcome = CaptureOutcome(attempt_id, hold_id, requested, charged, "captured")
                first[attempt_id] = outcome
                outcomes.append(outcome)
            # One entry per hold for all its attempts of this batch.
            new: list[NewCapture] = []
            for hold_id, cause in first_attempt.items():
                hold = holds[hold_id]
                charged = charged_by_hold[hold_id]
                change = -charged if hold["reserving"] else ZERO
                balance = balance.apply(hold["unit"], amount=change, held=change, used=charged)
                new.append(
                    NewCapture(
                        cause,
                        hold["unit"],
                        change,
                        charged,
                        requested_by_hold[hold_id],
                        hold_id,
                        *balance.level(hold["unit"]),
                    )
                )
            if new:
                entries = await tx.insert_captures(
                    captures=new,
                    charged={h: (c, requested_by_hold[h]) for h, c in charged_by_hold.items()},
                    attempts=attempts,
                )
                outcomes = [
                    CaptureOutcome(o.attempt_id, o.hold_id, o.requested, o.charged, o.status, entries[o.hold_id])
                    if o.entry_id is None and o.status == "captured"
                    else o
                    for o in outcomes
                ]
        return LedgerResult(
            balance=balance,
            unit=unit_of(balance.plan_type),
            amount=sum((c.used for c in new), ZERO),
            replayed=not new,
            captures=outcomes,
        )

    async def release(self, caller: Caller, *, account_id: str, hold_id: str) -> LedgerResult:
        """Free what is left of a hold and close it; a replay changes nothing."""
        scoped = caller.account_scope(account_id)
        hold_id = _cause(hold_id, "hold_id")
        async with self._locked(scoped) as tx:
            before = Balance.of(tx.account)
            hold = await tx.get_hold(hold_id=hold_id)
            if hold is None or hold["account_id"] != scoped:
                raise NotFound(f"hold {hold_id} not found")
            unit = hold["unit"]
            if hold["status"] == "released":
                prior = await tx.find_entry(kind="release", cause=hold_id)
                return LedgerResult(
                    balance=before,
                    unit=unit,
                    amount=hold["amount_released"],
                    entry_id=prior["id"] if prior else None,
                    replayed=True,
                )
            left = ZERO
            if hold["reserving"]:
                left = hold["amount_held"] - hold["amount_captured"] - hold["amount_released"]
            after = before.apply(unit, held=-left)
            entry_id = await tx.release_hold(hold_id=hold_id, released=left, **_levels(after, unit))
            return LedgerResult(balance=after, unit=unit, amount=left, entry_id=entry_id)

    async def release_holds(
        self, caller: Caller, *, account_id: str, prefix: str, expected: str, force: bool = False
    ) -> LedgerResult:
        """Close every open hold whose id starts with `prefix` (a batch's holds), once the
        captures asked against all of them add up to `expected`: released any earlier, a
        capture still on its way would find its hold closed and charge nothing."""
        scoped = caller.account_scope(account_id)
        prefix = _cause(prefix, "hold_prefix")
        want = parse_amount(expected or "0", field="expected", allow_zero=True)
        async with self._locked(scoped) as tx:
            balance = Balance.of(tx.account)
            holds = await tx.holds_by_prefix(prefix=prefix)
            asked = sum((h["amount_requested"] for h in holds), ZERO)
            if asked < want and not force:
                raise Conflict(f"captures pending: {asked} of {want} booked against {prefix}*")
            freed = ZERO
            for hold in holds:
                if hold["status"] == "released":
                    continue
                left = ZERO
                if hold["reserving"]:
                    left = hold["amount_held"] - hold["amount_captured"] - hold["amount_released"]
                balance = balance.apply(hold["unit"], held=-left)
                await tx.release_hold(hold_id=hold["hold_id"], released=left, **_levels(balance, hold["unit"]))
                freed += left
        return LedgerResult(balance=balance, unit=unit_of(balance.plan_type), amount=freed, replayed=not holds)

    async def transactions(self, caller: Caller, *, account_id: str, limit: int, skip: int) -> tuple[list[Entry], int]:
        scoped = caller.account_scope(account_id)
        if not 1 <= limit <= 500:
            raise InvalidArgument("limit must be between 1 and 500")
        if skip < 0:
            raise InvalidArgument("skip must not be negative")
        if await self.repo.account(account_id=scoped) is None:
            raise NotFound(f"account {account_id} not found")
        rows, total = await self.repo.entries(account_id=scoped, limit=limit, skip=skip)
        return [_entry(r) for r in rows], total

    @asynccontextmanager
    async def _locked(self, account_id: str) -> AsyncIterator[LedgerTx]:
        """The account's ledger under its row lock. A refusal by one of the database's rules
        (which the checks above should have made impossible) is a conflict, not a crash."""
        try:
            async with self.repo.locked(account_id=account_id) as tx:
                if tx is None:
                    raise NotFound(f"account {account_id} not found")
                yield tx
        except asyncpg.CheckViolationError as exc:
            raise Conflict(f"refused by the ledger rule {exc.constraint_name or exc.message}") from exc
