"""SpeechAI voice campaigns (batches) under /api/v1/batches, in the shapes the deployed
dashboard reads (API_COMPAT.md): plain arrays with X-Total-Count, `_id` beside `batch_id`
(either accepted in paths), numbers for amounts, the documented reply keys plus the ones the
UI really reads. The campaigns service parses files, prices and scopes by account; this
module validates the form, streams the upload and maps."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, Response, UploadFile
from pregonero.campaigns.v1 import campaigns_pb2
from pydantic import BaseModel, Field, ValidationError, field_validator

from services.runtime.identity import Caller
from services.runtime.protos import to_timestamp

from ..auth import require_caller
from ..errors import ApiError
from ..ids import BatchId
from ..values import json_array, json_object, number, optional_number, when
from .bulk import UPLOAD_PART, percentage
from .jobs import AccountFilter, Limit, Skip, job_status_filter, list_jobs_page, scoped_account

router = APIRouter(prefix="/api/v1/batches", tags=["voice batches"])

# Parsing a workbook of tens of thousands of rows (and pricing it) takes the campaigns
# service a while; the connection stays open, as for WhatsApp files.
UPLOAD_TIMEOUT_S = 300.0
# A cheap early refusal: the form parser has spooled the file to disk, and anything larger
# than this is no contact list (45-column exports of 100k rows stay well below). The
# campaigns service applies its own row limit (413 as well).
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
SPREADSHEET_SUFFIXES = (".xlsx", ".xls", ".csv")
VOICE = "voice"
USE_CASES = ("debt_collection", "marketing")
COUNTRIES = {"chile": "CL", "argentina": "AR"}
BATCH_STATUSES = ("pending", "processing", "paused", "suspended", "completed", "failed", "cancelled")
# The document's filter values: `active` is pending or processing.
BATCH_FILTERS = ("active", *BATCH_STATUSES)
# The campaigns page's own filter words (any case), in the suite's terms. The page shows every
# campaign that is active (`is_active`) as running, so RUNNING is `active`, not `processing`.
DASHBOARD_FILTERS = {
    "pending": "pending",
    "running": "active",
    "paused": "paused",
    "completed": "completed",
    "cancelled": "cancelled",
    "error": "failed",
}
DASHBOARD_WORDS = tuple(word.upper() for word in DASHBOARD_FILTERS)
# Statuses in which the feeder releases the batch's calls: what the dashboard calls active.
ACTIVE_STATUSES = ("pending", "processing")

CallerDep = Annotated[Caller, Depends(require_caller)]
Priority = Annotated[int, Field(ge=1, le=4, description="1 (highest) .. 4")]
HHMM = Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="HH:MM")]


# --- request bodies ----------------------------------------------------------------------


class AllowedHours(BaseModel, extra="allow"):
    start: HHMM
    end: HHMM


class CallSettings(BaseModel, extra="allow"):
    """The dashboard's calling rules. Unknown keys pass through to campaigns untouched."""

    max_call_duration: int | None = Field(None, ge=1, le=4 * 3600, description="seconds")
    ring_timeout: int | None = Field(None, ge=1, le=600, description="seconds")
    max_attempts: int | None = Field(None, ge=1, le=20)
    retry_delay_hours: float | None = Field(None, ge=0, le=24 * 30)
    allowed_hours: AllowedHours | None = None
    days_of_week: list[Annotated[int, Field(ge=0, le=6)]] | None = Field(None, description="0 = Sunday")
    timezone: str | None = Field(None, max_length=64)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    def as_json(self) -> str:
        return json.dumps(self.model_dump(exclude_none=True))


class BatchCreate(BaseModel):
    """`POST /batches` without a file: an empty voice batch."""

    account_id: str | None = Field(None, max_length=64, description="admins; members get their own")
    name: str = Field(..., min_length=1, max_length=200)
    description: str | None = Field(None, max_length=2000)
    priority: Priority = 1
    call_settings: CallSettings | None = None
    allow_duplicates: bool = False
    use_case: Literal["debt_collection", "marketing"] | None = None
    country: Literal["CL", "AR"] | None = None


class BatchPatch(BaseModel):
    """Any subset. `is_active` pauses (false) or resumes (true)."""

    is_active: bool | None = None
    name: str | None = Field(None, min_length=1, max_length=200)
    description: str | None = Field(None, max_length=2000)
    priority: Priority | None = None
    call_settings: CallSettings | None = None


def call_settings_from_form(text: str | None) -> str:
    """`call_settings_json` arrives as a string inside the multipart form, so FastAPI cannot
    validate it; bad JSON or a bad rule is the client's error (400), said precisely."""
    if not text or not text.strip():
        return ""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"call_settings_json is not valid JSON: {exc.msg}") from exc
    if not isinstance(raw, dict):
        raise ApiError(400, "call_settings_json must be a JSON object")
    try:
        return CallSettings.model_validate(raw).as_json()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"call_settings_json.{where}: {first['msg']}") from exc


def parse_scheduled_at(text: str | None) -> datetime | None:
    """ISO 8601; a time without an offset is taken as UTC."""
    if not text or not text.strip():
        return None
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ApiError(400, f"scheduled_at must be an ISO 8601 date-time, not {text[:40]!r}") from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# --- the multipart upload (preview, create, per-country create) -----------------------------


class ContactsUpload:
    """The validated form: the file and the header that precedes it on the stream."""

    def __init__(self, file: UploadFile, header: campaigns_pb2.ContactsUploadHeader) -> None:
        self.file = file
        self.header = header

    def aim(self, use_case: str | None, country: str | None) -> None:
        """The use case and country the route gives ("" lets the campaigns service decide)."""
        self.header.use_case = use_case or ""
        self.header.country = country or ""

    def parts(self) -> AsyncIterator[campaigns_pb2.ContactsUploadRequest]:
        async def gen() -> AsyncIterator[campaigns_pb2.ContactsUploadRequest]:
            yield campaigns_pb2.ContactsUploadRequest(header=self.header)
            # The form parser spooled the upload to disk; it crosses to campaigns in parts.
            while chunk := await self.file.read(UPLOAD_PART):
                yield campaigns_pb2.ContactsUploadRequest(chunk=chunk)

        return gen()


async def contacts_upload(
    caller: CallerDep,
    file: Annotated[UploadFile, File(description="Contacts: .xlsx, .xls or .csv")],
    account_id: Annotated[str | None, Form(max_length=64, description="admins; members get their own")] = None,
    batch_name: Annotated[str | None, Form(max_length=200)] = None,
    batch_description: Annotated[str | None, Form(max_length=2000)] = None,
    allow_duplicates: Annotated[bool, Form()] = False,
    processing_type: Annotated[Literal["basic", "acquisition"], Form()] = "basic",
    dias_fecha_limite: Annotated[int | None, Form(ge=0, le=3650, description="due date = today + N days")] = None,
    dias_fecha_maxima: Annotated[int | None, Form(ge=0, le=3650, description="last date = today + N days")] = None,
    call_settings_json: Annotated[str | None, Form(max_length=20_000, description="call_settings as JSON")] = None,
    priority: Annotated[int, Form(ge=1, le=4)] = 1,
    scheduled_at: Annotated[str | None, Form(max_length=64, description="ISO 8601; calls start then")] = None,
) -> ContactsUpload:
    """The form every upload route shares. Country and use case are set by the route."""
    name = file.filename or "contacts.xlsx"
    if not name.lower().endswith(SPREADSHEET_SUFFIXES):
        raise ApiError(400, f"file must be .xlsx, .xls or .csv, not {name!r}")
    if file.size is not None and file.size > MAX_UPLOAD_BYTES:
        raise ApiError(413, f"the file is larger than {MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
    header = campaigns_pb2.ContactsUploadHeader(
        account_id=scoped_account(caller, account_id),
        file_name=name,
        batch_name=(batch_name or "").strip(),
        batch_description=batch_description or "",
        allow_duplicates=allow_duplicates,
        processing_type=processing_type,
        dias_fecha_limite=dias_fecha_limite or 0,
        dias_fecha_maxima=dias_fecha_maxima or 0,
        call_settings_json=call_settings_from_form(call_settings_json),
        priority=priority,
        scheduled_at=to_timestamp(parse_scheduled_at(scheduled_at)),
    )
    return ContactsUpload(file, header)


UploadDep = Annotated[ContactsUpload, Depends(contacts_upload)]
UseCaseForm = Annotated[Literal["debt_collection", "marketing"] | None, Form(description="default debt_collection")]
CountryForm = Annotated[Literal["CL", "AR"] | None, Form(description="default: told by the file's headers")]


# --- JSON --------------------------------------------------------------------------------


def batch_json(batch: campaigns_pb2.Batch) -> dict[str, Any]:
    """Every batch field API_COMPAT lists, plus the counters and facts the detail view shows."""
    p = batch.progress
    voice = batch.channel == VOICE
    return {
        "_id": batch.object_id,
        "batch_id": batch.batch_id,
        "account_id": batch.account_id,
        "name": batch.name,
        "description": batch.description,
        "channel": batch.channel,
        "status": batch.status,
        "is_active": batch.status in ACTIVE_STATUSES,
        "suspension_reason": batch.suspension_reason or None,
        "cancellation_reason": batch.cancellation_reason or None,
        "use_case": batch.use_case or None,
        "country": batch.country or None,
        "processing_type": batch.processing_type or None,
        "priority": batch.priority or 1,
        "call_settings": json_object(batch.call_settings_json),
        # Chilean debt collection: the legal window applied on top of call_settings, null otherwise.
        "legal_window": json_object(batch.legal_window_json) or None,
        "file_name": batch.file_name or None,
        "total_jobs": p.total,
        "pending_jobs": p.pending,
        "scheduled_jobs": batch.scheduled_jobs,
        # Voice batches count these themselves; a WhatsApp batch's come from its progress.
        "in_progress_jobs": batch.in_progress_jobs if voice else p.in_flight,
        "completed_jobs": batch.completed_jobs if voice else p.sent,
        "failed_jobs": p.failed,
        "cancelled_jobs": p.cancelled,
        "suspended_jobs": p.suspended,
        "invalid_rows": batch.invalid_rows,
        "total_cost": number(batch.total_cost),
        "total_minutes": number(batch.total_minutes),
        "estimated_cost": number(batch.estimated_cost),
        "error": batch.error or None,
        "created_at": when(batch.created_at),
        "updated_at": when(batch.updated_at),
        "started_at": when(batch.started_at),
        "completed_at": when(batch.finished_at),
    }


def progress_percentage(b: dict[str, Any]) -> float:
    """As the missing-endpoints document computes it: completed jobs over all jobs, in percent
    to two decimals (failed and cancelled jobs are not progress)."""
    return round(100.0 * b["completed_jobs"] / b["total_jobs"], 2) if b["total_jobs"] else 0.0


# The API reference's batch states (active | paused | completed | cancelled) for the suite's.
# A suspended batch (its account out of credit, or suspended) waits to go on, as a paused one
# does; a failed one has stopped for good without finishing its calls.
DOCUMENTED_STATUS = {
    "pending": "active",
    "processing": "active",
    "paused": "paused",
    "suspended": "paused",
    "completed": "completed",
    "cancelled": "cancelled",
    "failed": "cancelled",
}


def status_json(batch: campaigns_pb2.Batch) -> dict[str, Any]:
    """The 5-second poll: counters and state only (no settings, no texts)."""
    b = batch_json(batch)
    keys = (
        "batch_id",
        "_id",
        "status",
        "is_active",
        "total_jobs",
        "pending_jobs",
        "scheduled_jobs",
        "in_progress_jobs",
        "completed_jobs",
        "failed_jobs",
        "cancelled_jobs",
        "suspended_jobs",
        "total_cost",
        "total_minutes",
        "started_at",
        "completed_at",
        "updated_at",
    )
    return {**{k: b[k] for k in keys}, "progress_percentage": progress_percentage(b)}


def summary_json(summary: campaigns_pb2.BatchSummary) -> dict[str, Any]:
    b = batch_json(summary.batch)
    return {
        **b,
        # The reference's word in `status`, the suite's own beside it.
        "status": DOCUMENTED_STATUS.get(b["status"], b["status"]),
        "batch_status": b["status"],
        "completion_rate": percentage(b["completed_jobs"], b["total_jobs"]),
        "progress_percentage": progress_percentage(b),
        "hourly_stats": [
            {
                "hour": when(h.hour),
                "calls": h.calls,
                "completed": h.completed,
                "failed": h.failed,
                "cost": number(h.cost),
                "minutes": number(h.minutes),
            }
            for h in summary.hourly_stats
        ],
    }


def problems_json(problems: Any) -> list[dict[str, Any]]:
    return [{"row": p.row, "reason": p.reason} for p in problems]


def preview_json(p: campaigns_pb2.ContactsPreview, file_name: str) -> dict[str, Any]:
    """The documented `preview{...}` and, top level, what the UI reads (`total_rows`,
    `sampleRows`, `detectedFormat`)."""
    counts = {
        "total_rows": p.total_rows,
        "valid_rows": p.valid_rows,
        "invalid_rows": p.invalid_rows,
        "duplicates": p.duplicates,
        "estimated_cost": number(p.estimated_cost),
    }
    return {
        "success": True,
        "filename": p.file_name or file_name,
        "preview": counts,
        **counts,
        "sampleRows": json_array(p.sample_rows_json),
        "detectedFormat": p.detected_format,
        "invalid_details": problems_json(p.invalid),
        "warnings": problems_json(p.warnings),
        "available_credit": optional_number(p.available_credit),
    }


def created_json(c: campaigns_pb2.VoiceBatchCreated) -> dict[str, Any]:
    """The documented reply and, top level, what the UI reads (`batch_id, jobs_created,
    contacts_processed, duplicates_skipped`)."""
    batch = batch_json(c.batch)
    return {
        "success": True,
        "message": f"Batch created with {c.jobs_created} jobs",
        "_id": batch["_id"],
        "batch_id": batch["batch_id"],
        "batch_name": batch["name"],
        "total_debtors": c.contacts_processed,
        "total_jobs": c.jobs_created,
        "estimated_cost": number(c.estimated_cost) if c.estimated_cost else batch["estimated_cost"],
        "duplicates_found": c.duplicates_skipped,
        "created_at": batch["created_at"],
        "jobs_created": c.jobs_created,
        "contacts_processed": c.contacts_processed,
        "duplicates_skipped": c.duplicates_skipped,
        "invalid_rows": c.invalid_rows,
        "invalid_details": problems_json(c.invalid),
        "batch": batch,
    }


def stub(request: Request) -> Any:
    return request.app.state.backends.campaigns


# --- routes: creating ----------------------------------------------------------------------


@router.post("/excel/preview", summary="What a contacts file would create: counts, cost, first jobs")
async def preview_contacts(
    request: Request,
    caller: CallerDep,
    upload: UploadDep,
    use_case: UseCaseForm = None,
    country: CountryForm = None,
) -> dict[str, Any]:
    preview = await _stream(stub(request).PreviewContacts, upload, use_case, country)
    return preview_json(preview, upload.header.file_name)


async def _stream(rpc: Any, upload: ContactsUpload, use_case: str | None, country: str | None) -> Any:
    """The file, aimed at its use case and country, streamed to a campaigns upload RPC."""
    upload.aim(use_case, country)
    # A stream of the whole file, longer than a unary call's default deadline.
    return await rpc(upload.parts(), timeout=UPLOAD_TIMEOUT_S)


async def _create_from_file(
    request: Request, upload: ContactsUpload, use_case: str | None, country: str | None
) -> dict[str, Any]:
    return created_json(await _stream(stub(request).CreateVoiceBatch, upload, use_case, country))


@router.post("/excel/create", summary="A voice campaign from a contacts file (.xlsx, .xls, .csv)")
async def create_from_file(
    request: Request,
    caller: CallerDep,
    upload: UploadDep,
    use_case: UseCaseForm = None,
    country: CountryForm = None,
) -> dict[str, Any]:
    return await _create_from_file(request, upload, use_case, country)


def _country_route(country: str) -> Any:
    async def create(
        request: Request,
        caller: CallerDep,
        upload: UploadDep,
        use_case: Annotated[str, Path(description=" | ".join(USE_CASES))],
    ) -> dict[str, Any]:
        if use_case not in USE_CASES:
            raise ApiError(404, f"unknown use case {use_case!r}; use {' or '.join(USE_CASES)}")
        return await _create_from_file(request, upload, use_case, COUNTRIES[country])

    create.__name__ = f"create_{country}_batch"
    return create


for _country in COUNTRIES:
    router.add_api_route(
        f"/{_country}/{{use_case}}",
        _country_route(_country),
        methods=["POST"],
        summary=f"A voice campaign from a {_country.capitalize()} contacts file, for one use case",
    )


@router.post("", summary="An empty voice campaign (no file)")
async def create_batch(request: Request, caller: CallerDep, body: BatchCreate) -> dict[str, Any]:
    batch = await stub(request).CreateBatch(
        campaigns_pb2.CreateBatchRequest(
            account_id=scoped_account(caller, body.account_id),
            name=body.name.strip(),
            description=body.description or "",
            priority=body.priority,
            call_settings_json=body.call_settings.as_json() if body.call_settings else "",
            allow_duplicates=body.allow_duplicates,
            use_case=body.use_case or "",
            country=body.country or "",
        ),
    )
    b = batch_json(batch)
    # Both reading styles the old backend's clients used: the batch itself, and wrapped.
    return {**b, "success": True, "message": "Batch created", "batch": b}


# --- routes: reading ---------------------------------------------------------------------------


@router.get("", summary="Voice campaigns, newest first (array; total in X-Total-Count)")
async def list_batches(
    request: Request,
    response: Response,
    caller: CallerDep,
    account_id: AccountFilter = None,
    status: Annotated[
        str | None,
        Query(max_length=32, description=f"{' | '.join(BATCH_FILTERS)} or {' | '.join(DASHBOARD_WORDS)}"),
    ] = None,
    limit: Limit = 50,
    skip: Skip = 0,
) -> list[dict[str, Any]]:
    reply = await stub(request).ListBatches(
        campaigns_pb2.ListBatchesRequest(
            account_id=scoped_account(caller, account_id),
            status=batch_status_filter(status),
            channel=VOICE,
            limit=limit,
            skip=skip,
        ),
    )
    response.headers["X-Total-Count"] = str(reply.total)
    return [batch_json(b) for b in reply.batches]


def batch_status_filter(status: str | None) -> str:
    """The suite's filter for `?status=`: its own words as they are, the dashboard's in any case."""
    if not status or status in BATCH_FILTERS:
        return status or ""
    if (word := status.strip().lower()) in DASHBOARD_FILTERS:
        return DASHBOARD_FILTERS[word]
    raise ApiError(400, f"status must be one of {', '.join((*BATCH_FILTERS, *DASHBOARD_WORDS))}")


async def _get(request: Request, batch_id: str) -> campaigns_pb2.Batch:
    return await stub(request).GetBatch(campaigns_pb2.BatchRef(batch_id=batch_id))


@router.get("/{batch_id}", summary="One voice campaign")
async def get_batch(request: Request, caller: CallerDep, batch_id: BatchId) -> dict[str, Any]:
    return batch_json(await _get(request, batch_id))


@router.get("/{batch_id}/status", summary="Counters and state only: the dashboard polls this every 5 s")
async def batch_status(request: Request, caller: CallerDep, batch_id: BatchId) -> dict[str, Any]:
    return status_json(await _get(request, batch_id))


@router.get("/{batch_id}/summary", summary="The campaign with its completion rate and calls per hour")
async def batch_summary(request: Request, caller: CallerDep, batch_id: BatchId) -> dict[str, Any]:
    summary = await stub(request).GetBatchSummary(campaigns_pb2.BatchRef(batch_id=batch_id))
    return summary_json(summary)


@router.get("/{batch_id}/jobs", summary="The campaign's jobs (array; total in X-Total-Count)")
async def batch_jobs(
    request: Request,
    response: Response,
    caller: CallerDep,
    batch_id: BatchId,
    status: Annotated[str | None, Query(max_length=32)] = None,
    limit: Limit = 100,
    skip: Skip = 0,
) -> list[dict[str, Any]]:
    # An unknown batch, or another account's, is 404 rather than an empty page; the jobs are
    # then listed by the canonical id, whichever form the path used.
    status = job_status_filter(status)
    batch = await _get(request, batch_id)
    return await list_jobs_page(request, response, batch_id=batch.batch_id, status=status, limit=limit, skip=skip)


# --- routes: steering ------------------------------------------------------------------------


@router.patch("/{batch_id}", summary="Pause/resume (is_active) or change name, description, priority, call_settings")
async def update_batch(request: Request, caller: CallerDep, batch_id: BatchId, body: BatchPatch) -> dict[str, Any]:
    patch = body.model_dump(exclude_unset=True, exclude_none=True, mode="json")
    if body.call_settings is not None:
        patch["call_settings"] = body.call_settings.model_dump(exclude_none=True)
    if not patch:
        # Nothing to change: the batch as it is (still 404 for someone else's).
        batch = await _get(request, batch_id)
    else:
        batch = await stub(request).UpdateBatch(
            campaigns_pb2.UpdateBatchRequest(batch_id=batch_id, patch_json=json.dumps(patch)),
        )
    if patch.get("is_active") is False:
        message = "Batch paused"
    elif patch.get("is_active") is True:
        message = "Batch resumed"
    else:
        message = "Batch updated"
    return {
        "success": True,
        "message": message,
        "batch_id": batch.batch_id,
        "updated_fields": [*patch, "updated_at"] if patch else [],
        "batch": batch_json(batch),
    }


async def _steer(request: Request, rpc: str, message: Any, text: str) -> dict[str, Any]:
    batch = await getattr(stub(request), rpc)(message)
    return {"success": True, "message": text, "batch_id": batch.batch_id, "batch": batch_json(batch)}


@router.put("/{batch_id}/pause", summary="Pause (legacy; PATCH is_active=false does the same)")
async def pause_batch(request: Request, caller: CallerDep, batch_id: BatchId) -> dict[str, Any]:
    return await _steer(request, "PauseBatch", campaigns_pb2.BatchRef(batch_id=batch_id), "Batch paused")


@router.put("/{batch_id}/resume", summary="Resume (legacy; PATCH is_active=true does the same)")
async def resume_batch(request: Request, caller: CallerDep, batch_id: BatchId) -> dict[str, Any]:
    return await _steer(request, "ResumeBatch", campaigns_pb2.BatchRef(batch_id=batch_id), "Batch resumed")


@router.post("/{batch_id}/cancel", summary="Stop for good: pending and scheduled calls are cancelled")
async def cancel_batch(
    request: Request,
    caller: CallerDep,
    batch_id: BatchId,
    reason: Annotated[str | None, Query(max_length=500)] = None,
) -> dict[str, Any]:
    reply = await _steer(
        request,
        "CancelBatch",
        campaigns_pb2.CancelBatchRequest(batch_id=batch_id, reason=reason or ""),
        "Batch cancelled successfully",
    )
    return {**reply, "reason": reason}


@router.delete("/{batch_id}", summary="Delete the campaign; its jobs are cancelled, or deleted with delete_jobs")
async def delete_batch(
    request: Request, caller: CallerDep, batch_id: BatchId, delete_jobs: bool = False
) -> dict[str, Any]:
    reply = await stub(request).DeleteBatch(
        campaigns_pb2.DeleteBatchRequest(batch_id=batch_id, delete_jobs=delete_jobs),
    )
    return {
        "success": True,
        "message": "Batch deleted",
        "batch_id": reply.batch_id or batch_id,
        "jobs_deleted": reply.jobs_deleted,
        "jobs_cancelled": reply.jobs_cancelled,
    }
