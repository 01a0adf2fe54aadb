"""Scheduled messages against real PostgreSQL and NATS: the due loop starts each due message
exactly once however many replicas run it, with the recipients of that moment (union of its
groups' active contacts, each phone once, minus opt-outs); the rules refuse bad input and
forbidden transitions and change nothing; and the message's live events (scheduled →
sending → progress → sent) come out of the batch's own path.

The dispatcher (devices) and accounts (zone, price) are replaced by small fakes; everything
that touches SQL or NATS is real."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import grpc
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from pregonero.events.v1 import events_pb2

from services.campaigns import messages_repo, repo
from services.campaigns.batch_publisher import Notifier
from services.campaigns.batches import Batches, SenderChoice
from services.campaigns.credit import AccountInfo, Price
from services.campaigns.messages_repo import MessagesRepo
from services.campaigns.repo import CampaignsRepo
from services.campaigns.results_applier import ResultsApplier
from services.campaigns.scheduled_messages import DueMessages, ScheduledMessages
from services.campaigns.template import UnknownVariable, compile_for, compile_named
from services.runtime.bus import BATCH_STATE_BUCKET
from services.runtime.db import check_queries
from services.runtime.errors import Conflict, InvalidArgument, NotFound
from services.runtime.identity import MEMBER, Caller
from tests.conftest import bus_client, collected, service_pool


@dataclass
class FakeDevices:
    """The dispatcher's list of active devices, per account."""

    active_ids: dict[str, list[int]] = field(default_factory=dict)

    async def active(self, account_id: str) -> list[SenderChoice]:
        return [SenderChoice(i, 0) for i in self.active_ids.get(account_id, [])]


class FakeCredit:
    """Accounts' answers for zones and prices: Chilean accounts at 0.01 a message."""

    async def account(self, account_id: str) -> AccountInfo:
        if account_id == "nobody":
            raise grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, None, None, details="no account")  # type: ignore[arg-type]
        return AccountInfo(
            account_id=account_id,
            plan_type="prepaid",
            status="active",
            timezone="",
            country="CL",
            max_concurrent_calls=1,
            available=Decimal(100),
            unit="credits",
            cost_per_minute=Decimal(0),
            cost_per_call_setup=Decimal(0),
        )

    async def price(self, account_id: str) -> Price:
        return Price(Decimal("0.01"), reserving=True)


@dataclass
class Env:
    pool: asyncpg.Pool
    nc: NATS
    js: JetStreamContext
    notifier: Notifier
    repo: MessagesRepo
    batches: Batches
    devices: FakeDevices
    messages: ScheduledMessages

    def due_loop(self, pool: asyncpg.Pool | None = None) -> DueMessages:
        return DueMessages(MessagesRepo(pool or self.pool), self.notifier, self.devices, on_started=lambda: None)  # type: ignore[arg-type]


@pytest.fixture
async def env(fresh_db: str, own_nats: str) -> AsyncIterator[Env]:
    pool = await service_pool(fresh_db, "campaigns")
    await check_queries(pool, messages_repo.Q)
    await check_queries(pool, repo.Q)
    nc, js = await bus_client(own_nats)
    notifier = Notifier(nc, js, await js.key_value(BATCH_STATE_BUCKET))
    batches = Batches(CampaignsRepo(pool), notifier)
    devices = FakeDevices()
    mrepo = MessagesRepo(pool)
    messages = ScheduledMessages(mrepo, batches, notifier, FakeCredit(), devices)  # type: ignore[arg-type]
    try:
        yield Env(pool, nc, js, notifier, mrepo, batches, devices, messages)
    finally:
        await nc.close()
        await pool.close()


def member(account_id: str) -> Caller:
    return Caller(role=MEMBER, account_id=account_id, user_id="u-1")


async def address_book(
    pool: asyncpg.Pool,
    account_id: str,
    groups: dict[str, list[str]],
    *,
    inactive: frozenset[str] = frozenset(),
    opted_out: frozenset[str] = frozenset(),
) -> dict[str, str]:
    """Contacts (named after their phone) in groups, written as the address book would; the
    group ids by name."""
    ids: dict[str, str] = {}
    async with pool.acquire() as conn:
        phones = sorted({p for members in groups.values() for p in members})
        contact = {}
        for p in phones:
            contact[p] = await conn.fetchval(
                "INSERT INTO contacts (account_id, name, phone, is_active) VALUES ($1, $2, $3, $4)"
                " RETURNING contact_id",
                account_id,
                f"N{p[-3:]}",
                p,
                p not in inactive,
            )
        for name, members in groups.items():
            gid = await conn.fetchval(
                "INSERT INTO contact_groups (account_id, name) VALUES ($1, $2) RETURNING group_id", account_id, name
            )
            await conn.executemany(
                "INSERT INTO group_members (group_id, contact_id) VALUES ($1, $2)", [(gid, contact[p]) for p in members]
            )
            ids[name] = str(gid)
        for p in opted_out:
            await conn.execute("INSERT INTO opt_outs (account_id, phone) VALUES ($1, $2)", account_id, p)
    return ids


def soon(seconds: float = 60) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()


async def make_due(env: Env, caller: Caller, groups: list[str], content: str = "Hola {{name}} ({{phone}})") -> str:
    """A scheduled message, then moved into the past as if its time had come."""
    view = await env.messages.create(caller, content=content, scheduled_for=soon(), group_ids=groups, timezone="")
    message_id = str(view.row["message_id"])
    await env.messages.schedule(caller, message_id, scheduled_for="", timezone="")
    await env.pool.execute(
        "UPDATE messages SET scheduled_for = now() - interval '1 second' WHERE message_id = $1", int(message_id)
    )
    return message_id


async def test_two_replicas_start_each_due_message_once_with_the_recipients_of_that_moment(env: Env) -> None:
    account = f"acc-{uuid.uuid4().hex[:6]}"
    caller = member(account)
    env.devices.active_ids[account] = [7, 8]
    a = [f"+5691000{i:04d}" for i in range(6)]
    b = a[3:] + [f"+5692000{i:04d}" for i in range(4)]
    groups = await address_book(
        env.pool, account, {"a": a, "b": b}, inactive=frozenset({a[0]}), opted_out=frozenset({b[-1]})
    )
    expected = (set(a) | set(b)) - {a[0], b[-1]}
    ids = [await make_due(env, caller, [groups["a"], groups["b"]]) for _ in range(5)]

    # Two replicas, each with its own pool, race for the same five messages.
    other = await asyncpg.create_pool(env.pool._connect_args[0], **env.pool._connect_kwargs)  # type: ignore[attr-defined]
    try:
        counts = await asyncio.gather(env.due_loop().round(), env.due_loop(other).round())
    finally:
        await other.close()
    assert sum(counts) == 5
    rows = await env.pool.fetch("SELECT * FROM batches WHERE account_id = $1", account)
    assert len(rows) == 5 and {str(r["message_id"]) for r in rows} == set(ids)
    assert all(r["sender_ids"] == [7, 8] and r["status"] == "pending" and r["template_syntax"] == "named" for r in rows)
    for row in rows:
        jobs = await env.pool.fetch("SELECT phone, vals FROM jobs WHERE batch_id = $1", row["batch_id"])
        assert Counter(j["phone"] for j in jobs) == Counter(expected)
        assert all(list(j["vals"]) == [f"N{j['phone'][-3:]}", j["phone"]] for j in jobs)
    for message_id in ids:
        view = await env.messages.get(caller, message_id)
        assert view.row["state"] == "sending" and view.recipients == len(expected) and not view.row["late"]
    # Nothing is left to start: another round does nothing.
    assert await env.due_loop().round() == 0


async def test_a_message_due_long_ago_starts_late_and_one_without_recipients_fails(env: Env) -> None:
    account = f"acc-{uuid.uuid4().hex[:6]}"
    caller = member(account)
    env.devices.active_ids[account] = [1]
    groups = await address_book(env.pool, account, {"g": ["+56930000001"], "h": ["+56930000002"]})
    late = await make_due(env, caller, [groups["g"]])
    await env.pool.execute(
        "UPDATE messages SET scheduled_for = now() - interval '5 minutes' WHERE message_id = $1", int(late)
    )
    empty = await make_due(env, caller, [groups["h"]])
    # Its only contact opted out after it was scheduled: nobody is left when it falls due.
    await env.pool.execute("INSERT INTO opt_outs (account_id, phone) VALUES ($1, '+56930000002')", account)
    async with collected(env.nc, f"events.message.{account}", events_pb2.MessageEvent.FromString) as seen:
        assert await env.due_loop().round() == 2
        await asyncio.sleep(0.2)
    assert (await env.messages.get(caller, late)).row["late"] is True
    failed = (await env.messages.get(caller, empty)).row
    assert failed["state"] == "failed" and "no recipients" in failed["error"]
    assert await env.pool.fetchval("SELECT count(*) FROM batches WHERE message_id = $1", int(empty)) == 0
    assert {(e.message_id, e.status, e.late) for e in seen} == {(late, "sending", True), (empty, "failed", False)}


async def test_live_events_follow_the_message_from_scheduled_to_sent(env: Env) -> None:
    account = f"acc-{uuid.uuid4().hex[:6]}"
    caller = member(account)
    env.devices.active_ids[account] = [3]
    phones = [f"+5694000{i:04d}" for i in range(4)]
    groups = await address_book(env.pool, account, {"g": phones})
    async with collected(env.nc, "events.message.>", events_pb2.MessageEvent.FromString) as seen:
        message_id = await make_due(env, caller, [groups["g"]])
        await env.due_loop().round()
        batch_id = (await env.messages.get(caller, message_id)).row["batch_id"]
        results = ResultsApplier(
            CampaignsRepo(env.pool),
            env.js,
            env.notifier,
            env.batches,
            None,
            lambda: None,
            lambda: None,  # type: ignore[arg-type]
        )
        jobs = await env.pool.fetch("SELECT job_id, phone FROM jobs WHERE batch_id = $1 ORDER BY job_id", batch_id)
        for j in jobs:  # one result at a time, as a slow device reports them
            outcome = events_pb2.JobOutcome(
                job_id=j["job_id"], attempt_id=f"{batch_id}:{j['job_id']}:1", status="sent", to=j["phone"], sender_id=3
            )
            await results.apply(batch_id, [outcome])
        await asyncio.sleep(0.3)
    mine = [e for e in seen if e.message_id == message_id and e.account_id == account]
    statuses = [e.status for e in mine if e.type == "status"]
    assert statuses == ["scheduled", "sending", "sent"]
    progress = [e for e in mine if e.type == "progress"]
    # At most one a second while it runs, and the final one with every recipient.
    assert 2 <= len(progress) <= 3
    assert progress[-1].final and (progress[-1].sent, progress[-1].failed, progress[-1].total) == (4, 0, 4)
    view = await env.messages.get(caller, message_id)
    assert view.row["state"] == "sent" and view.row["finished_at"] is not None
    stats = await env.messages.stats(caller, message_id)
    assert (stats.recipients, stats.sent, stats.failed, stats.pending, stats.delivery_rate) == (4, 4, 0, 0, 100.0)

    # What the provider reports afterwards: one read, one delivered, one failed after all.
    now = datetime.now(UTC)
    await CampaignsRepo(env.pool).apply_delivery(
        rows=[
            (batch_id, 1, "read", now, now, None),
            (batch_id, 2, "delivered", now, None, None),
            (batch_id, 3, "failed", None, None, "131026 undeliverable"),
        ]
    )
    stats = await env.messages.stats(caller, message_id)
    assert (stats.sent, stats.delivered, stats.read, stats.failed, stats.delivery_rate) == (4, 2, 1, 1, 75.0)
    view = await env.messages.get(caller, message_id)
    assert (view.delivered, view.read, view.delivery_failed) == (2, 1, 1)


async def test_bad_input_and_forbidden_transitions_are_refused_and_change_nothing(env: Env) -> None:
    account = f"acc-{uuid.uuid4().hex[:6]}"
    caller = member(account)
    groups = await address_book(env.pool, account, {"g": ["+56950000001"], "empty": []})
    create = env.messages.create

    async def refused(kind: type[Exception], words: str, **fields: Any) -> None:
        body = {"content": "Hola {{name}}", "scheduled_for": "", "group_ids": [], "timezone": ""} | fields
        with pytest.raises(kind, match=words):
            await create(caller, **body)

    await refused(InvalidArgument, "4097 characters", content="x" * 4097)
    await refused(InvalidArgument, "empty", content="   ")
    await refused(InvalidArgument, "HTML or script", content="Hola <b>amigo</b>")
    await refused(InvalidArgument, "HTML or script", content="<script>alert(1)</script>")
    await refused(InvalidArgument, r"unknown variable \{\{apellido\}\}", content="Hola {{apellido}}")
    await refused(InvalidArgument, "in the past", scheduled_for="2020-01-01T10:00:00")
    await refused(InvalidArgument, "more than a year ahead", scheduled_for=soon(400 * 86400))
    await refused(InvalidArgument, "not an ISO 8601", scheduled_for="tomorrow at noon")
    await refused(InvalidArgument, "unknown timezone", scheduled_for="2099-01-01T10:00:00", timezone="Mars/Olympus")
    await refused(InvalidArgument, "group 999999 does not exist", group_ids=["999999"])
    assert await env.pool.fetchval("SELECT count(*) FROM messages WHERE account_id = $1", account) == 0
    # 3 < 5 is text, not HTML.
    ok = await create(caller, content="3 < 5 y {{ name }}", scheduled_for="", group_ids=[groups["empty"]], timezone="")
    message_id = str(ok.row["message_id"])

    # A time without an offset is read in the account's zone (Chile), one with an offset as given.
    local = (datetime.now(ZoneInfo("America/Santiago")) + timedelta(days=2)).replace(microsecond=0, tzinfo=None)
    view = await env.messages.update(
        caller, message_id, content=None, scheduled_for=local.isoformat(), group_ids=None, timezone=""
    )
    assert view.row["scheduled_for"] == local.replace(tzinfo=ZoneInfo("America/Santiago"))
    given = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    text = given.astimezone(ZoneInfo("Asia/Tokyo")).isoformat()
    view = await env.messages.update(caller, message_id, content=None, scheduled_for=text, group_ids=None, timezone="")
    assert view.row["scheduled_for"] == given
    before = await env.pool.fetchrow("SELECT * FROM messages WHERE message_id = $1", int(message_id))

    # Scheduling needs recipients and a device: the reply names both.
    with pytest.raises(Conflict, match="group with active contacts.*active WhatsApp device"):
        await env.messages.schedule(caller, message_id, scheduled_for="", timezone="")
    await env.messages.update(caller, message_id, content=None, scheduled_for=None, group_ids=[], timezone="")
    with pytest.raises(Conflict, match="at least one group"):
        await env.messages.schedule(caller, message_id, scheduled_for="", timezone="")
    for action in (env.messages.pause, env.messages.resume):
        with pytest.raises(Conflict, match="is draft"):
            await action(caller, message_id)
    assert (await env.pool.fetchrow("SELECT status, content FROM messages WHERE message_id = $1", int(message_id))) == (
        before["status"],
        before["content"],
    )

    # Cancelled: nothing but delete and duplicate is left to it.
    await env.messages.cancel(caller, message_id)
    with pytest.raises(Conflict, match="is cancelled: only a draft or scheduled message can be edited"):
        await env.messages.update(caller, message_id, content="otro", scheduled_for=None, group_ids=None, timezone="")
    with pytest.raises(Conflict, match="is cancelled: only a draft can be scheduled"):
        await env.messages.schedule(caller, message_id, scheduled_for="", timezone="")
    with pytest.raises(Conflict, match="is cancelled"):
        await env.messages.cancel(caller, message_id)
    copy = await env.messages.duplicate(caller, message_id)
    assert copy.row["state"] == "draft" and copy.row["content"] == "3 < 5 y {{ name }}"

    # Another account's message is not found, whatever is asked of it.
    stranger = member("another")
    for call in (env.messages.get, env.messages.cancel, env.messages.delete, env.messages.preview):
        with pytest.raises(NotFound):
            await call(stranger, message_id)
    await env.messages.delete(caller, message_id)
    with pytest.raises(NotFound):
        await env.messages.get(caller, message_id)


async def test_a_time_without_an_offset_is_read_in_the_zone_of_the_request_the_user_or_the_account(env: Env) -> None:
    account = f"acc-{uuid.uuid4().hex[:6]}"
    wall = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0, tzinfo=None)

    async def read_as(caller: Caller, timezone: str = "") -> datetime:
        view = await env.messages.create(
            caller, content="Hola", scheduled_for=wall.isoformat(), group_ids=[], timezone=timezone
        )
        return view.row["scheduled_for"]  # type: ignore[no-any-return]

    user = Caller(role=MEMBER, account_id=account, user_id="u-2", timezone="America/Argentina/Buenos_Aires")
    assert await read_as(user) == wall.replace(tzinfo=ZoneInfo("America/Argentina/Buenos_Aires"))
    assert await read_as(user, "Asia/Tokyo") == wall.replace(tzinfo=ZoneInfo("Asia/Tokyo"))
    # No zone of the user's: the account's country's (a Chilean account here).
    assert await read_as(member(account)) == wall.replace(tzinfo=ZoneInfo("America/Santiago"))
    with pytest.raises(InvalidArgument, match="unknown timezone"):
        await read_as(Caller(role=MEMBER, account_id=account, user_id="u-3", timezone="Mars/Base"))


def test_named_templates_render_name_and_phone_and_leave_valor_alone() -> None:
    template = compile_named("Hola {{name}} ({{ phone }}), @valor1 {{name}}")
    assert template.render(["Ana", "+56911112222"]) == "Hola Ana (+56911112222), @valor1 Ana"
    assert compile_named("{{ name").render(["Ana", "+5691"]) == "{{ name"
    with pytest.raises(UnknownVariable, match=r"unknown variable \{\{nombre\}\}"):
        compile_named("Hola {{nombre}}")
    # A bulk batch keeps its @valorN syntax, whatever braces its text has.
    assert compile_for("valor", "{{x}} @valor1").render(["a"]) == "{{x}} a"


async def test_a_scheduled_message_taken_back_to_draft_loses_its_time_and_is_not_started(env: Env) -> None:
    account = f"acc-{uuid.uuid4().hex[:6]}"
    caller = member(account)
    env.devices.active_ids[account] = [5]
    groups = await address_book(env.pool, account, {"g": ["+56960000001"]})
    view = await env.messages.create(caller, content="Hola", scheduled_for=soon(), group_ids=[groups["g"]], timezone="")
    message_id = str(view.row["message_id"])
    await env.messages.schedule(caller, message_id, scheduled_for="", timezone="")
    with pytest.raises(InvalidArgument, match="needs its scheduled_for"):
        await env.messages.update(caller, message_id, content=None, scheduled_for="", group_ids=None, timezone="")
    async with collected(env.nc, f"events.message.{account}", events_pb2.MessageEvent.FromString) as seen:
        view = await env.messages.update(
            caller, message_id, content=None, scheduled_for="", group_ids=None, timezone="", unschedule=True
        )
        await asyncio.sleep(0.2)
    assert view.row["state"] == "draft" and view.row["scheduled_for"] is None
    assert [(e.type, e.status) for e in seen] == [("status", "draft")]
    await env.pool.execute(
        "UPDATE messages SET scheduled_for = now() - interval '1 second' WHERE message_id = $1", int(message_id)
    )
    assert await env.due_loop().round() == 0
