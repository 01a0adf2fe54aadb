"""Analytics over a date range: the SpeechAI dashboard's `/api/v1/reports/analytics` (voice
calls) and the scheduler guide's `/api/analytics/dashboard|messages|groups` (WhatsApp, bulk
and scheduled alike). Campaigns computes each reply from its maintained aggregates and checks
every parameter (services/campaigns/analytics.py); this module maps the query string and
returns the reply as campaigns wrote it, without decoding it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pregonero.campaigns.v1 import campaigns_pb2

from services.runtime.identity import Caller

from ..auth import require_caller
from .jobs import AccountFilter, scoped_account

router = APIRouter(tags=["analytics"])

CallerDep = Annotated[Caller, Depends(require_caller)]
BOUND = "YYYY-MM-DD (local midnight; `to` includes the whole day) or ISO 8601"
Zone = Annotated[str, Query(max_length=64, description="IANA zone the buckets are cut in; default the caller's")]
Bucket = Annotated[
    str, Query(max_length=8, description="hour | day | week", json_schema_extra={"enum": ["hour", "day", "week"]})
]
# What every reply carries; each report adds its own keys (README "Analytics").
REPLY: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Chart-ready figures: `series` has every bucket of the range, zeros included",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["from", "to", "timezone", "bucket"],
                    "properties": {
                        "account_id": {"type": ["string", "null"]},
                        "from": {"type": "string", "format": "date-time"},
                        "to": {"type": "string", "format": "date-time"},
                        "timezone": {"type": "string"},
                        "bucket": {"type": "string", "enum": ["hour", "day", "week"]},
                    },
                }
            }
        },
    }
}


def range_query(
    caller: CallerDep,
    start: Annotated[str, Query(alias="from", max_length=40, description=BOUND + "; default 30 days ago")] = "",
    to: Annotated[str, Query(max_length=40, description=BOUND + "; default now")] = "",
    timezone: Zone = "",
    bucket: Bucket = "day",
    account_id: AccountFilter = None,
) -> campaigns_pb2.AnalyticsRequest:
    """The query string every report takes, as the request campaigns checks."""
    message = campaigns_pb2.AnalyticsRequest(
        to=to, timezone=timezone, bucket=bucket, account_id=scoped_account(caller, account_id)
    )
    setattr(message, "from", start)  # `from` is a Python keyword
    return message


RangeQuery = Annotated[campaigns_pb2.AnalyticsRequest, Depends(range_query)]

# Each report's route: the same query string, the same reply, one RPC.
REPORTS = (
    (
        "/api/v1/reports/analytics",
        "voice",
        "Voice calls per bucket (placed, answered, no answer, busy, voicemail, failed, minutes, cost, "
        "promises to pay), totals, the outcome mix and the answer rate by local hour",
    ),
    (
        "/api/analytics/dashboard",
        "dashboard",
        "The headline figures: WhatsApp messages and voice calls in range, messages by state, groups",
    ),
    (
        "/api/analytics/messages",
        "messages",
        "WhatsApp messages per bucket (sent, delivered, read, failed), by channel (bulk, scheduled) and by message",
    ),
    (
        "/api/analytics/groups",
        "groups",
        "Per contact group: contacts, the messages naming it in range, and their delivery and read rates",
    ),
)


def _route(report: str) -> Callable[..., Awaitable[Response]]:
    async def route(request: Request, query: RangeQuery) -> Response:
        query.report = report
        reply = await request.app.state.backends.campaigns.GetAnalytics(query)
        return Response(reply.report_json, media_type="application/json")

    route.__name__ = f"{report}_analytics"  # the operation's id in the OpenAPI document
    return route


for _path, _report, _summary in REPORTS:
    router.add_api_route(
        _path, _route(_report), methods=["GET"], summary=_summary, response_class=Response, responses=REPLY
    )
