"""Batch rules: ingest a bulk file into jobs, and pause / resume / cancel / retry.

A bulk file's national numbers are read in the account's country (CL when it has none): the
upload's header has no country of its own.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg

from services.runtime.errors import Conflict, InvalidArgument, NotFound
from services.runtime.identity import Caller
from services.runtime.phones import DEFAULT_REGION

from .batch_publisher import Notifier
from .bulkfile import BulkFileParser, InvalidRow
from .campaign_metrics import count_ingest
from .repo import CampaignsRepo
from .template import MAX_MESSAGE_CHARS, compile_template

log = logging.getLogger("pregonero.campaigns")

COPY_BATCH_ROWS = 20_000
MAX_RECIPIENTS = 1_000_000
# In flight per batch when its senders have no rate limit: large enough to keep every
# dispatcher busy, small enough that a pause hands back little.
UNLIMITED_WINDOW = 20_000
# Seconds of sending the window holds for rate-limited senders.
WINDOW_SECONDS = 4
TERMINAL = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class SenderChoice:
    id: int
    rate_per_minute: int


@dataclass(frozen=True)
class BulkFileIngested:
    """The new batch, and what of the file it left out (the upload's reply tells the user)."""

    batch: asyncpg.Record
    duplicates: int
    invalid: int
    invalid_samples: list[InvalidRow]


def window_for(senders: list[SenderChoice]) -> int:
    if any(s.rate_per_minute == 0 for s in senders):
        return UNLIMITED_WINDOW
    per_second = sum(s.rate_per_minute for s in senders) / 60
    return max(10, min(UNLIMITED_WINDOW, int(per_second * WINDOW_SECONDS)))


def scope_of(caller: Caller) -> str:
    """Admins see every account's batches; members their own."""
    return "" if caller.is_admin else caller.account_id


def listing_scope(caller: Caller, *, account_id: str, limit: int, skip: int) -> str:
    """The account scope of a listing, once its page is checked. Naming an account narrows an
    admin's view; a member naming another gets NOT_FOUND."""
    if not 1 <= limit <= 1000:
        raise InvalidArgument("limit must be between 1 and 1000")
    if skip < 0:
        raise InvalidArgument("skip must not be negative")
    return caller.account_scope(account_id) if account_id else scope_of(caller)


def parse_batch_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError as exc:
        raise NotFound(f"job {text} not found") from exc


class Batches:
    def __init__(
        self, repo: CampaignsRepo, notifier: Notifier, *, country_of: Callable[[str], Awaitable[str]] | None = None
    ) -> None:
        self.repo = repo
        self.notifier = notifier
        self._country_of = country_of

    async def ingest_bulk_file(
        self,
        *,
        account_id: str,
        file_name: str,
        template: str,
        devices_limit: int,
        senders: list[SenderChoice],
        chunks: AsyncIterator[bytes],
    ) -> BulkFileIngested:
        """Parse while reading and COPY jobs as they come, all in one transaction: a bad file
        (or a dropped upload) leaves nothing behind."""
        if not template.strip():
            raise InvalidArgument("message is empty: give the text to send (it may use @valor1 ... @valorN)")
        if devices_limit < 1:
            raise InvalidArgument("devices_limit must be at least 1")
        if not senders:
            raise InvalidArgument("no active device: add or activate a device before sending")
        if len(template) > MAX_MESSAGE_CHARS:
            raise InvalidArgument(
                f"message is {len(template):,} characters long; WhatsApp takes at most {MAX_MESSAGE_CHARS:,}"
            )
        chosen = senders[: min(devices_limit, len(senders))]
        country = await self._country_of(account_id) if self._country_of is not None else DEFAULT_REGION
        parser = BulkFileParser(max_recipients=MAX_RECIPIENTS, template=compile_template(template), country=country)
        async with self.repo.pool.acquire() as conn, conn.transaction():
            batch = await self.repo.insert_batch(
                conn,
                account_id=account_id,
                channel="whatsapp",
                name=file_name or "bulk send",
                template=template,
                devices_limit=devices_limit,
                sender_ids=[s.id for s in chosen],
                window_size=window_for(chosen),
                file_name=file_name,
            )
            batch_id = batch["batch_id"]
            pending: list[tuple[object, ...]] = []
            job_id = 0

            async def flush() -> None:
                if pending:
                    await self.repo.copy_jobs(conn, records=pending)
                    pending.clear()

            def take(rows: list) -> None:  # type: ignore[type-arg]
                nonlocal job_id
                for row in rows:
                    job_id += 1
                    pending.append((batch_id, job_id, row.phone, row.values))

            async for chunk in chunks:
                take(parser.feed(chunk))
                if len(pending) >= COPY_BATCH_ROWS:
                    await flush()
            take(parser.finish())
            await flush()
            await self.repo.analyze_jobs(conn, rows=job_id)
            # Every row stays a job, so the file's lines add up in the job's counters; an
            # opted-out number's job is cancelled, never released.
            opted_out = await self.repo.cancel_opted_out(conn, batch_id=batch_id, account_id=account_id)
            if opted_out == job_id:
                raise InvalidArgument(
                    f"nothing to send: all {job_id:,} numbers of the file opted out of this account's messages"
                )
            batch = await self.repo.finish_ingest(
                conn, batch_id=batch_id, total=job_id, invalid=parser.invalid, duplicates=parser.duplicates
            )
        await self.notifier.run_state(batch_id, "active")
        count_ingest("bulk_file", valid=job_id, invalid=parser.invalid)
        log.info(
            "ingested bulk file",
            extra={
                "fields": {
                    "batch_id": str(batch_id),
                    "jobs": job_id,
                    "invalid": parser.invalid,
                    "opted_out": opted_out,
                }
            },
        )
        return BulkFileIngested(batch, parser.duplicates, parser.invalid, parser.invalid_samples)

    async def get(self, caller: Caller, batch_id: str) -> asyncpg.Record:
        row = await self.repo.get_batch(batch_id=parse_batch_id(batch_id), scope=scope_of(caller))
        if row is None or row["status"] == "ingesting":
            raise NotFound(f"job {batch_id} not found")
        return row

    async def list_batches(
        self, caller: Caller, *, channel: str, status: str, limit: int, skip: int, account_id: str = ""
    ) -> tuple[list[asyncpg.Record], int]:
        scope = listing_scope(caller, account_id=account_id, limit=limit, skip=skip)
        return await self.repo.list_batches(scope=scope, channel=channel, status=status, limit=limit, skip=skip)

    async def pause(self, caller: Caller, batch_id: str) -> asyncpg.Record:
        current = await self.get(caller, batch_id)
        if current["status"] == "paused":
            return current
        row = await self.repo.set_status(
            batch_id=current["batch_id"],
            scope=scope_of(caller),
            status="paused",
            from_statuses=("pending", "processing"),
        )
        if row is None:
            raise Conflict(f"job {batch_id} is {current['status']} and cannot be paused")
        await self.notifier.run_state(row["batch_id"], "paused")
        await self.notifier.publish(self.notifier.event(row, "paused", message="Envío pausado"))
        return row

    async def resume(self, caller: Caller, batch_id: str) -> asyncpg.Record:
        current = await self.get(caller, batch_id)
        if current["status"] in ("pending", "processing"):
            return current
        if current["status"] == "suspended":
            # Asks for credit again at once; without it the batch is suspended again.
            row = await self.resume_suspended(current["batch_id"], scope=scope_of(caller))
            if row is not None:
                return row
        row = await self.repo.set_status(
            batch_id=current["batch_id"], scope=scope_of(caller), status="processing", from_statuses=("paused",)
        )
        if row is None:
            raise Conflict(f"job {batch_id} is {current['status']} and cannot be resumed")
        await self.notifier.run_state(row["batch_id"], "active")
        await self.notifier.publish(self.notifier.event(row, "resumed", message="Envío reanudado"))
        return row

    async def resume_suspended(self, batch_id: uuid.UUID, *, scope: str = "") -> asyncpg.Record | None:
        """A suspended batch's jobs back in line for the feeder (a top-up, an activation)."""
        row = await self.repo.unsuspend(batch_id=batch_id, scope=scope)
        if row is None:
            return None
        await self.notifier.run_state(batch_id, "active")
        await self.notifier.publish(self.notifier.event(row, "resumed", message="Envío reanudado"))
        return row

    async def suspend_running(self, batch_id: uuid.UUID, *, reason: str) -> asyncpg.Record | None:
        """The account was suspended: nothing more is released, and what waits at the
        dispatchers is handed back (paused run state) until the account is active again."""
        row = await self.repo.suspend_running(batch_id=batch_id, reason=reason)
        if row is None:
            return None
        await self.notifier.run_state(batch_id, "paused")
        await self.notifier.publish(self.notifier.event(row, "suspended", error=reason, message=reason))
        return row

    async def cancel(self, caller: Caller, batch_id: str, reason: str) -> asyncpg.Record:
        current = await self.get(caller, batch_id)
        if current["status"] == "cancelled":
            return current
        # Dispatchers see the state first, so nothing new starts while jobs are cancelled.
        await self.notifier.run_state(current["batch_id"], "cancelled")
        row = await self.repo.cancel(
            batch_id=current["batch_id"], scope=scope_of(caller), reason=reason or "cancelled by user"
        )
        if row is None:
            await self.notifier.run_state(current["batch_id"], "active" if current["status"] != "paused" else "paused")
            raise Conflict(f"job {batch_id} is {current['status']} and cannot be cancelled")
        event = self.notifier.event(
            row,
            "cancelled",
            message="Envío cancelado",
            error=row["error"],
            actor_role=caller.role,
            actor_user_id=caller.user_id,
            actor_account=caller.account_id,
        )
        # Durable: the audit log records cancellations from this event.
        await self.notifier.publish(event, durable_id=f"{row['batch_id']}:cancelled")
        if row["finished_at"] is not None:
            await self.publish_finished(row)
        return row

    async def retry_failed(self, caller: Caller, batch_id: str) -> asyncpg.Record:
        current = await self.get(caller, batch_id)
        if current["status"] not in ("completed", "failed", "processing"):
            raise Conflict(f"job {batch_id} is {current['status']}; only running or finished jobs retry")
        if current["failed_jobs"] == 0:
            return current
        row = await self.repo.retry_failed(batch_id=current["batch_id"])
        await self.notifier.run_state(row["batch_id"], "active")
        return row

    async def results(
        self, caller: Caller, batch_id: str, *, status: str, limit: int, after: int
    ) -> list[asyncpg.Record]:
        batch = await self.get(caller, batch_id)
        if status and status not in ("pending", "sent", "failed", "cancelled", "unknown", "requeue", "suspended"):
            raise InvalidArgument("status must be one of pending, sent, failed, cancelled, unknown, suspended")
        if not 1 <= limit <= 10_000:
            raise InvalidArgument("limit must be between 1 and 10000")
        return await self.repo.list_results(batch_id=batch["batch_id"], after=max(after, 0), status=status, limit=limit)

    async def publish_finished(self, row: asyncpg.Record) -> None:
        await self.notifier.forget(row["batch_id"])
        if row["status"] == "failed":
            event = self.notifier.event(row, "job_failed", error=row["error"])
        else:
            event = self.notifier.event(row, "job_completed")
        await self.notifier.publish(event, durable_id=f"{row['batch_id']}:finished:{row['finished_at'].timestamp()}")
