"""gRPC servicer: proto in, domain call, proto out."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import grpc
from pregonero.campaigns.v1 import campaigns_pb2, campaigns_pb2_grpc
from pregonero.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc

from services.runtime.errors import InvalidArgument
from services.runtime.identity import MEMBER, Caller, current_caller
from services.runtime.protos import from_timestamp, json_object, to_timestamp
from services.runtime.rpc import outgoing_metadata

from .analytics import Analytics, report_json
from .batches import Batches, SenderChoice
from .calling_rules import DEFAULT_TIMEZONE, legal_window
from .exports import Exports
from .voice_batches import SAMPLE_ROWS, Checked, Upload, VoiceBatches, job_ids, sample_of, waiting_jobs


def batch_pb(row: asyncpg.Record, scheduled: int = 0) -> campaigns_pb2.Batch:
    """`scheduled`: how many of the waiting jobs wait for a later time (voice); the rest are pending."""
    return campaigns_pb2.Batch(
        batch_id=str(row["batch_id"]),
        account_id=row["account_id"],
        channel=row["channel"],
        status=row["status"],
        name=row["name"],
        message_template=row["message_template"],
        devices_limit=row["devices_limit"],
        invalid_rows=row["invalid_rows"],
        file_name=row["file_name"],
        error=row["error"],
        devices_used=row["devices_used"],
        object_id=row["object_id"],
        suspension_reason=row["suspension_reason"],
        description=row["description"],
        priority=row["priority"],
        call_settings_json=_json_text(row["call_settings"]),
        legal_window_json=_legal_window_json(row),
        estimated_cost=str(row["estimated_cost"]),
        total_minutes=str((row["total_seconds"] / 60).quantize(Decimal("0.01"))),
        use_case=row["use_case"],
        country=row["country"],
        processing_type=row["processing_type"],
        cancellation_reason=row["error"] if row["status"] == "cancelled" else "",
        # Voice counts a completed conversation where WhatsApp counts a sent message.
        completed_jobs=row["sent_jobs"],
        in_progress_jobs=row["queued_jobs"],
        total_cost=str(row["total_cost"]),
        unit_price=str(row["unit_price"]),
        progress=campaigns_pb2.Progress(
            sent=row["sent_jobs"],
            failed=row["failed_jobs"],
            total=row["total_jobs"],
            cancelled=row["cancelled_jobs"],
            in_flight=row["queued_jobs"],
            suspended=row["suspended_jobs"],
            pending=waiting_jobs(row) - scheduled,
        ),
        scheduled_jobs=scheduled,
        created_at=to_timestamp(row["created_at"]),
        updated_at=to_timestamp(row["updated_at"]),
        started_at=to_timestamp(row["started_at"]),
        finished_at=to_timestamp(row["finished_at"]),
        last_sent=campaigns_pb2.Recipient(to=row["last_sent_to"], sender_id=row["last_sent_sender_id"]),
        last_failed=campaigns_pb2.Recipient(
            to=row["last_failed_to"], sender_id=row["last_failed_sender_id"], error=row["last_failed_error"]
        ),
    )


def _legal_window_json(row: asyncpg.Record) -> str:
    """The legal window a voice batch is held to besides its call_settings (see calling_rules.py)."""
    if row["channel"] != "voice":
        return ""
    stored = row["call_settings"]
    settings = json.loads(stored) if isinstance(stored, str) else (stored or {})
    legal = legal_window(
        timezone=str(settings.get("timezone") or DEFAULT_TIMEZONE), country=row["country"], use_case=row["use_case"]
    )
    return json.dumps(legal.to_json()) if legal else ""


def _json_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def job_pb(row: asyncpg.Record) -> campaigns_pb2.Job:
    job_id, object_id = job_ids(row["id"])
    phones = list(row["phones"])
    index = row["next_phone_index"]
    status = row["status"]
    if status == "pending" and row["next_attempt_at"] > datetime.now(UTC):
        status = "scheduled"  # waiting for its start, its window or its next round
    return campaigns_pb2.Job(
        job_id=job_id,
        object_id=object_id,
        batch_id=str(row["batch_id"]),
        batch_object_id=row["batch_object_id"] or "",
        account_id=row["account_id"],
        status=status,
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        created_at=to_timestamp(row["created_at"]),
        started_at=to_timestamp(row["started_at"]),
        finished_at=to_timestamp(row["finished_at"]),
        next_attempt_at=to_timestamp(row["next_attempt_at"]),
        contact_name=row["name"],
        contact_dni=row["dni"],
        phones=phones,
        next_phone_index=index,
        payload_json=_json_text(row["payload"]),
        call_result_json=_json_text(row["call_result"]),
        fecha_pago_cliente=row["fecha_pago_cliente"].isoformat() if row["fecha_pago_cliente"] else "",
        monto_pago_cliente=_text(row["monto_pago_cliente"]),
        call_duration_seconds=_text(row["call_duration_seconds"]),
        call_started_at=to_timestamp(row["call_started_at"]),
        call_ended_at=to_timestamp(row["call_ended_at"]),
        estimated_cost=str(row["estimated_cost"]),
        cost=str(row["cost"]),
        to_number=phones[index] if 0 <= index < len(phones) else (phones[0] if phones else ""),
        cancellation_reason=row["cancellation_reason"],
    )


def preview_pb(file_name: str, checked: Checked) -> campaigns_pb2.ContactsPreview:
    parsed = checked.parsed
    return campaigns_pb2.ContactsPreview(
        file_name=file_name,
        total_rows=parsed.total_rows,
        valid_rows=len(checked.contacts),
        invalid_rows=len(parsed.invalid),
        duplicates=checked.duplicates,
        estimated_cost=str(checked.estimated_cost),
        detected_format=parsed.detected_format,
        sample_rows_json=json.dumps([sample_of(c) for c in checked.contacts[:SAMPLE_ROWS]]),
        invalid=[campaigns_pb2.RowProblem(row=p.row, reason=p.reason) for p in parsed.invalid[:1000]],
        warnings=[campaigns_pb2.RowProblem(row=p.row, reason=p.reason) for p in parsed.warnings[:1000]],
        available_credit=str(checked.account.available),
    )


def upload_of(header: campaigns_pb2.ContactsUploadHeader) -> Upload:
    return Upload(
        account_id=header.account_id,
        file_name=header.file_name,
        batch_name=header.batch_name,
        description=header.batch_description,
        allow_duplicates=header.allow_duplicates,
        processing_type=header.processing_type or "basic",
        dias_fecha_limite=header.dias_fecha_limite or None,
        dias_fecha_maxima=header.dias_fecha_maxima or None,
        country=header.country.upper(),
        use_case=header.use_case or "debt_collection",
        call_settings_json=header.call_settings_json,
        priority=header.priority or 1,
        scheduled_at=from_timestamp(header.scheduled_at) if header.HasField("scheduled_at") else None,
    )


async def _upload(
    request_iterator: AsyncIterator[campaigns_pb2.ContactsUploadRequest],
) -> tuple[campaigns_pb2.ContactsUploadHeader, AsyncIterator[bytes]]:
    first = await anext(aiter(request_iterator), None)
    if first is None or not first.HasField("header"):
        raise InvalidArgument("upload must start with its header")

    async def chunks() -> AsyncIterator[bytes]:
        async for part in request_iterator:
            if part.HasField("chunk"):
                yield part.chunk

    return first.header, chunks()


class CampaignsServicer(campaigns_pb2_grpc.CampaignsServiceServicer):
    def __init__(
        self,
        batches: Batches,
        voice: VoiceBatches,
        dispatcher: dispatcher_pb2_grpc.DispatcherServiceStub,
        exports: Exports,
        analytics: Analytics,
    ) -> None:
        self.batches = batches
        self.voice = voice
        self.dispatcher = dispatcher
        self.exports = exports
        self.analytics = analytics

    async def UploadBulkFile(
        self, request_iterator: AsyncIterator[campaigns_pb2.UploadBulkFileRequest], context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.BulkFileUploaded:
        caller = current_caller()
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("upload must start with its header")
        header = first.header
        account_id = caller.account_scope(header.account_id)
        senders = await self.dispatcher.ListSenders(
            dispatcher_pb2.ListSendersRequest(channel="whatsapp", active_only=True),
            # The devices of the account the batch is for, whoever the caller is.
            metadata=outgoing_metadata(Caller(role=MEMBER, account_id=account_id, user_id=caller.user_id)),
            timeout=10,
        )

        async def chunks() -> AsyncIterator[bytes]:
            async for part in request_iterator:
                if part.HasField("chunk"):
                    yield part.chunk

        ingested = await self.batches.ingest_bulk_file(
            account_id=account_id,
            file_name=header.file_name,
            template=header.message_template,
            devices_limit=header.devices_limit or 5,
            senders=[SenderChoice(s.id, s.rate_per_minute) for s in senders.senders],
            chunks=chunks(),
        )
        return campaigns_pb2.BulkFileUploaded(
            batch=await self._batch(ingested.batch),
            duplicates=ingested.duplicates,
            invalid_rows=ingested.invalid,
            invalid=[
                campaigns_pb2.RowProblem(row=r.line, value=r.value, reason=r.reason) for r in ingested.invalid_samples
            ],
        )

    async def GetBatch(self, request: campaigns_pb2.BatchRef, context: grpc.aio.ServicerContext) -> campaigns_pb2.Batch:
        return await self._batch(await self.voice.get(current_caller(), request.batch_id))

    async def ListBatches(
        self, request: campaigns_pb2.ListBatchesRequest, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.ListBatchesResponse:
        rows, total = await self.batches.list_batches(
            current_caller(),
            channel=request.channel,
            status=request.status,
            limit=request.limit or 100,
            skip=request.skip,
            account_id=request.account_id,
        )
        return campaigns_pb2.ListBatchesResponse(batches=await self._batches(rows), total=total)

    async def PauseBatch(
        self, request: campaigns_pb2.BatchRef, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.Batch:
        return await self._batch(await self.batches.pause(current_caller(), await self._key(request.batch_id)))

    async def ResumeBatch(
        self, request: campaigns_pb2.BatchRef, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.Batch:
        return await self._batch(await self.batches.resume(current_caller(), await self._key(request.batch_id)))

    async def CancelBatch(
        self, request: campaigns_pb2.CancelBatchRequest, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.Batch:
        key = await self._key(request.batch_id)
        return await self._batch(await self.batches.cancel(current_caller(), key, request.reason))

    async def RetryFailed(
        self, request: campaigns_pb2.BatchRef, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.Batch:
        return await self._batch(await self.batches.retry_failed(current_caller(), request.batch_id))

    async def ListJobResults(
        self, request: campaigns_pb2.ListJobResultsRequest, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.ListJobResultsResponse:
        limit = request.limit or 100
        rows = await self.batches.results(
            current_caller(), request.batch_id, status=request.status, limit=limit, after=request.after
        )
        return campaigns_pb2.ListJobResultsResponse(
            results=[
                campaigns_pb2.JobResult(
                    job_id=r["job_id"],
                    phone=r["phone"],
                    status=r["status"],
                    sender_id=r["sender_id"] or 0,
                    error=r["error"] or "",
                    attempts=r["attempts"],
                    finished_at=to_timestamp(r["finished_at"]),
                    delivery=r["delivery"] or "",
                    delivered_at=to_timestamp(r["delivered_at"]),
                    read_at=to_timestamp(r["read_at"]),
                    delivery_error=r["delivery_error"] or "",
                )
                for r in rows
            ],
            next_after=rows[-1]["job_id"] if len(rows) == limit else 0,
        )

    async def ExportRows(
        self, request: campaigns_pb2.ExportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[campaigns_pb2.ExportChunk]:
        export = await self.exports.open(
            current_caller(),
            kind=request.kind,
            fmt=request.format,
            batch_id=request.batch_id,
            message_id=request.message_id,
            account_id=request.account_id,
        )
        # Scoped and found: the name goes first, so the download starts before any row is read.
        yield campaigns_pb2.ExportChunk(file_name=export.file_name, content_type=export.content_type)
        async for data in export.chunks():
            if data:
                yield campaigns_pb2.ExportChunk(data=data)

    async def GetAnalytics(
        self, request: campaigns_pb2.AnalyticsRequest, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.AnalyticsReply:
        report = await self.analytics.report(
            current_caller(),
            request.report,
            account_id=request.account_id,
            start=getattr(request, "from"),  # `from` is a Python keyword
            end=request.to,
            timezone=request.timezone,
            bucket=request.bucket,
        )
        return campaigns_pb2.AnalyticsReply(report_json=report_json(report))

    async def _key(self, batch_id: str) -> str:
        """The batch id behind either of its forms (`batch_id` or `_id`)."""
        return str((await self.voice.get(current_caller(), batch_id))["batch_id"])

    async def _batch(self, row: asyncpg.Record) -> campaigns_pb2.Batch:
        return (await self._batches([row]))[0]

    async def _batches(self, rows: list[asyncpg.Record]) -> list[campaigns_pb2.Batch]:
        scheduled = await self.voice.scheduled(rows)
        return [batch_pb(r, scheduled.get(r["batch_id"], 0)) for r in rows]

    # --- voice ---

    async def PreviewContacts(
        self, request_iterator: AsyncIterator[campaigns_pb2.ContactsUploadRequest], context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.ContactsPreview:
        header, chunks = await _upload(request_iterator)
        checked = await self.voice.preview(current_caller(), upload_of(header), chunks)
        return preview_pb(header.file_name, checked)

    async def CreateVoiceBatch(
        self, request_iterator: AsyncIterator[campaigns_pb2.ContactsUploadRequest], context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.VoiceBatchCreated:
        header, chunks = await _upload(request_iterator)
        row, checked = await self.voice.create(current_caller(), upload_of(header), chunks)
        return campaigns_pb2.VoiceBatchCreated(
            batch=await self._batch(row),
            jobs_created=row["total_jobs"],
            contacts_processed=checked.parsed.total_rows,
            duplicates_skipped=checked.duplicates,
            invalid_rows=len(checked.parsed.invalid),
            # The batch's own figure: contacts that opted out were cancelled and cost nothing.
            estimated_cost=str(row["estimated_cost"]),
            invalid=[campaigns_pb2.RowProblem(row=p.row, reason=p.reason) for p in checked.parsed.invalid[:1000]],
        )

    async def CreateBatch(
        self, request: campaigns_pb2.CreateBatchRequest, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.Batch:
        row = await self.voice.create_empty(
            current_caller(),
            account_id=request.account_id,
            name=request.name,
            description=request.description,
            priority=request.priority,
            call_settings_json=request.call_settings_json,
            allow_duplicates=request.allow_duplicates,
            use_case=request.use_case,
            country=request.country,
        )
        return await self._batch(row)

    async def UpdateBatch(
        self, request: campaigns_pb2.UpdateBatchRequest, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.Batch:
        patch = json_object(request.patch_json, "patch_json")
        return await self._batch(await self.voice.update(current_caller(), request.batch_id, patch))

    async def DeleteBatch(
        self, request: campaigns_pb2.DeleteBatchRequest, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.DeleteBatchResponse:
        row, deleted, cancelled = await self.voice.delete(
            current_caller(), request.batch_id, delete_jobs=request.delete_jobs
        )
        return campaigns_pb2.DeleteBatchResponse(
            batch_id=str(row["batch_id"]), jobs_deleted=deleted, jobs_cancelled=cancelled
        )

    async def GetBatchSummary(
        self, request: campaigns_pb2.BatchRef, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.BatchSummary:
        row, hours = await self.voice.summary(current_caller(), request.batch_id)
        return campaigns_pb2.BatchSummary(
            batch=await self._batch(row),
            hourly_stats=[
                campaigns_pb2.HourlyStat(
                    hour=to_timestamp(h["hour"]),
                    calls=h["calls"],
                    completed=h["completed"],
                    failed=h["failed"],
                    cost=str(h["cost"]),
                    minutes=str((h["seconds"] / 60).quantize(Decimal("0.01"))),
                )
                for h in hours
            ],
        )

    async def ListJobs(
        self, request: campaigns_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.ListJobsResponse:
        rows, total = await self.voice.jobs(
            current_caller(),
            account_id=request.account_id,
            batch_id=request.batch_id,
            status=request.status,
            limit=request.limit or 100,
            skip=request.skip,
        )
        return campaigns_pb2.ListJobsResponse(jobs=[job_pb(r) for r in rows], total=total)

    async def GetJob(self, request: campaigns_pb2.JobRef, context: grpc.aio.ServicerContext) -> campaigns_pb2.Job:
        return job_pb(await self.voice.job(current_caller(), request.job_id))

    async def RetryJob(self, request: campaigns_pb2.JobRef, context: grpc.aio.ServicerContext) -> campaigns_pb2.Job:
        return job_pb(await self.voice.retry_job(current_caller(), request.job_id))

    async def CancelJob(
        self, request: campaigns_pb2.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.Job:
        return job_pb(await self.voice.cancel_job(current_caller(), request.job_id, request.reason))

    async def DeleteJob(
        self, request: campaigns_pb2.JobRef, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.DeleteJobResponse:
        cancelled = await self.voice.delete_job(current_caller(), request.job_id)
        if cancelled is not None:
            return campaigns_pb2.DeleteJobResponse(job_id=request.job_id, cancelled=True, job=job_pb(cancelled))
        return campaigns_pb2.DeleteJobResponse(job_id=request.job_id)

    async def GetDashboard(
        self, request: campaigns_pb2.DashboardRequest, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.Dashboard:
        scope, c, scheduled, recent, today = await self.voice.dashboard(current_caller(), request.account_id)
        done = c["completed_jobs"] + c["failed_jobs"] + c["cancelled_jobs"] + c["suspended_jobs"]
        return campaigns_pb2.Dashboard(
            account_id=scope,
            total_batches=c["total_batches"],
            active_batches=c["active_batches"],
            paused_batches=c["paused_batches"],
            completed_batches=c["completed_batches"],
            cancelled_batches=c["cancelled_batches"],
            total_jobs=c["total_jobs"],
            pending_jobs=max(c["total_jobs"] - done - c["in_progress_jobs"] - scheduled, 0),
            scheduled_jobs=scheduled,
            in_progress_jobs=c["in_progress_jobs"],
            completed_jobs=c["completed_jobs"],
            failed_jobs=c["failed_jobs"],
            cancelled_jobs=c["cancelled_jobs"],
            suspended_jobs=c["suspended_jobs"],
            total_cost=str(c["total_cost"]),
            total_minutes=str((c["total_seconds"] / 60).quantize(Decimal("0.01"))),
            recent_jobs=[job_pb(r) for r in recent],
            calls_today=today,
            jobs_today=c["jobs_today"],
        )

    async def ListCalls(
        self, request: campaigns_pb2.ListCallsRequest, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.ListCallsResponse:
        rows, total = await self.voice.calls(
            current_caller(),
            account_id=request.account_id,
            batch_id=request.batch_id,
            status=request.status,
            limit=request.limit or 50,
            skip=request.skip,
        )
        return campaigns_pb2.ListCallsResponse(calls=[call_pb(r) for r in rows], total=total)


def call_pb(row: asyncpg.Record) -> campaigns_pb2.CallRecord:
    result = row["call_result"] or {}
    if isinstance(result, str):
        result = json.loads(result)
    summary = result.get("summary") or {}
    analysis = summary.get("call_analysis") or {}
    job_id, _ = job_ids(row["id"])
    phones = list(row["phones"])
    return campaigns_pb2.CallRecord(
        call_id=summary.get("call_id") or f"call-{row['id']}-{row['attempts']}",
        job_id=job_id,
        batch_id=str(row["batch_id"]),
        contact_name=row["name"],
        phone=summary.get("to_number") or (phones[0] if phones else ""),
        status=summary.get("call_status") or row["status"],
        duration_ms=int(summary.get("duration_ms") or 0),
        cost=str(row["cost"]),
        created_at=to_timestamp(row["call_started_at"] or row["created_at"]),
        summary=analysis.get("call_summary") or "",
        sentiment=analysis.get("user_sentiment") or "",
    )
