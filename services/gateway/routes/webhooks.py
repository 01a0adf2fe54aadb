"""Provider webhooks. The WhatsApp Cloud API calls these with the statuses of messages it
accepted (sent, delivered, read, failed); they reach campaigns as `events.delivery.*`.

No bearer token here: Meta signs each delivery with the app secret (`X-Hub-Signature-256`,
an HMAC-SHA256 of the raw body), and subscribing answers a challenge with the verify token
the operator chose. Without those settings the routes answer 404."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse
from pregonero.events.v1 import events_pb2

from services.runtime import bus
from services.runtime.protos import to_timestamp

from ..errors import ApiError

router = APIRouter(tags=["webhooks"])

PROVIDER = "whatsapp_cloud"
STATUSES = frozenset({"sent", "delivered", "read", "failed"})


@router.get("/webhooks/whatsapp", summary="WhatsApp Cloud API subscription check", response_class=PlainTextResponse)
async def verify_subscription(
    request: Request,
    mode: str = Query("", alias="hub.mode"),
    token: str = Query("", alias="hub.verify_token"),
    challenge: str = Query("", alias="hub.challenge"),
) -> PlainTextResponse:
    expected = request.app.state.settings.whatsapp_verify_token.get_secret_value()
    if not expected:
        raise ApiError(404, "the WhatsApp webhook is not configured (WHATSAPP_VERIFY_TOKEN)")
    if mode != "subscribe" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise ApiError(403, "hub.verify_token does not match")
    return PlainTextResponse(challenge)


@router.post("/webhooks/whatsapp", summary="WhatsApp Cloud API message statuses")
async def receive_statuses(request: Request) -> dict[str, Any]:
    secret = request.app.state.settings.whatsapp_app_secret.get_secret_value()
    if not secret:
        raise ApiError(404, "the WhatsApp webhook is not configured (WHATSAPP_APP_SECRET)")
    raw = await request.body()
    signature = request.headers.get("x-hub-signature-256", "")
    expected = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise ApiError(401, "X-Hub-Signature-256 does not match the body")
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, "the body is not JSON") from exc
    reports = statuses_of(payload)
    if reports:
        # Meta retries a delivery it got no 200 for: the same body is published once.
        digest = hashlib.sha256(raw).hexdigest()[:32]
        message = events_pb2.DeliveryReports(provider=PROVIDER, reports=reports)
        await bus.publish(request.app.state.runtime.js, f"events.delivery.{PROVIDER}", message, msg_id=digest)
    return {"received": len(reports)}


def statuses_of(payload: Any) -> list[events_pb2.DeliveryReport]:
    """The message statuses in a webhook body (entry[].changes[].value.statuses[]); anything
    else in it (incoming messages, account updates) is not ours to handle and is skipped."""
    if not isinstance(payload, dict) or payload.get("object") != "whatsapp_business_account":
        raise ApiError(400, 'not a WhatsApp Business Account webhook ("object" must be whatsapp_business_account)')
    reports = []
    for entry in _objects(payload.get("entry")):
        for change in _objects(entry.get("changes")):
            value = change.get("value")
            for status in _objects(value.get("statuses") if isinstance(value, dict) else None):
                if status.get("status") not in STATUSES or not isinstance(status.get("id"), str):
                    continue
                errors = list(_objects(status.get("errors")))
                error = ""
                if errors:
                    first = errors[0]
                    error = f"({first.get('code')}) {first.get('title') or first.get('message') or ''}".strip()
                reports.append(
                    events_pb2.DeliveryReport(
                        provider_message_id=status["id"],
                        attempt_id=str(status.get("biz_opaque_callback_data") or ""),
                        status=status["status"],
                        at=to_timestamp(_when(status.get("timestamp"))),
                        error=error,
                    )
                )
    return reports


def _objects(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _when(value: Any) -> datetime | None:
    try:
        return datetime.fromtimestamp(int(value), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
