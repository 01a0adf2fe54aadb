"""50 concurrent clients do 10,000 mixed ledger operations against the running accounts
service (its own process, its own database); afterwards the tables break no rule, and
sending every capture again changes nothing."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import NamedTuple

import asyncpg
import grpc
import pytest
from pregonero.accounts.v1 import accounts_pb2, accounts_pb2_grpc

from services.runtime.devstack import Proc, Stack
from services.runtime.identity import ADMIN, MEMBER, Caller
from services.runtime.rpc import channel

from .ledger_invariants import violations

TASKS = 50
OPS = 10_000
ADMIN_MD = Caller(role=ADMIN, account_id="default", user_id="operator").metadata()


def feeder_md(account: str) -> tuple[tuple[str, str], ...]:
    """As campaigns calls the ledger's hold flow: for the one account whose work it releases."""
    return Caller(role=MEMBER, account_id=account, user_id="campaigns-feeder").metadata()


class Ledger(NamedTuple):
    """The accounts service as its two kinds of clients reach it."""

    admin: accounts_pb2_grpc.AccountsServiceStub  # the gateway, for an operator
    feeder: accounts_pb2_grpc.AccountsServiceStub  # campaigns, holding and spending credit


# A few accounts, so that 50 clients contend for the same rows; one of each plan.
ACCOUNTS = {
    "conc-a": ("credit_based", "300"),
    "conc-b": ("credit_based", "150"),
    "conc-c": ("credit_based", "40"),
    "conc-m": ("minutes_based", "200"),
    "conc-u": ("unlimited", "0"),
}
# Expected refusals; anything else is a failure.
REFUSALS = {
    "hold": {grpc.StatusCode.RESOURCE_EXHAUSTED},
    "refund": {grpc.StatusCode.FAILED_PRECONDITION},
    "adjust": {grpc.StatusCode.FAILED_PRECONDITION},
}


@pytest.fixture
async def service(fresh_db: str, own_nats: str, tmp_path: Path) -> AsyncIterator[Ledger]:
    stack = Stack(data_dir=tmp_path, database_url=fresh_db, nats_url=own_nats)
    stack.extra_env["LOG_LEVEL"] = "WARNING"
    proc: Proc = await asyncio.to_thread(stack.start_service, "accounts")
    addr = stack.addrs["accounts"]
    gateway = channel(addr, audience="accounts", keyring=stack.keyring("gateway"))
    campaigns = channel(addr, audience="accounts", keyring=stack.keyring("campaigns"))
    try:
        yield Ledger(accounts_pb2_grpc.AccountsServiceStub(gateway), accounts_pb2_grpc.AccountsServiceStub(campaigns))
    finally:
        await gateway.close()
        await campaigns.close()
        await asyncio.to_thread(proc.stop)


@dataclass
class Shared:
    holds: dict[str, list[str]] = field(default_factory=lambda: {a: [] for a in ACCOUNTS})
    captures: list[accounts_pb2.CaptureRequest] = field(default_factory=list)
    keys: list[tuple[str, str, str]] = field(default_factory=list)  # (account, key, credits)
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


def money(rng: random.Random, top: int) -> str:
    return f"{rng.randint(0, top * 100) / 100:.2f}"


def check_balance(b: accounts_pb2.Balance, shared: Shared) -> None:
    # Served as added, charged, held: what is left is balance - used - reserved.
    balance, used = Decimal(b.credit_balance), Decimal(b.credit_used)
    reserved, available = Decimal(b.credit_reserved), Decimal(b.credit_available)
    if balance < 0 or used < 0 or reserved < 0 or available != balance - used - reserved or available < 0:
        shared.errors.append(f"reply balance broken: {b}")
    minutes = [Decimal(v) for v in (b.minutes_purchased, b.minutes_used, b.minutes_reserved, b.minutes_available)]
    if min(minutes) < 0 or minutes[3] != minutes[0] - minutes[1] - minutes[2]:
        shared.errors.append(f"reply minutes broken: {b}")


async def client(ledger: Ledger, n: int, ops: int, shared: Shared) -> None:
    stub = ledger.admin
    rng = random.Random(n)
    for i in range(ops):
        account = rng.choice(list(ACCOUNTS))
        roll = rng.random()
        kind = ""
        try:
            if roll < 0.30:
                kind = "hold"
                hold_id = f"c{n}:h{i}"
                reply = await ledger.feeder.Hold(
                    accounts_pb2.HoldRequest(
                        account_id=account,
                        hold_id=hold_id,
                        amount=f"{rng.randint(1, 2000) / 100:.2f}",
                        partial=rng.random() < 0.3,
                    ),
                    metadata=feeder_md(account),
                )
                shared.holds[account].append(hold_id)
            elif roll < 0.65 and shared.holds[account]:
                kind = "capture"
                if shared.captures and rng.random() < 0.1:
                    request = rng.choice(shared.captures)  # a redelivered result batch
                else:
                    request = accounts_pb2.CaptureRequest(
                        account_id=account,
                        items=[
                            accounts_pb2.CaptureItem(
                                attempt_id=f"c{n}:a{i}:{k}",
                                hold_id=rng.choice(shared.holds[account][-20:]),
                                amount=money(rng, 6),
                            )
                            for k in range(rng.randint(1, 5))
                        ],
                    )
                    shared.captures.append(request)
                reply = await ledger.feeder.Capture(request, metadata=feeder_md(request.account_id))
                shared.outcomes.update(c.status for c in reply.captures)
            elif roll < 0.75 and shared.holds[account]:
                kind = "release"
                reply = await ledger.feeder.Release(
                    accounts_pb2.ReleaseRequest(account_id=account, hold_id=rng.choice(shared.holds[account])),
                    metadata=feeder_md(account),
                )
            elif roll < 0.85:
                kind = "topup"
                if shared.keys and rng.random() < 0.3:
                    account, key, credits = rng.choice(shared.keys)  # a client retrying
                else:
                    key, credits = f"c{n}:k{i}", f"{rng.randint(1, 3000) / 100:.2f}"
                    shared.keys.append((account, key, credits))
                unit = "minutes" if ACCOUNTS[account][0] == "minutes_based" else "credits"
                reply = await stub.TopUp(
                    accounts_pb2.TopUpRequest(account_id=account, idempotency_key=key, **{unit: credits}),
                    metadata=ADMIN_MD,
                )
            elif roll < 0.90:
                kind = "refund"
                unit = "minutes" if ACCOUNTS[account][0] == "minutes_based" else "credits"
                reply = await stub.Refund(
                    accounts_pb2.RefundRequest(account_id=account, **{unit: f"{rng.randint(1, 500) / 100:.2f}"}),
                    metadata=ADMIN_MD,
                )
            elif roll < 0.95:
                kind = "adjust"
                unit = "minutes" if ACCOUNTS[account][0] == "minutes_based" else "credits"
                signed = rng.choice([-1, 1]) * rng.randint(1, 1000) / 100
                reply = await stub.Adjust(
                    accounts_pb2.AdjustRequest(account_id=account, **{unit: f"{signed:.2f}"}, reason="test"),
                    metadata=ADMIN_MD,
                )
            else:
                kind = "balance"
                check_balance(
                    await stub.GetBalance(accounts_pb2.GetBalanceRequest(account_id=account), metadata=ADMIN_MD),
                    shared,
                )
                continue
            check_balance(reply.balance, shared)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in REFUSALS.get(kind, set()):
                shared.errors.append(f"{kind}: {exc.code().name} {exc.details()}")


async def snapshot(pool: asyncpg.Pool) -> tuple[list[tuple[object, ...]], int, list[tuple[object, ...]]]:
    accounts = await pool.fetch(
        "SELECT account_id, credit_balance, credit_reserved, credit_used, minutes_purchased, minutes_used,"
        " minutes_reserved, credit_refunded, minutes_refunded FROM accounts ORDER BY account_id"
    )
    entries = await pool.fetchval("SELECT count(*) FROM ledger_entries")
    holds = await pool.fetch("SELECT hold_id, amount_captured, amount_released, status FROM holds ORDER BY hold_id")
    return [tuple(r.values()) for r in accounts], entries, [tuple(r.values()) for r in holds]


@pytest.mark.timeout(180)
async def test_concurrent_ledger_keeps_its_invariants(service: Ledger, fresh_db: str) -> None:
    stub = service.admin
    for account, (plan, start) in ACCOUNTS.items():
        unit = "initial_minutes" if plan == "minutes_based" else "initial_credits"
        await stub.CreateAccount(
            accounts_pb2.CreateAccountRequest(account_id=account, plan_type=plan, **{unit: start}), metadata=ADMIN_MD
        )
    shared = Shared()
    started = time.perf_counter()
    await asyncio.gather(*(client(service, n, OPS // TASKS, shared) for n in range(TASKS)))
    elapsed = time.perf_counter() - started
    assert not shared.errors, shared.errors[:10]
    # The mix really exercised the paths that matter.
    assert shared.outcomes["captured"] > 1000 and shared.outcomes["replayed"] > 100, shared.outcomes
    print(f"\n{OPS} ledger operations by {TASKS} clients in {elapsed:.1f}s ({OPS / elapsed:.0f}/s)")

    pool = await asyncpg.create_pool(fresh_db, min_size=1, max_size=2, server_settings={"search_path": "accounts"})
    try:
        assert await violations(pool) == {}
        assert await pool.fetchval("SELECT count(*) FROM ledger_entries WHERE kind = 'capture'") > 1000
        before = await snapshot(pool)

        # Every result batch delivered again, all at once: nothing is charged twice.
        async def again(requests: list[accounts_pb2.CaptureRequest]) -> list[str]:
            statuses = []
            for request in requests:
                reply = await service.feeder.Capture(request, metadata=feeder_md(request.account_id))
                statuses += [c.status for c in reply.captures]
            return statuses

        batches = [shared.captures[i::TASKS] for i in range(TASKS)]
        statuses = [s for group in await asyncio.gather(*(again(b) for b in batches)) for s in group]
        assert set(statuses) == {"replayed"}
        assert await snapshot(pool) == before
        assert await violations(pool) == {}
    finally:
        await pool.close()
