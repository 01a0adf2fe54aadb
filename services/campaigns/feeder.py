"""The feeder: keeps each running batch's window of released jobs full, in chunks on DISPATCH.

A release publishes its chunks before the transaction that records it commits. If the commit
fails, the same jobs are released again under new chunk numbers with the same attempt ids,
and the dispatchers' attempt record makes the second copy a no-op: nothing is lost and
nothing is sent twice."""

from __future__ import annotations

import asyncio
import logging
from uuid import UUID

from nats.js import JetStreamContext
from pregonero.events.v1 import events_pb2

from services.runtime import bus

from .notify import Notifier
from .repo import CampaignsRepo
from .template import Template, compile_template

log = logging.getLogger("pregonero.campaigns.feeder")

CHUNK_JOBS = 500
PROGRESS_BLOCK = 1000  # chunk_processing events, as the bulk-send document describes


def attempt_id(batch_id: object, job_id: int, attempt_no: int) -> str:
    return f"{batch_id}:{job_id}:{attempt_no}"


class Feeder:
    def __init__(
        self,
        repo: CampaignsRepo,
        js: JetStreamContext,
        notifier: Notifier,
        *,
        chunk_jobs: int = CHUNK_JOBS,
        idle_wait: float = 0.25,
    ) -> None:
        self.repo, self.js, self.notifier = repo, js, notifier
        self.chunk_jobs = chunk_jobs
        self.idle_wait = idle_wait
        self.wakeup = asyncio.Event()
        self._templates: dict[UUID, Template] = {}

    def wake(self) -> None:
        """Results freed room in a window, or a batch became runnable."""
        self.wakeup.set()

    async def run(self) -> None:
        while True:
            released = 0
            try:
                for batch_id in await self.repo.runnable_batches():
                    released += await self.release(batch_id)
            except Exception:  # noqa: BLE001 - a failed round is retried; the loop must live
                log.exception("feeder round failed")
                await asyncio.sleep(1)
            if not released:
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), self.idle_wait)
                except TimeoutError:
                    pass

    def _template(self, batch_id: UUID, text: str) -> Template:
        template = self._templates.get(batch_id)
        if template is None:
            if len(self._templates) > 1000:
                self._templates.clear()
            template = self._templates[batch_id] = compile_template(text)
        return template

    async def release(self, batch_id: UUID) -> int:
        async with self.repo.pool.acquire() as conn, conn.transaction():
            batch = await self.repo.lock_for_release(conn, batch_id=batch_id)
            if batch is None:
                return 0
            room = batch["window_size"] - batch["queued_jobs"]
            if room <= 0:
                return 0
            jobs = list(await self.repo.requeued_jobs(conn, batch_id=batch_id, limit=room))
            fresh: list = []  # type: ignore[type-arg]
            if len(jobs) < room:
                fresh = list(
                    await self.repo.next_jobs(
                        conn, batch_id=batch_id, after=batch["released_upto"], limit=room - len(jobs)
                    )
                )
            jobs.extend(fresh)
            if not jobs:
                return 0
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
            upto = fresh[-1]["job_id"] if fresh else batch["released_upto"]
            await self.repo.mark_released(conn, batch_id=batch_id, upto=upto, count=len(jobs))
        await self._announce(batch, upto)
        return len(jobs)

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
