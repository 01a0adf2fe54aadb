"""Notifications and the audit log against a real PostgreSQL: one notification per source
event, scoping by account and user, unread counts, mark read, delete, admin-only audit."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from pregonero.events.v1 import events_pb2

from services.accounts import notify_repo
from services.accounts.audit import Audit
from services.accounts.notifications import Notifications
from services.accounts.notify_repo import NotifyRepo
from services.runtime import db
from services.runtime.devstack import Stack
from services.runtime.errors import InvalidArgument, NotFound, PermissionDenied
from services.runtime.identity import ADMIN, MEMBER, Caller

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "accounts" / "migrations"
ADMIN_CALLER = Caller(role=ADMIN, account_id="default", user_id="operator")
ACME = Caller(role=MEMBER, account_id="acme", user_id="usr-ana")
ACME_OTHER = Caller(role=MEMBER, account_id="acme", user_id="usr-luis")
GLOBEX = Caller(role=MEMBER, account_id="globex", user_id="usr-gl")

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
async def pool(infra: Stack) -> AsyncIterator[asyncpg.Pool]:
    name = f"t_notify_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(infra.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    pool = await db.create_pool(infra.database_url.rpartition("/")[0] + f"/{name}", schema="accounts")
    try:
        async with pool.acquire() as conn:
            await db.migrate(conn, schema="accounts", directory=MIGRATIONS)
        await db.check_queries(pool, notify_repo.Q)
        yield pool
    finally:
        await pool.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def notes(pool: asyncpg.Pool) -> AsyncIterator[tuple[Notifications, list[asyncpg.Record]]]:
    """Fresh accounts per test, and the notifications published as they are made."""
    await pool.execute("TRUNCATE notifications")
    await pool.execute(
        "INSERT INTO accounts (account_id, account_name) VALUES ('acme', 'Acme'), ('globex', 'Globex')"
        " ON CONFLICT DO NOTHING"
    )
    published: list[asyncpg.Record] = []

    async def publish(row: asyncpg.Record) -> None:
        published.append(row)

    yield Notifications(NotifyRepo(pool), on_created=publish), published


def finished(batch_id: str, account_id: str, kind: str = "job_completed") -> events_pb2.BatchEvent:
    return events_pb2.BatchEvent(
        batch_id=batch_id, account_id=account_id, type=kind, sent=3, failed=1, total=4, status="completed"
    )


async def test_a_redelivered_event_makes_one_notification(notes: tuple[Notifications, list]) -> None:
    n, published = notes
    first = await n.batch_event(finished("b-1", "acme"))
    again = await n.batch_event(finished("b-1", "acme"))
    assert first is not None and again is None
    assert first["kind"] == "batch_completed" and first["level"] == "success"
    assert [r["id"] for r in published] == [first["id"]]
    failed = await n.batch_event(finished("b-1", "acme", "job_failed"))
    assert failed is not None and failed["kind"] == "batch_failed"
    # Progress and other lifecycle events make none.
    assert await n.batch_event(finished("b-2", "acme", "progress")) is None
    # An event of an account that does not exist has nobody to tell.
    assert await n.batch_event(finished("b-3", "nobody")) is None
    assert await n.unread_count(ACME) == 2


async def test_a_call_campaign_is_told_as_one(notes: tuple[Notifications, list]) -> None:
    n, _ = notes
    message = await n.batch_event(finished("b-bulk", "acme"))
    call = finished("b-voice", "acme")
    call.channel = "voice"
    campaign = await n.batch_event(call)
    assert message is not None and campaign is not None
    assert message["title"] == "Envío masivo completado" and message["message"].startswith("3 enviados")
    assert campaign["title"] == "Campaña de llamadas completada" and campaign["message"].startswith("3 completadas")


async def test_scoping_by_account_and_user(notes: tuple[Notifications, list]) -> None:
    n, _ = notes
    acme = await n.batch_event(finished("b-a", "acme"))
    globex = await n.batch_event(finished("b-g", "globex"))
    own = await n.create(
        account_id="acme", user_id="usr-ana", kind="info", level="info", title="t", message="m", source_key="own-1"
    )
    assert acme and globex and own
    assert {r["id"] for r in await n.list(ACME)} == {acme["id"], own["id"]}
    assert {r["id"] for r in await n.list(ACME_OTHER)} == {acme["id"]}
    assert {r["id"] for r in await n.list(GLOBEX)} == {globex["id"]}
    assert {r["id"] for r in await n.list(ADMIN_CALLER)} == {acme["id"], globex["id"], own["id"]}
    assert {r["id"] for r in await n.list(ADMIN_CALLER, account_id="globex")} == {globex["id"]}
    # Newest first.
    assert [r["id"] for r in await n.list(ADMIN_CALLER)] == sorted([acme["id"], globex["id"], own["id"]], reverse=True)
    # A member naming another account, or touching its notification: not found.
    with pytest.raises(NotFound):
        await n.list(ACME, account_id="globex")
    with pytest.raises(NotFound):
        await n.mark_read(ACME, str(globex["id"]))
    with pytest.raises(NotFound):
        await n.delete(ACME, str(globex["id"]))
    with pytest.raises(NotFound):
        await n.mark_read(ACME_OTHER, str(own["id"]))
    with pytest.raises(NotFound):
        await n.delete(ACME, "not-a-number")


async def test_unread_counts_mark_read_and_delete(notes: tuple[Notifications, list]) -> None:
    n, _ = notes
    rows = [await n.batch_event(finished(f"b-{i}", "acme")) for i in range(3)]
    await n.batch_event(finished("b-g", "globex"))
    assert await n.unread_count(ACME) == 3
    assert await n.unread_count(ADMIN_CALLER) == 4
    assert await n.unread_count(ADMIN_CALLER, account_id="globex") == 1
    read = await n.mark_read(ACME, str(rows[0]["id"]))
    assert read["read_at"] is not None
    assert await n.mark_read(ACME, str(rows[0]["id"]))  # again: still read, no error
    assert await n.unread_count(ACME) == 2
    assert [r["id"] for r in await n.list(ACME, unread_only=True)] == [rows[2]["id"], rows[1]["id"]]
    await n.delete(ACME, str(rows[1]["id"]))
    with pytest.raises(NotFound):
        await n.delete(ACME, str(rows[1]["id"]))
    assert await n.unread_count(ACME) == 1
    assert await n.mark_all_read(ACME) == 1
    assert await n.unread_count(ACME) == 0
    assert await n.unread_count(GLOBEX) == 1
    assert len(await n.list(ACME, limit=1)) == 1


async def test_pages_by_offset_with_the_total_of_the_scope(notes: tuple[Notifications, list]) -> None:
    n, _ = notes
    rows = [await n.batch_event(finished(f"p-{i}", "acme")) for i in range(3)]
    await n.batch_event(finished("p-g", "globex"))
    newest_first = [r["id"] for r in reversed(rows)]
    assert [r["id"] for r in await n.list(ACME, limit=2)] == newest_first[:2]
    assert [r["id"] for r in await n.list(ACME, limit=2, offset=2)] == newest_first[2:]
    assert await n.list(ACME, offset=3) == []
    assert await n.count(ACME) == 3 and await n.count(ADMIN_CALLER) == 4
    await n.mark_read(ACME, str(rows[0]["id"]))
    assert await n.count(ACME, unread_only=True) == 2
    with pytest.raises(InvalidArgument):
        await n.list(ACME, offset=-1)


async def test_credit_and_suspension_notifications(notes: tuple[Notifications, list]) -> None:
    n, _ = notes
    assert await n.credit_level(account_id="acme", plan_type="credit_based", available=Decimal(500)) is None
    assert await n.credit_level(account_id="acme", plan_type="unlimited", available=Decimal(0)) is None
    low = await n.credit_level(account_id="acme", plan_type="credit_based", available=Decimal("2.5"))
    assert low is not None and low["kind"] == "credit_low" and low["level"] == "warning"
    assert await n.credit_level(account_id="acme", plan_type="credit_based", available=Decimal("1")) is None
    out = await n.credit_level(account_id="acme", plan_type="credit_based", available=Decimal(0))
    assert out is not None and out["kind"] == "credit_exhausted"
    at = datetime.now(UTC)
    suspended = await n.suspended(account_id="acme", reason="impago", changed_at=at)
    assert suspended is not None and suspended["message"] == "impago"
    assert await n.suspended(account_id="acme", reason="impago", changed_at=at) is None
    assert {r["kind"] for r in await n.list(ACME)} == {"credit_low", "credit_exhausted", "account_suspended"}


async def test_audit_is_append_only_and_for_admins(pool: asyncpg.Pool) -> None:
    audit = Audit(NotifyRepo(pool))
    await audit.record(ADMIN_CALLER, "credits.topup", account_id="acme", target="acme", details={"credits": "5"})
    await audit.record(None, "auth.login_failed", target="x@example.com")
    rows, total = await audit.list(ADMIN_CALLER, action="credits.topup", account_id="acme")
    assert total >= 1 and rows[0]["actor_role"] == ADMIN and rows[0]["target"] == "acme"
    with pytest.raises(PermissionDenied):
        await audit.list(ACME)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await pool.execute("DELETE FROM audit_log")
