"""The feeder: keeps each running batch's window of released jobs full, in chunks on DISPATCH.

Each release is paid for first: credit is reserved in accounts (a hold, see credit.py) and
jobs the account cannot pay for become `suspended` until a top-up. A release publishes its
chunks before the transaction that records it commits. If the commit
fails, the same jobs are released again under new chunk numbers with the same attempt ids,
and the dispatchers' attempt record makes the second copy a no-op: nothing is lost and
nothing is sent twice.

A chunk is bounded by bytes as well as by count, so it always fits the server's max_payload:
jobs are packed greedily in order. A job that alone would not fit can never be published; it
is failed, with its size as the reason, in the same transaction that releases the others, so
it neither blocks its batch nor is lost.

Batches do not share one fate: a release (or settlement) that fails is logged and backs off
that batch alone (1 s, doubling to 60 s, forgotten on its next success) while the round goes
on with the others, and settlement runs whatever happened to the releases. Only when the list
of batches itself cannot be read does the whole round fail (and the round loop wait)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg
from nats.js import JetStreamContext
from pregonero.events.v1 import events_pb2

from services.runtime import bus, tracing
from services.runtime.lifecycle import Rounds

from .batch_publisher import Notifier
from .batches import Batches
from .campaign_metrics import MESSAGES_RELEASED
from .credit import ChargesPending, Cover, Credit, reserve
from .repo import NO_CONNECTED_DEVICES, CampaignsRepo
from .template import Template, compile_for

log = logging.getLogger("pregonero.campaigns.feeder")

CHUNK_JOBS = 500
# Half of NATS's default max_payload (1 MiB), far from the limit; a server that announces a
# smaller max_payload lowers it (Feeder._budget).
CHUNK_BYTES = 512 * 1024
# Room left in a message for its NATS headers (Nats-Msg-Id, request id) when the server's
# max_payload is the tighter bound.
HEADER_ROOM = 4096
PROGRESS_BLOCK = 1000  # chunk_processing events, as the bulk-send document describes
# A stopped batch whose charges have not all arrived by then is settled anyway.
SETTLE_PATIENCE = timedelta(minutes=10)
# Compiled templates kept, least recently used dropped first: more than the batches that run at once.
TEMPLATE_CACHE = 1000
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0

# The widest chunk_seq, hold id suffix and unit price (numeric(18, 4)) a chunk header can carry:
# a header measured with them bounds every real one.
_MAX_SEQ = 2**63 - 1
_MAX_HOLD_SEQ = 2**31 - 1
_WIDEST_PRICE = "9" * 14 + "." + "9" * 4


def attempt_id(batch_id: object, job_id: int, attempt_no: int) -> str:
    return f"{batch_id}:{job_id}:{attempt_no}"


def _varint_size(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


_ITEMS_TAG = _varint_size(events_pb2.DispatchChunk.DESCRIPTOR.fields_by_name["items"].number << 3)


def item_size(item: events_pb2.WorkItem) -> int:
    """What one item adds to a chunk's serialized size: its field tag, its length and itself."""
    n = item.ByteSize()
    return _ITEMS_TAG + _varint_size(n) + n


def pack(sizes: Sequence[int], *, room: int, max_items: int) -> list[slice]:
    """Consecutive runs of items, greedily in order, each at most `max_items` long and
    `room` bytes in total. Every size must be at most `room`."""
    parts: list[slice] = []
    start, used = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (used + size > room or i - start >= max_items):
            parts.append(slice(start, i))
            start, used = i, 0
        used += size
    if start < len(sizes):
        parts.append(slice(start, len(sizes)))
    return parts


class Backoff:
    """Per-key back-off after failures: 1 s, 2 s, 4 s ... at most 60 s, forgotten on success."""

    def __init__(
        self, *, clock: Callable[[], float], first: float = BACKOFF_FIRST_S, cap: float = BACKOFF_MAX_S
    ) -> None:
        self.clock, self.first, self.cap = clock, first, cap
        self._failing: dict[Hashable, tuple[int, float]] = {}  # key → (failures in a row, not before)

    def ready(self, key: Hashable) -> bool:
        entry = self._failing.get(key)
        return entry is None or self.clock() >= entry[1]

    def failed(self, key: Hashable) -> float:
        """Record a failure; the seconds until the key is tried again."""
        failures = self._failing.get(key, (0, 0.0))[0] + 1
        delay = min(self.cap, self.first * 2 ** min(failures - 1, 32))
        self._failing[key] = (failures, self.clock() + delay)
        return delay

    def succeeded(self, key: Hashable) -> None:
        self._failing.pop(key, None)

    def keep_only(self, keys: Iterable[Hashable]) -> None:
        """Forget keys no longer listed (a batch that stopped or was deleted): the state stays
        as small as the list. One that comes back starts afresh, which costs one early try."""
        listed = set(keys)
        for key in [k for k in self._failing if k not in listed]:
            del self._failing[key]


def _chunk(
    batch: asyncpg.Record,
    *,
    seq: int,
    hold_id: str,
    unit_price: str,
    items: Sequence[events_pb2.WorkItem] = (),
) -> events_pb2.DispatchChunk:
    return events_pb2.DispatchChunk(
        batch_id=str(batch["batch_id"]),
        account_id=batch["account_id"],
        channel=batch["channel"],
        chunk_seq=seq,
        sender_ids=batch["sender_ids"],
        hold_id=hold_id,
        unit_price=unit_price,
        items=items,
    )


class Feeder:
    def __init__(
        self,
        repo: CampaignsRepo,
        js: JetStreamContext,
        notifier: Notifier,
        credit: Credit,
        batches: Batches,
        *,
        chunk_jobs: int = CHUNK_JOBS,
        chunk_bytes: int = CHUNK_BYTES,
        idle_wait: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.repo, self.js, self.notifier = repo, js, notifier
        self.credit, self.batches = credit, batches
        self.chunk_jobs, self.chunk_bytes = chunk_jobs, chunk_bytes
        self.rounds = Rounds(self.round, name="feeder", idle_wait=idle_wait)
        self._templates: OrderedDict[UUID, Template] = OrderedDict()
        # Separate states: a batch is either running (released) or stopped (settled).
        self.release_backoff = Backoff(clock=clock)
        self.settle_backoff = Backoff(clock=clock)

    def wake(self) -> None:
        """Results freed room in a window, or a batch became runnable."""
        self.rounds.wake()

    async def run(self) -> None:
        await self.rounds.run()

    async def round(self) -> int:
        """Release every runnable batch, then settle the stopped ones."""
        try:
            released = await self._release_runnable()
        except Exception:
            # Whatever happened to the releases, stopped batches' credit must not stay held;
            # the round still fails, so the loop waits before the next.
            await self.settle()
            raise
        await self.settle()
        return released

    async def _release_runnable(self) -> int:
        # Failing to list the batches fails the round (the loop waits a second): that is the
        # database, not one batch.
        batch_ids = await self.repo.runnable_batches()
        self.release_backoff.keep_only(batch_ids)
        released = 0
        for batch_id in batch_ids:
            if not self.release_backoff.ready(batch_id):
                continue
            try:
                released += await self.release(batch_id)
            except Exception:  # noqa: BLE001 - this batch waits; the others go on
                delay = self.release_backoff.failed(batch_id)
                log.exception("releasing batch %s failed; next try in %.0f s", batch_id, delay)
            else:
                self.release_backoff.succeeded(batch_id)
        return released

    def _template(self, batch_id: UUID, text: str, syntax: str = "valor") -> Template:
        """The batch's compiled template, in the syntax it was written in (`template_syntax`)."""
        template = self._templates.get(batch_id)
        if template is None:
            template = self._templates[batch_id] = compile_for(syntax, text)
            if len(self._templates) > TEMPLATE_CACHE:
                self._templates.popitem(last=False)
        else:
            self._templates.move_to_end(batch_id)
        return template

    def _budget(self) -> int:
        """A chunk's largest serialized size: ours, or less when the server allows less."""
        # nats-py keeps the connection (and the max_payload its server announced) on the
        # JetStream context without a public accessor; without one, ours stands.
        server = getattr(getattr(self.js, "_nc", None), "max_payload", 0)
        if isinstance(server, int) and server > HEADER_ROOM:
            return min(self.chunk_bytes, server - HEADER_ROOM)
        return self.chunk_bytes

    async def release(self, batch_id: UUID) -> int:
        """Fill the batch's window; how many jobs left its queue (published, or failed as too
        large to publish)."""
        suspended = finished = progress = None
        sent: list[int] = []
        too_big: list[int] = []
        async with self.repo.pool.acquire() as conn, conn.transaction():
            batch = await self.repo.lock_for_release(conn, batch_id=batch_id)
            if batch is None:
                return 0
            room = batch["window_size"] - batch["queued_jobs"]
            if room <= 0:
                return 0
            requeued = list(await self.repo.requeued_jobs(conn, batch_id=batch_id, limit=room))
            fresh: list[asyncpg.Record] = []
            if len(requeued) < room:
                fresh = list(
                    await self.repo.next_jobs(
                        conn, batch_id=batch_id, after=batch["released_upto"], limit=room - len(requeued)
                    )
                )
            jobs = requeued + fresh
            if not jobs:
                return 0
            template = self._template(batch_id, batch["message_template"], batch["template_syntax"])
            items = [
                events_pb2.WorkItem(
                    job_id=j["job_id"],
                    attempt_no=j["attempts"] + 1,
                    to=j["phone"],
                    attempt_id=attempt_id(batch_id, j["job_id"], j["attempts"] + 1),
                    text=template.render(j["vals"]),
                )
                for j in jobs
            ]
            sizes = [item_size(item) for item in items]
            widest = _chunk(
                batch, seq=_MAX_SEQ, hold_id=f"{batch_id}:{_MAX_HOLD_SEQ}", unit_price=_WIDEST_PRICE
            ).ByteSize()
            fits = self._budget() - widest  # room for items in any chunk of this batch
            sendable = [k for k, size in enumerate(sizes) if size <= fits]
            too_big = [k for k, size in enumerate(sizes) if size > fits]
            if sendable:
                remaining = len(requeued) + batch["total_jobs"] - batch["released_upto"]
                cover = await reserve(
                    self.credit,
                    self.repo,
                    conn,
                    batch,
                    want=len(sendable),
                    remaining=remaining,
                    quote=lambda: self.credit.price(batch["account_id"]),
                )
            else:  # nothing to pay for: no hold taken
                cover = Cover(count=0, hold_id="", price=batch["unit_price"], left=batch["hold_left"])
            sent = sendable[: cover.count]
            # The keyset moves past the fresh jobs dealt with (published or failed) up to the
            # first that waits for credit; everything after it stays pending.
            done = set(sent) | set(too_big)
            upto = batch["released_upto"]
            for k in range(len(requeued), len(jobs)):
                if k not in done:
                    break
                upto = jobs[k]["job_id"]
            if sent:
                await self._publish(conn, batch, [items[k] for k in sent], [sizes[k] for k in sent], cover, fits)
            if done:
                await self.repo.mark_released(conn, batch_id=batch_id, upto=upto, count=len(sent), left=cover.left)
            if too_big:
                dropped = [(jobs[k], items[k], sizes[k]) for k in too_big]
                progress, finished = await self._fail_too_big(conn, batch, dropped, fits)
            if cover.short:
                # The rest of this round and every job not released yet wait for credit.
                short = [jobs[k]["job_id"] for k in sendable[cover.count :] if k < len(requeued)]
                suspended = await self.repo.suspend(conn, batch_id=batch_id, upto=upto, also=short, reason=cover.short)
        # Committed: what follows only informs, and must not make a done release count as failed.
        if sent:
            MESSAGES_RELEASED.labels(batch["channel"]).inc(len(sent))
        try:
            if done:
                await self._announce(batch, upto)
            if progress is not None:
                await self.notifier.publish(progress)
            if finished is not None:
                await self.batches.publish_finished(finished)
            if suspended is not None:
                log.info("batch %s suspended: %s", batch_id, cover.short)
                await self.notifier.publish(
                    self.notifier.event(suspended, "suspended", error=cover.short, message=cover.short)
                )
        except Exception:  # noqa: BLE001
            log.exception("publishing the events of batch %s failed", batch_id)
        return len(sent) + len(too_big)

    async def _publish(
        self,
        conn: asyncpg.Connection,
        batch: asyncpg.Record,
        items: list[events_pb2.WorkItem],
        sizes: list[int],
        cover: Cover,
        fits: int,
    ) -> None:
        """The released jobs, in chunks on DISPATCH, before the release commits."""
        batch_id = batch["batch_id"]
        subject = f"dispatch.{batch['channel']}.{batch['account_id']}"
        unit_price = str(cover.price) if cover.hold_id else ""
        publishes = []
        for part in pack(sizes, room=fits, max_items=self.chunk_jobs):
            seq = await self.repo.next_chunk_seq(conn)
            chunk = _chunk(batch, seq=seq, hold_id=cover.hold_id, unit_price=unit_price, items=items[part])
            publishes.append(bus.publish(self.js, subject, chunk, msg_id=f"{batch_id}:{seq}"))
        # Every publish has ended before the transaction does, whether it commits or not. Under
        # the batch's origin: its chunks carry the request id and trace of its upload on.
        with tracing.incoming("feeder release", [tracing.from_stored(batch["origin"])]):
            outcomes = await asyncio.gather(*publishes, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def _fail_too_big(
        self,
        conn: asyncpg.Connection,
        batch: asyncpg.Record,
        dropped: list[tuple[asyncpg.Record, events_pb2.WorkItem, int]],
        fits: int,
    ) -> tuple[events_pb2.BatchEvent, asyncpg.Record | None]:
        """Jobs (with their item and its size) whose message fits in no chunk end `failed`, as
        their attempt's outcome, recorded as a result would be; the progress event to publish,
        and the batch if that finished it."""
        batch_id = batch["batch_id"]
        jobs = [job for job, _, _ in dropped]
        reasons = [
            f"message too large to send: {size} bytes, one dispatch message carries at most {fits}"
            for _, _, size in dropped
        ]
        applied = await self.repo.apply_outcomes(
            conn,
            batch_id=batch_id,
            job_ids=[j["job_id"] for j in jobs],
            statuses=["failed"] * len(jobs),
            sender_ids=[0] * len(jobs),
            errors=reasons,
            attempt_nos=[j["attempts"] + 1 for j in jobs],
            cancelled=False,  # lock_for_release only locks running batches
        )
        # Never released, so never counted in flight: nothing to take off queued_jobs.
        row = await self.repo.add_counters(
            conn,
            batch_id=batch_id,
            sent=0,
            failed=len(applied),
            cancelled=0,
            unknown=0,
            resolved=0,
            devices_used=0,
            cost=Decimal(0),
        )
        finished = await self.repo.finish_if_done(conn, batch_id=batch_id)
        log.warning("batch %s: %d jobs failed, too large to send", batch_id, len(applied))
        outcomes = [
            events_pb2.JobOutcome(
                job_id=item.job_id, attempt_id=item.attempt_id, status="failed", to=item.to, error=reason
            )
            for (_, item, _), reason in zip(dropped, reasons, strict=True)
        ]
        return self.notifier.event(finished or row, "progress", outcomes=outcomes), finished

    async def settle(self) -> None:
        """Release the holds of batches that have stopped (paused, suspended, cancelled,
        completed) once nothing of them is in flight and accounts has booked their charges."""
        batch_ids = await self.repo.unsettled_batches()
        self.settle_backoff.keep_only(batch_ids)
        for batch_id in batch_ids:
            if not self.settle_backoff.ready(batch_id):
                continue
            try:
                await self._settle(batch_id)
            except Exception:  # noqa: BLE001 - this batch waits; the others go on
                delay = self.settle_backoff.failed(batch_id)
                log.exception("settling batch %s failed; next try in %.0f s", batch_id, delay)
            else:
                self.settle_backoff.succeeded(batch_id)

    async def _settle(self, batch_id: UUID) -> None:
        async with self.repo.pool.acquire() as conn, conn.transaction():
            batch = await self.repo.lock_for_settle(conn, batch_id=batch_id)
            if batch is None:
                return
            # Charges still on their way would find their hold closed: wait for them,
            # unless the batch has been still for long (a lost result must not pin credit).
            force = datetime.now(UTC) - batch["updated_at"] > SETTLE_PATIENCE
            try:
                freed = await self.credit.release_batch(
                    batch["account_id"], f"{batch_id}:", expected=batch["total_cost"], force=force
                )
            except ChargesPending:
                return
            await self.repo.mark_settled(conn, batch_id=batch_id)
        price = batch["unit_price"]
        waiting_for_credit = batch["status"] == "suspended" and batch["suspension_reason"] != NO_CONNECTED_DEVICES
        if waiting_for_credit and price > 0 and freed >= price:
            # What the holds had left pays for more: try again before waiting for a top-up
            # (a batch waiting for its devices waits for them: device_events.py).
            await self.batches.resume_suspended(batch_id)
            self.wake()

    async def _announce(self, batch: Any, upto: int) -> None:
        """job_started on the first release, chunk_processing per block of 1,000 recipients."""
        before = batch["released_upto"]
        total = batch["total_jobs"]
        if batch["started_at"] is None:
            await self.notifier.publish(
                self.notifier.event(batch, "job_started", message=f"Iniciando envío masivo de {total} mensajes"),
                durable_id=f"{batch['batch_id']}:started",
            )
        block = (before // PROGRESS_BLOCK) * PROGRESS_BLOCK
        while block < upto:
            end = min(block + PROGRESS_BLOCK, total)
            if block >= before or before == 0:
                await self.notifier.publish(
                    self.notifier.event(
                        batch,
                        "chunk_processing",
                        chunk_start=block,
                        chunk_end=end,
                        message=f"Procesando chunk {block}-{end} de {total}",
                    )
                )
            block += PROGRESS_BLOCK
