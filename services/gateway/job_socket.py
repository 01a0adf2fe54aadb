"""Live progress of WhatsApp bulk jobs: BatchEvents from NATS fanned out to local WebSockets.

One core-NATS subscription per gateway process (`events.batch.>`); any replica can serve any
job's socket. The NATS callback only renders and enqueues, never awaits a socket: each socket
has a bounded queue and its own writer task, so a slow client only ever loses its own
per-recipient detail (coalesced into the latest counters), never slows the others.

A (re)connecting socket first gets the job's state (`render_snapshot`): a running job's
`job_started` and its counters with the last recipient, or its end. The bulk sender's app
reconnects whenever its job history changes, and learning a job's end changes it; so a job's
end is told once to each client (`Ends`): a later socket of the same client gets a neutral
`job_status` and stays open, as the original backend's did, while a client whose socket dropped
just before the end still learns it. That memory is per process: behind several replicas a
client may be told once by each."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf.message import DecodeError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pregonero.campaigns.v1 import campaigns_pb2
from pregonero.events.v1 import events_pb2

log = logging.getLogger("pregonero.gateway.job_socket")

SUBJECT_PREFIX = "events.batch."
Message = dict[str, Any]

# Going away: the client reconnects (to another replica) on 1001.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001


class Kind(enum.Enum):
    STREAM = "stream"  # may be dropped under pressure, coalesced into the latest counters
    STATE = "state"  # paused/resumed/cancelled: under pressure only the latest is kept
    TERMINAL = "terminal"  # always delivered, then the socket closes


@dataclass(frozen=True, slots=True)
class Push:
    """One BatchEvent rendered for the socket; shared by every subscriber of the batch."""

    kind: Kind
    messages: tuple[Message, ...]
    # The counters snapshot after this event (progress events only), used when coalescing.
    counters: Message | None = None


def percentage(sent: int, failed: int, total: int) -> float:
    return round(100 * (sent + failed) / total, 1) if total else 0.0


def _progress(sent: int, failed: int, total: int) -> dict[str, Any]:
    return {"sent": sent, "failed": failed, "total": total, "percentage": percentage(sent, failed, total)}


def counters_message(job_id: str, sent: int, failed: int, total: int) -> Message:
    return {"type": "progress", "job_id": job_id, "progress": _progress(sent, failed, total)}


# What a socket of a job that ended gets once its client has been told the end.
STATUS_TYPE = "job_status"
# How long a client is remembered as told of a job's end, and how many such pairs at most.
ENDS_TTL_S = 600.0
ENDS_MAX = 20_000

_STATE_TYPES = {
    "paused": ("job_paused", "Envío masivo pausado"),
    "resumed": ("job_resumed", "Envío masivo reanudado"),
    "cancelled": ("job_cancelled", "Envío masivo cancelado"),
    "suspended": ("job_suspended", "Envío masivo suspendido: saldo insuficiente"),
}


def render(event: events_pb2.BatchEvent) -> Push | None:
    """The socket events of one BatchEvent, in order; None for a type clients do not know."""
    job_id = event.batch_id
    kind = event.type
    if kind == "progress":
        return _render_progress(event)
    if kind == "job_started":
        message = f"Iniciando envío masivo de {event.total} mensajes"
        return Push(Kind.STREAM, ({"type": "job_started", "job_id": job_id, "message": message},))
    if kind == "chunk_processing":
        start, end, total = event.chunk_start, event.chunk_end, event.total
        chunk = {
            "type": "chunk_processing",
            "job_id": job_id,
            "chunk_start": start,
            "chunk_end": end,
            "total": total,
            "message": f"Procesando chunk {start}-{end} de {total}",
        }
        return Push(Kind.STREAM, (chunk,))
    if kind == "job_completed":
        results = {
            "sent": event.sent,
            "failed": event.failed,
            "total": event.total,
            "devices_used": event.devices_used,
            "parallel_workers": event.parallel_workers,
        }
        done = {"type": "job_completed", "job_id": job_id, "status": event.status or "completed", "results": results}
        return Push(Kind.TERMINAL, (done,))
    if kind == "job_failed":
        error = event.error or "error"
        message = event.message or f"{error}: {event.sent} enviados y {event.failed} fallidos de {event.total}"
        failed = {"type": "job_failed", "job_id": job_id, "error": error, "message": message}
        return Push(Kind.TERMINAL, (failed,))
    if kind in _STATE_TYPES:
        socket_type, default_message = _STATE_TYPES[kind]
        state = {"type": socket_type, "job_id": job_id, "message": event.message or default_message}
        return Push(Kind.STATE, (state,))
    return None


def _render_progress(event: events_pb2.BatchEvent) -> Push:
    """Counters are those after the whole chunk; each outcome gets the counters as they were
    right after it, so they rise one by one and the last equals the event's. A sent recipient
    is a `progress`, a failed one an `error`, as the bulk-send guide has it (the app logs every
    `progress` as sent)."""
    job_id, total = event.batch_id, event.total
    outcomes = [o for o in event.outcomes if o.status in ("sent", "failed")]
    sent_after = sum(1 for o in outcomes if o.status == "sent")
    failed_after = len(outcomes) - sent_after
    messages: list[Message] = []
    for outcome in outcomes:
        if outcome.status == "sent":
            sent_after -= 1
        else:
            failed_after -= 1
        # sent_after / failed_after now count the outcomes after this one.
        progress = _progress(max(0, event.sent - sent_after), max(0, event.failed - failed_after), total)
        messages.append(_recipient_message(job_id, outcome, progress))
    counters = counters_message(job_id, event.sent, event.failed, total)
    return Push(Kind.STREAM, tuple(messages) or (counters,), counters)


def _recipient_message(job_id: str, outcome: events_pb2.JobOutcome, progress: dict[str, Any]) -> Message:
    who = {"device_id": outcome.sender_id, "phone": outcome.to}
    if outcome.status == "failed":
        return {"type": "error", "job_id": job_id, **who, "error": outcome.error, "progress": progress}
    return {"type": "progress", "job_id": job_id, **who, "status": outcome.status, "progress": progress}


def render_snapshot(event: events_pb2.BatchEvent) -> Push | None:
    """The state a (re)connecting socket starts from (see `batch_event`): the job's end; or,
    once it has started, `job_started`, the counters with the last recipient (the app drops a
    `progress` without `phone`) and its pause or suspension; or, before, the counters."""
    if event.type != "job_started":
        return render(event)
    job_id = event.batch_id
    messages: list[Message] = [
        {"type": "job_started", "job_id": job_id, "message": f"Iniciando envío masivo de {event.total} mensajes"}
    ]
    counters = counters_message(job_id, event.sent, event.failed, event.total)
    # The last one sent when there is one: a failed one would be an `error`, logged again.
    last = next((o for o in event.outcomes if o.status == "sent"), None) or next(iter(event.outcomes), None)
    messages.append(counters if last is None else _recipient_message(job_id, last, counters["progress"]))
    if event.status in _STATE_TYPES:
        socket_type, default_message = _STATE_TYPES[event.status]
        messages.append({"type": socket_type, "job_id": job_id, "message": default_message})
    return Push(Kind.STREAM, tuple(messages), counters)


def status_message(event: events_pb2.BatchEvent) -> Message:
    """A finished job's state for a client already told its end: a type the app ignores."""
    return {
        "type": STATUS_TYPE,
        "job_id": event.batch_id,
        "status": event.status or ("failed" if event.type == "job_failed" else "completed"),
        "progress": _progress(event.sent, event.failed, event.total),
        "message": "El job ya terminó",
    }


def batch_event(batch: campaigns_pb2.Batch) -> events_pb2.BatchEvent:
    """The state of a batch as the event a late subscriber needs (`render_snapshot`): its end;
    `job_started` once it has started, with the last recipient sent and failed; else `progress`."""
    p = batch.progress
    event = events_pb2.BatchEvent(
        batch_id=batch.batch_id,
        account_id=batch.account_id,
        sent=p.sent,
        failed=p.failed,
        total=p.total,
        status=batch.status,
        devices_used=batch.devices_used,
        # Live events count the senders the batch may use, which is its devices_limit.
        parallel_workers=batch.devices_limit or batch.devices_used,
    )
    if batch.status in ("completed", "cancelled"):
        event.type = "job_completed"
    elif batch.status == "failed":
        event.type = "job_failed"
        event.error = batch.error or "failed"
        event.message = batch.error or "El envío masivo falló"
    elif batch.status == "processing" or batch.HasField("started_at"):
        event.type = "job_started"
        for status, last in (("sent", batch.last_sent), ("failed", batch.last_failed)):
            if last.to:
                event.outcomes.append(
                    events_pb2.JobOutcome(status=status, to=last.to, sender_id=last.sender_id, error=last.error)
                )
    else:
        event.type = "progress"
    return event


def end_signature(message: Message) -> tuple[Any, ...]:
    """What makes two renderings of a job's end the same end (a retried job ends anew)."""
    results = message.get("results") or {}
    return (
        message.get("type"),
        message.get("status"),
        results.get("sent"),
        results.get("failed"),
        results.get("total"),
        message.get("error"),
        message.get("message"),
    )


class Ends:
    """Which clients were told which job's end, for a while: (job, client) → (end, when)."""

    def __init__(self, *, ttl: float = ENDS_TTL_S, size: int = ENDS_MAX, clock: Callable[[], float]) -> None:
        self.ttl, self.size, self.clock = ttl, size, clock
        self._told: OrderedDict[tuple[str, str], tuple[tuple[Any, ...], float]] = OrderedDict()

    def tell(self, batch_id: str, client: str, end: Message) -> None:
        key = (batch_id, client)
        self._told.pop(key, None)
        self._told[key] = (end_signature(end), self.clock())
        while len(self._told) > self.size:
            self._told.popitem(last=False)

    def told(self, batch_id: str, client: str, end: Message) -> bool:
        entry = self._told.get((batch_id, client))
        return entry is not None and entry[0] == end_signature(end) and self.clock() - entry[1] < self.ttl


class Sink(Protocol):
    """What a subscriber writes to; Starlette's WebSocket is one."""

    async def send_json(self, data: Any) -> None: ...

    async def close(self, code: int) -> None: ...


class Subscriber:
    """One socket: a bounded queue of pushes and the writer task that drains it.

    `offer` and `reply` are synchronous and never wait on the socket. When the queue is full a
    stream push is dropped and a coalesced counters event is owed; it is queued as soon as the
    writer frees room, ahead of anything newer, so what the client sees stays in order."""

    def __init__(
        self,
        batch_id: str,
        sink: Sink,
        *,
        max_pending: int,
        send_timeout: float,
        on_done: Callable[[Subscriber], None],
        on_end: Callable[[Subscriber, Message], None] = lambda sub, end: None,
        client: str = "",
    ) -> None:
        self.batch_id = batch_id
        self.sink = sink
        self.client = client
        self.max_pending = max_pending
        self.send_timeout = send_timeout
        self.dropped = 0  # socket events not delivered because the client was slow
        self.queued = 0  # socket events waiting in `queue`
        self.queue: deque[tuple[Message, ...]] = deque()
        self.latest: Message | None = None
        self.owe_counters = False
        self.owed_state: tuple[Message, ...] | None = None
        self.terminal: Message | None = None
        self.task: asyncio.Task[None] | None = None
        self.finished = False
        self._on_done = on_done
        self._on_end = on_end
        self._started = False  # job_started sent: the snapshot's and a live one are the same news
        self._wakeup = asyncio.Event()

    def _fits(self, n: int) -> bool:
        # An idle socket takes a push even when it is larger than the bound: a results chunk
        # may expand to more per-recipient events than the bound, and a fast client must get them.
        return not self.queue or self.queued + n <= self.max_pending

    def _put(self, messages: tuple[Message, ...]) -> None:
        self.queue.append(messages)
        self.queued += len(messages)

    def _settle(self) -> bool:
        """Queue what is owed if there is room; True when nothing is owed any more."""
        if self.owed_state is not None:
            if not self._fits(1):
                return False
            self._put(self.owed_state)
            self.owed_state = None
        if self.owe_counters and self.latest is not None:
            if not self._fits(1):
                return False
            self._put((self.latest,))
        self.owe_counters = False
        return True

    def offer(self, push: Push) -> None:
        if self.terminal is not None or self.finished:
            return
        if push.counters is not None:
            self.latest = push.counters
        if push.kind is Kind.TERMINAL:
            self.terminal = push.messages[0]
        elif self._settle() and self._fits(len(push.messages)):
            self._put(push.messages)
        elif push.kind is Kind.STATE:
            self.dropped += len(self.owed_state or ())
            self.owed_state = push.messages
        else:
            self.dropped += len(push.messages)
            self.owe_counters = True
        self._wakeup.set()

    def reply(self, message: Message) -> None:
        """An answer to the client (pong): sent in turn, or dropped if the client is not reading."""
        if self.finished or self.terminal is not None:
            return
        if self._settle() and self._fits(1):
            self._put((message,))
            self._wakeup.set()
        else:
            self.dropped += 1

    def start(self, prelude: Iterable[Message], snapshot: Push | None) -> None:
        """Start writing: `prelude` and the snapshot first, then what arrived meanwhile (it
        may be older than the snapshot, which is harmless: counters only rise)."""
        first: list[Message] = list(prelude)
        if snapshot is not None and snapshot.kind is Kind.TERMINAL:
            # A finished job: what was buffered meanwhile adds nothing to its end.
            self.queue.clear()
            self.queued, self.owe_counters, self.owed_state = 0, False, None
            self.terminal = self.terminal or snapshot.messages[0]
        elif snapshot is not None:
            first.extend(snapshot.messages)
            self.latest = self.latest or snapshot.counters
        if first:
            self.queue.appendleft(tuple(first))
            self.queued += len(first)
        self.task = asyncio.create_task(self._run(), name=f"live-writer-{self.batch_id}")

    async def _send(self, message: Message) -> None:
        async with asyncio.timeout(self.send_timeout):
            await self.sink.send_json(message)

    async def _run(self) -> None:
        try:
            while True:
                self._settle()
                if self.queue:
                    item = self.queue.popleft()
                    self.queued -= len(item)
                    self._settle()
                    for message in item:
                        if message["type"] == "job_started":
                            if self._started:
                                continue
                            self._started = True
                        await self._send(message)
                elif self.terminal is not None:
                    await self._send(self.terminal)
                    self._on_end(self, self.terminal)
                    await self.close(CLOSE_NORMAL)
                    return
                else:
                    self._wakeup.clear()
                    await self._wakeup.wait()
        except Exception as exc:  # noqa: BLE001 - a failed or stuck send ends this socket only
            log.debug("live socket for %s ended: %r", self.batch_id, exc)
        finally:
            self.finished = True
            self._on_done(self)

    async def close(self, code: int) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self.sink.close(code)

    async def stop(self) -> None:
        self.finished = True
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


class LiveHub:
    """Fans BatchEvents out to the sockets of this process."""

    def __init__(
        self,
        *,
        max_pending: int = 2048,
        send_timeout: float = 30.0,
        dedup_window: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_pending = max_pending
        self.send_timeout = send_timeout
        self.subscribers: dict[str, set[Subscriber]] = {}
        self.ends = Ends(clock=clock)
        self._nats_sub: Subscription | None = None
        # A publisher that retries sends the same Nats-Msg-Id twice; the stream drops the
        # copy, but core subscribers see both.
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._dedup_window = dedup_window

    async def start(self, nc: NATS | None) -> None:
        if nc is None:
            raise RuntimeError("live hub needs a NATS connection")
        self._nats_sub = await nc.subscribe(SUBJECT_PREFIX + ">", cb=self.on_message)
        await nc.flush()  # the server has the interest before the first socket subscribes

    async def stop(self) -> None:
        if self._nats_sub is not None:
            with contextlib.suppress(Exception):
                await self._nats_sub.unsubscribe()
            self._nats_sub = None
        subs = [s for group in self.subscribers.values() for s in group]
        self.subscribers.clear()
        for sub in subs:
            await sub.stop()
        await asyncio.gather(*(sub.close(CLOSE_GOING_AWAY) for sub in subs))

    def subscribe(self, batch_id: str, sink: Sink, *, client: str = "") -> Subscriber:
        """Register a socket of `client` (its address); it buffers (bounded) until `Subscriber.start`."""
        sub = Subscriber(
            batch_id,
            sink,
            max_pending=self.max_pending,
            send_timeout=self.send_timeout,
            on_done=self.unsubscribe,
            on_end=lambda s, end: self.ends.tell(s.batch_id, s.client, end),
            client=client,
        )
        self.subscribers.setdefault(batch_id, set()).add(sub)
        return sub

    def opening(self, sub: Subscriber, event: events_pb2.BatchEvent) -> Push | None:
        """What a new socket starts from: the job's state, its end only if its client has not
        been told that end (else a neutral `job_status`, and the socket stays open)."""
        push = render_snapshot(event)
        if push is None or push.kind is not Kind.TERMINAL:
            return push
        if self.ends.told(sub.batch_id, sub.client, push.messages[0]):
            return Push(Kind.STATE, (status_message(event),))
        return push

    def rekey(self, sub: Subscriber, batch_id: str) -> None:
        """Follow the canonical batch id when the client connected with another form of it."""
        self.unsubscribe(sub)
        sub.batch_id = batch_id
        self.subscribers.setdefault(batch_id, set()).add(sub)

    def unsubscribe(self, sub: Subscriber) -> None:
        group = self.subscribers.get(sub.batch_id)
        if group is not None:
            group.discard(sub)
            if not group:
                del self.subscribers[sub.batch_id]

    async def on_message(self, msg: Msg) -> None:
        """The NATS callback: nothing in it waits, so one slow socket never delays the next message."""
        batch_id = msg.subject[len(SUBJECT_PREFIX) :]
        if batch_id not in self.subscribers:
            return
        msg_id = (msg.headers or {}).get("Nats-Msg-Id")
        if msg_id:
            if msg_id in self._seen:
                return
            self._seen[msg_id] = None
            if len(self._seen) > self._dedup_window:
                self._seen.popitem(last=False)
        try:
            event = events_pb2.BatchEvent.FromString(msg.data)
        except DecodeError:
            log.warning("undecodable batch event on %s", msg.subject)
            return
        if not event.batch_id:
            event.batch_id = batch_id
        self.publish(event)

    def publish(self, event: events_pb2.BatchEvent) -> None:
        group = self.subscribers.get(event.batch_id)
        if not group:
            return
        push = render(event)
        if push is None:
            return
        for sub in list(group):
            sub.offer(push)
