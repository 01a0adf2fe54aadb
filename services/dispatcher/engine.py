"""The fan-out: pull work chunks from DISPATCH only as fast as there are free send slots, pace
each sender to its own rate, record every attempt before the provider sees it, and publish
the outcomes in chunks to EVENTS.

Backpressure: a slow provider keeps items in the lanes, the free-slot count stays low, the
fetch waits, the batch's window stays full and the feeder stops releasing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js import api as js_api
from pregonero.events.v1 import events_pb2

from services.runtime import bus
from services.runtime.bus import DISPATCH_STREAM

from .providers.base import Provider, SenderConfig, SendRequest, SendResult
from .repo import AttemptsRepo
from .runstate import RunStates

log = logging.getLogger("pregonero.dispatcher.engine")

FLUSH_EVERY_S = 0.25
FLUSH_AT = 500
RATE_LIMIT_RETRIES = 5

LoadSenders = Callable[[Sequence[int]], Awaitable[dict[int, SenderConfig]]]


class SenderCache:
    """Sender configurations for a few seconds: a chunk every few milliseconds must not each
    read the database, and an edited device takes effect within the TTL."""

    def __init__(self, load: LoadSenders, ttl: float = 2.0) -> None:
        self.load = load
        self.ttl = ttl
        self.cache: dict[tuple[int, ...], tuple[float, dict[int, SenderConfig]]] = {}

    async def get(self, ids: Sequence[int]) -> dict[int, SenderConfig]:
        key = tuple(sorted(ids))
        hit = self.cache.get(key)
        now = time.monotonic()
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        if len(self.cache) > 1000:
            self.cache.clear()
        value = await self.load(key)
        self.cache[key] = (now, value)
        return value


@dataclass
class Chunk:
    """One DISPATCH message being worked: its outcomes are flushed as they come, and it is
    acked only when every item has one."""

    msg: Msg
    data: events_pb2.DispatchChunk
    remaining: int
    outcomes: list[events_pb2.JobOutcome] = field(default_factory=list)
    sent_attempts: list[tuple[str, str, str, str, int]] = field(default_factory=list)
    handed_back: list[str] = field(default_factory=list)
    last_ping: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    broken: bool = False  # a flush failed: never ack, let JetStream redeliver

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


class Lane:
    """A sender's queue, its workers and its pace.

    Sends start on a grid 60/rate apart (plus jitter) and a few stay in flight. The grid is
    5% wider than the rate: over any ten sends that absorbs up to 50 ms of difference in how
    long two requests take to reach the provider, so the provider never counts more than
    the rate in any one-second window, while the grid keeps the long-run rate steady.

    When requests take much longer than usual (a busy host, a slow network) the grid alone
    can let arrivals bunch; so a send also waits until the send `per_second` places before
    it has been answered for a second. The provider accepted that one before answering, so
    no one-second window at the provider ever holds more than `per_second` of our sends."""

    MARGIN = 1.05

    def __init__(self, sender: SenderConfig) -> None:
        self.sender = sender
        self.interval = 60.0 / sender.rate_per_minute * self.MARGIN if sender.rate_per_minute > 0 else 0.0
        # When each of the last `per_second` sends was answered (futures, in start order).
        self.per_second = math.ceil(sender.rate_per_minute / 60) if sender.rate_per_minute > 0 else 0
        self.answered: deque[asyncio.Future[float]] = deque(maxlen=self.per_second or 1)
        self.jitter = sender.jitter_ms / 1000.0
        self.next_at = 0.0
        self.pace_lock = asyncio.Lock()
        self.queue: asyncio.Queue[tuple[Chunk, events_pb2.WorkItem]] = asyncio.Queue()
        self.workers: list[asyncio.Task[None]] = []

    async def send(
        self, provider: Provider, request: SendRequest, still_wanted: Callable[[], bool]
    ) -> SendResult | None:
        """One paced send; None when the batch stopped while waiting for its turn."""
        if self.interval or self.jitter:
            async with self.pace_lock:
                loop = asyncio.get_running_loop()
                # After a pause in the work the next request may have to open a connection
                # again and arrive late: send that one alone, and start the grid from its answer.
                cold = loop.time() > self.next_at + self.interval
                slot = max(self.next_at, loop.time())
                if slot > loop.time():
                    await asyncio.sleep(slot - loop.time())
                gap = self.interval + (random.uniform(0, self.jitter) if self.jitter else 0.0)
                if self.per_second and len(self.answered) == self.per_second:
                    answered_at = await self.answered[0]
                    if answered_at + 1.0 > loop.time():
                        await asyncio.sleep(answered_at + 1.0 - loop.time())
                        slot = max(slot, loop.time())
                # Checked after the waits: a pause must stop sends within the second.
                if not still_wanted():
                    return None
                if cold:
                    result = await self._timed(provider, request, self._place())
                    self.next_at = loop.time() + gap
                    return result
                self.next_at = slot + gap
                place = self._place()
            return await self._timed(provider, request, place)
        if not still_wanted():
            return None
        return await provider.send(request)

    def _place(self) -> asyncio.Future[float] | None:
        """This send's place in the answered line (taken in start order, under the pace lock)."""
        if not self.per_second:
            return None
        answered: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.answered.append(answered)
        return answered

    @staticmethod
    async def _timed(provider: Provider, request: SendRequest, answered: asyncio.Future[float] | None) -> SendResult:
        try:
            return await provider.send(request)
        finally:
            if answered is not None and not answered.done():
                answered.set_result(asyncio.get_running_loop().time())


class Engine:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        attempts: AttemptsRepo,
        load_senders: LoadSenders,
        providers: dict[str, Provider],
        runstates: RunStates,
        channel: str = "whatsapp",
        max_in_flight: int = 20_000,
        ack_wait: float = 15.0,
    ) -> None:
        self.js = js
        self.attempts = attempts
        self.load_senders = load_senders
        self.providers = providers
        self.runstates = runstates
        self.channel = channel
        self.max_in_flight = max_in_flight
        # A chunk whose dispatcher died is redelivered after this; live ones say "in
        # progress" three times per period so slow sends are never taken for dead.
        self.ack_wait = ack_wait
        self.in_flight = 0
        self.room = asyncio.Event()
        self.room.set()
        self.lanes: dict[int, Lane] = {}
        self.chunks: set[Chunk] = set()
        self.by_seq: dict[int, Chunk] = {}
        # Provider look-ups after a crash come in thousands at once; a few at a time is faster.
        self.recovering = asyncio.Semaphore(32)
        self._rr = 0

    # --- intake ---

    async def run(self) -> None:
        sub = await self.js.pull_subscribe(
            f"dispatch.{self.channel}.>",
            durable=f"dispatch-{self.channel}",
            stream=DISPATCH_STREAM,
            config=js_api.ConsumerConfig(
                ack_policy=js_api.AckPolicy.EXPLICIT, ack_wait=self.ack_wait, max_ack_pending=1000, max_deliver=-1
            ),
        )
        flusher = asyncio.create_task(self._flush_loop(), name="flusher")
        try:
            while True:
                free = self.max_in_flight - self.in_flight
                if free <= 0:
                    self.room.clear()
                    await self.room.wait()
                    continue
                try:
                    msgs = await sub.fetch(max(1, min(8, free // 500)), timeout=1)
                except (TimeoutError, NatsTimeout):
                    continue
                for msg in msgs:
                    await self._start_chunk(msg)
        finally:
            flusher.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _start_chunk(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        working = self.by_seq.get(seq)
        if working is not None:
            # JetStream gave up waiting for our ack and sent it again while we still work on
            # it: keep working the first copy and ack through the newest delivery.
            working.msg = msg
            return
        data = events_pb2.DispatchChunk.FromString(msg.data)
        chunk = Chunk(msg=msg, data=data, remaining=len(data.items))
        self.chunks.add(chunk)
        self.by_seq[seq] = chunk
        self.in_flight += chunk.remaining
        if not self.runstates.active(data.batch_id):
            for item in data.items:
                self._resolve(chunk, item, "requeue")
            return
        senders = await self.load_senders(list(data.sender_ids))
        if not senders:
            for item in data.items:
                self._resolve(chunk, item, "failed", error="no active device for this job")
            return
        # Record first, then send: an attempt already on record was sent (or is being
        # resolved) by an earlier delivery of this chunk.
        new = set(
            await self.attempts.claim(
                batch_id=data.batch_id, items=[(i.attempt_id, i.job_id) for i in data.items], sender_id=0
            )
        )
        redelivered = [i for i in data.items if i.attempt_id not in new]
        known = await self.attempts.existing(attempt_ids=[i.attempt_id for i in redelivered]) if redelivered else {}
        lanes = [self._lane(s) for s in senders.values()]
        for item in data.items:
            if item.attempt_id in new:
                self._enqueue(chunk, item, lanes)
                continue
            row = known.get(item.attempt_id)
            if row is not None and row["status"] in ("sent", "failed", "unknown"):
                self._resolve(
                    chunk,
                    item,
                    row["status"],
                    sender_id=row["sender_id"],
                    error=row["error"] or "",
                    provider_message_id=row["provider_message_id"] or "",
                    record=False,
                )
            else:
                asyncio.create_task(self._recover(chunk, item, senders, lanes))

    async def _recover(
        self, chunk: Chunk, item: events_pb2.WorkItem, senders: dict[int, SenderConfig], lanes: list[Lane]
    ) -> None:
        """An attempt recorded but never resolved: the process that sent it died. Ask the
        provider; send only if the provider never accepted it."""
        try:
            for sender in senders.values():
                async with self.recovering:
                    found = await self.providers[sender.provider].lookup(item.attempt_id, sender)
                if found is not None:
                    self._resolve(
                        chunk,
                        item,
                        "sent" if found.status == "sent" else "failed",
                        sender_id=sender.id,
                        provider_message_id=found.provider_message_id,
                        error=found.error,
                    )
                    return
        except Exception as exc:  # noqa: BLE001 - the outcome cannot be known: say so, never re-send
            log.warning("could not resolve attempt %s: %s", item.attempt_id, exc)
            self._resolve(chunk, item, "unknown", error="outcome unknown after a restart")
            return
        self._enqueue(chunk, item, lanes)

    # --- sending ---

    def _lane(self, sender: SenderConfig) -> Lane:
        lane = self.lanes.get(sender.id)
        if lane is None or lane.sender != sender:
            if lane is not None:  # configuration changed: new pace, old workers finish their items
                for w in lane.workers:
                    w.cancel()
            lane = self.lanes[sender.id] = Lane(sender)
            lane.workers = [
                asyncio.create_task(self._worker(lane), name=f"lane-{sender.id}")
                for _ in range(max(1, sender.concurrency))
            ]
        return lane

    def _enqueue(self, chunk: Chunk, item: events_pb2.WorkItem, lanes: list[Lane]) -> None:
        # The least-loaded lane in send time; round robin among equals.
        self._rr += 1
        best = min(
            range(len(lanes)),
            key=lambda i: (lanes[i].queue.qsize() * max(lanes[i].interval, 1e-6), (i - self._rr) % len(lanes)),
        )
        lanes[best].queue.put_nowait((chunk, item))

    async def _worker(self, lane: Lane) -> None:
        provider = self.providers[lane.sender.provider]
        while True:
            chunk, item = await lane.queue.get()
            try:
                await self._send(lane, provider, chunk, item)
            except asyncio.CancelledError:
                self._resolve(chunk, item, "requeue")
                raise
            except Exception as exc:  # noqa: BLE001 - one bad send must not kill the lane
                log.exception("send failed unexpectedly")
                self._resolve(chunk, item, "failed", sender_id=lane.sender.id, error=type(exc).__name__)

    async def _send(self, lane: Lane, provider: Provider, chunk: Chunk, item: events_pb2.WorkItem) -> None:
        batch_id = chunk.data.batch_id
        if not self.runstates.active(batch_id):
            self._resolve(chunk, item, "requeue")
            return
        request = SendRequest(attempt_id=item.attempt_id, sender=lane.sender, to=item.to, text=item.text)
        for _ in range(RATE_LIMIT_RETRIES):
            result = await lane.send(provider, request, lambda: self.runstates.active(batch_id))
            if result is None:
                self._resolve(chunk, item, "requeue")
                return
            if result.status != "rate_limited":
                break
            await asyncio.sleep(result.retry_after or 1.0)
        else:
            self._resolve(chunk, item, "failed", sender_id=lane.sender.id, error="rate limited by provider")
            return
        self._resolve(
            chunk,
            item,
            result.status if result.status == "sent" else "failed",
            sender_id=lane.sender.id,
            error=result.error,
            provider_message_id=result.provider_message_id,
        )

    # --- outcomes ---

    def _resolve(
        self,
        chunk: Chunk,
        item: events_pb2.WorkItem,
        status: str,
        *,
        sender_id: int = 0,
        error: str = "",
        provider_message_id: str = "",
        record: bool = True,
    ) -> None:
        chunk.outcomes.append(
            events_pb2.JobOutcome(
                job_id=item.job_id,
                attempt_id=item.attempt_id,
                status=status,
                sender_id=sender_id,
                to=item.to,
                error=error,
                provider_message_id=provider_message_id,
                # A sent message costs the price it was released at; nothing else is charged.
                cost=chunk.data.unit_price if status == "sent" else "",
            )
        )
        if status == "requeue":
            chunk.handed_back.append(item.attempt_id)
        elif record:
            chunk.sent_attempts.append((item.attempt_id, status, provider_message_id, error, sender_id))
        chunk.remaining -= 1
        self.in_flight -= 1
        if self.in_flight < self.max_in_flight:
            self.room.set()
        if len(chunk.outcomes) >= FLUSH_AT or chunk.remaining == 0:
            asyncio.create_task(self._flush(chunk))

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            now = time.monotonic()
            # Pings first and together: a slow flush must not let another chunk's ack wait run out.
            due = [c for c in self.chunks if c.remaining and now - c.last_ping > self.ack_wait / 4]
            for chunk in due:
                chunk.last_ping = now
            await asyncio.gather(*(c.msg.in_progress() for c in due), return_exceptions=True)
            for chunk in list(self.chunks):
                if chunk.outcomes:
                    await self._flush(chunk)

    async def _flush(self, chunk: Chunk) -> None:
        """Record outcomes, then publish them; ack the chunk once it is fully resolved. A
        crash in between is safe: the redelivered chunk finds the attempts on record."""
        async with chunk.lock:
            outcomes, chunk.outcomes = chunk.outcomes, []
            finished, chunk.sent_attempts = chunk.sent_attempts, []
            handed_back, chunk.handed_back = chunk.handed_back, []
            done = chunk.remaining == 0 and chunk in self.chunks
            if done:
                self.chunks.discard(chunk)
                self.by_seq.pop(chunk.msg.metadata.sequence.stream, None)
            if outcomes and not chunk.broken:
                try:
                    if finished:
                        await self.attempts.finish(rows=finished)
                    if handed_back:
                        await self.attempts.release(attempt_ids=handed_back)
                    digest = hashlib.sha1("|".join(f"{o.attempt_id}={o.status}" for o in outcomes).encode())
                    result = events_pb2.ResultChunk(
                        batch_id=chunk.data.batch_id,
                        account_id=chunk.data.account_id,
                        chunk_key=str(chunk.data.chunk_seq),
                        outcomes=outcomes,
                        hold_id=chunk.data.hold_id,
                    )
                    await bus.publish(
                        self.js,
                        f"events.job.{chunk.data.batch_id}",
                        result,
                        msg_id=f"{chunk.data.batch_id}:r:{digest.hexdigest()}",
                    )
                except Exception:  # noqa: BLE001 - unacked, the chunk is redelivered and resolved again
                    log.exception("flushing outcomes failed; chunk %s will be redelivered", chunk.data.chunk_seq)
                    chunk.broken = True
                    self.chunks.discard(chunk)
                    self.by_seq.pop(chunk.msg.metadata.sequence.stream, None)
            if done and not chunk.broken:
                await chunk.msg.ack()
