"""Live notifications: `events.notification.<account_id>` from NATS fanned out to the
`/ws/{user_id}` sockets of this process. One core-NATS subscription per process; the
callback only enqueues (bounded per socket, the oldest dropped), never awaits a socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from google.protobuf.message import DecodeError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pregonero.accounts.v1 import notifications_pb2

from services.runtime.identity import Caller
from services.runtime.protos import from_timestamp, iso

from .live import CLOSE_GOING_AWAY, Sink

log = logging.getLogger("pregonero.gateway.notify_live")

SUBJECT_PREFIX = "events.notification."
Message = dict[str, Any]


def notification_json(n: notifications_pb2.Notification) -> Message:
    """As the seed's dashboards read it: `type` is the level (success|error|warning|info)."""
    try:
        data = json.loads(n.data_json) if n.data_json else {}
    except ValueError:
        data = {}
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
        "timestamp": iso(from_timestamp(n.created_at)),
        "read_at": iso(from_timestamp(n.read_at)),
    }


class NotificationSocket:
    """One socket: a bounded queue and the task that writes it."""

    def __init__(self, caller: Caller, sink: Sink, *, max_pending: int, send_timeout: float) -> None:
        self.caller = caller
        self.sink = sink
        self.send_timeout = send_timeout
        self.queue: asyncio.Queue[Message] = asyncio.Queue(max_pending)
        self.dropped = 0
        self.task: asyncio.Task[None] | None = None

    def offer(self, message: Message) -> None:
        """Never waits: a client that does not read loses its oldest pending message."""
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(message)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="notification-writer")

    async def _run(self) -> None:
        try:
            while True:
                message = await self.queue.get()
                async with asyncio.timeout(self.send_timeout):
                    await self.sink.send_json(message)
        except Exception as exc:  # noqa: BLE001 - a failed or stuck send ends this socket only
            log.debug("notification socket ended: %r", exc)

    async def stop(self) -> None:
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
        self._nats_sub: Subscription | None = None

    async def start(self, nc: NATS | None) -> None:
        if nc is None:
            raise RuntimeError("notification hub needs a NATS connection")
        self._nats_sub = await nc.subscribe(SUBJECT_PREFIX + ">", cb=self.on_message)
        await nc.flush()

    async def stop(self) -> None:
        if self._nats_sub is not None:
            with contextlib.suppress(Exception):
                await self._nats_sub.unsubscribe()
            self._nats_sub = None
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
