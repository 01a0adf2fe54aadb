"""What campaigns tells the others: batch run state (KV, watched by dispatchers) and batch
events (for live pushes)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

import asyncpg
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from pregonero.events.v1 import events_pb2

from services.runtime import bus
from services.runtime.protos import to_timestamp

# NATS refuses a message over its max_payload (1 MiB by default). A progress event of one
# results fetch (up to 64 result chunks of 500) carries tens of thousands of outcomes, several
# MiB: its outcomes go out in parts of at most this many bytes, each with the counters.
EVENT_BYTES = 512 * 1024


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
                await self.nc.publish(subject, part.SerializeToString())
