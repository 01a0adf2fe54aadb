"""WAHA webhooks (WhatsApp Web sessions of `waha` devices). The dispatcher configures each
session to call here with two events:

- `session.status`: the session's status (STARTING, SCAN_QR_CODE, WORKING, FAILED, STOPPED)
  becomes the device's connection through the dispatcher's ReportSenderState, which records
  it, fetches the QR when one is to be scanned, stops or resumes the device's work and pushes
  `whatsapp_status` to the account's sockets.
- `message.ack`: what WhatsApp says of a message we sent (SERVER, DEVICE, READ, PLAYED, or
  ERROR) reaches campaigns as `events.delivery.waha`, in the same `DeliveryReports` as Meta's
  statuses. An ack names WAHA's message id only: the dispatcher, which kept it with the
  attempt when the message was accepted, says which attempt it is. Campaigns applies a later
  state over an earlier one only, so a duplicate or an ack out of order changes nothing (READ
  never goes back to DELIVERED); the same ack posted twice is also published once.

Authentication as WAHA documents it: `X-Webhook-Hmac` is the hex HMAC-SHA512 of the raw body
with the key the session was configured with (the operator's WAHA_WEBHOOK_HMAC_KEY, which the
gateway and the dispatcher share). Without the key the route answers 404. The body is capped
before it is read whole, and parsed only once its signature is checked."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from datetime import UTC, datetime
from typing import Any

import grpc
from fastapi import APIRouter, Request
from pregonero.dispatcher.v1 import dispatcher_pb2
from pregonero.events.v1 import events_pb2
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.runtime import bus
from services.runtime.identity import ADMIN, Caller
from services.runtime.protos import to_timestamp

from ..bodies import read_capped
from ..errors import ApiError

log = logging.getLogger("pregonero.gateway.waha_webhook")

router = APIRouter(tags=["webhooks"])

PROVIDER = "waha"
SUBJECT = f"events.delivery.{PROVIDER}"
# A session.status or message.ack is well under 4 KiB (the ack's message fields included).
MAX_BODY_BYTES = 64 * 1024
# The webhook names a session, not an account: the device is found across accounts, by the
# suite's own identity (an admin bound to no account).
WEBHOOK_CALLER = Caller(role=ADMIN, account_id="", user_id="waha-webhook")
# message.ack's ackName (or its number) → Meta's words. PENDING adds nothing to what the send
# recorded; PLAYED is a voice note listened to: read.
ACK_STATUS = {"ERROR": "failed", "SERVER": "sent", "DEVICE": "delivered", "READ": "read", "PLAYED": "read"}
ACK_NAMES = {-1: "ERROR", 0: "PENDING", 1: "SERVER", 2: "DEVICE", 3: "READ", 4: "PLAYED"}


class StatusPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: str = Field(min_length=1, max_length=64)


class AckPayload(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=256)
    fromMe: bool | None = None  # noqa: N815 - WAHA's field name
    ack: int | None = None
    ackName: str | None = Field(None, max_length=32)  # noqa: N815 - WAHA's field name


class WahaEvent(BaseModel):
    """The envelope WAHA posts. It carries more (me, environment, engine, metadata): the body
    is the provider's, so what we do not read is ignored rather than refused."""

    model_config = ConfigDict(extra="ignore")

    event: str = Field(min_length=1, max_length=64)
    session: str = Field(min_length=1, max_length=200)
    timestamp: int | None = Field(None, ge=0, le=10**15)  # milliseconds
    payload: dict[str, Any]


@router.post("/webhooks/waha", summary="WAHA session states and message acks (WhatsApp Web devices)")
async def receive_event(request: Request) -> dict[str, Any]:
    key = request.app.state.settings.waha_webhook_hmac_key.get_secret_value()
    if not key:
        raise ApiError(404, "the WAHA webhook is not configured (WAHA_WEBHOOK_HMAC_KEY)")
    raw = await read_capped(request, MAX_BODY_BYTES)
    algorithm = request.headers.get("x-webhook-hmac-algorithm", "sha512").strip().lower()
    given = request.headers.get("x-webhook-hmac", "").strip().lower()
    expected = hmac.new(key.encode(), raw, hashlib.sha512).hexdigest()
    if algorithm != "sha512" or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "X-Webhook-Hmac does not match the body (HMAC-SHA512 with the operator's key)")
    try:
        event = WahaEvent.model_validate(json.loads(raw))
        if event.event == "session.status":
            return await _session_status(request, event, StatusPayload.model_validate(event.payload))
        if event.event == "message.ack":
            return await _message_ack(request, event, AckPayload.model_validate(event.payload))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, f"not a WAHA event: {where}: {first['msg']}") from exc
    except ValueError as exc:
        raise ApiError(400, "the body is not JSON") from exc
    return {"ignored": event.event}  # an event we did not subscribe to (a global webhook's)


async def _session_status(request: Request, event: WahaEvent, payload: StatusPayload) -> dict[str, Any]:
    try:
        sender = await request.app.state.backends.dispatcher.ReportSenderState(
            dispatcher_pb2.ReportSenderStateRequest(
                # The dispatcher reads WAHA's status word (and asks WAHA for the state now).
                provider=PROVIDER,
                session=event.session,
                reason=payload.status,
            ),
            metadata=WEBHOOK_CALLER.metadata(),  # no one signed in: the webhook's own identity
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() is not grpc.StatusCode.NOT_FOUND:
            raise  # 5xx: WAHA posts it again
        # Another application's session on the same WAHA, or a device deleted meanwhile:
        # nothing of ours to change, and nothing WAHA should retry.
        log.info("session.status of %s, which no device has: ignored", event.session)
        return {"ignored": "unknown session"}
    return {"device_id": sender.id, "connection": sender.connection}


async def _message_ack(request: Request, event: WahaEvent, payload: AckPayload) -> dict[str, Any]:
    name = (payload.ackName or ACK_NAMES.get(payload.ack if payload.ack is not None else 0, "")).upper()
    status = ACK_STATUS.get(name)
    if status is None or payload.fromMe is False:  # PENDING, or a message someone sent us
        return {"received": 0}
    found = await request.app.state.backends.dispatcher.FindSenderAttempts(
        dispatcher_pb2.FindSenderAttemptsRequest(
            provider=PROVIDER, session=event.session, provider_message_ids=[payload.id]
        ),
        metadata=WEBHOOK_CALLER.metadata(),  # no one signed in: the webhook's own identity
    )
    attempt_id = found.attempt_ids.get(payload.id, "")
    if not attempt_id:  # a message sent from the phone itself, or not by the suite
        return {"received": 0}
    at = datetime.fromtimestamp(event.timestamp / 1000, UTC) if event.timestamp else datetime.now(UTC)
    report = events_pb2.DeliveryReport(
        provider_message_id=payload.id,
        attempt_id=attempt_id,
        status=status,
        at=to_timestamp(at),
        error="waha: ERROR ack (WhatsApp did not take the message)" if status == "failed" else "",
    )
    # WAHA retries a post it got no 2xx for: the same ack of the same message is published once.
    digest = hashlib.sha256(f"{payload.id}:{status}".encode()).hexdigest()[:32]
    message = events_pb2.DeliveryReports(provider=PROVIDER, reports=[report])
    await bus.publish(request.app.state.runtime.js, SUBJECT, message, msg_id=f"{PROVIDER}:{digest}")
    return {"received": 1}
