"""Downloads: a bulk job's per-recipient results (`/jobs/{id}/results/export`), a voice
campaign's jobs (`/api/v1/batches/{id}/export`) and the scheduler guide's
`/api/reports/export?type=…` (messages, contacts, groups, a message's results, a bulk job's
results, a voice campaign's jobs, the ledger's transactions), as CSV or XLSX. Each is
authorised as its neighbours are (the bulk sender's routes, the SpeechAI ones, the guide's).

The service that owns the rows makes the file while it reads them (campaigns, or accounts for
the ledger, both with services/runtime/exports.py) and streams it; this module waits for the
stream's first message, which names the file (or its error: another account's batch is 404
like everywhere), then forwards each chunk as it comes, so a million rows never sit in the
gateway. A stream that breaks after the headers went out cuts the connection, and the client
sees an unfinished download, never a short file that looks whole."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

import grpc
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pregonero.accounts.v1 import accounts_pb2
from pregonero.campaigns.v1 import campaigns_pb2

from services.runtime.identity import Caller

from ..auth import caller_or_anonymous, require_caller
from ..errors import ApiError
from ..ids import MAX_ID_CHARS, BatchId, is_batch_id
from .jobs import AccountFilter, scoped_account

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("pregonero.gateway")
router = APIRouter(tags=["exports"])

# The guide's types first, then the suite's (as services/campaigns/exports.py lists them);
# transactions are the accounts service's.
KINDS = (
    "messages",
    "contacts",
    "groups",
    "message_results",
    "bulk_job_results",
    "voice_batch_jobs",
    "transactions",
)
# The query parameter each kind needs.
NEEDS = {"message_results": "message_id", "bulk_job_results": "job_id", "voice_batch_jobs": "batch_id"}
FORMATS = ("csv", "xlsx")
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
# The whole download, a million-row workbook's minute of making included: the longest
# deadline callers set (as uploads'), which the servers' connection grace outlasts
# (runtime/rpc.py), so a connection's end never cuts an export.
EXPORT_TIMEOUT_S = 300.0
FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The file, sent while it is made (`Content-Disposition` names it)",
        "content": {
            "text/csv": {"schema": {"type": "string"}},
            XLSX: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

# Any string passes the schema's check and is answered here, so a wrong value gets a 400 that
# lists the allowed ones rather than a validation error; the document still lists them.
Format = Annotated[str, Query(max_length=32, description="csv | xlsx", json_schema_extra={"enum": list(FORMATS)})]
Kind = Annotated[
    str, Query(alias="type", max_length=32, description=" | ".join(KINDS), json_schema_extra={"enum": list(KINDS)})
]


def _checked_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ApiError(400, f"format must be one of {', '.join(FORMATS)}")
    return fmt


def _file_route(path: str, summary: str) -> Callable[[F], F]:
    """A GET route whose reply is a file, sent while it is made."""
    return router.get(path, summary=summary, response_class=StreamingResponse, responses=FILE_RESPONSES)


async def stream_export(request: Request, message: Any) -> StreamingResponse:
    """The file of an ExportRequest (campaigns) or an ExportTransactionsRequest (accounts)."""
    backends = request.app.state.backends
    if isinstance(message, accounts_pb2.ExportTransactionsRequest):
        call = backends.accounts.ExportTransactions(message, timeout=EXPORT_TIMEOUT_S)
    else:
        call = backends.campaigns.ExportRows(message, timeout=EXPORT_TIMEOUT_S)
    replies = aiter(call)
    # The first message, or the error that takes its place (404, 400), before any header.
    head = await anext(replies)

    async def body() -> AsyncIterator[bytes]:
        try:
            async for part in replies:
                yield part.data
        except grpc.aio.AioRpcError as exc:
            log.warning("export %s broke off: %s %s", head.file_name, exc.code().name, exc.details())
            raise
        finally:
            call.cancel()  # a client gone away stops the export at its service as well

    return StreamingResponse(
        body(),
        media_type=head.content_type,
        headers={
            "Content-Disposition": f'attachment; filename="{head.file_name}"',
            "Cache-Control": "no-store",
        },
    )


@_file_route(
    "/jobs/{job_id}/results/export",
    "A bulk job's per-recipient results as one CSV or XLSX file",
)
async def export_job_results(
    request: Request, caller: Annotated[Caller, Depends(caller_or_anonymous)], job_id: str, format: Format = "csv"
) -> StreamingResponse:
    message = campaigns_pb2.ExportRequest(kind="bulk_job_results", format=_checked_format(format), batch_id=job_id)
    return await stream_export(request, message)


@_file_route(
    "/api/v1/batches/{batch_id}/export",
    "A voice campaign's jobs (outcome, attempts, duration, summary, promise to pay) as CSV or XLSX",
)
async def export_batch_jobs(
    request: Request, caller: Annotated[Caller, Depends(require_caller)], batch_id: BatchId, format: Format = "csv"
) -> StreamingResponse:
    message = campaigns_pb2.ExportRequest(kind="voice_batch_jobs", format=_checked_format(format), batch_id=batch_id)
    return await stream_export(request, message)


@_file_route(
    "/api/reports/export",
    "A report as CSV or XLSX: messages, contacts, groups, a message's or a bulk job's results, "
    "a voice campaign's jobs, or the ledger's transactions",
)
async def export_report(
    request: Request,
    caller: Annotated[Caller, Depends(require_caller)],
    kind: Kind,
    format: Format = "csv",
    message_id: Annotated[
        str | None, Query(max_length=MAX_ID_CHARS, description="message_results: the scheduled message")
    ] = None,
    job_id: Annotated[str | None, Query(max_length=MAX_ID_CHARS, description="bulk_job_results: the job")] = None,
    batch_id: Annotated[
        str | None, Query(max_length=MAX_ID_CHARS, description="voice_batch_jobs: `batch_id` or `_id`")
    ] = None,
    account_id: AccountFilter = None,
) -> StreamingResponse:
    if kind not in KINDS:
        raise ApiError(400, f"type must be one of {', '.join(KINDS)}")
    fmt = _checked_format(format)
    if kind == "transactions":
        ledger = accounts_pb2.ExportTransactionsRequest(format=fmt, account_id=scoped_account(caller, account_id))
        return await stream_export(request, ledger)
    message = campaigns_pb2.ExportRequest(kind=kind, format=fmt)
    if kind not in NEEDS:  # the listings: an account's, or an admin's every account's
        message.account_id = scoped_account(caller, account_id)
        return await stream_export(request, message)
    named = {"message_id": message_id, "job_id": job_id, "batch_id": batch_id}[NEEDS[kind]]
    if not named or not named.strip():
        raise ApiError(400, f"{NEEDS[kind]} is required for type={kind}")
    if kind == "voice_batch_jobs" and not is_batch_id(named):
        raise ApiError(404, f"batch {named} not found")
    if kind == "message_results":
        message.message_id = named.strip()
    else:
        message.batch_id = named.strip()
    return await stream_export(request, message)
