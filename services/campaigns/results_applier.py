"""Applies the dispatchers' results in batches: job states, batch counters, completion.

A WhatsApp batch ends `failed` when none of its recipients could be sent (FINISH_IF_DONE) or
when a dispatcher reports that none of its devices is active any more: then it can no longer
proceed, and its jobs not yet released fail at once rather than one release at a time.

When its devices are active but none can send for now (disconnected, waiting for a QR scan,
at its daily cap), the dispatcher hands the recipients back unsent (`requeue` with
NO_CONNECTED_SENDER): the batch is suspended with the reason, in the same transaction, until
one of its devices connects again (device_events.py)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal
from uuid import UUID

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pregonero.events.v1 import events_pb2

from services.runtime import bus

from .batch_publisher import Notifier
from .batches import Batches
from .call_outcomes import CallResults
from .repo import NO_CONNECTED_DEVICES, CampaignsRepo

log = logging.getLogger("pregonero.campaigns.results")

# The reason a batch whose devices are all gone fails with, as the bulk sender shows it.
NO_DEVICES = "No hay devices disponibles"

DURABLE = "campaigns-results"
FETCH = 64


class ResultsApplier:
    def __init__(
        self,
        repo: CampaignsRepo,
        js: JetStreamContext,
        notifier: Notifier,
        batches: Batches,
        calls: CallResults,
        on_applied: Callable[[], None],
        on_call_ended: Callable[[], None],
    ) -> None:
        self.repo, self.js, self.notifier, self.batches, self.calls = repo, js, notifier, batches, calls
        self.on_applied = on_applied
        self.on_call_ended = on_call_ended

    async def run(self) -> None:
        await bus.consume(self.js, "events.job.>", durable=DURABLE, handle=self.handle, fetch=FETCH)

    async def handle(self, msgs: list[Msg]) -> None:
        groups: dict[str, list[events_pb2.JobOutcome]] = defaultdict(list)
        for msg in msgs:
            chunk = events_pb2.ResultChunk.FromString(msg.data)
            groups[chunk.batch_id].extend(chunk.outcomes)
        for batch_id, outcomes in groups.items():
            await self.apply(UUID(batch_id), outcomes)
        self.on_applied()

    async def apply(self, batch_id: UUID, outcomes: list[events_pb2.JobOutcome]) -> None:
        async with self.repo.pool.acquire() as conn, conn.transaction():
            batch = await self.repo.lock_batch(conn, batch_id=batch_id)
            if batch is None:
                return  # the batch was deleted; its results have nowhere to go
            if batch["channel"] == "voice":
                await self.calls.apply(conn, batch, outcomes)
                finished = await self.repo.finish_if_done(conn, batch_id=batch_id)
            else:
                applied, row, finished = await self._apply_messages(conn, batch, outcomes)
                suspended = None
                if self._waiting_for_devices(applied, outcomes):
                    suspended = await self.repo.suspend_locked(conn, batch_id=batch_id, reason=NO_CONNECTED_DEVICES)
                    row = suspended or row
        # Committed: what follows only informs. A failure here must not fail the results
        # (they are applied; a late socket reads the state from the snapshot instead).
        try:
            if batch["channel"] == "voice":
                self.on_call_ended()
            elif suspended is not None:
                # What waits at the dispatchers is handed back at once, not item by item.
                await self.notifier.run_state(batch_id, "paused")
                reason = NO_CONNECTED_DEVICES
                await self.notifier.publish(self.notifier.event(suspended, "suspended", error=reason, message=reason))
            if batch["channel"] != "voice" and applied:
                ids = {r["job_id"] for r in applied if r["status"] in ("sent", "failed")}
                shown = [o for o in outcomes if o.job_id in ids]
                await self.notifier.publish(self.notifier.event(finished or row, "progress", outcomes=shown))
            if finished is not None:
                await self.batches.publish_finished(finished)
        except Exception:  # noqa: BLE001
            log.exception("publishing progress of batch %s failed", batch_id)

    @staticmethod
    def _waiting_for_devices(applied: list[asyncpg.Record], outcomes: list[events_pb2.JobOutcome]) -> bool:
        """Some recipients were handed back (now, not in a replay) because no device could send."""
        requeued = {r["job_id"] for r in applied if r["status"] == "requeue"}
        return any(o.error == bus.NO_CONNECTED_SENDER and o.job_id in requeued for o in outcomes)

    async def _apply_messages(
        self, conn: asyncpg.Connection, batch: asyncpg.Record, outcomes: list[events_pb2.JobOutcome]
    ) -> tuple[list[asyncpg.Record], asyncpg.Record, asyncpg.Record | None]:
        batch_id = batch["batch_id"]
        applied = await self.repo.apply_outcomes(
            conn,
            batch_id=batch_id,
            job_ids=[o.job_id for o in outcomes],
            statuses=[o.status for o in outcomes],
            sender_ids=[o.sender_id for o in outcomes],
            errors=[o.error for o in outcomes],
            attempt_nos=[int(o.attempt_id.rsplit(":", 1)[1]) for o in outcomes],
            # A stopped batch releases nothing more: what is handed back ends there.
            cancelled=batch["status"] in ("cancelled", "failed"),
        )
        counts: dict[str, int] = defaultdict(int)
        for r in applied:
            counts[r["status"]] += 1
        # What the sent attempts cost: the same figures accounts charges from these results.
        costs = {o.job_id: o.cost for o in outcomes if o.status == "sent" and o.cost}
        cost = sum((Decimal(costs[r["job_id"]]) for r in applied if r["job_id"] in costs), Decimal(0))
        used = {o.sender_id for o in outcomes if o.sender_id}
        status_of = {r["job_id"]: r["status"] for r in applied}
        last_sent: tuple[str, int] = ("", 0)
        last_failed: tuple[str, int, str] = ("", 0, "")
        for o in outcomes:
            if status_of.get(o.job_id) == "sent":
                last_sent = (o.to, o.sender_id)
            elif status_of.get(o.job_id) == "failed":
                last_failed = (o.to, o.sender_id, o.error)
        row = await self.repo.add_counters(
            conn,
            batch_id=batch_id,
            sent=counts["sent"],
            failed=counts["failed"],
            cancelled=counts["cancelled"],
            unknown=counts["unknown"],
            resolved=len(applied),
            devices_used=len(used),
            cost=cost,
            last_sent=last_sent,
            last_failed=last_failed,
        )
        if any(o.error == bus.NO_ACTIVE_SENDER and status_of.get(o.job_id) == "failed" for o in outcomes):
            row = await self.repo.fail_batch(conn, batch_id=batch_id, reason=NO_DEVICES) or row
        return applied, row, await self.repo.finish_if_done(conn, batch_id=batch_id)
