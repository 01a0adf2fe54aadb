"""Wablas status callbacks: Wablas posts each status change of a message it accepted (pending,
sent, delivered or received, read, cancel, rejected) to the device's Tracking URL; they reach
campaigns as `events.delivery.wablas`, in the same `DeliveryReports` as Meta's, and campaigns
applies them the same way (a later state wins, so a `read` never goes back to `delivered`, and
a report repeated or late changes nothing).

Authentication: Wablas's documentation shows no signature and no credential on these calls
(the Tracking URL is a plain URL set per device, with no custom headers), so a key travels in
that URL, compared in constant time (a proxy that can add headers may send it as
`X-Webhook-Key` instead). Without WABLAS_WEBHOOK_SECRET the route answers 404.

- A device's own URL, which the device's owner can read in Wablas's settings:
  `/webhooks/wablas?device=<its id in the suite>&key=<HMAC-SHA256(secret, "wablas-device:<id>")>`
  (the dispatcher's `wablas.tracking_url` builds it). Its key is good for that device only,
  and its callbacks are matched to attempts through Wablas's message id among that device's
  messages (kept by the dispatcher when Wablas accepted each): a body's ref_id is not
  believed, so no device's owner can report on another's messages.
- The operator's URL, `/webhooks/wablas?key=<the secret itself>`, for a deployment that keeps
  its Wablas settings to itself: the body's `ref_id` (our attempt id, sent with each message;
  the documented body does not list it, some servers add it) names the attempt.

The key is in the URL: access logs that record query strings must not be readable by tenants
(the gateway's own log records the path only). A report that finds no attempt (a message sent
from the phone, or outside the suite) is dropped: nothing could apply it."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from pregonero.dispatcher.v1 import dispatcher_pb2
from pregonero.events.v1 import events_pb2
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from services.runtime import bus
from services.runtime.identity import ADMIN, Caller
from services.runtime.protos import to_timestamp

from ..bodies import read_capped
from ..errors import ApiError

log = logging.getLogger("pregonero.gateway.wablas_webhook")

router = APIRouter(tags=["webhooks"])

PROVIDER = "wablas"
SUBJECT = f"events.delivery.{PROVIDER}"
MAX_BODY_BYTES = 64 * 1024  # one callback is a few hundred bytes
MAX_REPORTS = 100  # a body may hold a list (as Wablas's v2 sends do): bounded
# The callback names a device, not an account: its messages are looked up by the suite's own
# identity (an admin bound to no account), scoped to that device.
WEBHOOK_CALLER = Caller(role=ADMIN, account_id="", user_id="wablas-webhook")
# Wablas's words → ours. `pending` (queued at Wablas) adds nothing to what the send recorded.
STATUSES = {
    "sent": "sent",
    "delivered": "delivered",
    "received": "delivered",
    "read": "read",
    "cancel": "failed",
    "canceled": "failed",
    "cancelled": "failed",
    "reject": "failed",
    "rejected": "failed",
    "failed": "failed",
}
# Our attempt ids: "<batch uuid>:<job id>:<attempt no>" (see campaigns/delivery.py job_of).
_ATTEMPT_ID = re.compile(r"[0-9a-fA-F-]{36}:[0-9]{1,19}:[0-9]{1,9}")


class WablasStatus(BaseModel):
    """One status callback. Fields Wablas adds beyond these (deviceId, sender, ...) are
    ignored rather than refused: the body is the provider's, not a client's of ours."""

    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=128)
    status: str = Field(min_length=1, max_length=32)
    phone: str | None = Field(None, max_length=64)
    note: str | None = Field(None, max_length=1000)
    ref_id: str | None = Field(None, max_length=200)


_BODY = TypeAdapter(WablasStatus | list[WablasStatus])


@router.post("/webhooks/wablas", summary="Wablas message status callbacks (the device's Tracking URL)")
async def receive_statuses(
    request: Request,
    key: str = Query("", max_length=256, description="The operator's webhook secret"),
    device: str = Query("", max_length=19, pattern="^[0-9]*$", description="The device's id in the suite"),
) -> dict[str, Any]:
    secret = request.app.state.settings.wablas_webhook_secret.get_secret_value()
    if not secret:
        raise ApiError(404, "the Wablas webhook is not configured (WABLAS_WEBHOOK_SECRET)")
    given = key or request.headers.get("x-webhook-key", "")
    expected = device_key(secret, device) if device else secret
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "the webhook key does not match")
    raw = await read_capped(request, MAX_BODY_BYTES)
    try:
        parsed = _BODY.validate_python(json.loads(raw))
    except ValueError as exc:  # not JSON, or not a status callback (ValidationError is one)
        raise ApiError(400, _problem(exc)) from exc
    statuses = parsed if isinstance(parsed, list) else [parsed]
    if len(statuses) > MAX_REPORTS:
        raise ApiError(413, f"at most {MAX_REPORTS} statuses in one body")
    reports = reports_of(statuses, received_at=datetime.now(UTC), ref_ids=not device)
    reports = await with_attempts(request, reports, device=device)
    if reports:
        # Wablas may post the same status again: the same reports are published once.
        seen = "\n".join(f"{r.provider_message_id}:{r.status}" for r in reports)
        digest = hashlib.sha256(seen.encode()).hexdigest()[:32]
        message = events_pb2.DeliveryReports(provider=PROVIDER, reports=reports)
        await bus.publish(request.app.state.runtime.js, SUBJECT, message, msg_id=f"{PROVIDER}:{digest}")
    return {"received": len(reports)}


async def with_attempts(
    request: Request, reports: list[events_pb2.DeliveryReport], *, device: str
) -> list[events_pb2.DeliveryReport]:
    """The reports with their attempt ids, those without a ref_id found by Wablas's message id
    among the device's messages; the ones no attempt of ours is behind are left out."""
    unnamed = sorted({r.provider_message_id for r in reports if not r.attempt_id})
    if unnamed and device:
        found = await request.app.state.backends.dispatcher.FindSenderAttempts(
            dispatcher_pb2.FindSenderAttemptsRequest(provider=PROVIDER, session=device, provider_message_ids=unnamed),
            metadata=WEBHOOK_CALLER.metadata(),  # no one signed in: the webhook's own identity
        )
        for report in reports:
            if not report.attempt_id:
                report.attempt_id = found.attempt_ids.get(report.provider_message_id, "")
    kept = [r for r in reports if r.attempt_id]
    if len(kept) < len(reports):
        log.info(
            "wablas device %s: %d statuses of messages not sent by the suite", device or "?", len(reports) - len(kept)
        )
    return kept


def device_key(secret: str, device: str) -> str:
    """One device's key (the dispatcher's wablas.device_key derives the same)."""
    return hmac.new(secret.encode(), f"wablas-device:{device}".encode(), hashlib.sha256).hexdigest()


def reports_of(
    statuses: list[WablasStatus], *, received_at: datetime, ref_ids: bool
) -> list[events_pb2.DeliveryReport]:
    """The callbacks that say something about a message's fate, as delivery reports; their
    ref_ids are taken for attempt ids only when `ref_ids` (the operator's URL). Wablas's body
    has no time of the event: the time it reached us stands for it (seconds late)."""
    reports = []
    for status in statuses:
        ours = STATUSES.get(status.status.strip().casefold())
        if ours is None:
            continue
        ref = (status.ref_id or "").strip() if ref_ids else ""
        reports.append(
            events_pb2.DeliveryReport(
                provider_message_id=status.id,
                attempt_id=ref if _ATTEMPT_ID.fullmatch(ref) else "",
                status=ours,
                at=to_timestamp(received_at),
                error=f"wablas: {status.status}: {status.note or ''}".strip(" :")[:300] if ours == "failed" else "",
            )
        )
    return reports


def _problem(exc: ValueError) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("WablasStatus", "list[")))
        return f"not a Wablas status callback: {where or 'body'}: {first['msg']}"
    return "the body is not JSON"
