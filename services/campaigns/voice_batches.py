"""Voice-call batches: contact files in, call jobs out, and what the dashboard does with them
(edit, pause, cancel, delete; jobs retried, cancelled, deleted; counters for the dashboard).

An upload is spooled to a temporary file (xlsx needs random access, and memory stays
bounded), parsed in a worker thread, checked against the account's credit and its other
active batches, and COPYed in one transaction: a rejected file leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple
from uuid import UUID

import asyncpg

from services.runtime.errors import Conflict, InvalidArgument, NotFound, PayloadTooLarge
from services.runtime.identity import Caller

from .batches import Batches, listing_scope, scope_of
from .calling_rules import CallSettings, parse_call_settings
from .campaign_metrics import count_ingest
from .contacts import ARGENTINA, BadFile, Contact, ParsedFile, TooManyRows, parse_contacts
from .credit import AccountInfo, Credit
from .voice_repo import VoiceRepo

log = logging.getLogger("pregonero.campaigns.voice")

MAX_UPLOAD_BYTES = 64 * 2**20
COPY_ROWS = 10_000
SAMPLE_ROWS = 5
USE_CASES = ("debt_collection", "marketing")
PROCESSING_TYPES = ("basic", "acquisition")
STATUSES = ("pending", "scheduled", "in_progress", "completed", "failed", "cancelled", "suspended")
_OBJECT_ID = re.compile(r"^[0-9a-f]{24}$")
_JOB_ID = re.compile(r"^job-(\d{1,18})$")
MAX_JOB_KEY = 2**63 - 1  # voice_jobs.id is a bigint


def job_ids(job_id: int) -> tuple[str, str]:
    """(`job_id`, `_id`) of a job: the API's two forms of the same key."""
    return f"job-{job_id}", f"{job_id:024x}"


def parse_job_ref(text: str) -> int:
    """The key of `job-<n>`, `<n>` or the 24-hex `_id`. Any other id names no job, and neither
    does one beyond bigint (an id of the original backend is 24-hex too)."""
    text = text.strip().lower()
    key = -1
    if m := _JOB_ID.match(text):
        key = int(m.group(1))
    elif _OBJECT_ID.match(text):
        key = int(text, 16)
    elif text.isascii() and text.isdigit() and len(text) <= 18:
        key = int(text)
    if not 0 < key <= MAX_JOB_KEY:
        raise NotFound(f"job {text[:64]} not found")
    return key


def waiting_jobs(batch: asyncpg.Record) -> int:
    """A batch's jobs still to be started: neither finished, nor at a provider, nor suspended
    (stored `pending`, whether due or `scheduled` for later)."""
    done = batch["sent_jobs"] + batch["failed_jobs"] + batch["cancelled_jobs"] + batch["unknown_jobs"]
    return max(batch["total_jobs"] - done - batch["queued_jobs"] - batch["suspended_jobs"], 0)


class Dashboard(NamedTuple):
    scope: str
    counters: asyncpg.Record
    scheduled: int
    recent: list[asyncpg.Record]
    calls_today: int


@dataclass(frozen=True, slots=True)
class Upload:
    """The form fields of a contact file upload."""

    account_id: str
    file_name: str
    batch_name: str = ""
    description: str = ""
    allow_duplicates: bool = False
    processing_type: str = "basic"
    dias_fecha_limite: int | None = None
    dias_fecha_maxima: int | None = None
    country: str = ""
    use_case: str = "debt_collection"
    call_settings_json: str = ""
    priority: int = 1
    scheduled_at: datetime | None = None


@dataclass
class Checked:
    """A parsed file checked against the account: the jobs to create and what was skipped."""

    parsed: ParsedFile
    contacts: list[Contact]
    duplicates: int
    settings: CallSettings
    per_call: Decimal
    account: AccountInfo
    invalid: list[tuple[int, str]] = field(default_factory=list)

    @property
    def estimated_cost(self) -> Decimal:
        return self.per_call * len(self.contacts)

    @property
    def country(self) -> str:
        return country_of(self.parsed)


def country_of(parsed: ParsedFile) -> str:
    return "AR" if parsed.detected_format == ARGENTINA else "CL"


def payload_of(c: Contact) -> dict[str, Any]:
    return {
        "debt_amount": float(c.debt_amount) if c.debt_amount is not None else None,
        "due_date": c.due_date.isoformat() if c.due_date else None,
        "company_name": c.company,
        "reference_number": c.reference_number,
        "additional_info": {
            "cantidad_cupones": c.cantidad_cupones,
            "fecha_maxima": c.fecha_maxima.isoformat() if c.fecha_maxima else None,
            "dias_retraso": c.days_late,
        },
    }


def sample_of(c: Contact) -> dict[str, Any]:
    return {
        "row": c.row,
        "contact": {"name": c.name, "dni": c.dni, "phones": list(c.phones), "next_phone_index": 0},
        "payload": payload_of(c),
    }


class VoiceBatches:
    def __init__(self, repo: VoiceRepo, batches: Batches, credit: Credit) -> None:
        self.repo, self.batches, self.credit = repo, batches, credit

    # --- files ---

    async def preview(self, caller: Caller, upload: Upload, chunks: AsyncIterator[bytes]) -> Checked:
        return await self._checked(caller, upload, chunks)

    async def create(
        self, caller: Caller, upload: Upload, chunks: AsyncIterator[bytes]
    ) -> tuple[asyncpg.Record, Checked]:
        checked = await self._checked(caller, upload, chunks)
        if not checked.contacts:
            raise InvalidArgument("the file has no contact to call (every row is invalid or a duplicate)")
        account = checked.account
        if account.plan_type != "unlimited" and checked.estimated_cost > account.available:
            raise InvalidArgument(
                f"insufficient credit: the batch would cost about {checked.estimated_cost} {account.unit}, "
                f"{account.available} available; top up or upload fewer contacts"
            )
        start = upload.scheduled_at or datetime.now(UTC)
        settings_json = json.dumps(checked.settings.to_json())
        async with self.repo.pool.acquire() as conn, conn.transaction():
            batch = await self.repo.insert_batch(
                conn,
                account_id=account.account_id,
                name=upload.batch_name or Path(upload.file_name).stem or "campaign",
                description=upload.description,
                priority=upload.priority,
                call_settings_json=settings_json,
                use_case=upload.use_case,
                country=checked.country,
                processing_type=upload.processing_type,
                allow_duplicates=upload.allow_duplicates,
                file_name=upload.file_name,
                window_size=max(account.max_concurrent_calls, 1),
            )
            records = [
                (
                    batch["batch_id"],
                    account.account_id,
                    c.key,
                    c.name,
                    c.dni,
                    list(c.phones),
                    json.dumps(payload_of(c)),
                    checked.settings.max_attempts,
                    start,
                    checked.per_call,
                )
                for c in checked.contacts
            ]
            for i in range(0, len(records), COPY_ROWS):
                await self.repo.copy_jobs(conn, records=records[i : i + COPY_ROWS])
            await self.repo.analyze_jobs(conn, rows=len(records))
            # Every contact stays a job, so the file adds up in the counters; one whose every
            # phone opted out is cancelled, never called.
            opted_out, trimmed = await self.repo.drop_opted_out(
                conn, batch_id=batch["batch_id"], account_id=account.account_id
            )
            if opted_out == len(records):
                raise InvalidArgument(
                    f"nothing to call: every phone of the file's {opted_out:,} contacts opted out of this account"
                )
            batch = await self.repo.finish_ingest(
                conn,
                batch_id=batch["batch_id"],
                total=len(records),
                invalid=len(checked.parsed.invalid),
                duplicates=checked.duplicates,
                cost=checked.per_call * (len(records) - opted_out),
            )
        count_ingest("voice_contacts", valid=len(records), invalid=len(checked.parsed.invalid))
        log.info(
            "voice batch created",
            extra={
                "fields": {
                    "batch_id": str(batch["batch_id"]),
                    "jobs": len(records),
                    "opted_out": opted_out,
                    "with_opted_out_phones": trimmed,
                }
            },
        )
        return batch, checked

    async def _checked(self, caller: Caller, upload: Upload, chunks: AsyncIterator[bytes]) -> Checked:
        account_id = caller.account_scope(upload.account_id)
        if upload.use_case not in USE_CASES:
            raise InvalidArgument(f"use_case must be one of {', '.join(USE_CASES)}")
        if upload.processing_type not in PROCESSING_TYPES:
            raise InvalidArgument(f"processing_type must be one of {', '.join(PROCESSING_TYPES)}")
        if not 1 <= upload.priority <= 4:
            raise InvalidArgument("priority must be between 1 and 4")
        if upload.country not in ("", "CL", "AR"):
            raise InvalidArgument("country must be CL or AR")
        account = await self.credit.account(account_id)
        suffix = Path(upload.file_name).suffix.lower()
        if suffix not in (".xlsx", ".xls", ".csv"):
            raise InvalidArgument("the file must be .xlsx, .xls or .csv")
        with tempfile.TemporaryDirectory(prefix="pregonero-upload-") as tmp:
            path = Path(tmp) / f"upload{suffix}"
            await _spool(chunks, path)
            try:
                parsed = await asyncio.to_thread(
                    parse_contacts,
                    path,
                    upload.file_name,
                    country=upload.country or None,
                    allow_duplicates=upload.allow_duplicates,
                    dias_fecha_limite=upload.dias_fecha_limite,
                    dias_fecha_maxima=upload.dias_fecha_maxima,
                    today=date.today(),
                )
            except TooManyRows as exc:
                raise PayloadTooLarge(str(exc)) from exc
            except BadFile as exc:
                raise InvalidArgument(str(exc)) from exc
        settings = parse_call_settings(
            upload.call_settings_json or None,
            account_timezone=account.timezone,
            country=country_of(parsed),
            use_case=upload.use_case,
        )
        contacts = parsed.contacts
        duplicates = parsed.duplicates
        if not upload.allow_duplicates and contacts:
            taken = await self.repo.active_debtors(account_id=account_id, keys=[c.key for c in contacts])
            if taken:
                contacts = [c for c in contacts if c.key not in taken]
                duplicates += len(parsed.contacts) - len(contacts)
        return Checked(
            parsed=parsed,
            contacts=contacts,
            duplicates=duplicates,
            settings=settings,
            per_call=account.per_call_estimate(settings.max_call_duration_s),
            account=account,
        )

    # --- batches ---

    async def create_empty(
        self,
        caller: Caller,
        *,
        account_id: str,
        name: str,
        description: str,
        priority: int,
        call_settings_json: str,
        allow_duplicates: bool,
        use_case: str,
        country: str,
    ) -> asyncpg.Record:
        account = await self.credit.account(caller.account_scope(account_id))
        use_case = use_case or "debt_collection"
        if use_case not in USE_CASES:
            raise InvalidArgument(f"use_case must be one of {', '.join(USE_CASES)}")
        if not name.strip():
            raise InvalidArgument("name is required")
        if not 1 <= (priority or 1) <= 4:
            raise InvalidArgument("priority must be between 1 and 4")
        settings = parse_call_settings(
            call_settings_json or None,
            account_timezone=account.timezone,
            country=(country or account.country or "CL").upper(),
            use_case=use_case,
        )
        async with self.repo.pool.acquire() as conn, conn.transaction():
            batch = await self.repo.insert_batch(
                conn,
                account_id=account.account_id,
                name=name.strip(),
                description=description,
                priority=priority or 1,
                call_settings_json=json.dumps(settings.to_json()),
                use_case=use_case,
                country=(country or account.country or "CL").upper(),
                processing_type="basic",
                allow_duplicates=allow_duplicates,
                file_name="",
                window_size=max(account.max_concurrent_calls, 1),
            )
            return await self.repo.finish_ingest(
                conn, batch_id=batch["batch_id"], total=0, invalid=0, duplicates=0, cost=Decimal(0)
            )

    async def get(self, caller: Caller, batch_id: str) -> asyncpg.Record:
        """A batch by `batch_id` or by its 24-hex `_id`."""
        text = batch_id.strip().lower()
        if _OBJECT_ID.match(text):
            row = await self.repo.batch_by_object_id(object_id=text, scope=scope_of(caller))
            if row is None or row["status"] == "ingesting":
                raise NotFound(f"batch {batch_id} not found")
            return row
        return await self.batches.get(caller, batch_id)

    async def update(self, caller: Caller, batch_id: str, patch: dict[str, Any]) -> asyncpg.Record:
        known = {"is_active", "name", "description", "priority", "call_settings"}
        if unknown := set(patch) - known:
            raise InvalidArgument(f"cannot change {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(known))}")
        batch = await self.get(caller, batch_id)
        key = str(batch["batch_id"])
        if "is_active" in patch:
            if not isinstance(patch["is_active"], bool):
                raise InvalidArgument("is_active must be true or false")
            if patch["is_active"]:
                batch = await self.batches.resume(caller, key)
            else:
                batch = await self.batches.pause(caller, key)
        name, description, priority, settings_json = (
            patch.get("name"),
            patch.get("description"),
            patch.get("priority"),
            None,
        )
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise InvalidArgument("name must be a non-empty string")
        if description is not None and not isinstance(description, str):
            raise InvalidArgument("description must be a string")
        if priority is not None and (not isinstance(priority, int) or not 1 <= priority <= 4):
            raise InvalidArgument("priority must be an integer between 1 and 4")
        if "call_settings" in patch:
            account = await self.credit.account(batch["account_id"])
            settings = parse_call_settings(
                patch["call_settings"],
                account_timezone=account.timezone,
                country=batch["country"] or "CL",
                use_case=batch["use_case"] or "debt_collection",
            )
            settings_json = json.dumps(settings.to_json())
        if any(v is not None for v in (name, description, priority, settings_json)):
            row = await self.repo.update_batch(
                batch_id=batch["batch_id"],
                scope=scope_of(caller),
                name=name.strip() if name else None,
                description=description,
                priority=priority,
                call_settings_json=settings_json,
            )
            if row is None:
                raise NotFound(f"batch {batch_id} not found")
            batch = row
        return batch

    async def delete(self, caller: Caller, batch_id: str, *, delete_jobs: bool) -> tuple[asyncpg.Record, int, int]:
        batch = await self.get(caller, batch_id)
        if batch["channel"] != "voice":
            raise InvalidArgument("only call batches are deleted here; cancel a bulk send instead")
        if batch["queued_jobs"] > 0 and batch["status"] not in ("cancelled", "completed"):
            # Calls in progress end first: cancel stops new ones, then the batch can go.
            await self.batches.cancel(caller, str(batch["batch_id"]), "batch deleted")
        if batch["queued_jobs"] > 0:
            raise Conflict(f"batch {batch_id} has calls in progress; delete it once they end")
        deleted, cancelled = await self.repo.delete_batch(
            batch_id=batch["batch_id"], delete_jobs=delete_jobs, reason="batch deleted"
        )
        return batch, deleted, cancelled

    async def summary(self, caller: Caller, batch_id: str) -> tuple[asyncpg.Record, list[asyncpg.Record]]:
        batch = await self.get(caller, batch_id)
        return batch, await self.repo.hours(batch_id=batch["batch_id"])

    # --- jobs ---

    async def jobs(
        self, caller: Caller, *, account_id: str, batch_id: str, status: str, limit: int, skip: int
    ) -> tuple[list[asyncpg.Record], int]:
        scope = listing_scope(caller, account_id=account_id, limit=limit, skip=skip)
        if status and status not in STATUSES:
            raise InvalidArgument(f"status must be one of {', '.join(STATUSES)}")
        batch_key = (await self.get(caller, batch_id))["batch_id"] if batch_id else None
        return await self.repo.list_jobs(scope=scope, batch_id=batch_key, status=status, limit=limit, skip=skip)

    async def job(self, caller: Caller, job_id: str) -> asyncpg.Record:
        row = await self.repo.get_job(job_id=parse_job_ref(job_id), scope=scope_of(caller))
        if row is None:
            raise NotFound(f"job {job_id} not found")
        return row

    async def cancel_job(self, caller: Caller, job_id: str, reason: str) -> asyncpg.Record:
        row = await self.repo.cancel_job(
            job_id=parse_job_ref(job_id), scope=scope_of(caller), reason=reason or "cancelled by user"
        )
        if row is None:
            raise NotFound(f"job {job_id} not found")
        if row["status"] != "cancelled":
            raise Conflict(f"job {job_id} is {row['status']}: only pending or scheduled jobs are cancelled")
        return await self.job(caller, job_id)

    async def delete_job(self, caller: Caller, job_id: str) -> asyncpg.Record | None:
        """Deletes the job (None). A job being called is cancelled instead, and returned: the
        dashboard's bulk delete must not fail on it. Its call ends normally, nothing follows it,
        and the job ends `cancelled` (call_outcomes)."""
        row = await self.repo.delete_job(job_id=parse_job_ref(job_id), scope=scope_of(caller), reason="deleted by user")
        if row is None:
            raise NotFound(f"job {job_id} not found")
        if row["status"] == "in_progress":
            return await self.job(caller, job_id)
        return None

    async def retry_job(self, caller: Caller, job_id: str) -> asyncpg.Record:
        row = await self.repo.retry_job(job_id=parse_job_ref(job_id), scope=scope_of(caller))
        if row is None:
            raise NotFound(f"job {job_id} not found")
        if row["status"] != "pending":
            raise Conflict(f"job {job_id} is {row['status']}: only failed or cancelled jobs are retried")
        return await self.job(caller, job_id)

    # --- dashboard ---

    async def scheduled(self, rows: Sequence[asyncpg.Record]) -> dict[UUID, int]:
        """How many jobs of each of these voice batches wait for a later time."""
        waiting = {r["batch_id"]: waiting_jobs(r) for r in rows if r["channel"] == "voice"}
        return await self.repo.scheduled({batch_id: n for batch_id, n in waiting.items() if n > 0})

    async def dashboard(self, caller: Caller, account_id: str) -> Dashboard:
        scope = caller.account_scope(account_id) if account_id else scope_of(caller)
        today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        counters = await self.repo.dashboard(scope=scope, today=today)
        scheduled = await self.repo.scheduled_in(scope=scope)
        recent, _ = await self.repo.calls(scope=scope, batch_id=None, status="", limit=10, skip=0, count=False)
        calls_today = await self.repo.calls_since(scope=scope, since=today)
        return Dashboard(scope, counters, scheduled, recent, calls_today)

    async def calls(
        self, caller: Caller, *, account_id: str, batch_id: str, status: str, limit: int, skip: int
    ) -> tuple[list[asyncpg.Record], int]:
        scope = listing_scope(caller, account_id=account_id, limit=limit, skip=skip)
        key = (await self.get(caller, batch_id))["batch_id"] if batch_id else None
        return await self.repo.calls(scope=scope, batch_id=key, status=status, limit=limit, skip=skip)


async def _spool(chunks: AsyncIterator[bytes], path: Path) -> None:
    size = 0
    with path.open("wb") as out:
        async for chunk in chunks:
            size += len(chunk)
            if size > MAX_UPLOAD_BYTES:
                raise PayloadTooLarge(f"the file is larger than {MAX_UPLOAD_BYTES // 2**20} MB")
            out.write(chunk)
    if size == 0:
        raise InvalidArgument("the file is empty")
