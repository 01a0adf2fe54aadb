"""What campaigns tells the others: batch run state (KV, watched by dispatchers), batch
events (for live pushes), and, for the batches of scheduled messages, the same events as the
message's (`events.message.<account_id>`): the message's progress comes from the same place as
a bulk job's."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from datetime import UTC, datetime

import asyncpg
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pregonero.events.v1 import events_pb2

from services.runtime import bus, tracing
from services.runtime.protos import to_timestamp

# NATS refuses a message over its max_payload (1 MiB by default). A progress event of one
# results fetch (up to 64 result chunks of 500) carries tens of thousands of outcomes, several
# MiB: its outcomes go out in parts of at most this many bytes, each with the counters.
EVENT_BYTES = 512 * 1024
# A message's progress goes out at most this often (per campaigns process); its last one
# (`final`) always does.
MESSAGE_PROGRESS_EVERY_S = 1.0
# Batches of scheduled messages whose events were built here lately: far more than run at once.
REMEMBERED_MESSAGES = 10_000
# What a batch event means for its scheduled message's status.
MESSAGE_STATUS = {"paused": "paused", "suspended": "paused", "resumed": "sending", "cancelled": "cancelled"}
# A batch's status as its message's (the view message_states says the same in SQL).
FINAL_STATUS = {"completed": "sent", "failed": "failed", "cancelled": "cancelled"}
RUNNING_STATUS = {"paused": "paused", "suspended": "paused", **FINAL_STATUS}


def in_parts(event: events_pb2.BatchEvent, budget: int = EVENT_BYTES) -> list[events_pb2.BatchEvent]:
    """The event as it is when it fits `budget`, else one copy per slice of its outcomes."""
    if event.ByteSize() <= budget or len(event.outcomes) <= 1:
        return [event]
    head = events_pb2.BatchEvent()
    head.CopyFrom(event)
    head.ClearField("outcomes")
    room = budget - head.ByteSize()
    parts: list[events_pb2.BatchEvent] = []
    part: list[events_pb2.JobOutcome] = []
    used = 0
    for outcome in event.outcomes:
        size = outcome.ByteSize() + 8  # the field's tag and length
        if part and used + size > room:
            parts.append(_with(head, part))
            part, used = [], 0
        part.append(outcome)
        used += size
    parts.append(_with(head, part))
    return parts


def _with(head: events_pb2.BatchEvent, outcomes: list[events_pb2.JobOutcome]) -> events_pb2.BatchEvent:
    event = events_pb2.BatchEvent()
    event.CopyFrom(head)
    event.outcomes.extend(outcomes)
    return event


def state_key(batch_id: object) -> str:
    return f"batch.{batch_id}"


class Notifier:
    def __init__(self, nc: NATS, js: JetStreamContext, kv: KeyValue) -> None:
        self.nc, self.js, self.kv = nc, js, kv
        # batch_id → message_id, learnt from the rows events are built from (`event`), so
        # `publish` knows which batch events are a message's without asking the database.
        self._message_of: OrderedDict[str, str] = OrderedDict()
        self._last_progress: dict[str, float] = {}

    async def run_state(self, batch_id: object, state: str) -> None:
        value = events_pb2.BatchRunState(
            batch_id=str(batch_id), state=state, changed_at=to_timestamp(datetime.now(UTC))
        )
        await self.kv.put(state_key(batch_id), value.SerializeToString())

    async def forget(self, batch_id: object) -> None:
        """A finished batch has nothing in flight: drop its state so the bucket (and every
        dispatcher's copy) holds running batches only."""
        await self.kv.delete(state_key(batch_id))

    def event(
        self, row: asyncpg.Record, kind: str, *, outcomes: Iterable[events_pb2.JobOutcome] = (), **fields: object
    ) -> events_pb2.BatchEvent:
        message_id = row.get("message_id")
        if message_id is not None:
            self._message_of[str(row["batch_id"])] = str(message_id)
            self._message_of.move_to_end(str(row["batch_id"]))
            if len(self._message_of) > REMEMBERED_MESSAGES:
                self._message_of.popitem(last=False)
        return events_pb2.BatchEvent(
            batch_id=str(row["batch_id"]),
            account_id=row["account_id"],
            type=kind,
            sent=row["sent_jobs"],
            failed=row["failed_jobs"],
            total=row["total_jobs"],
            status=row["status"],
            devices_used=row["devices_used"],
            parallel_workers=len(row["sender_ids"]),
            channel=row["channel"],
            outcomes=list(outcomes),
            at=to_timestamp(datetime.now(UTC)),
            **fields,  # type: ignore[arg-type]
        )

    async def publish(self, event: events_pb2.BatchEvent, *, durable_id: str = "") -> None:
        """Lifecycle events go through JetStream with a dedup id; progress snapshots are
        fire-and-forget (the next one supersedes a lost one)."""
        subject = f"events.batch.{event.batch_id}"
        for n, part in enumerate(in_parts(event)):
            if durable_id:
                await bus.publish(self.js, subject, part, msg_id=durable_id if n == 0 else f"{durable_id}:{n}")
            else:
                await self.nc.publish(subject, part.SerializeToString(), headers=tracing.live_headers())
        message_id = self._message_of.get(event.batch_id)
        if message_id is not None:
            await self._as_message(event, message_id)

    async def message_event(self, account_id: str, message_id: object, kind: str, **fields: object) -> None:
        """A scheduled message's `status` or `progress`, for its account's live sockets (core
        NATS: one missed is read from the message's state on the next request)."""
        event = events_pb2.MessageEvent(
            account_id=account_id,
            message_id=str(message_id),
            type=kind,
            at=to_timestamp(datetime.now(UTC)),
            **fields,  # type: ignore[arg-type]
        )
        await self.nc.publish(f"events.message.{account_id}", event.SerializeToString(), headers=tracing.live_headers())

    async def _as_message(self, event: events_pb2.BatchEvent, message_id: str) -> None:
        counters = {"sent": event.sent, "failed": event.failed, "total": event.total}
        if event.type == "progress":
            now = time.monotonic()
            if now - self._last_progress.get(message_id, -MESSAGE_PROGRESS_EVERY_S) < MESSAGE_PROGRESS_EVERY_S:
                return
            self._last_progress[message_id] = now
            if len(self._last_progress) > REMEMBERED_MESSAGES:  # ones another replica finished
                del self._last_progress[next(iter(self._last_progress))]
            status = RUNNING_STATUS.get(event.status, "sending")
            await self.message_event(event.account_id, message_id, "progress", status=status, **counters)
        elif event.type in ("job_completed", "job_failed"):
            status = FINAL_STATUS.get(event.status, "sent")
            if status != "cancelled":  # a cancel was told when it happened
                await self.message_event(event.account_id, message_id, "status", status=status)
            await self.message_event(event.account_id, message_id, "progress", status=status, final=True, **counters)
            self._last_progress.pop(message_id, None)
            self._message_of.pop(event.batch_id, None)
        elif event.type in MESSAGE_STATUS:
            await self.message_event(event.account_id, message_id, "status", status=MESSAGE_STATUS[event.type])
