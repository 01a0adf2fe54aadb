"""gRPC servicer of scheduled messages: proto in, domain call, proto out."""

from __future__ import annotations

import grpc
from pregonero.campaigns.v1 import messages_pb2, messages_pb2_grpc

from services.runtime.identity import current_caller
from services.runtime.protos import to_timestamp

from .scheduled_messages import MessageView, ScheduledMessages


def message_pb(view: MessageView) -> messages_pb2.ScheduledMessage:
    r = view.row
    sent_at = r["finished_at"] if r["state"] == "sent" else None
    return messages_pb2.ScheduledMessage(
        id=str(r["message_id"]),
        account_id=r["account_id"],
        content=r["content"],
        scheduled_for=to_timestamp(r["scheduled_for"]),
        status=r["state"],
        groups=[
            messages_pb2.MessageGroup(id=str(g["group_id"]), name=g["name"], contact_count=g["contact_count"])
            for g in view.groups
        ],
        created_at=to_timestamp(r["created_at"]),
        updated_at=to_timestamp(r["updated_at"]),
        sent_at=to_timestamp(sent_at),
        recipient_count=view.recipients,
        sent_count=r["sent_jobs"],
        delivered_count=view.delivered,
        read_count=view.read,
        failed_count=r["failed_jobs"] + view.delivery_failed,
        created_by=r["created_by"],
        late=r["late"],
        error=r["error"] or r["batch_error"],
        started_at=to_timestamp(r["started_at"]),
    )


class ScheduledMessagesServicer(messages_pb2_grpc.ScheduledMessagesServiceServicer):
    def __init__(self, messages: ScheduledMessages) -> None:
        self.messages = messages

    async def ListMessages(
        self, request: messages_pb2.ListMessagesRequest, context: grpc.aio.ServicerContext
    ) -> messages_pb2.ListMessagesResponse:
        views, total = await self.messages.listing(
            current_caller(), state=request.status, limit=request.limit or 100, offset=request.offset
        )
        return messages_pb2.ListMessagesResponse(messages=[message_pb(v) for v in views], total=total)

    async def GetMessage(
        self, request: messages_pb2.MessageRef, context: grpc.aio.ServicerContext
    ) -> messages_pb2.ScheduledMessage:
        return message_pb(await self.messages.get(current_caller(), request.id))

    async def CreateMessage(
        self, request: messages_pb2.MessageInput, context: grpc.aio.ServicerContext
    ) -> messages_pb2.ScheduledMessage:
        view = await self.messages.create(
            current_caller(),
            content=request.content,
            scheduled_for=request.scheduled_for,
            group_ids=list(request.group_ids),
            timezone=request.timezone,
        )
        return message_pb(view)

    async def UpdateMessage(
        self, request: messages_pb2.UpdateMessageRequest, context: grpc.aio.ServicerContext
    ) -> messages_pb2.ScheduledMessage:
        view = await self.messages.update(
            current_caller(),
            request.id,
            content=request.content if request.HasField("content") else None,
            scheduled_for=request.scheduled_for if request.HasField("scheduled_for") else None,
            group_ids=list(request.group_ids) if request.set_group_ids else None,
            timezone=request.timezone,
            unschedule=request.unschedule,
        )
        return message_pb(view)

    async def DeleteMessage(
        self, request: messages_pb2.MessageRef, context: grpc.aio.ServicerContext
    ) -> messages_pb2.DeleteMessageResponse:
        await self.messages.delete(current_caller(), request.id)
        return messages_pb2.DeleteMessageResponse()

    async def ScheduleMessage(
        self, request: messages_pb2.ScheduleMessageRequest, context: grpc.aio.ServicerContext
    ) -> messages_pb2.ScheduledMessage:
        view = await self.messages.schedule(
            current_caller(), request.id, scheduled_for=request.scheduled_for, timezone=request.timezone
        )
        return message_pb(view)

    async def PauseMessage(
        self, request: messages_pb2.MessageRef, context: grpc.aio.ServicerContext
    ) -> messages_pb2.ScheduledMessage:
        return message_pb(await self.messages.pause(current_caller(), request.id))

    async def ResumeMessage(
        self, request: messages_pb2.MessageRef, context: grpc.aio.ServicerContext
    ) -> messages_pb2.ScheduledMessage:
        return message_pb(await self.messages.resume(current_caller(), request.id))

    async def CancelMessage(
        self, request: messages_pb2.MessageRef, context: grpc.aio.ServicerContext
    ) -> messages_pb2.ScheduledMessage:
        return message_pb(await self.messages.cancel(current_caller(), request.id))

    async def DuplicateMessage(
        self, request: messages_pb2.MessageRef, context: grpc.aio.ServicerContext
    ) -> messages_pb2.ScheduledMessage:
        return message_pb(await self.messages.duplicate(current_caller(), request.id))

    async def PreviewMessage(
        self, request: messages_pb2.MessageRef, context: grpc.aio.ServicerContext
    ) -> messages_pb2.MessagePreview:
        preview = await self.messages.preview(current_caller(), request.id)
        return messages_pb2.MessagePreview(
            recipient_count=preview.recipients,
            estimated_cost=str(preview.unit_price * preview.recipients),
            unit_price=str(preview.unit_price),
            samples=[messages_pb2.PreviewSample(name=n, phone=p, text=t) for n, p, t in preview.samples],
        )

    async def GetMessageStats(
        self, request: messages_pb2.MessageRef, context: grpc.aio.ServicerContext
    ) -> messages_pb2.MessageStats:
        s = await self.messages.stats(current_caller(), request.id)
        return messages_pb2.MessageStats(
            recipient_count=s.recipients,
            sent=s.sent,
            delivered=s.delivered,
            read=s.read,
            failed=s.failed,
            pending=s.pending,
            delivery_rate=s.delivery_rate,
        )

    async def GetMessagesDashboard(
        self, request: messages_pb2.MessagesDashboardRequest, context: grpc.aio.ServicerContext
    ) -> messages_pb2.MessagesDashboard:
        figures, upcoming = await self.messages.dashboard(current_caller())
        by_state = figures["by_state"]
        return messages_pb2.MessagesDashboard(
            by_status=by_state,
            total_messages=sum(by_state.values()),
            next_24h=[message_pb(v) for v in upcoming],
            messages_sent_today=figures["messages_today"],
            recipients_sent_today=figures["sent_today"],
            delivery_rate=figures["delivery_rate"],
            active_groups=figures["active_groups"],
            active_contacts=figures["active_contacts"],
        )
