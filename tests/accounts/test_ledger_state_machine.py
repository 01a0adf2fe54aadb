"""A hypothesis state machine drives the ledger (domain over the real PostgreSQL) through
random top-ups, holds, captures (and their replays), releases, refunds, adjustments and
suspensions, and after every step checks the tables against the rules and against a model."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from services.accounts.domain import Accounts
from services.accounts.ledger import CREDITS, MINUTES, Balance, CaptureItem, Ledger, LedgerResult, unit_of
from services.accounts.main import MIGRATIONS
from services.accounts.repo import AccountsRepo, LedgerRepo, Q
from services.runtime.db import check_queries, create_pool, migrate
from services.runtime.devstack import Stack
from services.runtime.errors import AlreadyExists, Conflict, NotFound, ResourceExhausted
from services.runtime.identity import ADMIN, Caller

from .ledger_invariants import violations

T = TypeVar("T")
ADMIN_CALLER = Caller(role=ADMIN, account_id="default", user_id="operator")
ZERO = Decimal(0)

amounts = st.decimals(min_value=Decimal("0.0001"), max_value=Decimal(60), places=4)
costs = st.decimals(min_value=ZERO, max_value=Decimal(25), places=4)


@dataclass
class Env:
    loop: asyncio.AbstractEventLoop
    pool: asyncpg.Pool
    ledger: Ledger
    accounts: Accounts

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="module")
def env(infra: Stack) -> Iterator[Env]:
    """A migrated database of its own, driven from a loop of its own (hypothesis is sync)."""
    loop = asyncio.new_event_loop()
    name = f"t_ledger_sm_{uuid.uuid4().hex[:8]}"
    url = f"{infra.database_url.rpartition('/')[0]}/{name}"

    async def up() -> asyncpg.Pool:
        admin = await asyncpg.connect(infra.database_url)
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.close()
        conn = await asyncpg.connect(url)
        await migrate(conn, schema="accounts", directory=MIGRATIONS)
        await conn.close()
        pool = await create_pool(url, schema="accounts", max_size=2)
        await check_queries(pool, Q)
        return pool

    async def down(pool: asyncpg.Pool) -> None:
        await pool.close()
        admin = await asyncpg.connect(infra.database_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

    pool = loop.run_until_complete(up())
    try:
        yield Env(loop, pool, Ledger(LedgerRepo(pool)), Accounts(AccountsRepo(pool)))
    finally:
        loop.run_until_complete(down(pool))
        loop.close()


@dataclass
class HoldModel:
    unit: str
    reserving: bool
    held: Decimal
    captured: Decimal = ZERO
    released: Decimal = ZERO
    open: bool = True

    @property
    def left(self) -> Decimal:
        return self.held - self.captured - self.released if self.reserving else ZERO


@dataclass
class Model:
    """What the ledger should hold, computed the plain way."""

    plan: str
    balance: dict[str, Decimal] = field(default_factory=lambda: {CREDITS: ZERO, MINUTES: ZERO})
    reserved: dict[str, Decimal] = field(default_factory=lambda: {CREDITS: ZERO, MINUTES: ZERO})
    used: dict[str, Decimal] = field(default_factory=lambda: {CREDITS: ZERO, MINUTES: ZERO})
    holds: dict[str, HoldModel] = field(default_factory=dict)
    captures: dict[str, tuple[str, Decimal]] = field(default_factory=dict)  # attempt → (hold, charged)
    keys: dict[str, tuple[str, str, Decimal]] = field(default_factory=dict)  # key → (kind, unit, amount)
    suspended: bool = False

    def available(self, unit: str) -> Decimal:
        return self.balance[unit] - self.reserved[unit]


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self, env: Env) -> None:
        super().__init__()
        self.env = env
        self.account_id = f"sm-{uuid.uuid4().hex[:10]}"
        self.model = Model(plan="credit_based")
        self.seq = 0
        self.replied: Balance | None = None

    def _id(self, prefix: str) -> str:
        self.seq += 1
        return f"{self.account_id}:{prefix}-{self.seq}"  # hold ids are unique across accounts

    @initialize(plan=st.sampled_from(["credit_based", "credit_based", "minutes_based", "unlimited"]), start=costs)
    def open_account(self, plan: str, start: Decimal) -> None:
        self.model.plan = plan
        unit = unit_of(plan)
        self.env.run(
            self.env.accounts.create(
                account_id=self.account_id,
                account_name="state machine",
                plan_type=plan,
                **{f"initial_{unit}": str(start)},  # type: ignore[arg-type]
            )
        )
        self.model.balance[unit] += start

    @property
    def unit(self) -> str:
        return unit_of(self.model.plan)

    # -- top-ups, refunds, adjustments (admin, keyed) ------------------------------------

    def _keyed(self, kind: str, unit: str, amount: Decimal, key: str) -> Any:
        op = {"topup": self.env.ledger.top_up, "refund": self.env.ledger.refund, "adjustment": self.env.ledger.adjust}
        return self._run(op[kind](ADMIN_CALLER, account_id=self.account_id, key=key, **{unit: str(amount)}))

    def _run(self, call: Coroutine[Any, Any, LedgerResult]) -> LedgerResult:
        """Run a ledger call; its reply's balance is checked against the tables after the step."""
        result = self.env.run(call)
        self.replied = result.balance
        return result

    @rule(amount=amounts, minutes=st.booleans())
    def top_up(self, amount: Decimal, minutes: bool) -> None:
        unit = MINUTES if minutes else CREDITS
        key = self._id("topup")
        result = self._keyed("topup", unit, amount, key)
        self.model.balance[unit] += amount
        self.model.keys[key] = ("topup", unit, amount)
        assert not result.replayed and result.balance_after == self.model.balance[unit]

    @precondition(lambda self: self.model.keys)
    @rule(data=st.data(), same=st.booleans())
    def replay_keyed(self, data: st.DataObject, same: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.model.keys)))
        kind, unit, amount = self.model.keys[key]
        if same:
            assert self._keyed(kind, unit, amount, key).replayed
        else:
            with pytest.raises(AlreadyExists):
                self._keyed(kind, unit, amount + Decimal("0.5") if amount > 0 else amount - 1, key)

    @rule(amount=amounts)
    def refund(self, amount: Decimal) -> None:
        unit, key = self.unit, self._id("refund")
        if amount > self.model.used[unit]:
            with pytest.raises(Conflict):
                self._keyed("refund", unit, amount, key)
            return
        self._keyed("refund", unit, amount, key)
        self.model.balance[unit] += amount
        self.model.used[unit] -= amount
        self.model.keys[key] = ("refund", unit, amount)

    @rule(amount=amounts, negative=st.booleans())
    def adjust(self, amount: Decimal, negative: bool) -> None:
        unit, key = self.unit, self._id("adjust")
        signed = -amount if negative else amount
        if negative and amount > self.model.available(unit):
            with pytest.raises(Conflict):
                self._keyed("adjustment", unit, signed, key)
            return
        self._keyed("adjustment", unit, signed, key)
        self.model.balance[unit] += signed
        self.model.keys[key] = ("adjustment", unit, signed)

    # -- holds, captures, releases -------------------------------------------------------

    @rule(amount=amounts, partial=st.booleans())
    def hold(self, amount: Decimal, partial: bool) -> None:
        hold_id, unit, m = self._id("batch:window"), self.unit, self.model
        call = self.env.ledger.hold(
            ADMIN_CALLER, account_id=self.account_id, hold_id=hold_id, amount=str(amount), partial=partial
        )
        if m.suspended:
            with pytest.raises(Conflict):
                self._run(call)
            return
        if m.plan == "unlimited":
            result = self._run(call)
            assert result.amount == 0
            m.holds[hold_id] = HoldModel(CREDITS, reserving=False, held=ZERO)
            return
        available = m.available(unit)
        if available < amount and (not partial or available <= 0):
            with pytest.raises(ResourceExhausted):
                self._run(call)
            return
        result = self._run(call)
        held = min(amount, available)
        assert result.amount == held and not result.replayed
        m.holds[hold_id] = HoldModel(unit, reserving=True, held=held)
        m.reserved[unit] += held

    @precondition(lambda self: self.model.holds)
    @rule(data=st.data())
    def replay_hold(self, data: st.DataObject) -> None:
        hold_id = data.draw(st.sampled_from(sorted(self.model.holds)))
        result = self._run(self.env.ledger.hold(ADMIN_CALLER, account_id=self.account_id, hold_id=hold_id, amount="1"))
        assert result.replayed and result.amount == self.model.holds[hold_id].held

    @precondition(lambda self: self.model.holds)
    @rule(data=st.data())
    def capture(self, data: st.DataObject) -> None:
        m = self.model
        n = data.draw(st.integers(1, 4), label="items")
        items: list[CaptureItem] = []
        expected: list[tuple[str, Decimal]] = []
        in_batch: dict[str, Decimal] = {}
        for _ in range(n):
            replay = m.captures and data.draw(st.booleans(), label="replay")
            if replay:
                attempt = data.draw(st.sampled_from(sorted(m.captures)), label="attempt")
                hold_id, charged = m.captures[attempt]
                items.append(CaptureItem(attempt, hold_id, str(data.draw(costs))))
                expected.append(("replayed", charged))
                continue
            if data.draw(st.integers(0, 9), label="unknown hold") == 0:
                items.append(CaptureItem(self._id("attempt"), "no-such-hold", "1"))
                expected.append(("hold_not_found", ZERO))
                continue
            hold_id = data.draw(st.sampled_from(sorted(m.holds)), label="hold")
            cost = data.draw(costs, label="cost")
            attempt = self._id("attempt")
            hold = m.holds[hold_id]
            charged = min(cost, hold.left) if hold.reserving else cost
            hold.captured += charged
            if hold.reserving:
                m.balance[hold.unit] -= charged
                m.reserved[hold.unit] -= charged
            m.used[hold.unit] += charged
            in_batch[attempt] = charged
            m.captures[attempt] = (hold_id, charged)
            items.append(CaptureItem(attempt, hold_id, str(cost)))
            expected.append(("captured", charged))
        result = self._run(self.env.ledger.capture(ADMIN_CALLER, account_id=self.account_id, items=items))
        assert [(o.status, o.charged) for o in result.captures] == expected
        assert result.replayed == (not in_batch)

    @precondition(lambda self: self.model.holds)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        hold_id = data.draw(st.sampled_from(sorted(self.model.holds)))
        hold = self.model.holds[hold_id]
        result = self._run(self.env.ledger.release(ADMIN_CALLER, account_id=self.account_id, hold_id=hold_id))
        if not hold.open:
            assert result.replayed and result.amount == hold.released
            return
        left = hold.left
        assert result.amount == left and not result.replayed
        self.model.reserved[hold.unit] -= left
        hold.released += left
        hold.open = False

    @rule()
    def release_unknown(self) -> None:
        with pytest.raises(NotFound):
            self.env.run(self.env.ledger.release(ADMIN_CALLER, account_id=self.account_id, hold_id="never-held"))

    @rule()
    def toggle_suspended(self) -> None:
        status = "active" if self.model.suspended else "suspended"
        self.env.run(self.env.accounts.update(ADMIN_CALLER, self.account_id, f'{{"status": "{status}"}}'))
        self.model.suspended = not self.model.suspended

    # -- after every step ----------------------------------------------------------------

    @invariant()
    def ledger_is_sound(self) -> None:
        broken = self.env.run(violations(self.env.pool, self.account_id))
        assert not broken, broken
        b = self.env.run(self.env.ledger.balance(ADMIN_CALLER, self.account_id))
        if self.replied is not None:  # what the last call answered is what the tables hold
            assert self.replied == b, (self.replied, b)
            self.replied = None
        m = self.model
        assert b.credit_balance >= 0 and b.minutes_purchased - b.minutes_used >= 0
        assert b.credit_available == b.credit_balance - b.credit_reserved >= 0
        assert b.minutes_available >= 0
        # Served as added, charged, held: what is left is the same amount either way.
        assert b.served_credit_balance - b.served_credit_used - b.credit_reserved == b.credit_available
        assert b.served_minutes_purchased - b.served_minutes_used - b.minutes_reserved == b.minutes_available
        assert b.served_credit_used >= b.credit_used >= 0 and b.served_minutes_used >= b.minutes_used >= 0
        assert (b.credit_balance, b.credit_reserved, b.credit_used) == (
            m.balance[CREDITS],
            m.reserved[CREDITS],
            m.used[CREDITS],
        )
        assert (b.minutes_purchased - b.minutes_used, b.minutes_reserved, b.minutes_used) == (
            m.balance[MINUTES],
            m.reserved[MINUTES],
            m.used[MINUTES],
        )


@pytest.mark.timeout(900)  # room to shrink a failure to its shortest steps
def test_ledger_state_machine(env: Env) -> None:
    run_state_machine_as_test(
        lambda: LedgerMachine(env),
        settings=settings(
            max_examples=60,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


def test_database_refuses_what_the_code_would_not_do(env: Env) -> None:
    """The rules hold in the database itself, not only in the code above it."""

    async def scenario() -> None:
        await env.accounts.create(account_id="guarded", account_name="guarded", initial_credits="10")
        async with env.pool.acquire() as conn:
            with pytest.raises(asyncpg.CheckViolationError):  # balances move only through entries
                await conn.execute("UPDATE accounts SET credit_balance = 999 WHERE account_id = 'guarded'")
            with pytest.raises(asyncpg.CheckViolationError):  # never below zero
                await conn.execute(
                    "INSERT INTO ledger_entries (account_id, kind, unit, amount, cause, balance_after, held_after)"
                    " VALUES ('guarded', 'adjustment', 'credits', -11, 'x', 0, 0)"
                )
            with pytest.raises(asyncpg.UniqueViolationError):  # one top-up per key
                await conn.execute(
                    "INSERT INTO ledger_entries (account_id, kind, unit, amount, cause, balance_after, held_after)"
                    " VALUES ('guarded', 'topup', 'credits', 5, 'initial', 0, 0)"
                )
            with pytest.raises(asyncpg.PostgresError, match="immutable"):
                await conn.execute("DELETE FROM ledger_entries WHERE account_id = 'guarded'")
        result = await env.ledger.hold(ADMIN_CALLER, account_id="guarded", hold_id="g:1", amount="4")
        assert result.balance.credit_available == 6
        async with env.pool.acquire() as conn:
            with pytest.raises(asyncpg.CheckViolationError):  # a capture never exceeds its hold
                await conn.execute("UPDATE holds SET amount_captured = 5 WHERE hold_id = 'g:1'")
        assert not await violations(env.pool, "guarded")

    env.run(scenario())
