"""The fan-out: pull work chunks from DISPATCH only as fast as there are free send slots, pace
each sender to its own rate, claim every attempt just before the provider sees it, and
publish the outcomes in chunks to EVENTS.

Backpressure: a slow provider keeps items in the lanes, the free-slot count stays low, the
fetch waits, the batch's window stays full and the feeder stops releasing.

Nothing lost, nothing sent twice:
- A chunk is acked only once every item has an outcome on record and published; a chunk
  that cannot be finished here (its flush failed, the process stops) is handed back unacked
  and its unsent items go out from the redelivery.
- The claim (a row in `attempts`) is the only licence to send, taken just before the request
  leaves (a lane whose sends are far faster than a claim takes a few ahead, see `Lane.ahead`,
  and gives back those it does not send), through the sender version the lane holds. A
  second copy of the same work (a redelivered chunk, a job released twice) finds the claim
  and never sends; a sender that was edited, disabled or deleted refuses the claim, and its
  queued work moves to the senders as they are now. So only sends in flight (and on a fast
  lane the few claimed ahead) can lose their outcome to a crash.
- A claim whose outcome is lost is resolved from the provider's record once no send can still
  be under way (`send_grace`); a provider that cannot say makes it `unknown`, never resent.

Devices that cannot send for now (the engine's API, called by connections.py):
- `sender_unavailable(sender_id, reason)`: the device is disconnected, waits for a QR scan,
  or has used its `daily_limit` for its local day. From that call on it claims nothing more:
  its lane is retired as an edit retires it, so what it holds and has not sent (queued, or
  claimed ahead and given back) goes to the job's other available devices; sends already at
  the provider finish and report what the provider says. (At its daily cap, claims it
  already holds are within the cap and still go out through it.)
- `sender_available(sender_id)`: it can send again; work from now on may go to it. When it
  was out for its daily cap (reason `DAILY_LIMIT_REASON`: its local day has turned), a
  `DeviceEvent` connected tells the batches that wait for it.
- The database counts each device's claims per local day and refuses those past its cap
  (CLAIM_SENDS), whichever dispatcher asks: a refusal through a device that has not changed
  is that cap. The device then rests (its queued work moves on; claims it already holds are
  within the cap and still go out) until the watcher says it is unavailable.
- A device can also say so itself, refusing a send (`SendResult.device_unavailable`: a Wablas
  device disconnected, expired, out of quota or with wrong credentials; a WAHA session not
  WORKING, or WAHA unreachable). Nothing went out: the claim is given back (RELEASE, waiting
  out a database that is away, so that no copy of the work takes it for a send of unknown
  fate), the device is taken out at once by `sender_unavailable(..., for_s=...)`, for a while
  only (at least DEVICE_REST_S: nobody else has said so yet; its state, asked of its provider
  through `ask_device` when that is set, or found by the connections poller, keeps it out
  until it connects), and the item goes to the job's other available devices, or is handed
  back as below. Never retried on the same device, never failed for it.
- An item none of whose job's devices can send now (at least one of them active) is handed
  back unsent: `requeue` with `bus.NO_CONNECTED_SENDER`, on which campaigns suspends the
  batch until a device connects. Only when no device of the job is active at all does it
  fail (`bus.NO_ACTIVE_SENDER`, the bulk sender's documented behaviour).
Both calls are synchronous, cheap and safe at any moment; they concern this process only, so
every dispatcher replica's engine must be told (connections.py does)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from cachetools import TTLCache
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from pregonero.events.v1 import events_pb2

from services.runtime import bus, tracing
from services.runtime.bus import DISPATCH_STREAM

from . import device_states
from .connections import DAILY_LIMIT_REASON
from .providers.base import Provider, SenderConfig, SendRequest, SendResult
from .repo import AttemptsRepo
from .runstate import RunStates
from .send_metrics import NO_PROVIDER, PROVIDER_SECONDS, PROVIDER_THROTTLED, count_outcome

log = logging.getLogger("pregonero.dispatcher.engine")

FLUSH_EVERY_S = 0.25
FLUSH_AT = 500
RATE_LIMIT_RETRIES = 5
CLAIM_AHEAD = 64
# Longer than any one send can be under way (providers time out within 15 s): a claim this
# old whose outcome never came is settled by asking the provider.
SEND_GRACE_S = 30.0

LoadSenders = Callable[[Sequence[int]], Awaitable[dict[int, SenderConfig]]]
# How long a device rests after the record refused a claim through it although it had not
# changed (its daily cap is full, see `_refused_unchanged`): the connections watcher says
# why within that time, and the device is not asked again claim after claim meanwhile.
REFUSED_REST_S = 5.0
# The least a device rests after it refused a send because it cannot send now (its provider's
# `retry_after` when longer): then it is tried again, unless its state says it is still out.
DEVICE_REST_S = 5.0
# Asks the device's provider for its state now and records it (connections.py `ask`).
AskDevice = Callable[[SenderConfig], Coroutine[Any, Any, None]]


async def timed_send(provider: Provider, request: SendRequest) -> SendResult:
    started = time.perf_counter()
    try:
        return await provider.send(request)
    finally:
        PROVIDER_SECONDS.labels(request.sender.provider).observe(time.perf_counter() - started)


class SenderCache:
    """Sender configurations for a few seconds: a chunk every few milliseconds must not each
    read the database. An edit is seen within the TTL, or at once when a claim through the
    old version is refused (`forget`)."""

    def __init__(self, load: LoadSenders, ttl: float = 2.0, size: int = 1000) -> None:
        self.load = load
        # Expired entries go at their TTL, and the least recently used first when it is full.
        self.cache: TTLCache[tuple[int, ...], dict[int, SenderConfig]] = TTLCache(size, ttl, timer=time.monotonic)

    async def get(self, ids: Sequence[int]) -> dict[int, SenderConfig]:
        key = tuple(sorted(ids))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        value = await self.load(key)
        self.cache[key] = value
        return value

    def forget(self) -> None:
        self.cache.clear()


@dataclass
class Chunk:
    """One DISPATCH message being worked: its outcomes are flushed as they come, and it is
    acked only when every item has one."""

    msg: Msg
    data: events_pb2.DispatchChunk
    remaining: int  # items with no outcome yet that this delivery still works on
    outcomes: list[events_pb2.JobOutcome] = field(default_factory=list)
    finished: list[tuple[str, int, str, str, str, int]] = field(default_factory=list)
    last_ping: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # A flush failed: send nothing more of it; flush what it has, then hand it back.
    broken: bool = False
    dropped: int = 0  # items left unsent for the redelivery
    failures: int = 0
    retry_at: float = 0.0
    closed: bool = False
    # The request id and trace it came with (taken up in `Engine.run`): its sends and results carry them on.
    origin: tracing.Origin = field(default_factory=tracing.current)

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


Entry = tuple[Chunk, events_pb2.WorkItem]


class Lane:
    """A sender's queue, its workers and its pace.

    Sends start on a grid 60/rate apart (plus jitter) and a few stay in flight. The grid is
    5% wider than the rate: over any ten sends that absorbs up to 50 ms of difference in how
    long two requests take to reach the provider, so the provider never counts more than
    the rate in any one-second window, while the grid keeps the long-run rate steady.

    When requests take much longer than usual (a busy host, a slow network) the grid alone
    can let arrivals bunch; so a send also waits until the send `per_second` places before
    it has been answered for a second. The provider accepted that one before answering, so
    no one-second window at the provider ever holds more than `per_second` of our sends.

    A lane whose sender changed is retired: its workers finish the send they are in, pass
    the queued items on to the senders as they are now, and end."""

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
        self.queue: asyncio.Queue[Entry | None] = asyncio.Queue()
        self.workers: list[asyncio.Task[None]] = []
        self.retired = False
        # Retired, but the claims it holds are still sent (its daily cap is full: they are
        # within it). Otherwise a retired lane gives them back.
        self.send_claimed = False
        # Claimed ahead, sent by the next free worker (unpaced lanes only; see `ahead`).
        self.ready: deque[Entry] = deque()
        self.idle_workers = 0  # waiting on an empty queue
        self.send_s = 0.1  # how long a send takes here (moving average)

    def ahead(self, claim_s: float) -> int:
        """How many sends to claim in one go. A lane whose sends take far less time than a
        claim (a provider next door) would wait on the database between every two sends:
        it claims what its workers send in two claims' time, up to CLAIM_AHEAD. A lane that
        waits for the network, or keeps a pace, claims each send on its own just before it
        leaves. Claims taken ahead are what a crash can leave without an outcome, so the
        number stays small where it does not buy speed."""
        if self.interval or self.jitter:
            return 1
        wanted = math.ceil(2 * len(self.workers) * claim_s / max(self.send_s, 1e-6))
        return max(1, min(CLAIM_AHEAD, wanted))

    async def send(
        self, provider: Provider, request: SendRequest, go: Callable[[], Awaitable[str]]
    ) -> SendResult | str:
        """One paced send. `go` is asked when the turn has come, just before the request
        leaves: an empty answer sends, any other is the reason nothing was sent (returned)."""
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
                # Asked after the waits: a pause or an edit must stop sends within the second.
                reason = await go()
                if reason:
                    return reason
                if cold:
                    result = await self._timed(provider, request, self._place())
                    self.next_at = loop.time() + gap
                    return result
                self.next_at = slot + gap
                place = self._place()
            return await self._timed(provider, request, place)
        reason = await go()
        if reason:
            return reason
        started = time.monotonic()
        try:
            return await timed_send(provider, request)
        finally:
            self.send_s += (time.monotonic() - started - self.send_s) / 16

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
            return await timed_send(provider, request)
        finally:
            if answered is not None and not answered.done():
                answered.set_result(asyncio.get_running_loop().time())


ClaimRow = tuple[str, str, int, int, int]


class SendClaims:
    """Claims of attempts, grouped: each send asks just before its request goes out, and the
    asks of one moment share one statement (while one is at the database, the next group
    gathers), so a claim per send costs about what a claim per chunk did. Claims taken ahead
    and not used are released the same way."""

    def __init__(self, attempts: AttemptsRepo) -> None:
        self.attempts = attempts
        self.waiting: list[tuple[Sequence[ClaimRow], asyncio.Future[list[bool]]]] = []
        self.task: asyncio.Task[None] | None = None
        # How long a claim statement takes (moving average): the lanes size what they claim
        # ahead by it.
        self.latency = 0.002

    async def claim(self, row: ClaimRow) -> bool:
        """True when this send owns the attempt; raises when the database cannot say."""
        return (await self.claim_many([row]))[0]

    async def claim_many(self, rows: Sequence[ClaimRow]) -> list[bool]:
        """For each row, whether this send owns the attempt; raises when the database cannot say."""
        future: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
        self.waiting.append((rows, future))
        if self.task is None or self.task.done():
            # Serves the sends of many chunks: in the trace of none.
            self.task = asyncio.create_task(self._run(), name="claims", context=contextvars.Context())
        return await future

    async def _run(self) -> None:
        while self.waiting:
            group, self.waiting = self.waiting, []
            started = time.monotonic()
            try:
                claimed = await self.attempts.claim_sends(rows=[row for rows, _ in group for row in rows])
            except Exception as exc:  # noqa: BLE001 - each send decides what to do about it
                for _, future in group:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.latency += (time.monotonic() - started - self.latency) / 8
            # Two asks for the same attempt in one statement (two copies of the same work in
            # this process) insert it once: only the first asker owns it.
            for rows, future in group:
                mine = []
                for row in rows:
                    mine.append(row[0] in claimed)
                    claimed.discard(row[0])
                if not future.done():
                    future.set_result(mine)


class Engine:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        attempts: AttemptsRepo,
        senders: SenderCache,
        providers: dict[str, Provider],
        runstates: RunStates,
        channel: str = "whatsapp",
        max_in_flight: int = 20_000,
        ack_wait: float = 15.0,
        send_grace: float = SEND_GRACE_S,
        ask_device: AskDevice | None = None,
    ) -> None:
        self.js = js
        self.attempts = attempts
        self.senders = senders
        self.providers = providers
        self.runstates = runstates
        self.channel = channel
        self.max_in_flight = max_in_flight
        # A chunk whose dispatcher died is redelivered after this; live ones say "in
        # progress" four times per period so slow sends are never taken for dead.
        self.ack_wait = ack_wait
        self.send_grace = send_grace
        self.claims = SendClaims(attempts)
        self.in_flight = 0
        self.sending = 0  # requests at a provider right now
        self.idle = asyncio.Event()  # set whenever none is
        self.idle.set()
        self.room = asyncio.Event()
        self.room.set()
        self.lanes: dict[int, Lane] = {}
        self.chunks: set[Chunk] = set()
        self.by_seq: dict[int, Chunk] = {}
        # Provider look-ups after a crash come in thousands at once; a few at a time is faster.
        self.recovering = asyncio.Semaphore(32)
        # Tasks the engine starts and does not await: kept, so none is collected mid-flight.
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stopping = False
        self._rr = 0
        # Devices that cannot send for now: told so (with the reason), or resting until a
        # monotonic time after the record refused them a claim. Neither takes work.
        self.unavailable: dict[int, str] = {}
        self.resting: dict[int, float] = {}
        self.device_states = device_states.DeviceStates(js)
        # Told when a device refuses a send because it cannot send now: the dispatcher wires
        # it to `Connections.ask`, which records and publishes the device's state (and tells
        # this engine, and the other replicas, when it changed).
        self.ask_device = ask_device

    def _spawn(
        self, coro: Coroutine[Any, Any, None], name: str, context: contextvars.Context | None = None
    ) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name, context=context)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("engine task %s failed", task.get_name(), exc_info=task.exception())

    # --- devices that cannot send for now (see the module docstring) ---

    def sender_unavailable(self, sender_id: int, reason: str, *, for_s: float | None = None) -> None:
        """The device is disconnected, waits for a QR scan or has used its daily cap: it claims
        nothing more, and what its lane has queued goes to the job's other available devices,
        or back to campaigns when none is left. Sends already at the provider finish. Claims
        it took ahead are given back and move too, except at its daily cap (`reason`
        DAILY_LIMIT_REASON): those are within the cap, and go out through it.

        With `for_s` (the engine's own finding: the device refused a send) it is out for that
        long only, then tried again, unless connections.py says it is out meanwhile (no
        `for_s`: until `sender_available`), as nobody may ever tell it that it is back."""
        if for_s is not None:
            if sender_id not in self.unavailable:
                if self.can_send(sender_id):
                    log.info("device %s cannot send (%s); its work moves on for %.0fs", sender_id, reason, for_s)
                until = time.monotonic() + for_s
                self.resting[sender_id] = max(self.resting.get(sender_id, 0.0), until)
            self._stop_lane(sender_id)
            return
        if sender_id not in self.unavailable:
            log.info("device %s cannot send (%s); its queued work moves on", sender_id, reason)
        self.unavailable[sender_id] = reason or "unavailable"
        self._stop_lane(sender_id, send_claimed=reason == DAILY_LIMIT_REASON)

    def sender_available(self, sender_id: int) -> None:
        """The device can send again: work from now on may go to it. When it had been out for
        its daily cap (its local day has turned), the batches that wait for it hear so: a
        `DeviceEvent` connected, as when a device reconnects."""
        reason = self.unavailable.pop(sender_id, None)
        self.resting.pop(sender_id, None)
        if reason is None:
            return
        log.info("device %s can send again", sender_id)
        if reason == DAILY_LIMIT_REASON:
            self._spawn(self._announce_new_day(sender_id), name=f"new-day-{sender_id}")

    def can_send(self, sender_id: int) -> bool:
        if sender_id in self.unavailable:
            return False
        until = self.resting.get(sender_id)
        if until is None:
            return True
        if time.monotonic() < until:
            return False
        del self.resting[sender_id]
        return True

    def _stop_lane(self, sender_id: int, *, send_claimed: bool = False) -> None:
        lane = self.lanes.get(sender_id)
        if lane is not None:
            lane.send_claimed = send_claimed
            self._retire(lane)

    def _refused_unchanged(self, lane: Lane) -> None:
        """The record refused a claim through a device that has not changed: its daily cap is
        full (the database counts every dispatcher's claims). Its queued work moves on now;
        the claims it holds are within the cap and are still sent."""
        sender_id = lane.sender.id
        if self.can_send(sender_id):
            log.info("device %s was refused a claim by the record (its daily limit); work moves on", sender_id)
            self.resting[sender_id] = time.monotonic() + REFUSED_REST_S
        if not lane.retired:
            lane.send_claimed = True
        self._retire(lane)

    async def _announce_new_day(self, sender_id: int) -> None:
        senders = await self._retrying(lambda: self.senders.get([sender_id]))
        sender = senders.get(sender_id)
        if sender is not None and self.can_send(sender_id):
            await self.device_states.publish(
                account_id=sender.account_id,
                sender_id=sender_id,
                state=device_states.CONNECTED,
                reason="daily limit reset",
            )

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
            while not self.stopping:
                free = self.max_in_flight - self.in_flight
                if free <= 0:
                    self.room.clear()
                    await self.room.wait()
                    continue
                msgs = await bus.pull(sub, max(1, min(8, free // 500)), name=f"dispatch-{self.channel}")
                for msg in msgs:
                    if self.stopping:
                        with contextlib.suppress(Exception):
                            await msg.nak()
                        continue
                    with tracing.incoming(f"dispatch-{self.channel}", [msg.headers]):
                        await self._start_chunk(msg)
        finally:
            flusher.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def drain(self) -> None:
        """On shutdown: start no new send, let those at a provider finish, record and publish
        every outcome, then hand back what is left (unacked work goes to another dispatcher
        at once). A send cut off mid-request would be an outcome lost."""
        self.stopping = True
        held = [entry for lane in self.lanes.values() for entry in lane.ready]
        for lane in self.lanes.values():  # wake idle workers so they see the stop
            lane.ready.clear()
            for _ in lane.workers:
                lane.queue.put_nowait(None)
        if held:
            await self._release([item for _, item in held])
            for chunk, _ in held:
                self._drop(chunk)
        if self.sending:
            await self.idle.wait()
        for chunk in list(self.chunks):
            await self._flush(chunk, final=True)

    async def _start_chunk(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        working = self.by_seq.get(seq)
        if working is not None:
            # JetStream gave up waiting for our ack and sent it again while we still work on
            # it: keep working the first copy and ack through the newest delivery.
            working.msg = msg
            return
        try:
            data = events_pb2.DispatchChunk.FromString(msg.data)
        except DecodeError as exc:
            # Never sendable: set aside where an admin can see and replay it.
            log.error("dispatch message %s on %s does not decode; dead-lettered", seq, msg.subject)
            with contextlib.suppress(Exception):
                await bus.dead_letter(
                    self.js, msg, durable=f"dispatch-{self.channel}", error=exc, deliveries=msg.metadata.num_delivered
                )
                await msg.term()
            return
        try:
            senders = await self.senders.get(list(data.sender_ids))
            # What an earlier delivery of this work left on record. A first delivery has
            # none; should another chunk have carried the same attempt, its claim refuses
            # ours and the refusal looks it up.
            known = (
                await self.attempts.existing(attempt_ids=[i.attempt_id for i in data.items])
                if msg.metadata.num_delivered > 1
                else {}
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("chunk %s put back: the database is unavailable (%s)", data.chunk_seq, exc)
            with contextlib.suppress(Exception):  # unacked, it comes back after the ack wait anyway
                await msg.nak(delay=2)
            return
        chunk = Chunk(msg=msg, data=data, remaining=len(data.items))
        self.chunks.add(chunk)
        self.by_seq[seq] = chunk
        self.in_flight += chunk.remaining
        active = self.runstates.active(data.batch_id)
        lanes = [self._lane(s) for s in senders.values() if self.can_send(s.id)]
        unsendable: list[events_pb2.WorkItem] = []
        for item in data.items:
            row = known.get(item.attempt_id)
            if row is not None:
                self._spawn(self._recover(chunk, item, row), name="recover")
            elif not active:
                self._resolve(chunk, item, "requeue")
            elif lanes:
                self._enqueue(chunk, item, lanes)
            elif senders:  # active, but none can send now: they wait, unsent
                self._resolve(chunk, item, "requeue", error=bus.NO_CONNECTED_SENDER)
            else:
                unsendable.append(item)
        if unsendable:
            await self._fail_unsent(chunk, unsendable, bus.NO_ACTIVE_SENDER)

    async def _fail_unsent(self, chunk: Chunk, items: list[events_pb2.WorkItem], error: str) -> None:
        """Items that cannot be sent end failed, on record first: a copy of this work that
        already claimed one of them decides its outcome instead."""
        recorded = await self._retrying(
            lambda: self.attempts.record_unsent(batch_id=chunk.data.batch_id, items=items, error=error)
        )
        for item in items:
            if item.attempt_id in recorded:
                count_outcome("failed", channel=self.channel, provider=NO_PROVIDER)
                self._resolve(chunk, item, "failed", error=error, record=False)
            else:
                self._spawn(self._recover(chunk, item, await self._row(item.attempt_id)), name="recover")

    async def _row(self, attempt_id: str) -> asyncpg.Record | None:
        """The attempt's record, as it is now."""
        found = await self._retrying(lambda: self.attempts.existing(attempt_ids=[attempt_id]))
        return found.get(attempt_id)  # type: ignore[no-any-return]

    async def _retrying(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """A database call that must happen: retried with back-off while the database is away."""
        delay = 0.5
        while True:
            try:
                return await call()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("database unavailable (%s); trying again in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _recover(self, chunk: Chunk, item: events_pb2.WorkItem, row: asyncpg.Record | None) -> None:
        """An attempt another send has claimed: an earlier delivery whose process died, or a
        copy of this work still sending. Its outcome is the record's once there is one, or
        the provider's when it has the message; otherwise it waits until no send of it can
        still be under way, and only then is it `unknown` (the provider cannot say) or sent
        again (the provider never got it)."""
        while True:
            if row is None:  # the claim was given up (see below): ours to send
                await self._route(chunk, item)
                return
            if row["status"] != "sending":
                self._resolve(
                    chunk,
                    item,
                    row["status"],
                    sender_id=row["sender_id"],
                    error=row["error"] or "",
                    provider_message_id=row["provider_message_id"] or "",
                    record=False,
                )
                return
            found = await self._look_up(chunk, item, row["sender_id"])
            if isinstance(found, SendResult):  # the provider has it: that is the outcome
                status = "sent" if found.status == "sent" else "failed"
                count_outcome(status, channel=self.channel, provider=await self._provider_of(chunk, row["sender_id"]))
                self._resolve(
                    chunk,
                    item,
                    status,
                    sender_id=row["sender_id"],
                    provider_message_id=found.provider_message_id,
                    error=found.error,
                )
                return
            wait = self.send_grace - row["age"]
            if wait > 0:
                # A send of it may still be under way: its owner records the outcome, or the
                # provider gets it, or the claim grows old enough to be given up.
                await asyncio.sleep(min(wait, 5.0))
            elif found == "unknown":
                provider = await self._provider_of(chunk, row["sender_id"])
                count_outcome("unknown", channel=self.channel, provider=provider)
                self._resolve(
                    chunk, item, "unknown", sender_id=row["sender_id"], error="outcome unknown after a restart"
                )
                return
            else:
                # Never at the provider: give the stale claim up (only if it is still the same
                # one), and the item is sent again through a fresh claim.
                await self._retrying(
                    functools.partial(
                        self.attempts.unclaim,
                        attempt_id=item.attempt_id,
                        claimed_at=row["created_at"],
                        older_than_s=self.send_grace,
                    )
                )
            row = await self._row(item.attempt_id)

    async def _provider_of(self, chunk: Chunk, sender_id: int) -> str:
        """The provider of the sender that claimed a recovered attempt (for its metrics)."""
        senders = await self._retrying(lambda: self.senders.get(list(chunk.data.sender_ids)))
        sender = senders.get(sender_id)
        return sender.provider if sender is not None else NO_PROVIDER

    async def _look_up(self, chunk: Chunk, item: events_pb2.WorkItem, sender_id: int) -> SendResult | str:
        """The provider's record of a lost send: a result, "absent", or "unknown"."""
        try:
            senders = await self._retrying(lambda: self.senders.get(list(chunk.data.sender_ids)))
            # Asked through the sender that claimed it when it is still there, else through
            # each provider among the job's senders (a provider's record is per attempt id).
            ordered = sorted(senders.values(), key=lambda s: s.id != sender_id)
            if not ordered:
                return "unknown"
            asked: set[str] = set()
            for sender in ordered:
                if sender.provider in asked:
                    continue
                asked.add(sender.provider)
                async with self.recovering:
                    found = await self.providers[sender.provider].lookup(item.attempt_id, sender)
                if found is not None:
                    return found
        except Exception as exc:  # noqa: BLE001 - the outcome cannot be known: say so, never re-send
            log.warning("could not resolve attempt %s: %s", item.attempt_id, exc)
            return "unknown"
        return "absent"

    # --- sending ---

    def _lane(self, sender: SenderConfig) -> Lane:
        lane = self.lanes.get(sender.id)
        if lane is not None and lane.sender == sender:
            return lane
        if lane is not None:
            self._retire(lane)
        lane = self.lanes[sender.id] = Lane(sender)
        # A lane outlives the chunk that opened it: it starts with no request id or trace, and
        # takes each item's own (`_worker`).
        lane.workers = [
            self._spawn(self._worker(lane), name=f"lane-{sender.id}", context=contextvars.Context())
            for _ in range(max(1, sender.concurrency))
        ]
        return lane

    def _retire(self, lane: Lane) -> None:
        """The sender changed: new work goes to a new lane; this one's workers finish their
        send and pass the queue on (never cancelled mid-send: that request may be out)."""
        if lane.retired:
            return
        lane.retired = True
        if self.lanes.get(lane.sender.id) is lane:
            del self.lanes[lane.sender.id]
        for _ in lane.workers:
            lane.queue.put_nowait(None)  # wakes a worker waiting on an empty queue

    def _enqueue(self, chunk: Chunk, item: events_pb2.WorkItem, lanes: list[Lane]) -> None:
        lanes = [lane for lane in lanes if not lane.retired]
        if not lanes:  # retired while this chunk was being started
            self._spawn(self._route(chunk, item), name="route")
            return
        # The least-loaded lane in send time; round robin among equals.
        self._rr += 1
        best = min(
            range(len(lanes)),
            key=lambda i: (lanes[i].queue.qsize() * max(lanes[i].interval, 1e-6), (i - self._rr) % len(lanes)),
        )
        lanes[best].queue.put_nowait((chunk, item))

    async def _route(self, chunk: Chunk, item: events_pb2.WorkItem) -> None:
        """Send an item through the job's senders as they are now."""
        if chunk.broken or self.stopping:
            self._drop(chunk)
        elif not self.runstates.active(chunk.data.batch_id):
            self._resolve(chunk, item, "requeue")
        else:
            senders = await self._retrying(lambda: self.senders.get(list(chunk.data.sender_ids)))
            usable = [s for s in senders.values() if self.can_send(s.id)]
            if usable:
                self._enqueue(chunk, item, [self._lane(s) for s in usable])
            elif senders:  # active, but none can send now: it waits, unsent
                self._resolve(chunk, item, "requeue", error=bus.NO_CONNECTED_SENDER)
            else:
                await self._fail_unsent(chunk, [item], bus.NO_ACTIVE_SENDER)

    async def _worker(self, lane: Lane) -> None:
        provider = self.providers[lane.sender.provider]
        while True:
            held = bool(lane.ready)  # claimed ahead: given back if it is not sent
            if held:
                chunk, item = lane.ready.popleft()
            else:
                lane.idle_workers += 1
                try:
                    entry = await lane.queue.get()
                finally:
                    lane.idle_workers -= 1
                if entry is None:
                    if (lane.retired or self.stopping) and not lane.ready:
                        return
                    continue
                chunk, item = entry
            if chunk.broken or self.stopping:
                if held:
                    await self._release([item])
                self._drop(chunk)
            elif lane.retired and not (held and lane.send_claimed):
                if held:
                    await self._release([item])
                await self._route(chunk, item)
            else:
                # The chunk's request id and trace: the provider's request is a span of its trace.
                with tracing.resumed(chunk.origin):
                    try:
                        if not held and lane.ahead(self.claims.latency) > 1:
                            claimed = await self._claim_ahead(lane, chunk, item)
                            if claimed is None:
                                continue
                            held = claimed
                        await self._send(lane, provider, chunk, item, held=held)
                    except Exception:  # noqa: BLE001 - one bad send must not kill the lane
                        log.exception("send of %s failed unexpectedly", item.attempt_id)
                        self._resolve(chunk, item, "unknown", sender_id=lane.sender.id, error="internal error")
            if self.stopping and lane.queue.empty() and not lane.ready:
                return

    async def _claim_ahead(self, lane: Lane, chunk: Chunk, item: events_pb2.WorkItem) -> bool | None:
        """Claim this item and the next few of the lane's queue in one statement; the others
        wait in `lane.ready` for the next free worker. True: this item is claimed; False: the
        database is away (it goes the single-claim way, which waits and tries again); None:
        refused, and dealt with."""
        sender = lane.sender
        taken: list[Entry] = [(chunk, item)]
        wakeups = 0
        want = lane.ahead(self.claims.latency) - len(lane.ready)
        while len(taken) < want and not lane.queue.empty():
            entry = lane.queue.get_nowait()
            if entry is None:
                wakeups += 1  # put back below: a worker of a retired lane must still see it
                continue
            c, i = entry
            if c.broken:
                self._drop(c)
            elif not self.runstates.active(c.data.batch_id):
                self._resolve(c, i, "requeue")
            else:
                taken.append(entry)
        for _ in range(wakeups):
            lane.queue.put_nowait(None)
        rows = [(i.attempt_id, c.data.batch_id, i.job_id, sender.id, sender.version) for c, i in taken]
        try:
            owned = await self.claims.claim_many(rows)
        except Exception as exc:  # noqa: BLE001 - the database is away or restarting: nothing was sent
            log.warning("claim of %d sends failed (%r); trying again", len(rows), exc)
            self._put_back(lane, taken[1:])
            return False
        for (c, i), mine in zip(taken[1:], owned[1:], strict=True):
            if mine:
                lane.ready.append((c, i))
            else:
                self._spawn(self._refused(lane, c, i), name="refused")
        # Workers asleep on the empty queue take the rest.
        for _ in range(min(lane.idle_workers, len(lane.ready))):
            lane.queue.put_nowait(None)
        if owned[0]:
            return True
        await self._refused(lane, chunk, item)
        return None

    def _put_back(self, lane: Lane, entries: Sequence[Entry]) -> None:
        """Items taken from a lane's queue and not claimed: back in line, or, once the lane is
        retired (its workers may have ended), to the job's devices as they are now."""
        for chunk, item in entries:
            if lane.retired:
                self._spawn(self._route(chunk, item), name="route")
            else:
                lane.queue.put_nowait((chunk, item))

    async def _release(self, items: Sequence[events_pb2.WorkItem]) -> None:
        """Claims taken ahead whose sends never started are given back, so another copy of the
        work sends them at once. If the database is away they stay: the copy that finds one
        asks the provider after the grace, which never got them, and sends them then."""
        try:
            await self.attempts.release(attempt_ids=[i.attempt_id for i in items])
        except Exception as exc:  # noqa: BLE001 - see above: late, never lost or doubled
            log.warning("could not release %d unsent claims: %r", len(items), exc)

    async def _send(
        self, lane: Lane, provider: Provider, chunk: Chunk, item: events_pb2.WorkItem, *, held: bool = False
    ) -> None:
        batch_id = chunk.data.batch_id
        sender = lane.sender
        counted = False
        claimed = fresh = held  # fresh: claimed ahead, not sent yet

        async def go() -> str:
            nonlocal claimed, counted, fresh
            if not claimed or fresh:
                fresh = False
                if chunk.broken or self.stopping:
                    return "drop"
                if not self.runstates.active(batch_id):
                    return "stopped"
                if lane.retired and not (claimed and lane.send_claimed):
                    return "moved"  # the device changed or cannot send now: its work moves on
            if not claimed:
                try:
                    claim = (item.attempt_id, batch_id, item.job_id, sender.id, sender.version)
                    claimed = await self.claims.claim(claim)
                except Exception as exc:  # noqa: BLE001 - the database is away or restarting: not sent, try again
                    log.warning("claim of %s failed (%r); trying again", item.attempt_id, exc)
                    return "unclaimed"
                if not claimed:
                    return "refused"
            # Counted while at the provider: a stop waits for these to answer.
            self.sending += 1
            self.idle.clear()
            counted = True
            return ""

        request = SendRequest(attempt_id=item.attempt_id, sender=sender, to=item.to, text=item.text)
        delay = 0.5
        result: SendResult | str = ""
        for _ in range(RATE_LIMIT_RETRIES):
            try:
                result = await lane.send(provider, request, go)
            except Exception as exc:  # noqa: BLE001 - the request may have left: unknown, never resent
                if not claimed:
                    raise
                log.warning("send of %s broke off: %r", item.attempt_id, exc)
                result = SendResult(status="unknown", error=type(exc).__name__)
            finally:
                if counted:
                    self.sending -= 1
                    counted = False
                    if not self.sending:
                        self.idle.set()
            if result == "unclaimed":  # the database is away: keep the place and try again
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            if isinstance(result, str) or result.status != "rate_limited" or result.device_unavailable:
                break
            PROVIDER_THROTTLED.labels(sender.provider).inc()
            await asyncio.sleep(result.retry_after or 1.0)
        if held and result in ("drop", "stopped", "moved"):
            await self._release([item])
        if result == "drop":
            self._drop(chunk)
        elif result == "stopped":
            self._resolve(chunk, item, "requeue")
        elif result == "moved":
            await self._route(chunk, item)
        elif result == "refused":
            await self._refused(lane, chunk, item)
        elif isinstance(result, str):  # still unclaimed after every try: nothing went out
            self._spawn(self._route(chunk, item), name="route")
        elif result.device_unavailable:
            await self._device_refused(lane, chunk, item, result)
        elif result.status == "rate_limited":
            count_outcome("failed", channel=self.channel, provider=sender.provider)
            self._resolve(chunk, item, "failed", sender_id=sender.id, error="rate limited by provider")
        else:
            count_outcome(result.status, channel=self.channel, provider=sender.provider)
            self._resolve(
                chunk,
                item,
                result.status,
                sender_id=sender.id,
                error=result.error,
                provider_message_id=result.provider_message_id,
            )

    async def _device_refused(self, lane: Lane, chunk: Chunk, item: events_pb2.WorkItem, result: SendResult) -> None:
        """The device refused the send because it cannot send now: nothing went out. The device
        rests (its lane retired: what it queued or claimed ahead moves on), its state is asked
        for, the claim is given back and the item goes to the job's devices as they are now."""
        sender = lane.sender
        lane.send_claimed = False  # not even claims within a daily cap can go out through it
        if sender.id not in self.unavailable:
            fresh = self.can_send(sender.id)
            self.sender_unavailable(sender.id, result.error, for_s=max(result.retry_after, DEVICE_REST_S))
            provider = self.providers.get(sender.provider)
            if fresh and self.ask_device is not None and callable(getattr(provider, "device_state", None)):
                self._spawn(self.ask_device(sender), name=f"ask-device-{sender.id}")
        self._retire(lane)
        await self._give_back(item)
        await self._route(chunk, item)

    async def _give_back(self, item: events_pb2.WorkItem) -> None:
        """A claim whose send the provider refused (nothing went out) is given back before the
        item moves on: a copy of the work that found it would wait out the grace and then ask
        the provider, which may not be able to say (WAHA: `unknown` for a message never sent).
        So it waits for a database that is away, except at a stop (the redelivery finds it)."""
        delay = 0.5
        while True:
            try:
                await self.attempts.release(attempt_ids=[item.attempt_id])
                return
            except Exception as exc:  # noqa: BLE001 - the database is away: nothing was sent, try again
                if self.stopping:
                    log.warning("could not give back the refused claim of %s: %r", item.attempt_id, exc)
                    return
                log.warning("giving back the refused claim of %s failed (%r); trying again", item.attempt_id, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _refused(self, lane: Lane, chunk: Chunk, item: events_pb2.WorkItem) -> None:
        """A claim was refused: another copy of this work holds it, or the sender changed."""
        row = await self._row(item.attempt_id)
        if row is not None:
            self._spawn(self._recover(chunk, item, row), name="recover")
            return
        self.senders.forget()
        sender = lane.sender
        now = await self._retrying(lambda: self.senders.get([sender.id]))
        fresh = now.get(sender.id)
        if fresh is not None and fresh.version == sender.version:
            self._refused_unchanged(lane)
        else:
            log.info("sender %s changed; its queued work moves on", sender.id)
        self._retire(lane)
        await self._route(chunk, item)

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
        if chunk.closed:  # handed back at a stop: the redelivery reports it
            return
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
        # A hand-back (requeue) was never claimed: there is nothing on record to finish.
        if record and status != "requeue":
            chunk.finished.append((item.attempt_id, item.job_id, status, provider_message_id, error, sender_id))
        self._settled(chunk)
        if len(chunk.outcomes) >= FLUSH_AT or chunk.remaining == 0:
            self._spawn(self._flush(chunk), name="flush")

    def _drop(self, chunk: Chunk) -> None:
        """An item this delivery will not send (the chunk broke, the process stops): the
        redelivery of the unacked chunk sends it."""
        if chunk.closed:
            return
        chunk.dropped += 1
        self._settled(chunk)
        if chunk.remaining == 0:
            self._spawn(self._flush(chunk), name="flush")

    def _settled(self, chunk: Chunk) -> None:
        chunk.remaining -= 1
        self.in_flight -= 1
        if self.in_flight < self.max_in_flight:
            self.room.set()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            now = time.monotonic()
            # Pings first and together: a slow flush must not let another chunk's ack wait run out.
            due = [c for c in self.chunks if now - c.last_ping > self.ack_wait / 4]
            for chunk in due:
                chunk.last_ping = now
            await asyncio.gather(*(c.msg.in_progress() for c in due), return_exceptions=True)
            for chunk in list(self.chunks):
                if (chunk.outcomes or chunk.remaining == 0) and chunk.retry_at <= now:
                    await self._flush(chunk)

    async def _flush(self, chunk: Chunk, *, final: bool = False) -> None:
        """Record outcomes, then publish them; ack the chunk once it is fully resolved. A
        crash in between is safe: the redelivered chunk finds the attempts on record. A
        failed flush keeps its outcomes for the next try and stops the chunk's sends."""
        async with chunk.lock:
            if chunk.closed:
                return
            # Outcomes that come in while one lot is being published go out in the next lot:
            # the chunk closes only when none is left (its last one may arrive mid-publish).
            while chunk.outcomes:
                outcomes, chunk.outcomes = chunk.outcomes, []
                finished, chunk.finished = chunk.finished, []
                try:
                    # In the chunk's trace, from whichever task flushes it; its results carry it on.
                    with tracing.resumed(chunk.origin):
                        if finished:
                            await self.attempts.finish(batch_id=chunk.data.batch_id, rows=finished)
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
                except Exception:  # noqa: BLE001 - kept for the next try; the chunk sends no more
                    chunk.outcomes[:0] = outcomes
                    chunk.finished[:0] = finished
                    chunk.failures += 1
                    chunk.retry_at = time.monotonic() + min(0.5 * 2**chunk.failures, 30.0)
                    if not chunk.broken:
                        log.exception("flushing outcomes of chunk %s failed; it sends no more", chunk.data.chunk_seq)
                        chunk.broken = True
                    return
                chunk.failures = 0
            if chunk.remaining == 0 or final:
                chunk.closed = True
                self.chunks.discard(chunk)
                self.by_seq.pop(chunk.msg.metadata.sequence.stream, None)
                self.in_flight -= chunk.remaining  # left behind at a stop
                with contextlib.suppress(Exception):
                    if chunk.remaining == 0 and chunk.dropped == 0:
                        await chunk.msg.ack()
                    else:
                        # What was not sent here goes out from the redelivery, now rather than
                        # after the ack wait.
                        await chunk.msg.nak()
