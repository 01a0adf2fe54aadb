"""Provider webhooks. The WhatsApp Cloud API calls these with the statuses of messages it
accepted (sent, delivered, read, failed); they reach campaigns as `events.delivery.*`. An
inbound text saying STOP, BAJA or NO puts its sender on the opt-out list of the accounts whose
Cloud API device is the number it wrote to (the dispatcher knows which; campaigns keeps the list).

No bearer token here: Meta signs each delivery with the app secret (`X-Hub-Signature-256`,
an HMAC-SHA256 of the raw body), and subscribing answers a challenge with the verify token
the operator chose. Without those settings the routes answer 404."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from fastapi import APIRouter, Query, Request
from fastapi.responses import PlainTextResponse
from pregonero.campaigns.v1 import address_book_pb2
from pregonero.dispatcher.v1 import dispatcher_pb2
from pregonero.events.v1 import events_pb2

from services.runtime import bus
from services.runtime.identity import ADMIN, MEMBER, Caller
from services.runtime.protos import to_timestamp

from ..errors import ApiError

log = logging.getLogger("pregonero.gateway.webhooks")

router = APIRouter(tags=["webhooks"])

PROVIDER = "whatsapp_cloud"
STATUSES = frozenset({"sent", "delivered", "read", "failed"})
# Replies that withdraw consent, compared trimmed and case-insensitive.
STOP_WORDS = frozenset({"stop", "baja", "no"})
_WA_ID = re.compile(r"[1-9][0-9]{6,14}")  # Meta's `from`: the E.164 digits, without the +
_NUMBER_ID = re.compile(r"[0-9]{1,32}")
WEBHOOK_USER = "whatsapp-webhook"
# The number's senders are looked up across accounts: the webhook names no account.
FINDER = Caller(role=ADMIN, account_id="", user_id=WEBHOOK_USER)


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
    stops = stops_of(payload)
    if not stops:
        return {"received": len(reports)}
    return {"received": len(reports), "opted_out": await add_opt_outs(request, stops)}


@dataclass(frozen=True, slots=True)
class Stop:
    phone_number_id: str  # the business number written to
    phone: str  # who wrote, E.164


def stops_of(payload: dict[str, Any]) -> list[Stop]:
    """The inbound texts saying STOP, BAJA or NO (entry[].changes[].value.messages[]), each
    sender once per business number; any other message is not ours to handle."""
    stops: dict[Stop, None] = {}
    for entry in _objects(payload.get("entry")):
        for change in _objects(entry.get("changes")):
            value = change.get("value")
            if not isinstance(value, dict):
                continue
            metadata = value.get("metadata")
            number_id = metadata.get("phone_number_id") if isinstance(metadata, dict) else None
            if not isinstance(number_id, str) or not _NUMBER_ID.fullmatch(number_id):
                continue
            for message in _objects(value.get("messages")):
                text = message.get("text")
                body = text.get("body") if isinstance(text, dict) else None
                sender = message.get("from")
                if message.get("type") != "text" or not isinstance(body, str) or not isinstance(sender, str):
                    continue
                if body.strip().casefold() in STOP_WORDS and _WA_ID.fullmatch(sender):
                    stops[Stop(number_id, "+" + sender)] = None
    return list(stops)


async def add_opt_outs(request: Request, stops: list[Stop]) -> int:
    """Each sender joins the opt-outs of every account with a live Cloud API device on the
    number it wrote to (each of them sends from it, so each must stop); how many were new.
    A failure answers 5xx, so Meta delivers the body again: adding is idempotent. A sender
    the address book refuses as a phone can never succeed, and is skipped."""
    backends = request.app.state.backends
    added = 0
    for stop in stops:
        found = await backends.dispatcher.FindSendersByNumber(
            dispatcher_pb2.FindSendersByNumberRequest(provider=PROVIDER, phone_number_id=stop.phone_number_id),
            metadata=FINDER.metadata(),  # no one signed in: the webhook's own identity
        )
        accounts = sorted({sender.account_id for sender in found.senders})
        if not accounts:
            log.warning("opt-out reply to number id %s, which no device uses: ignored", stop.phone_number_id)
        for account_id in accounts:
            try:
                reply = await backends.address_book.AddOptOut(
                    address_book_pb2.AddOptOutRequest(account_id=account_id, phone=stop.phone, source="inbound"),
                    # As each account in turn: the opt-out is that account's.
                    metadata=Caller(role=MEMBER, account_id=account_id, user_id=WEBHOOK_USER).metadata(),
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                log.warning("opt-out reply from a number the address book refuses: %s", exc.details())
                continue
            added += reply.created
    return added


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
