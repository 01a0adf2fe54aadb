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
        if durable_id:
            await bus.publish(self.js, subject, event, msg_id=durable_id)
        else:
            await self.nc.publish(subject, event.SerializeToString())
