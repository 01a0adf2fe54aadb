"""WhatsApp devices of the bulk sender (senders owned by the dispatcher), in the shapes the
deployed React client reads (API_COMPAT.md, "WhatsApp bulk sender")."""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any, Literal, Self

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pregonero.dispatcher.v1 import dispatcher_pb2
from pydantic import BaseModel, Field, model_validator

from services.runtime.identity import Caller
from services.runtime.protos import from_timestamp, iso

from ..auth import caller_or_anonymous
from ..errors import ApiError

router = APIRouter(tags=["devices"])

CHANNEL = "whatsapp"
# Wire limits of the proto fields, so an oversized number is a 422 rather than an encoding
# crash; the real ranges are the dispatcher's to check.
Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
DeviceId = Annotated[int, Path(ge=1, le=2**63 - 1, description="Device id")]
CallerDep = Annotated[Caller, Depends(caller_or_anonymous)]


# A WhatsApp Web session at the operator's WAHA: the suite runs it, the user scans its QR.
SESSION_PROVIDER = "waha"


class DeviceCreate(BaseModel):
    # Required, except for a waha device (see _credentials).
    token: str | None = None
    secret: str | None = None
    device_name: str | None = None
    is_receiver: bool | None = None
    phone: str | None = None
    rate_per_minute: Int32 | None = Field(None, description="Sends per minute; 0 means no limit (default 60)")
    jitter_ms: Int32 | None = None
    provider: str | None = None
    provider_config: dict[str, Any] | None = None
    status: str | None = None
    daily_limit: Int32 | None = Field(None, description="Most messages sent in one of the device's days; 0 = no cap")

    @model_validator(mode="after")
    def _credentials(self) -> Self:
        if self.provider != SESSION_PROVIDER:
            missing = [name for name in ("token", "secret") if getattr(self, name) is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)} required (only a waha device is created without them)")
        return self


class DeviceUpdate(BaseModel):
    """Any subset of the fields. Read-only fields a client echoes back (id, secret_masked,
    timestamps) are ignored, and an empty or null secret keeps the stored one."""

    token: str | None = None
    secret: str | None = None
    device_name: str | None = None
    is_receiver: bool | None = None
    phone: str | None = None
    rate_per_minute: Int32 | None = None
    jitter_ms: Int32 | None = None
    concurrency: Int32 | None = None
    provider: str | None = None
    provider_config: dict[str, Any] | None = None
    status: str | None = None
    daily_limit: Int32 | None = None


class Device(BaseModel):
    id: int
    token: str
    secret_masked: str
    device_name: str
    status: str
    is_receiver: bool
    phone: str
    rate_per_minute: int
    jitter_ms: int
    provider: str
    created_at: str | None
    updated_at: str | None
    # What the provider last said of the device; `status` stays the user's active/inactive.
    connection: str = Field(description="connected | disconnected | qr_needed | unknown")
    connection_reason: str
    quota_left: int = Field(description="Messages the provider still allows today; -1 = not known")
    daily_limit: int = Field(description="Most messages sent in one of the device's local days; 0 = no cap")
    sent_today: int = Field(description="Messages sent in the device's local day so far")


class DeviceList(BaseModel):
    total: int
    devices: list[Device]


class DeviceReply(BaseModel):
    status: str
    message: str
    device: Device | None


def device_json(sender: dispatcher_pb2.Sender) -> dict[str, Any]:
    return {
        "id": sender.id,
        "token": sender.token,
        "secret_masked": sender.secret_masked,
        "device_name": sender.device_name,
        "status": sender.status,
        "is_receiver": sender.is_receiver,
        "phone": sender.phone,
        "rate_per_minute": sender.rate_per_minute,
        "jitter_ms": sender.jitter_ms,
        "provider": sender.provider,
        "created_at": iso(from_timestamp(sender.created_at, present=sender.HasField("created_at"))),
        "updated_at": iso(from_timestamp(sender.updated_at, present=sender.HasField("updated_at"))),
        "connection": sender.connection or "unknown",
        "connection_reason": sender.connection_reason,
        "quota_left": sender.quota_left,
        "daily_limit": sender.daily_limit,
        "sent_today": sender.sent_today,
    }


@router.get("/devices", summary="The caller's WhatsApp devices", response_model=DeviceList)
async def list_devices(request: Request, caller: CallerDep) -> dict[str, Any]:
    reply = await request.app.state.backends.dispatcher.ListSenders(
        dispatcher_pb2.ListSendersRequest(channel=CHANNEL),
    )
    return {"total": reply.total, "devices": [device_json(s) for s in reply.senders]}


@router.get("/devices/{device_id}", summary="One device", response_model=Device)
async def get_device(request: Request, caller: CallerDep, device_id: DeviceId) -> dict[str, Any]:
    sender = await request.app.state.backends.dispatcher.GetSender(dispatcher_pb2.SenderRef(id=device_id))
    return device_json(sender)


@router.post("/devices", summary="Add a device", response_model=DeviceReply)
async def create_device(request: Request, caller: CallerDep, body: DeviceCreate) -> dict[str, Any]:
    stub = request.app.state.backends.dispatcher
    sender = await stub.CreateSender(
        dispatcher_pb2.CreateSenderRequest(
            channel=CHANNEL,
            provider=body.provider or "",
            device_name=body.device_name or "",
            token=body.token or "",
            secret=body.secret or "",
            is_receiver=bool(body.is_receiver),
            phone=body.phone or "",
            rate_per_minute=body.rate_per_minute or 0,
            jitter_ms=body.jitter_ms or 0,
            provider_config_json=json.dumps(body.provider_config or {}),
            status=body.status or "",
            daily_limit=body.daily_limit or 0,
        ),
    )
    if body.rate_per_minute == 0:
        # CreateSender reads 0 as "default" (proto3 has no presence); an explicit "no limit"
        # is applied by a patch, which can say it.
        sender = await stub.UpdateSender(
            dispatcher_pb2.UpdateSenderRequest(id=sender.id, patch_json=json.dumps({"rate_per_minute": 0})),
        )
    return {"status": "success", "message": "Device created successfully", "device": device_json(sender)}


@router.put("/devices/{device_id}", summary="Change some fields of a device", response_model=DeviceReply)
async def update_device(request: Request, caller: CallerDep, device_id: DeviceId, body: DeviceUpdate) -> dict[str, Any]:
    patch = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None}
    if patch.get("secret") == "":
        del patch["secret"]  # edit forms send the secret field empty when it is not changed
    sender = await request.app.state.backends.dispatcher.UpdateSender(
        dispatcher_pb2.UpdateSenderRequest(id=device_id, patch_json=json.dumps(patch)),
    )
    return {"status": "success", "message": "Device updated successfully", "device": device_json(sender)}


@router.delete("/devices/{device_id}", summary="Remove a device", response_model=DeviceReply)
async def delete_device(request: Request, caller: CallerDep, device_id: DeviceId) -> dict[str, Any]:
    await request.app.state.backends.dispatcher.DeleteSender(dispatcher_pb2.SenderRef(id=device_id))
    return {"status": "success", "message": "Device deleted successfully", "device": None}


# --- WhatsApp Web sessions (provider waha) ---


class DeviceQr(BaseModel):
    qr_code: str = Field(description="The QR to scan, a base64 PNG")
    status: str = Field(description="qr_needed")


@router.get(
    "/devices/{device_id}/qr",
    summary="The QR that links a WhatsApp Web (waha) device to its phone",
    description="A PNG by default; `?format=json` or `Accept: application/json` gives "
    '`{"qr_code": <base64 PNG>, "status"}`. 409 when the device shows no QR to scan.',
    responses={200: {"content": {"image/png": {}, "application/json": {"schema": DeviceQr.model_json_schema()}}}},
    response_model=None,
)
async def device_qr(
    request: Request,
    caller: CallerDep,
    device_id: DeviceId,
    format: Annotated[Literal["png", "json"] | None, Query(description="png (default) or json")] = None,
) -> Response | dict[str, Any]:
    qr = await request.app.state.backends.dispatcher.GetSenderQr(dispatcher_pb2.SenderRef(id=device_id))
    if not qr.png:
        if qr.connection == "connected":
            raise ApiError(409, f"device {device_id} is linked already: there is no QR to scan")
        raise ApiError(
            409,
            f"device {device_id} shows no QR now ({qr.connection or 'unknown'}: its session is starting, stopped "
            "or failed): restart it, or ask again in a few seconds",
        )
    accept = request.headers.get("accept", "")
    if format == "json" or (format is None and "application/json" in accept and "image/png" not in accept):
        return {"qr_code": base64.b64encode(qr.png).decode(), "status": qr.connection}
    # A QR is a one-time pairing secret that WhatsApp replaces within a minute: never cached.
    return Response(qr.png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.post(
    "/devices/{device_id}/logout",
    summary="Unlink a WhatsApp Web (waha) device from its phone; it asks for a new QR",
    response_model=DeviceReply,
)
async def logout_device(request: Request, caller: CallerDep, device_id: DeviceId) -> dict[str, Any]:
    sender = await request.app.state.backends.dispatcher.LogoutSender(dispatcher_pb2.SenderRef(id=device_id))
    return {
        "status": "success",
        "message": "Device logged out: scan the new QR to link it",
        "device": device_json(sender),
    }


@router.post(
    "/devices/{device_id}/restart",
    summary="Restart a WhatsApp Web (waha) device's session",
    response_model=DeviceReply,
)
async def restart_device(request: Request, caller: CallerDep, device_id: DeviceId) -> dict[str, Any]:
    sender = await request.app.state.backends.dispatcher.RestartSender(dispatcher_pb2.SenderRef(id=device_id))
    return {"status": "success", "message": "Device session restarting", "device": device_json(sender)}
