"""The feeder: keeps each running batch's window of released jobs full, in chunks on DISPATCH.

Each release is paid for first: credit is reserved in accounts (a hold, see credit.py) and
jobs the account cannot pay for become `suspended` until a top-up. A release publishes its
chunks before the transaction that records it commits. If the commit
fails, the same jobs are released again under new chunk numbers with the same attempt ids,
and the dispatchers' attempt record makes the second copy a no-op: nothing is lost and
nothing is sent twice."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from uuid import UUID

from nats.js import JetStreamContext
from pregonero.events.v1 import events_pb2

from services.runtime import bus
from services.runtime.lifecycle import Rounds

from .batches import Batches
from .credit import ChargesPending, Cover, Credit, reserve
from .notify import Notifier
from .repo import CampaignsRepo
from .template import Template, compile_template

log = logging.getLogger("pregonero.campaigns.feeder")

CHUNK_JOBS = 500
PROGRESS_BLOCK = 1000  # chunk_processing events, as the bulk-send document describes
# A stopped batch whose charges have not all arrived by then is settled anyway.
SETTLE_PATIENCE = timedelta(minutes=10)


def attempt_id(batch_id: object, job_id: int, attempt_no: int) -> str:
    return f"{batch_id}:{job_id}:{attempt_no}"


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
        idle_wait: float = 0.25,
    ) -> None:
        self.repo, self.js, self.notifier = repo, js, notifier
        self.credit, self.batches = credit, batches
        self.chunk_jobs = chunk_jobs
        self.rounds = Rounds(self.round, name="feeder", idle_wait=idle_wait)
        self._templates: dict[UUID, Template] = {}

    def wake(self) -> None:
        """Results freed room in a window, or a batch became runnable."""
        self.rounds.wake()

    async def run(self) -> None:
        await self.rounds.run()

    async def round(self) -> int:
        released = 0
        for batch_id in await self.repo.runnable_batches():
            released += await self.release(batch_id)
        await self.settle()
        return released

    def _template(self, batch_id: UUID, text: str) -> Template:
        template = self._templates.get(batch_id)
        if template is None:
            if len(self._templates) > 1000:
                self._templates.clear()
            template = self._templates[batch_id] = compile_template(text)
        return template

    async def release(self, batch_id: UUID) -> int:
        suspended = None
        async with self.repo.pool.acquire() as conn, conn.transaction():
            batch = await self.repo.lock_for_release(conn, batch_id=batch_id)
            if batch is None:
                return 0
            room = batch["window_size"] - batch["queued_jobs"]
            if room <= 0:
                return 0
            requeued = list(await self.repo.requeued_jobs(conn, batch_id=batch_id, limit=room))
            fresh: list = []  # type: ignore[type-arg]
            if len(requeued) < room:
                fresh = list(
                    await self.repo.next_jobs(
                        conn, batch_id=batch_id, after=batch["released_upto"], limit=room - len(requeued)
                    )
                )
            jobs = requeued + fresh
            if not jobs:
                return 0
            remaining = len(requeued) + batch["total_jobs"] - batch["released_upto"]
            cover = await reserve(
                self.credit,
                self.repo,
                conn,
                batch,
                want=len(jobs),
                remaining=remaining,
                quote=lambda: self.credit.price(batch["account_id"]),
            )
            jobs = jobs[: cover.count]
            fresh = fresh[: max(cover.count - len(requeued), 0)]
            upto = fresh[-1]["job_id"] if fresh else batch["released_upto"]
            if jobs:
                await self._publish(conn, batch, jobs, cover)
                await self.repo.mark_released(conn, batch_id=batch_id, upto=upto, count=len(jobs), left=cover.left)
            if cover.short:
                # The rest of this round and every job not released yet wait for credit.
                short = [j["job_id"] for j in requeued[cover.count :]]
                suspended = await self.repo.suspend(conn, batch_id=batch_id, upto=upto, also=short, reason=cover.short)
        if jobs:
            await self._announce(batch, upto)
        if suspended is not None:
            log.info("batch %s suspended: %s", batch_id, cover.short)
            await self.notifier.publish(
                self.notifier.event(suspended, "suspended", error=cover.short, message=cover.short)
            )
        return len(jobs)

    async def _publish(self, conn, batch, jobs: list, cover: Cover) -> None:  # type: ignore[no-untyped-def]
        """The released jobs, in chunks on DISPATCH, before the release commits."""
        batch_id = batch["batch_id"]
        template = self._template(batch_id, batch["message_template"])
        subject = f"dispatch.{batch['channel']}.{batch['account_id']}"
        publishes = []
        for start in range(0, len(jobs), self.chunk_jobs):
            seq = await self.repo.next_chunk_seq(conn)
            chunk = events_pb2.DispatchChunk(
                batch_id=str(batch_id),
                account_id=batch["account_id"],
                channel=batch["channel"],
                chunk_seq=seq,
                sender_ids=batch["sender_ids"],
                hold_id=cover.hold_id,
                unit_price=str(cover.price) if cover.hold_id else "",
                items=[
                    events_pb2.WorkItem(
                        job_id=j["job_id"],
                        attempt_no=j["attempts"] + 1,
                        to=j["phone"],
                        attempt_id=attempt_id(batch_id, j["job_id"], j["attempts"] + 1),
                        text=template.render(j["vals"]),
                    )
                    for j in jobs[start : start + self.chunk_jobs]
                ],
            )
            publishes.append(bus.publish(self.js, subject, chunk, msg_id=f"{batch_id}:{seq}"))
        await asyncio.gather(*publishes)

    async def settle(self) -> None:
        """Release the holds of batches that have stopped (paused, suspended, cancelled,
        completed) once nothing of them is in flight and accounts has booked their charges."""
        for batch_id in await self.repo.unsettled_batches():
            freed = None
            async with self.repo.pool.acquire() as conn, conn.transaction():
                batch = await self.repo.lock_for_settle(conn, batch_id=batch_id)
                if batch is None:
                    continue
                # Charges still on their way would find their hold closed: wait for them,
                # unless the batch has been still for long (a lost result must not pin credit).
                force = datetime.now(UTC) - batch["updated_at"] > SETTLE_PATIENCE
                try:
                    freed = await self.credit.release_batch(
                        batch["account_id"], f"{batch_id}:", expected=batch["total_cost"], force=force
                    )
                except ChargesPending:
                    continue
                await self.repo.mark_settled(conn, batch_id=batch_id)
            price = batch["unit_price"]
            if batch["status"] == "suspended" and price > 0 and freed >= price:
                # What the holds had left pays for more: try again before waiting for a top-up.
                await self.batches.resume_suspended(batch_id)
                self.wake()

    async def _announce(self, batch, upto: int) -> None:  # type: ignore[no-untyped-def]
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
