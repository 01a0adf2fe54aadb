"""Offline operations against a real PostgreSQL: claimed once per user and client id, the
outcome kept and final, other content under the same id refused, a refusal given back."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.accounts import sync_repo
from services.accounts.sync_operations import CLAIMED, CONFLICT, FINISHED, PENDING, SyncOperations
from services.accounts.sync_repo import SyncRepo
from services.runtime import db
from services.runtime.errors import InvalidArgument, NotFound
from services.runtime.identity import ADMIN, MEMBER, Caller
from tests.conftest import service_pool

pytestmark = pytest.mark.timeout(30)

ANA = Caller(role=MEMBER, account_id="acme", user_id="usr-ana")
LUIS = Caller(role=MEMBER, account_id="acme", user_id="usr-luis")
OTHER = Caller(role=MEMBER, account_id="globex", user_id="usr-ana")


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


@pytest.fixture
async def pool(fresh_db: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await service_pool(fresh_db, "accounts")
    try:
        await db.check_queries(pool, sync_repo.Q)
        yield pool
    finally:
        await pool.close()


async def test_an_operation_is_claimed_once_and_repeats_get_its_outcome(pool: asyncpg.Pool) -> None:
    ops = SyncOperations(SyncRepo(pool))
    op = {"client_op_id": "op-1", "method": "POST", "path": "/api/groups", "digest": digest("a")}
    assert (await ops.claim(ANA, **op)).state == CLAIMED
    assert (await ops.claim(ANA, **op)).state == PENDING  # no outcome yet: not run twice
    await ops.finish(ANA, client_op_id="op-1", status=201, body='{"id": "g-1"}')
    again = await ops.claim(ANA, **op)
    assert (again.state, again.status, again.body) == (FINISHED, 201, '{"id": "g-1"}')
    # The same id with other content is refused; other users and accounts have ids of their own.
    assert (await ops.claim(ANA, **{**op, "digest": digest("b")})).state == CONFLICT
    assert (await ops.claim(LUIS, **op)).state == CLAIMED
    assert (await ops.claim(OTHER, **op)).state == CLAIMED
    # An outcome is final, in the service and in the database itself.
    with pytest.raises(NotFound):
        await ops.finish(ANA, client_op_id="op-1", status=500, body="{}")
    with pytest.raises(asyncpg.IntegrityConstraintViolationError, match="final"):
        await pool.execute("UPDATE sync_operations SET status = 500 WHERE user_id = 'usr-ana' AND status = 201")


async def test_concurrent_sends_of_one_operation_claim_it_once(pool: asyncpg.Pool) -> None:
    ops = SyncOperations(SyncRepo(pool))
    op = {"client_op_id": "race", "method": "DELETE", "path": "/api/groups/1", "digest": digest("r")}
    states = await asyncio.gather(*(ops.claim(ANA, **op) for _ in range(10)))
    assert sorted(s.state for s in states) == [CLAIMED] + [PENDING] * 9


async def test_a_refused_operation_is_given_back_but_a_finished_one_stays(pool: asyncpg.Pool) -> None:
    ops = SyncOperations(SyncRepo(pool))
    op = {"client_op_id": "later", "method": "POST", "path": "/api/messages", "digest": digest("m")}
    assert (await ops.claim(ANA, **op)).state == CLAIMED
    assert await ops.release(ANA, client_op_id="later")
    assert (await ops.claim(ANA, **op)).state == CLAIMED
    await ops.finish(ANA, client_op_id="later", status=201, body="{}")
    assert not await ops.release(ANA, client_op_id="later")
    assert (await ops.claim(ANA, **op)).state == FINISHED


@pytest.mark.parametrize(
    ("caller", "fields"),
    [
        (ANA, {"client_op_id": ""}),
        (ANA, {"client_op_id": "x" * 129}),
        (ANA, {"client_op_id": "tab\there"}),
        (ANA, {"method": "GET"}),
        (ANA, {"path": "api/groups"}),
        (ANA, {"digest": b"short"}),
        (Caller(role=ADMIN, account_id="default", user_id=""), {}),
    ],
)
async def test_bad_claims_are_refused_and_store_nothing(
    pool: asyncpg.Pool, caller: Caller, fields: dict[str, object]
) -> None:
    ops = SyncOperations(SyncRepo(pool))
    op = {"client_op_id": "bad", "method": "POST", "path": "/api/groups", "digest": digest("x"), **fields}
    with pytest.raises(InvalidArgument):
        await ops.claim(caller, **op)  # type: ignore[arg-type]
    assert await pool.fetchval("SELECT count(*) FROM sync_operations") == 0
