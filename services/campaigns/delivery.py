"""Applies what providers report after accepting a message (delivered, read, failed after
all) to the recipients it was sent to. Reports name the attempt we gave the provider; one
that is not ours (a message sent outside Pregonero from the same business number) is
ignored."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pregonero.events.v1 import events_pb2

from services.runtime import bus
from services.runtime.protos import from_timestamp

from .repo import CampaignsRepo

log = logging.getLogger("pregonero.campaigns.delivery")

DURABLE = "campaigns-delivery"
# Later states win: read implies delivered, and failed ends it.
RANK = {"sent": 0, "delivered": 1, "read": 2, "failed": 3}


def job_of(attempt_id: str) -> tuple[UUID, int] | None:
    """The (batch, job) of a WhatsApp attempt id "<batch_id>:<job_id>:<attempt_no>"."""
    parts = attempt_id.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    try:
        return UUID(parts[0]), int(parts[1])
    except ValueError:
        return None


class DeliveryApplier:
    def __init__(self, repo: CampaignsRepo, js: JetStreamContext) -> None:
        self.repo, self.js = repo, js

    async def run(self) -> None:
        await bus.consume(self.js, "events.delivery.>", durable=DURABLE, handle=self.handle)

    async def handle(self, msgs: list[Msg]) -> None:
        jobs: dict[tuple[UUID, int], _Job] = {}
        for msg in msgs:
            for report in events_pb2.DeliveryReports.FromString(msg.data).reports:
                key = job_of(report.attempt_id)
                if key is not None and report.status in RANK:
                    jobs.setdefault(key, _Job()).add(report)
        rows = [
            (batch, job, s.status, s.delivered_at, s.read_at, s.error)
            for (batch, job), s in jobs.items()
            if s.status != "sent"  # nothing to add to what the send itself recorded
        ]
        updated = await self.repo.apply_delivery(rows=rows)
        log.debug("delivery reports: %d jobs, %d updated", len(rows), updated)


@dataclass
class _Job:
    """One job's reports in a batch: its furthest state, when it was first delivered and read."""

    status: str = "sent"
    delivered_at: datetime | None = None
    read_at: datetime | None = None
    error: str | None = None

    def add(self, report: events_pb2.DeliveryReport) -> None:
        if RANK[report.status] > RANK[self.status]:
            self.status = report.status
        at = from_timestamp(report.at) if report.HasField("at") else None
        if report.status in ("delivered", "read"):  # read implies delivered
            self.delivered_at = _earliest(self.delivered_at, at)
        if report.status == "read":
            self.read_at = _earliest(self.read_at, at)
        if report.status == "failed":
            self.error = report.error or "failed"


def _earliest(current: datetime | None, at: datetime | None) -> datetime | None:
    if at is None or current is None:
        return current or at
    return min(current, at)
