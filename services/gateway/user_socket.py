"""Live pushes on `/ws/{user_id}`, from NATS to the sockets of this process: notifications
(`events.notification.<account_id>`), scheduled messages' transitions and progress
(`events.message.<account_id>`) and WhatsApp devices' states (`events.device.<account_id>`).
One core-NATS subscription per subject family and process; the callbacks only enqueue (bounded
per socket, the oldest dropped), never await a socket. Members get their own account's events,
admins every account's.

Progress goes only to the sockets that asked for that message (`subscribe_message`), at most
once a second per socket and message: a newer one waiting for its turn replaces the older,
and a run's final one goes at once, so the last counters a client sees are the true ones."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

from google.protobuf.message import DecodeError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pregonero.accounts.v1 import notifications_pb2
from pregonero.events.v1 import events_pb2
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.runtime.identity import Caller
from services.runtime.protos import from_timestamp, iso

from .job_socket import CLOSE_GOING_AWAY, Sink

log = logging.getLogger("pregonero.gateway.user_socket")

SUBJECT_PREFIX = "events.notification."
MESSAGE_SUBJECTS = "events.message.>"
DEVICE_SUBJECTS = "events.device.>"
Message = dict[str, Any]

# message_progress per socket and message, at most once in this many seconds (the guide's pace).
PROGRESS_INTERVAL_S = 1.0
# What one socket may follow: enough for a screen of messages, not a way to hold memory.
MAX_WATCHED = 100
MAX_MESSAGE_ID = 64
WATCH_TYPES = frozenset({"subscribe_message", "unsubscribe_message"})


# What a notification is about, from the ids its data carries, most specific first: a
# scheduled message, a group, a contact; else a WhatsApp bulk job or a voice campaign (both
# `batch_*` kinds, told apart by channel); else the account (credit, suspension).
_ENTITY_KEYS = (("message_id", "message"), ("group_id", "group"), ("contact_id", "contact"))


def related_entity(kind: str, data: dict[str, Any], account_id: str) -> tuple[str | None, str | None]:
    for key, entity in _ENTITY_KEYS:
        if data.get(key):
            return entity, str(data[key])
    if kind.startswith("batch_") and data.get("job_id"):
        return ("batch" if data.get("channel") == "voice" else "job"), str(data["job_id"])
    if kind.startswith(("credit_", "account_")):
        return "account", account_id
    return None, None


def notification_json(n: notifications_pb2.Notification) -> Message:
    """As the seed's dashboards read it: `type` is the level (success|error|warning|info);
    and in the scheduler guide's names beside (`is_read`, `created_at`, `related_entity_*`)."""
    try:
        data = json.loads(n.data_json) if n.data_json else {}
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    created_at = iso(from_timestamp(n.created_at))
    entity_type, entity_id = related_entity(n.kind, data, n.account_id)
    return {
        "id": n.id,
        "type": n.level,
        "kind": n.kind,
        "title": n.title,
        "message": n.message,
        "account_id": n.account_id,
        "user_id": n.user_id or None,
        "data": data,
        "read": n.read,
        "is_read": n.read,
        "timestamp": created_at,
        "created_at": created_at,
        "read_at": iso(from_timestamp(n.read_at)),
        "related_entity_type": entity_type,
        "related_entity_id": entity_id,
    }


def message_status_json(event: events_pb2.MessageEvent) -> Message:
    message: Message = {
        "type": "message_status_update",
        "message_id": event.message_id,
        "status": event.status,
        "timestamp": iso(from_timestamp(event.at)),
    }
    if event.late:
        message["late"] = True
    return message


def message_progress_json(event: events_pb2.MessageEvent) -> Message:
    return {
        "type": "message_progress",
        "message_id": event.message_id,
        "sent": event.sent,
        "total": event.total,
        "failed": event.failed,
    }


def whatsapp_status_json(event: events_pb2.DeviceEvent) -> Message:
    message: Message = {"type": "whatsapp_status", "status": event.status, "device_id": event.sender_id}
    if event.status == "qr_needed" and event.qr_code:
        message["qr_code"] = event.qr_code
    return message


class WatchRequest(BaseModel):
    """`{"type": "subscribe_message" | "unsubscribe_message", "message_id": ...}` from a client."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, str_strip_whitespace=True)

    type: Literal["subscribe_message", "unsubscribe_message"]
    message_id: str = Field(min_length=1, max_length=MAX_MESSAGE_ID)


def _invalid(exc: ValidationError) -> Message:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "message"
    return {"type": "error", "error": "invalid_request", "message": f"{where}: {first['msg']}"}


@dataclass(slots=True)
class _Pace:
    """One followed message on one socket: when its last progress went, and the newest one
    waiting for its turn."""

    last: float = -math.inf
    waiting: Message | None = None
    timer: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.waiting = None


class NotificationSocket:
    """One socket: a bounded queue and the task that writes it."""

    def __init__(self, caller: Caller, sink: Sink, *, max_pending: int, send_timeout: float) -> None:
        self.caller = caller
        self.sink = sink
        self.send_timeout = send_timeout
        self.queue: asyncio.Queue[Message] = asyncio.Queue(max_pending)
        self.dropped = 0
        self.task: asyncio.Task[None] | None = None
        self.watching: dict[str, _Pace] = {}

    def offer(self, message: Message) -> None:
        """Never waits: a client that does not read loses its oldest pending message."""
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(message)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="notification-writer")

    def offer_progress(self, message_id: str, message: Message, *, final: bool) -> None:
        """Now if the last one went a second ago or more (or this is the run's last), else
        when the second is up; a newer one replaces the one waiting."""
        pace = self.watching.get(message_id)
        if pace is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if final or now - pace.last >= PROGRESS_INTERVAL_S:
            pace.cancel()
            pace.last = now
            self.offer(message)
            return
        pace.waiting = message
        if pace.timer is None:
            pace.timer = loop.call_at(pace.last + PROGRESS_INTERVAL_S, self._progress_due, message_id)

    def _progress_due(self, message_id: str) -> None:
        pace = self.watching.get(message_id)
        if pace is None or pace.waiting is None:
            return
        message = pace.waiting
        pace.timer, pace.waiting = None, None
        pace.last = asyncio.get_running_loop().time()
        self.offer(message)

    async def _run(self) -> None:
        try:
            while True:
                message = await self.queue.get()
                async with asyncio.timeout(self.send_timeout):
                    await self.sink.send_json(message)
        except Exception as exc:  # noqa: BLE001 - a failed or stuck send ends this socket only
            log.debug("notification socket ended: %r", exc)

    async def stop(self) -> None:
        for pace in self.watching.values():
            pace.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


class NotificationHub:
    def __init__(self, *, max_pending: int = 256, send_timeout: float = 30.0) -> None:
        self.max_pending = max_pending
        self.send_timeout = send_timeout
        # Members by account; admins see every account's.
        self.by_account: dict[str, set[NotificationSocket]] = {}
        self.admins: set[NotificationSocket] = set()
        # The sockets following each message's progress.
        self.watchers: dict[str, set[NotificationSocket]] = {}
        self._nats_subs: list[Subscription] = []

    async def start(self, nc: NATS | None) -> None:
        if nc is None:
            raise RuntimeError("notification hub needs a NATS connection")
        self._nats_subs = [
            await nc.subscribe(SUBJECT_PREFIX + ">", cb=self.on_message),
            await nc.subscribe(MESSAGE_SUBJECTS, cb=self.on_message_event),
            await nc.subscribe(DEVICE_SUBJECTS, cb=self.on_device_event),
        ]
        await nc.flush()

    async def stop(self) -> None:
        for sub in self._nats_subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._nats_subs = []
        self.watchers.clear()
        socks = [*self.admins, *(s for group in self.by_account.values() for s in group)]
        self.admins.clear()
        self.by_account.clear()
        for sock in socks:
            await sock.stop()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await sock.sink.close(CLOSE_GOING_AWAY)

    def subscribe(self, caller: Caller, sink: Sink) -> NotificationSocket:
        sock = NotificationSocket(caller, sink, max_pending=self.max_pending, send_timeout=self.send_timeout)
        if caller.is_admin:
            self.admins.add(sock)
        else:
            self.by_account.setdefault(caller.account_id, set()).add(sock)
        return sock

    def unsubscribe(self, sock: NotificationSocket) -> None:
        for message_id in list(sock.watching):
            self._unwatch(sock, message_id)
        self.admins.discard(sock)
        group = self.by_account.get(sock.caller.account_id)
        if group is not None:
            group.discard(sock)
            if not group:
                del self.by_account[sock.caller.account_id]

    async def on_message(self, msg: Msg) -> None:
        try:
            notification = notifications_pb2.Notification.FromString(msg.data)
        except DecodeError:
            log.warning("undecodable notification on %s", msg.subject)
            return
        self.publish(notification)

    def publish(self, notification: notifications_pb2.Notification) -> None:
        targets = [*self.admins]
        for sock in self.by_account.get(notification.account_id, ()):
            # A user's own notification goes to that user only; account-wide ones to all.
            if not notification.user_id or sock.caller.user_id == notification.user_id:
                targets.append(sock)
        if not targets:
            return
        message = {"type": "new_notification", "notification": notification_json(notification)}
        for sock in targets:
            sock.offer(message)

    def client_request(self, sock: NotificationSocket, data: dict[str, Any]) -> None:
        """A socket's `subscribe_message` / `unsubscribe_message`; the answer is queued on it."""
        try:
            request = WatchRequest.model_validate(data)
        except ValidationError as exc:
            sock.offer(_invalid(exc))
            return
        message_id = request.message_id
        if request.type == "unsubscribe_message":
            self._unwatch(sock, message_id)
            sock.offer({"type": "unsubscribed", "message_id": message_id})
            return
        if message_id not in sock.watching:
            if len(sock.watching) >= MAX_WATCHED:
                sock.offer(
                    {
                        "type": "error",
                        "error": "too_many_subscriptions",
                        "message": f"at most {MAX_WATCHED} messages per socket: unsubscribe from one first",
                        "message_id": message_id,
                    }
                )
                return
            sock.watching[message_id] = _Pace()
            self.watchers.setdefault(message_id, set()).add(sock)
        sock.offer({"type": "subscribed", "message_id": message_id})

    def _unwatch(self, sock: NotificationSocket, message_id: str) -> None:
        pace = sock.watching.pop(message_id, None)
        if pace is not None:
            pace.cancel()
        group = self.watchers.get(message_id)
        if group is not None:
            group.discard(sock)
            if not group:
                del self.watchers[message_id]

    def _sees(self, sock: NotificationSocket, account_id: str) -> bool:
        return sock.caller.is_admin or sock.caller.account_id == account_id

    def _account_sockets(self, account_id: str) -> list[NotificationSocket]:
        return [*self.admins, *self.by_account.get(account_id, ())]

    async def on_message_event(self, msg: Msg) -> None:
        try:
            event = events_pb2.MessageEvent.FromString(msg.data)
        except DecodeError:
            log.warning("undecodable message event on %s", msg.subject)
            return
        event.account_id = event.account_id or msg.subject.rpartition(".")[2]
        self.publish_message_event(event)

    def publish_message_event(self, event: events_pb2.MessageEvent) -> None:
        if event.type == "status":
            message = message_status_json(event)
            for sock in self._account_sockets(event.account_id):
                sock.offer(message)
        elif event.type == "progress":
            watchers = self.watchers.get(event.message_id)
            if not watchers:
                return
            message = message_progress_json(event)
            for sock in list(watchers):
                if self._sees(sock, event.account_id):
                    sock.offer_progress(event.message_id, message, final=event.final)

    async def on_device_event(self, msg: Msg) -> None:
        try:
            event = events_pb2.DeviceEvent.FromString(msg.data)
        except DecodeError:
            log.warning("undecodable device event on %s", msg.subject)
            return
        event.account_id = event.account_id or msg.subject.rpartition(".")[2]
        self.publish_device_event(event)

    def publish_device_event(self, event: events_pb2.DeviceEvent) -> None:
        message = whatsapp_status_json(event)
        for sock in self._account_sockets(event.account_id):
            sock.offer(message)
