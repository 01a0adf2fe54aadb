"""gRPC servicer: proto in, domain call, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
from pregonero.campaigns.v1 import campaigns_pb2, campaigns_pb2_grpc
from pregonero.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc

from services.runtime.errors import InvalidArgument
from services.runtime.identity import MEMBER, Caller, current_caller
from services.runtime.protos import to_timestamp
from services.runtime.rpc import outgoing_metadata

from .batches import Batches, SenderChoice


def batch_pb(row: asyncpg.Record) -> campaigns_pb2.Batch:
    done = row["sent_jobs"] + row["failed_jobs"] + row["cancelled_jobs"] + row["unknown_jobs"]
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
        total_cost=str(row["total_cost"]),
        unit_price=str(row["unit_price"]),
        progress=campaigns_pb2.Progress(
            sent=row["sent_jobs"],
            failed=row["failed_jobs"],
            total=row["total_jobs"],
            cancelled=row["cancelled_jobs"],
            in_flight=row["queued_jobs"],
            suspended=row["suspended_jobs"],
            pending=max(row["total_jobs"] - done - row["queued_jobs"] - row["suspended_jobs"], 0),
        ),
        created_at=to_timestamp(row["created_at"]),
        updated_at=to_timestamp(row["updated_at"]),
        started_at=to_timestamp(row["started_at"]),
        finished_at=to_timestamp(row["finished_at"]),
    )


class CampaignsServicer(campaigns_pb2_grpc.CampaignsServiceServicer):
    def __init__(self, batches: Batches, dispatcher: dispatcher_pb2_grpc.DispatcherServiceStub) -> None:
        self.batches = batches
        self.dispatcher = dispatcher

    async def UploadBulkFile(
        self, request_iterator: AsyncIterator[campaigns_pb2.UploadBulkFileRequest], context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.Batch:
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

        row = await self.batches.ingest_bulk_file(
            account_id=account_id,
            file_name=header.file_name,
            template=header.message_template,
            devices_limit=header.devices_limit or 5,
            senders=[SenderChoice(s.id, s.rate_per_minute) for s in senders.senders],
            chunks=chunks(),
        )
        return batch_pb(row)

    async def GetBatch(self, request: campaigns_pb2.BatchRef, context: grpc.aio.ServicerContext) -> campaigns_pb2.Batch:
        return batch_pb(await self.batches.get(current_caller(), request.batch_id))

    async def ListBatches(
        self, request: campaigns_pb2.ListBatchesRequest, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.ListBatchesResponse:
        rows, total = await self.batches.list(
            current_caller(),
            channel=request.channel,
            status=request.status,
            limit=request.limit or 100,
            skip=request.skip,
            account_id=request.account_id,
        )
        return campaigns_pb2.ListBatchesResponse(batches=[batch_pb(r) for r in rows], total=total)

    async def PauseBatch(
        self, request: campaigns_pb2.BatchRef, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.Batch:
        return batch_pb(await self.batches.pause(current_caller(), request.batch_id))

    async def ResumeBatch(
        self, request: campaigns_pb2.BatchRef, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.Batch:
        return batch_pb(await self.batches.resume(current_caller(), request.batch_id))

    async def CancelBatch(
        self, request: campaigns_pb2.CancelBatchRequest, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.Batch:
        return batch_pb(await self.batches.cancel(current_caller(), request.batch_id, request.reason))

    async def RetryFailed(
        self, request: campaigns_pb2.BatchRef, context: grpc.aio.ServicerContext
    ) -> campaigns_pb2.Batch:
        return batch_pb(await self.batches.retry_failed(current_caller(), request.batch_id))

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
                )
                for r in rows
            ],
            next_after=rows[-1]["job_id"] if len(rows) == limit else 0,
        )
