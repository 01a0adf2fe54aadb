"""SpeechAI voice jobs (one call target each) under /api/v1/jobs, in the shapes the deployed
dashboard reads (API_COMPAT.md). The WhatsApp bulk sender's `/jobs` (no prefix) are batches
and live in routes/bulk.py.

This module also holds the small JSON helpers every voice route shares (batches.py and
dashboard.py import them from here, the lowest module of the three), so a field is shaped
the same way wherever it appears."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pregonero.campaigns.v1 import campaigns_pb2
from pydantic import BaseModel, Field

from services.runtime.identity import Caller

from ..auth import require_caller
from ..errors import ApiError
from ..ids import VoiceJobId
from ..values import json_object, number, optional_number, when, with_keys

router = APIRouter(prefix="/api/v1/jobs", tags=["voice jobs"])

CallerDep = Annotated[Caller, Depends(require_caller)]
Limit = Annotated[int, Query(ge=1, le=1000)]
Skip = Annotated[int, Query(ge=0, le=2**31 - 1)]
AccountFilter = Annotated[str | None, Query(max_length=64, description="admins: one account; members: their own")]
JOB_STATUSES = ("pending", "scheduled", "in_progress", "completed", "failed", "cancelled", "suspended")
# The old backend's alias, still in the dashboard's filter list.
JOB_STATUS_ALIASES = {"done": "completed"}


def scoped_account(caller: Caller, requested: str | None) -> str:
    """The account to send on: a member naming another account is told it does not exist
    here, before a file is streamed or a backend asked. The campaigns service scopes again;
    this only answers early and the same way (404, never 403)."""
    requested = (requested or "").strip()
    if requested and not caller.is_admin and requested != caller.account_id:
        raise ApiError(404, f"account {requested} not found")
    return requested


def job_status_filter(status: str | None) -> str:
    status = JOB_STATUS_ALIASES.get(status or "", status or "")
    if status and status not in JOB_STATUSES:
        raise ApiError(400, f"status must be one of {', '.join(JOB_STATUSES)}")
    return status


# --- the job -----------------------------------------------------------------------------

PAYLOAD_DEFAULTS: dict[str, Any] = {
    "debt_amount": None,
    "due_date": None,
    "company_name": None,
    "reference_number": None,
    "additional_info": {"cantidad_cupones": None, "fecha_maxima": None},
}
CALL_RESULT_DEFAULTS: dict[str, Any] = {
    "success": None,
    "status": None,
    "summary": {
        "call_status": None,
        "duration_ms": None,
        "call_cost": {"combined_cost": None, "total_duration_seconds": None},
        "call_analysis": {"call_summary": None, "user_sentiment": None},
        "recording_url": None,
        "public_log_url": None,
        "transcript": None,
        "collected_dynamic_variables": {},
    },
}


def job_json(job: campaigns_pb2.Job) -> dict[str, Any]:
    """Every job field API_COMPAT lists; the nested objects exist even before the first call."""
    return {
        "_id": job.object_id,
        "job_id": job.job_id,
        "batch_id": job.batch_id,
        "batch_object_id": job.batch_object_id or None,
        "account_id": job.account_id,
        "status": job.status,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        # The old backend's jobs were "single" (one debtor) or "batch"; Pregonero has only one.
        "mode": "single",
        "contact": {
            "name": job.contact_name,
            "phones": list(job.phones),
            "dni": job.contact_dni,
            "next_phone_index": job.next_phone_index,
        },
        # Extra keys (marketing payloads) pass through; the ones the dashboard reads always exist.
        "payload": with_keys(json_object(job.payload_json), PAYLOAD_DEFAULTS),
        "fecha_pago_cliente": job.fecha_pago_cliente or None,
        "monto_pago_cliente": optional_number(job.monto_pago_cliente),
        "call_result": with_keys(json_object(job.call_result_json), CALL_RESULT_DEFAULTS),
        "call_duration_seconds": optional_number(job.call_duration_seconds),
        "call_started_at": when(job.call_started_at),
        "call_ended_at": when(job.call_ended_at),
        "estimated_cost": number(job.estimated_cost),
        "cost": number(job.cost),
        "to_number": job.to_number or None,
        "cancellation_reason": job.cancellation_reason or None,
        "created_at": when(job.created_at),
        "started_at": when(job.started_at),
        "finished_at": when(job.finished_at),
        "next_attempt_at": when(job.next_attempt_at),
    }


def stub(request: Request) -> Any:
    return request.app.state.backends.campaigns


async def list_jobs_page(
    request: Request,
    response: Response,
    *,
    account_id: str = "",
    batch_id: str = "",
    status: str | None,
    limit: int,
    skip: int,
) -> list[dict[str, Any]]:
    """`GET /jobs` and `GET /batches/{id}/jobs`: a plain array, the total in X-Total-Count."""
    reply = await stub(request).ListJobs(
        campaigns_pb2.ListJobsRequest(
            account_id=account_id, batch_id=batch_id, status=job_status_filter(status), limit=limit, skip=skip
        ),
    )
    response.headers["X-Total-Count"] = str(reply.total)
    return [job_json(j) for j in reply.jobs]


# --- routes ------------------------------------------------------------------------------


class JobCancel(BaseModel):
    reason: str | None = Field(None, max_length=500)


@router.get("", summary="Voice jobs, newest first (array; total in X-Total-Count)")
async def list_jobs(
    request: Request,
    response: Response,
    caller: CallerDep,
    status: Annotated[str | None, Query(max_length=32, description=" | ".join(JOB_STATUSES))] = None,
    batch_id: Annotated[str | None, Query(max_length=64, description="`batch_id` or `_id`")] = None,
    account_id: AccountFilter = None,
    limit: Limit = 100,
    skip: Skip = 0,
) -> list[dict[str, Any]]:
    return await list_jobs_page(
        request,
        response,
        account_id=scoped_account(caller, account_id),
        batch_id=batch_id or "",
        status=status,
        limit=limit,
        skip=skip,
    )


@router.get("/{job_id}", summary="One voice job")
async def get_job(request: Request, caller: CallerDep, job_id: VoiceJobId) -> dict[str, Any]:
    job = await stub(request).GetJob(campaigns_pb2.JobRef(job_id=job_id))
    return job_json(job)


@router.put("/{job_id}/retry", summary="Call again: a failed or cancelled job goes back to pending")
async def retry_job(request: Request, caller: CallerDep, job_id: VoiceJobId) -> dict[str, Any]:
    job = await stub(request).RetryJob(campaigns_pb2.JobRef(job_id=job_id))
    return {"success": True, "message": "Job will be retried", "job": job_json(job)}


@router.put("/{job_id}/cancel", summary="Do not call: the job stays, as cancelled")
async def cancel_job(
    request: Request,
    caller: CallerDep,
    job_id: VoiceJobId,
    body: JobCancel | None = None,
    reason: Annotated[str | None, Query(max_length=500)] = None,
) -> dict[str, Any]:
    # The dashboard sends one bodiless PUT per selected job; a reason may come either way.
    why = (body.reason if body else None) or reason or ""
    job = await stub(request).CancelJob(
        campaigns_pb2.CancelJobRequest(job_id=job_id, reason=why),
    )
    return {"success": True, "message": "Job cancelled", "job": job_json(job)}


@router.delete(
    "/{job_id}",
    summary="Delete the job (as the dashboard's bulk delete expects); a job being called is cancelled instead",
)
async def delete_job(request: Request, caller: CallerDep, job_id: VoiceJobId) -> dict[str, Any]:
    reply = await stub(request).DeleteJob(campaigns_pb2.JobRef(job_id=job_id))
    if reply.cancelled:
        # The cancel-job document's reply: its call ends normally and the job ends cancelled.
        return {"success": True, "message": "Job cancelled", "job_id": reply.job_id, "job": job_json(reply.job)}
    return {"success": True, "message": "Job deleted", "job_id": reply.job_id or job_id}
