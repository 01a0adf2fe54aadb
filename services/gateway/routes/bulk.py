"""The WhatsApp bulk sender's routes: send a file, follow and steer its job."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from pregonero.campaigns.v1 import campaigns_pb2

from services.runtime.identity import Caller
from services.runtime.protos import from_timestamp, iso

from ..auth import caller_or_anonymous
from ..errors import ApiError

router = APIRouter(tags=["whatsapp bulk"])
UPLOAD_PART = 256 * 1024
CallerDep = Annotated[Caller, Depends(caller_or_anonymous)]


def percentage(done: int, total: int) -> float:
    return round(100.0 * done / total, 1) if total else 0.0


def job_json(batch: campaigns_pb2.Batch) -> dict[str, Any]:
    p = batch.progress
    body: dict[str, Any] = {
        "id": batch.batch_id,
        "status": batch.status,
        "created_at": iso(from_timestamp(batch.created_at)),
        "updated_at": iso(from_timestamp(batch.updated_at)),
        "started_at": iso(from_timestamp(batch.started_at)),
        "finished_at": iso(from_timestamp(batch.finished_at)),
        "message": batch.message_template,
        "file_name": batch.file_name,
        "total_numbers": p.total,
        "devices_limit": batch.devices_limit,
        "invalid_rows": batch.invalid_rows,
        "progress": {
            "sent": p.sent,
            "failed": p.failed,
            "total": p.total,
            "percentage": percentage(p.sent + p.failed, p.total),
            "cancelled": p.cancelled,
            "pending": p.pending,
            "in_flight": p.in_flight,
            "suspended": p.suspended,
        },
        "results": {},
        # What the sent messages cost, in the account's unit (credits, or minutes).
        "total_cost": float(Decimal(batch.total_cost or "0")),
    }
    if batch.suspension_reason:
        body["suspension_reason"] = batch.suspension_reason
    if batch.status in ("completed", "cancelled", "failed"):
        body["results"] = {
            "sent": p.sent,
            "failed": p.failed,
            "total": p.total,
            "cancelled": p.cancelled,
            "devices_used": batch.devices_used,
            "parallel_workers": batch.devices_limit,
        }
    if batch.error:
        body["error"] = batch.error
    return body


@router.post("/messages/send-bulk-file", summary="Send one WhatsApp message per row of a pipe-separated file")
async def send_bulk_file(
    request: Request,
    caller: CallerDep,
    file: Annotated[UploadFile, File(description="phone|@valor1|@valor2... per line, UTF-8")],
    message: Annotated[str, Form(description="Template; @valor1 ... @valorN are replaced per row")],
    devices_limit: Annotated[int, Form(ge=1, le=1000)] = 5,
) -> dict[str, Any]:
    name = file.filename or "upload.csv"

    async def parts() -> AsyncIterator[campaigns_pb2.UploadBulkFileRequest]:
        yield campaigns_pb2.UploadBulkFileRequest(
            header=campaigns_pb2.UploadHeader(
                account_id=caller.account_id, file_name=name, message_template=message, devices_limit=devices_limit
            )
        )
        # The upload is spooled to disk by the form parser; it crosses to campaigns in parts.
        while chunk := await file.read(UPLOAD_PART):
            yield campaigns_pb2.UploadBulkFileRequest(chunk=chunk)

    # A stream of the whole file: longer than a unary call's default deadline.
    uploaded = await request.app.state.backends.campaigns.UploadBulkFile(parts(), timeout=300)
    batch = uploaded.batch
    return {
        "status": "success",
        "message": f"Job creado y en proceso. Procesando {batch.progress.total} mensajes desde archivo '{name}'.",
        "job": job_json(batch),
        # What of the file is not sent: repeated phones (each sent once) and rows without a
        # usable phone, the first 100 of them by line.
        "duplicates": uploaded.duplicates,
        "invalid_rows": uploaded.invalid_rows,
        "invalid": [{"line": r.row, "value": r.value, "reason": r.reason} for r in uploaded.invalid],
    }


@router.get("/jobs", summary="Bulk-send jobs, newest first")
async def list_jobs(
    request: Request,
    response: Response,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    # The proto's int32: beyond it the request cannot be encoded (a 422 here, not a crash).
    skip: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    status: str = "",
) -> list[dict[str, Any]]:
    reply = await request.app.state.backends.campaigns.ListBatches(
        campaigns_pb2.ListBatchesRequest(limit=limit, skip=skip, status=status, channel="whatsapp"),
    )
    response.headers["X-Total-Count"] = str(reply.total)
    return [job_json(b) for b in reply.batches]


@router.get("/jobs/{job_id}", summary="One bulk-send job")
async def get_job(request: Request, caller: CallerDep, job_id: str) -> dict[str, Any]:
    batch = await request.app.state.backends.campaigns.GetBatch(campaigns_pb2.BatchRef(batch_id=job_id))
    return job_json(batch)


async def _steer(request: Request, rpc: str, message: Any) -> dict[str, Any]:
    batch = await getattr(request.app.state.backends.campaigns, rpc)(message)
    return {"status": "success", "job": job_json(batch)}


@router.post("/jobs/{job_id}/pause", summary="Stop sending; in-flight messages are handed back")
async def pause_job(request: Request, caller: CallerDep, job_id: str) -> dict[str, Any]:
    return await _steer(request, "PauseBatch", campaigns_pb2.BatchRef(batch_id=job_id))


@router.post("/jobs/{job_id}/resume", summary="Go on sending a paused job")
async def resume_job(request: Request, caller: CallerDep, job_id: str) -> dict[str, Any]:
    return await _steer(request, "ResumeBatch", campaigns_pb2.BatchRef(batch_id=job_id))


@router.post("/jobs/{job_id}/cancel", summary="Stop for good: every unsent recipient is cancelled")
async def cancel_job(request: Request, caller: CallerDep, job_id: str, reason: str = "") -> dict[str, Any]:
    return await _steer(request, "CancelBatch", campaigns_pb2.CancelBatchRequest(batch_id=job_id, reason=reason))


@router.post("/jobs/{job_id}/retry-failed", summary="Send again to the recipients that failed")
async def retry_failed(request: Request, caller: CallerDep, job_id: str) -> dict[str, Any]:
    return await _steer(request, "RetryFailed", campaigns_pb2.BatchRef(batch_id=job_id))


@router.get("/jobs/{job_id}/results", summary="Per-recipient outcomes, keyset paged")
async def job_results(
    request: Request,
    caller: CallerDep,
    job_id: str,
    status: str = "",
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,  # the proto's int64
) -> dict[str, Any]:
    if status and status not in ("pending", "sent", "failed", "cancelled", "unknown", "suspended"):
        raise ApiError(400, "status must be one of pending, sent, failed, cancelled, unknown, suspended")
    reply = await request.app.state.backends.campaigns.ListJobResults(
        campaigns_pb2.ListJobResultsRequest(batch_id=job_id, status=status, limit=limit, after=after),
        timeout=30,  # a page of up to 10,000 rows: longer than a call's default deadline
    )
    return {
        "job_id": job_id,
        "results": [
            {
                "row": r.job_id,
                "phone": r.phone,
                "status": r.status,
                "device_id": r.sender_id or None,
                "error": r.error or None,
                "attempts": r.attempts,
                "finished_at": iso(from_timestamp(r.finished_at)),
                # After `sent`: what the provider reported (WhatsApp Cloud API devices).
                "delivery": r.delivery or None,
                "delivered_at": iso(from_timestamp(r.delivered_at)),
                "read_at": iso(from_timestamp(r.read_at)),
                "delivery_error": r.delivery_error or None,
            }
            for r in reply.results
        ],
        "next_after": reply.next_after or None,
    }
