"""Scheduled WhatsApp messages (`/api/messages`, the scheduler guide's shapes). Campaigns
decides what a message may do and who may see it; this module only maps."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pregonero.campaigns.v1 import messages_pb2, messages_pb2_grpc
from pydantic import BaseModel, ConfigDict, Field

from services.runtime.identity import Caller
from services.runtime.protos import from_timestamp, iso

from ..auth import require_caller
from ..user_limits import per_user

router = APIRouter(tags=["scheduled messages"])

CallerDep = Annotated[Caller, Depends(require_caller)]
MessageId = Annotated[str, Path(min_length=1, max_length=40)]
GroupId = Annotated[str, Field(min_length=1, max_length=40)] | int


class MessageCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Length, HTML and variables are checked by campaigns, which says what is wrong.
    content: str
    scheduled_for: str | None = Field(None, description="ISO 8601; without an offset, in `timezone`")
    group_ids: list[GroupId] = Field(default_factory=list, max_length=1000)
    timezone: str = Field("", max_length=64, description="IANA zone of a scheduled_for without an offset")


class MessageUpdate(BaseModel):
    """Only the fields sent change; `status: "draft"` takes a scheduled message back to draft
    (the other statuses are reached through /schedule, /pause, /resume and /cancel)."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["draft"] | None = None
    content: str | None = None
    scheduled_for: str | None = None
    group_ids: list[GroupId] | None = Field(None, max_length=1000)
    timezone: str = Field("", max_length=64)


class ScheduleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scheduled_for: str | None = None
    timezone: str = Field("", max_length=64)


def stub(request: Request) -> messages_pb2_grpc.ScheduledMessagesServiceStub:
    stub: messages_pb2_grpc.ScheduledMessagesServiceStub = request.app.state.backends.messages
    return stub


def message_json(m: messages_pb2.ScheduledMessage) -> dict[str, Any]:
    return {
        "id": m.id,
        "content": m.content,
        "scheduled_for": iso(from_timestamp(m.scheduled_for)),
        "status": m.status,
        "groups": [{"id": g.id, "name": g.name, "contact_count": g.contact_count} for g in m.groups],
        "created_at": iso(from_timestamp(m.created_at)),
        "updated_at": iso(from_timestamp(m.updated_at)),
        "sent_at": iso(from_timestamp(m.sent_at)),
        "recipient_count": m.recipient_count,
        "sent_count": m.sent_count,
        "delivered_count": m.delivered_count,
        "read_count": m.read_count,
        "failed_count": m.failed_count,
        "created_by": m.created_by,
        "late": m.late,
        "started_at": iso(from_timestamp(m.started_at)),
        "error": m.error or None,
    }


@router.get("/api/messages", summary="Messages, newest first")
async def list_messages(
    request: Request,
    response: Response,
    caller: CallerDep,
    status: Annotated[str, Query(max_length=20)] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> list[dict[str, Any]]:
    reply = await stub(request).ListMessages(
        messages_pb2.ListMessagesRequest(status=status, limit=limit, offset=offset)
    )
    response.headers["X-Total-Count"] = str(reply.total)
    return [message_json(m) for m in reply.messages]


@router.post("/api/messages", status_code=201, summary="Write a message (a draft until scheduled)")
async def create_message(request: Request, caller: CallerDep, body: MessageCreate) -> dict[str, Any]:
    created = await stub(request).CreateMessage(
        messages_pb2.MessageInput(
            content=body.content,
            scheduled_for=body.scheduled_for or "",
            group_ids=[str(g) for g in body.group_ids],
            timezone=body.timezone,
        ),
    )
    return message_json(created)


# Before /api/messages/{id}: "dashboard" is no message id.
@router.get("/api/messages/dashboard", summary="Messages per status, the next 24 hours, today's sends")
async def messages_dashboard(request: Request, caller: CallerDep) -> dict[str, Any]:
    d = await stub(request).GetMessagesDashboard(messages_pb2.MessagesDashboardRequest())
    return {
        "by_status": dict(d.by_status),
        "total_messages": d.total_messages,
        "next_24h": [message_json(m) for m in d.next_24h],
        "messages_sent_today": d.messages_sent_today,
        "recipients_sent_today": d.recipients_sent_today,
        "delivery_rate": d.delivery_rate,
        "active_groups": d.active_groups,
        "active_contacts": d.active_contacts,
    }


@router.get("/api/messages/{message_id}", summary="One message")
async def get_message(request: Request, caller: CallerDep, message_id: MessageId) -> dict[str, Any]:
    return message_json(await stub(request).GetMessage(messages_pb2.MessageRef(id=message_id)))


@router.put("/api/messages/{message_id}", summary="Edit a draft or scheduled message")
async def update_message(
    request: Request, caller: CallerDep, message_id: MessageId, body: MessageUpdate
) -> dict[str, Any]:
    sent = body.model_fields_set
    update = messages_pb2.UpdateMessageRequest(id=message_id, timezone=body.timezone, unschedule=body.status == "draft")
    if "content" in sent and body.content is not None:
        update.content = body.content
    if "scheduled_for" in sent:
        update.scheduled_for = body.scheduled_for or ""  # null clears a draft's time
    if "group_ids" in sent:
        update.set_group_ids = True
        update.group_ids.extend(str(g) for g in body.group_ids or [])
    return message_json(await stub(request).UpdateMessage(update))


@router.delete("/api/messages/{message_id}", status_code=204, summary="Delete a message that is not sending")
async def delete_message(request: Request, caller: CallerDep, message_id: MessageId) -> Response:
    await stub(request).DeleteMessage(messages_pb2.MessageRef(id=message_id))
    return Response(status_code=204)


@router.post(
    "/api/messages/{message_id}/schedule",
    summary="Send it at its time (10 a minute per user)",
    dependencies=[Depends(per_user("messages.send", 10))],
)
async def schedule_message(
    request: Request, caller: CallerDep, message_id: MessageId, body: ScheduleBody | None = None
) -> dict[str, Any]:
    body = body or ScheduleBody()
    scheduled = await stub(request).ScheduleMessage(
        messages_pb2.ScheduleMessageRequest(
            id=message_id, scheduled_for=body.scheduled_for or "", timezone=body.timezone
        ),
    )
    return message_json(scheduled)


@router.post("/api/messages/{message_id}/pause", summary="Stop sending; what was not sent waits")
async def pause_message(request: Request, caller: CallerDep, message_id: MessageId) -> dict[str, Any]:
    return message_json(await stub(request).PauseMessage(messages_pb2.MessageRef(id=message_id)))


@router.post(
    "/api/messages/{message_id}/resume",
    summary="Go on sending a paused message (10 a minute per user, with scheduling)",
    dependencies=[Depends(per_user("messages.send", 10))],
)
async def resume_message(request: Request, caller: CallerDep, message_id: MessageId) -> dict[str, Any]:
    return message_json(await stub(request).ResumeMessage(messages_pb2.MessageRef(id=message_id)))


@router.post("/api/messages/{message_id}/cancel", summary="Stop for good: nothing more is sent")
async def cancel_message(request: Request, caller: CallerDep, message_id: MessageId) -> dict[str, Any]:
    return message_json(await stub(request).CancelMessage(messages_pb2.MessageRef(id=message_id)))


@router.post("/api/messages/{message_id}/duplicate", status_code=201, summary="A new draft like this message")
async def duplicate_message(request: Request, caller: CallerDep, message_id: MessageId) -> dict[str, Any]:
    return message_json(await stub(request).DuplicateMessage(messages_pb2.MessageRef(id=message_id)))


@router.get("/api/messages/{message_id}/preview", summary="Recipients, cost and the first five texts")
async def preview_message(request: Request, caller: CallerDep, message_id: MessageId) -> dict[str, Any]:
    p = await stub(request).PreviewMessage(messages_pb2.MessageRef(id=message_id))
    return {
        "recipient_count": p.recipient_count,
        "estimated_cost": float(p.estimated_cost or 0),
        "unit_price": float(p.unit_price or 0),
        "samples": [{"name": s.name, "phone": s.phone, "text": s.text} for s in p.samples],
    }


@router.get("/api/messages/{message_id}/stats", summary="Sent, delivered, read, failed and pending")
async def message_stats(request: Request, caller: CallerDep, message_id: MessageId) -> dict[str, Any]:
    s = await stub(request).GetMessageStats(messages_pb2.MessageRef(id=message_id))
    return {
        "recipient_count": s.recipient_count,
        "sent": s.sent,
        "delivered": s.delivered,
        "read": s.read,
        "failed": s.failed,
        "pending": s.pending,
        "delivery_rate": s.delivery_rate,
    }
