"""Scheduled messages: their rules (content, time, what scheduling needs, which transitions
each status allows) and the due loop that starts them.

A message becomes, when it falls due, a WhatsApp batch like any other: the due loop claims
it (`FOR UPDATE SKIP LOCKED`) and, in the same transaction, writes its batch with one job per
recipient (fixed then) and marks it sending. The claim and the batch commit together or not
at all, so however many replicas run the loop and whenever one dies, each message starts
exactly once; one that fell due while no replica ran starts when one is back, marked late.
From there the batch's path sends it, and the message's status and counters are the batch's."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import asyncpg
import grpc
from pregonero.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc

from services.runtime.errors import Conflict, InvalidArgument, NotFound
from services.runtime.identity import MEMBER, Caller
from services.runtime.lifecycle import Rounds
from services.runtime.rpc import outgoing_metadata
from services.runtime.validation import known_zone

from .batch_publisher import Notifier
from .batches import Batches, SenderChoice, window_for
from .credit import Credit, NoCredit
from .messages_repo import MessagesRepo
from .template import UnknownVariable, compile_named

log = logging.getLogger("pregonero.campaigns.messages")

MAX_CONTENT = 4096
MAX_AHEAD = timedelta(days=365)
# A message that starts later than this after its time is marked late.
LATE_AFTER = timedelta(seconds=30)
DUE_POLL_S = 0.5
SAMPLES = 5
STATES = ("draft", "scheduled", "sending", "sent", "paused", "cancelled", "failed")
# Where a user's zone is not known, the account's country's.
COUNTRY_ZONES = {"CL": "America/Santiago", "AR": "America/Argentina/Buenos_Aires"}
DEFAULT_ZONE = "America/Santiago"
# Any HTML tag or comment (`<b>`, `</p>`, `<script ...>`, `<!-- -->`); a lone `<` (3 < 5) is text.
_TAG = re.compile(r"<\s*(/?\s*[A-Za-z][^<>]*|!--.*?--)>", re.DOTALL)
_SCRIPT_URL = re.compile(r"javascript\s*:", re.IGNORECASE)
DEVICES_TIMEOUT_S = 10.0


def check_content(text: str) -> str:
    if not text.strip():
        raise InvalidArgument("content is empty: write the message to send")
    if len(text) > MAX_CONTENT:
        raise InvalidArgument(f"content is {len(text)} characters long; at most {MAX_CONTENT} are allowed")
    found = _TAG.search(text) or _SCRIPT_URL.search(text)
    if found:
        raise InvalidArgument(f"content may not contain HTML or script: found {found.group(0)[:40]!r}")
    try:
        compile_named(text)
    except UnknownVariable as exc:
        raise InvalidArgument(str(exc)) from exc
    return text


def parse_when(text: str, zone: ZoneInfo | None) -> datetime:
    """ISO 8601; without an offset it is a wall-clock time in `zone`."""
    try:
        when = datetime.fromisoformat(text.strip())
        if when.tzinfo is None:
            assert zone is not None
            when = when.replace(tzinfo=zone)
        return when.astimezone(UTC)
    except (ValueError, OverflowError) as exc:  # OverflowError: year 1 or 9999 moved out of range
        raise InvalidArgument(f"scheduled_for {text[:40]!r} is not an ISO 8601 date and time") from exc


def check_time(when: datetime, now: datetime) -> datetime:
    if when <= now:
        raise InvalidArgument(f"scheduled_for {when.isoformat()} is in the past")
    if when > now + MAX_AHEAD:
        raise InvalidArgument(f"scheduled_for {when.isoformat()} is more than a year ahead")
    return when


def has_offset(text: str) -> bool:
    try:
        return datetime.fromisoformat(text.strip()).tzinfo is not None
    except ValueError:
        return True  # parse_when says what is wrong with it


def parse_id(text: str, what: str = "message") -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise NotFound(f"{what} {text[:40]} not found")
    return int(text)


def group_ids_of(texts: list[str]) -> list[int]:
    ids: list[int] = []
    for text in texts:
        if not (text.isascii() and text.isdigit()) or len(text) > 18:
            raise InvalidArgument(f"group {text[:40]!r} does not exist")
        ids.append(int(text))
    return list(dict.fromkeys(ids))


@dataclass
class MessageView:
    """A message as the API shows it, with what its row alone cannot tell."""

    row: asyncpg.Record
    groups: list[asyncpg.Record] = field(default_factory=list)
    recipients: int = 0
    delivered: int = 0
    read: int = 0
    delivery_failed: int = 0


@dataclass(frozen=True)
class Preview:
    recipients: int
    unit_price: Decimal
    samples: list[tuple[str, str, str]]  # name, phone, text


@dataclass(frozen=True)
class Stats:
    recipients: int
    sent: int
    delivered: int
    read: int
    failed: int
    pending: int
    delivery_rate: float


def delivery_rate(*, sent: int, failed: int, delivery_failed: int) -> float:
    tried = sent + failed
    return round(100.0 * (sent - delivery_failed) / tried, 1) if tried else 0.0


class Devices:
    """The account's active WhatsApp devices, as the dispatcher (which owns them) lists them."""

    def __init__(self, stub: dispatcher_pb2_grpc.DispatcherServiceStub) -> None:
        self.stub = stub

    async def active(self, account_id: str) -> list[SenderChoice]:
        reply = await self.stub.ListSenders(
            dispatcher_pb2.ListSendersRequest(channel="whatsapp", active_only=True),
            # The devices of the message's account, whoever asks.
            metadata=outgoing_metadata(Caller(role=MEMBER, account_id=account_id, user_id="campaigns-scheduler")),
            timeout=DEVICES_TIMEOUT_S,
        )
        return [SenderChoice(s.id, s.rate_per_minute) for s in reply.senders]


class ScheduledMessages:
    def __init__(
        self,
        repo: MessagesRepo,
        batches: Batches,
        notifier: Notifier,
        credit: Credit,
        devices: Devices,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.repo, self.batches, self.notifier = repo, batches, notifier
        self.credit, self.devices, self.clock = credit, devices, clock

    # --- reading ---

    async def get(self, caller: Caller, message_id: str) -> MessageView:
        account_id = caller.account_scope()
        row = await self.repo.get(message_id=parse_id(message_id), account_id=account_id)
        if row is None:
            raise NotFound(f"message {message_id} not found")
        return (await self._views([row], account_id))[0]

    async def listing(self, caller: Caller, *, state: str, limit: int, offset: int) -> tuple[list[MessageView], int]:
        if state and state not in STATES:
            raise InvalidArgument(f"status must be one of {', '.join(STATES)}")
        if not 1 <= limit <= 1000:
            raise InvalidArgument("limit must be between 1 and 1000")
        if offset < 0:
            raise InvalidArgument("offset must not be negative")
        account_id = caller.account_scope()
        rows, total = await self.repo.list_messages(account_id=account_id, state=state, limit=limit, offset=offset)
        return await self._views(rows, account_id), total

    async def _views(self, rows: list[asyncpg.Record], account_id: str) -> list[MessageView]:
        ids = [r["message_id"] for r in rows]
        views = {r["message_id"]: MessageView(r) for r in rows}
        for g in await self.repo.groups_of(message_ids=ids, account_id=account_id):
            views[g["message_id"]].groups.append(g)
        waiting = [r["message_id"] for r in rows if r["batch_id"] is None]
        if waiting:
            counts = await self.repo.recipients_of(message_ids=waiting, account_id=account_id)
            for message_id in waiting:
                views[message_id].recipients = counts.get(message_id, 0)
        started = {r["batch_id"]: r["message_id"] for r in rows if r["batch_id"] is not None}
        delivery = await self.repo.delivery_of(batch_ids=list(started))
        for batch_id, message_id in started.items():
            view = views[message_id]
            view.recipients = view.row["total_jobs"]
            if batch_id in delivery:
                d = delivery[batch_id]
                view.delivered, view.read, view.delivery_failed = d["delivered"], d["read"], d["delivery_failed"]
        return [views[i] for i in ids]

    # --- writing ---

    async def zone_for(self, caller: Caller, requested: str = "") -> ZoneInfo:
        """The zone a time without an offset is read in: the one the request names, else the
        user's (the gateway sends it with the caller), else the account's (its own, else its
        country's). Every such lookup goes through here."""
        name = requested.strip() or caller.timezone
        if not name:
            try:
                account = await self.credit.account(caller.account_scope())
                name = account.timezone or COUNTRY_ZONES.get(account.country, DEFAULT_ZONE)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                name = DEFAULT_ZONE  # an operator's account that accounts does not keep
        return known_zone(name)

    async def _when(self, caller: Caller, text: str, timezone: str) -> datetime:
        if timezone.strip():
            zone = await self.zone_for(caller, timezone)  # a bad zone is refused even when unused
        elif has_offset(text):
            zone = None
        else:
            zone = await self.zone_for(caller)
        return check_time(parse_when(text, zone), self.clock())

    async def _groups(self, conn: Any, account_id: str, texts: list[str]) -> list[int]:
        ids = group_ids_of(texts)
        found = await self.repo.own_groups(conn, account_id=account_id, group_ids=ids)
        missing = [str(i) for i in ids if i not in found]
        if missing:
            raise InvalidArgument(f"group {', '.join(missing)} does not exist")
        return ids

    async def create(
        self, caller: Caller, *, content: str, scheduled_for: str, group_ids: list[str], timezone: str
    ) -> MessageView:
        account_id = caller.account_scope()
        check_content(content)
        when = await self._when(caller, scheduled_for, timezone) if scheduled_for.strip() else None
        if timezone.strip() and when is None:
            await self.zone_for(caller, timezone)
        async with self.repo.pool.acquire() as conn, conn.transaction():
            groups = await self._groups(conn, account_id, group_ids)
            message_id = await self.repo.insert(
                conn, account_id=account_id, created_by=caller.user_id, content=content, scheduled_for=when
            )
            await self.repo.add_groups(conn, message_id=message_id, group_ids=groups)
        return await self.get(caller, str(message_id))

    async def update(
        self,
        caller: Caller,
        message_id: str,
        *,
        content: str | None,
        scheduled_for: str | None,
        group_ids: list[str] | None,
        timezone: str,
        unschedule: bool = False,
    ) -> MessageView:
        """Only what is given changes; `unschedule` takes a scheduled message back to draft."""
        account_id = caller.account_scope()
        key = parse_id(message_id)
        if content is not None:
            check_content(content)
        when = await self._when(caller, scheduled_for, timezone) if scheduled_for else None
        async with self.repo.pool.acquire() as conn, conn.transaction():
            row = await self.repo.lock(conn, message_id=key, account_id=account_id)
            if row is None:
                raise NotFound(f"message {message_id} not found")
            if row["status"] not in ("draft", "scheduled"):
                state = await self._state(key, account_id)
                raise Conflict(f"message {message_id} is {state}: only a draft or scheduled message can be edited")
            if scheduled_for == "" and row["status"] == "scheduled" and not unschedule:
                raise InvalidArgument("a scheduled message needs its scheduled_for; cancel it to stop it")
            new_when = row["scheduled_for"] if scheduled_for is None else when
            unscheduled = unschedule and row["status"] == "scheduled"
            if unscheduled:  # first: a draft may lose its time, a scheduled message may not
                await self.repo.set_status(
                    message_id=key, account_id=account_id, status="draft", from_statuses=("scheduled",), conn=conn
                )
            if group_ids is not None:
                groups = await self._groups(conn, account_id, group_ids)
                await self.repo.set_groups(conn, message_id=key, group_ids=groups)
            await self.repo.update(
                conn,
                message_id=key,
                account_id=account_id,
                content=row["content"] if content is None else content,
                scheduled_for=new_when,
            )
            if row["status"] == "scheduled" and not unscheduled:
                # Still scheduled: it must still be sendable, as /schedule would check.
                assert new_when is not None
                check_time(new_when, self.clock())
                await self._check_sendable(conn, key, account_id)
        if unscheduled:
            await self.notifier.message_event(account_id, key, "status", status="draft")
        return await self.get(caller, message_id)

    async def delete(self, caller: Caller, message_id: str) -> None:
        account_id = caller.account_scope()
        key = parse_id(message_id)
        async with self.repo.pool.acquire() as conn, conn.transaction():
            row = await self.repo.lock(conn, message_id=key, account_id=account_id)
            if row is None:
                raise NotFound(f"message {message_id} not found")
            state = await self._state(key, account_id, conn)
            if state in ("sending", "paused"):
                raise Conflict(f"message {message_id} is {state}: cancel it before deleting it")
            await self.repo.delete(conn, message_id=key, account_id=account_id)

    async def duplicate(self, caller: Caller, message_id: str) -> MessageView:
        source = await self.get(caller, message_id)
        account_id = caller.account_scope()
        when = source.row["scheduled_for"]
        async with self.repo.pool.acquire() as conn, conn.transaction():
            copy_id = await self.repo.insert(
                conn,
                account_id=account_id,
                created_by=caller.user_id,
                content=source.row["content"],
                # A time already past is no time for a new draft.
                scheduled_for=when if when is not None and when > self.clock() else None,
            )
            await self.repo.add_groups(conn, message_id=copy_id, group_ids=[g["group_id"] for g in source.groups])
        return await self.get(caller, str(copy_id))

    # --- transitions ---

    async def _state(self, message_id: int, account_id: str, conn: Any = None) -> str:
        row = await self.repo.get(message_id=message_id, account_id=account_id, conn=conn)
        return "deleted" if row is None else str(row["state"])

    async def _check_sendable(self, conn: Any, message_id: int, account_id: str) -> None:
        """What sending needs: recipients in its groups and an active device (409 naming what
        is missing)."""
        missing = []
        # Read on the caller's connection: an edit may have changed the groups in its transaction.
        groups = await self.repo.groups_of(message_ids=[message_id], account_id=account_id, conn=conn)
        if not groups:
            missing.append("at least one group (the message has none)")
        elif await self.repo.count_recipients(message_id=message_id, account_id=account_id, conn=conn) == 0:
            missing.append("a group with active contacts (its groups have none that may be messaged)")
        if not await self.devices.active(account_id):
            missing.append("an active WhatsApp device (connect or activate one)")
        if missing:
            raise Conflict(f"message {message_id} cannot be scheduled: it needs {' and '.join(missing)}")

    async def schedule(self, caller: Caller, message_id: str, *, scheduled_for: str, timezone: str) -> MessageView:
        account_id = caller.account_scope()
        key = parse_id(message_id)
        when = await self._when(caller, scheduled_for, timezone) if scheduled_for.strip() else None
        async with self.repo.pool.acquire() as conn, conn.transaction():
            row = await self.repo.lock(conn, message_id=key, account_id=account_id)
            if row is None:
                raise NotFound(f"message {message_id} not found")
            if row["status"] != "draft":
                state = await self._state(key, account_id, conn)
                raise Conflict(f"message {message_id} is {state}: only a draft can be scheduled")
            when = when or row["scheduled_for"]
            if when is None:
                raise InvalidArgument("scheduled_for is required: say when to send the message")
            check_time(when, self.clock())
            await self._check_sendable(conn, key, account_id)
            await self.repo.schedule(conn, message_id=key, account_id=account_id, scheduled_for=when)
        await self.notifier.message_event(account_id, key, "status", status="scheduled")
        return await self.get(caller, message_id)

    async def pause(self, caller: Caller, message_id: str) -> MessageView:
        view = await self.get(caller, message_id)
        if view.row["state"] != "sending":
            raise Conflict(f"message {message_id} is {view.row['state']}: only a sending message can be paused")
        await self.batches.pause(caller, str(view.row["batch_id"]))
        return await self.get(caller, message_id)

    async def resume(self, caller: Caller, message_id: str) -> MessageView:
        view = await self.get(caller, message_id)
        if view.row["state"] != "paused":
            raise Conflict(f"message {message_id} is {view.row['state']}: only a paused message can be resumed")
        await self.batches.resume(caller, str(view.row["batch_id"]))
        return await self.get(caller, message_id)

    async def cancel(self, caller: Caller, message_id: str) -> MessageView:
        account_id = caller.account_scope()
        key = parse_id(message_id)
        # Before it starts there is no batch: the message alone is cancelled. Should the due
        # loop have started it meanwhile, its batch is.
        if await self.repo.set_status(
            message_id=key, account_id=account_id, status="cancelled", from_statuses=("draft", "scheduled")
        ):
            await self.notifier.message_event(account_id, key, "status", status="cancelled")
            return await self.get(caller, message_id)
        view = await self.get(caller, message_id)
        if view.row["state"] not in ("sending", "paused"):
            state = view.row["state"]
            raise Conflict(
                f"message {message_id} is {state}: only a draft, scheduled, sending or paused one can be cancelled"
            )
        await self.batches.cancel(caller, str(view.row["batch_id"]), "cancelled by user")
        return await self.get(caller, message_id)

    # --- figures ---

    async def preview(self, caller: Caller, message_id: str) -> Preview:
        view = await self.get(caller, message_id)
        row = view.row
        template = compile_named(row["content"])
        if row["batch_id"] is not None:
            jobs = await self.repo.first_jobs(batch_id=row["batch_id"], limit=SAMPLES)
            people = [(j["vals"][0], j["phone"]) for j in jobs]
        else:
            first = await self.repo.first_recipients(
                message_id=row["message_id"], account_id=row["account_id"], limit=SAMPLES
            )
            people = [(r["name"], r["phone"]) for r in first]
        try:
            price = (await self.credit.price(row["account_id"])).each
        except NoCredit:
            price = Decimal(0)  # an account that cannot send now has no price to quote
        samples = [(name, phone, template.render([name, phone])) for name, phone in people]
        return Preview(recipients=view.recipients, unit_price=price, samples=samples)

    async def stats(self, caller: Caller, message_id: str) -> Stats:
        view = await self.get(caller, message_id)
        r = view.row
        resolved = r["sent_jobs"] + r["failed_jobs"] + r["cancelled_jobs"] + r["unknown_jobs"]
        return Stats(
            recipients=view.recipients,
            sent=r["sent_jobs"],
            delivered=view.delivered,
            read=view.read,
            failed=r["failed_jobs"] + view.delivery_failed,
            pending=max(r["total_jobs"] - resolved, 0) if r["batch_id"] is not None else view.recipients,
            delivery_rate=delivery_rate(
                sent=r["sent_jobs"], failed=r["failed_jobs"], delivery_failed=view.delivery_failed
            ),
        )

    async def dashboard(self, caller: Caller) -> tuple[dict[str, Any], list[MessageView]]:
        account_id = caller.account_scope()
        zone = await self.zone_for(caller)
        midnight = datetime.now(zone).replace(hour=0, minute=0, second=0, microsecond=0)
        figures = await self.repo.dashboard(account_id=account_id, today=midnight)
        figures["delivery_rate"] = delivery_rate(
            sent=figures["sent"], failed=figures["failed"], delivery_failed=figures["delivery_failed"]
        )
        return figures, await self._views(list(figures["upcoming"]), account_id)


class DueMessages:
    """The due loop: starts each message that has fallen due, one transaction per message."""

    def __init__(
        self,
        repo: MessagesRepo,
        notifier: Notifier,
        devices: Devices,
        *,
        on_started: Callable[[], None],
        idle_wait: float = DUE_POLL_S,
    ) -> None:
        self.repo, self.notifier, self.devices = repo, notifier, devices
        self.on_started = on_started
        self.rounds = Rounds(self.round, name="due-messages", idle_wait=idle_wait)

    async def run(self) -> None:
        await self.rounds.run()

    async def round(self) -> int:
        started = 0
        while await self.start_one():
            started += 1
        return started

    async def start_one(self) -> bool:
        """Start the next due message, if any; False when none is due."""
        async with self.repo.pool.acquire() as conn, conn.transaction():
            message = await self.repo.claim_due(conn)
            if message is None:
                return False
            message_id, account_id = message["message_id"], message["account_id"]
            late = datetime.now(UTC) - message["scheduled_for"] > LATE_AFTER
            senders = await self.devices.active(account_id)
            batch_id: UUID | None = None
            if not senders:
                reason = "no active WhatsApp device when it fell due"
            else:
                batch_id, total = await self.repo.create_batch(
                    conn, message=message, sender_ids=[s.id for s in senders], window_size=window_for(senders)
                )
                reason = "" if total else "no recipients when it fell due: its groups had no active contacts"
            if reason:
                await self.repo.fail(conn, message_id=message_id, reason=reason)
            else:
                assert batch_id is not None
                await self.repo.start(conn, message_id=message_id, batch_id=batch_id, late=late)
        # Committed: it has started (or failed) once and for all; what follows only informs.
        try:
            if reason:
                log.warning("message %s failed: %s", message_id, reason)
                await self.notifier.message_event(account_id, message_id, "status", status="failed")
            else:
                log.info("message %s started as batch %s (%d recipients)", message_id, batch_id, total)
                await self.notifier.run_state(batch_id, "active")
                await self.notifier.message_event(account_id, message_id, "status", status="sending", late=late)
                self.on_started()
        except Exception:  # noqa: BLE001
            log.exception("publishing the start of message %s failed", message_id)
        return True
