"""gRPC servicer: proto in, domain call, proto out."""

from __future__ import annotations

import json

import asyncpg
import grpc
from pregonero.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc

from services.runtime.errors import Conflict, InvalidArgument, Unavailable
from services.runtime.identity import current_caller
from services.runtime.protos import to_timestamp

from . import wablas_messages
from .connections import Connections
from .crypto import masked
from .providers import wablas, waha
from .providers.base import DeviceState
from .senders import Senders, provider_config_of
from .waha_sessions import WahaSessions


def sender_pb(row: asyncpg.Record) -> dispatcher_pb2.Sender:
    return dispatcher_pb2.Sender(
        id=row["id"],
        account_id=row["account_id"],
        channel=row["channel"],
        provider=row["provider"],
        device_name=row["device_name"],
        token=row["token"],
        secret_masked=masked(row["secret_hint"]),
        status=row["status"],
        is_receiver=row["is_receiver"],
        phone=row["phone"],
        rate_per_minute=row["rate_per_minute"],
        jitter_ms=row["jitter_ms"],
        provider_config_json=json.dumps(provider_config_of(row)),
        created_at=to_timestamp(row["created_at"]),
        updated_at=to_timestamp(row["updated_at"]),
        connection=row["connection"],
        connection_reason=row["connection_reason"],
        quota_left=row["quota_left"],
        daily_limit=row["daily_limit"],
        sent_today=row["sent_today"],
        connection_checked_at=(
            to_timestamp(row["connection_checked_at"]) if row["connection_checked_at"] is not None else None
        ),
        session=row["session"],
    )


# The RPCs another service than the gateway may call (runtime/service_auth.py): campaigns
# reads an account's devices to route a scheduled message or a voice batch.
CALLERS = {"/pregonero.dispatcher.v1.DispatcherService/ListSenders": frozenset({"gateway", "campaigns"})}


class DispatcherServicer(dispatcher_pb2_grpc.DispatcherServiceServicer):
    def __init__(
        self,
        senders: Senders,
        connections: Connections | None = None,
        *,
        sessions: WahaSessions | None = None,
        messages: wablas_messages.KeptMessages | None = None,
    ) -> None:
        self.senders = senders
        self.connections = connections
        self.sessions = sessions  # None: this deployment runs no WhatsApp Web sessions (WAHA)
        self.messages = messages  # provider message ids kept with their attempts (Wablas's)

    async def CreateSender(
        self, request: dispatcher_pb2.CreateSenderRequest, context: grpc.aio.ServicerContext
    ) -> dispatcher_pb2.Sender:
        row = await self.senders.create(
            current_caller(),
            account_id=request.account_id,
            channel=request.channel,
            provider=request.provider,
            device_name=request.device_name,
            token=request.token,
            secret=request.secret,
            is_receiver=request.is_receiver,
            phone=request.phone,
            # proto3 cannot tell an unset rate from 0, so 0 here takes the default; "no limit"
            # (0) is set with UpdateSender, whose JSON patch says what it means.
            rate_per_minute=request.rate_per_minute or None,
            jitter_ms=request.jitter_ms,
            provider_config_json=request.provider_config_json,
            status=request.status,
            daily_limit=request.daily_limit,
        )
        return sender_pb(row)

    async def GetSender(
        self, request: dispatcher_pb2.SenderRef, context: grpc.aio.ServicerContext
    ) -> dispatcher_pb2.Sender:
        return sender_pb(await self.senders.get(current_caller(), request.id))

    async def ListSenders(
        self, request: dispatcher_pb2.ListSendersRequest, context: grpc.aio.ServicerContext
    ) -> dispatcher_pb2.ListSendersResponse:
        rows = await self.senders.list_senders(
            current_caller(), channel=request.channel, active_only=request.active_only
        )
        return dispatcher_pb2.ListSendersResponse(senders=[sender_pb(r) for r in rows], total=len(rows))

    async def UpdateSender(
        self, request: dispatcher_pb2.UpdateSenderRequest, context: grpc.aio.ServicerContext
    ) -> dispatcher_pb2.Sender:
        return sender_pb(await self.senders.update(current_caller(), request.id, request.patch_json))

    async def DeleteSender(
        self, request: dispatcher_pb2.SenderRef, context: grpc.aio.ServicerContext
    ) -> dispatcher_pb2.DeleteSenderResponse:
        await self.senders.delete(current_caller(), request.id)
        return dispatcher_pb2.DeleteSenderResponse(deleted=True)

    async def FindSendersByNumber(
        self, request: dispatcher_pb2.FindSendersByNumberRequest, context: grpc.aio.ServicerContext
    ) -> dispatcher_pb2.ListSendersResponse:
        rows = await self.senders.find_by_number(
            current_caller(), provider=request.provider, phone_number_id=request.phone_number_id
        )
        return dispatcher_pb2.ListSendersResponse(senders=[sender_pb(r) for r in rows], total=len(rows))

    async def ReportSenderState(
        self, request: dispatcher_pb2.ReportSenderStateRequest, context: grpc.aio.ServicerContext
    ) -> dispatcher_pb2.Sender:
        if self.connections is None:
            raise Unavailable("device states are not kept by this server")
        # A WAHA webhook is a nudge: the session's state now (with its QR) is what is recorded,
        # so a late or repeated post cannot set back a newer state (waha_sessions.confirm).
        connection = request.connection
        if not connection and request.provider == waha.NAME:
            connection = waha.connection_of(request.reason)  # the webhook passes WAHA's own word
        state = DeviceState(connection, request.reason, qr_code=request.qr_code)  # type: ignore[arg-type]
        if self.sessions is not None:
            state = await self.sessions.confirm(current_caller(), request.provider, request.session, state)
        row = await self.connections.report(
            current_caller(),
            provider=request.provider,
            session=request.session,
            connection=state.connection,
            reason=state.reason,
            qr_code=state.qr_code,
        )
        return sender_pb(row)

    async def GetSenderQr(
        self, request: dispatcher_pb2.SenderRef, context: grpc.aio.ServicerContext
    ) -> dispatcher_pb2.SenderQr:
        connection, png = await (await self._sessions(request.id)).qr(current_caller(), request.id)
        return dispatcher_pb2.SenderQr(id=request.id, connection=connection, png=png)

    async def LogoutSender(
        self, request: dispatcher_pb2.SenderRef, context: grpc.aio.ServicerContext
    ) -> dispatcher_pb2.Sender:
        return sender_pb(await (await self._sessions(request.id)).logout(current_caller(), request.id))

    async def RestartSender(
        self, request: dispatcher_pb2.SenderRef, context: grpc.aio.ServicerContext
    ) -> dispatcher_pb2.Sender:
        return sender_pb(await (await self._sessions(request.id)).restart(current_caller(), request.id))

    async def _sessions(self, sender_id: int) -> WahaSessions:
        if self.sessions is None:
            await self.senders.get(current_caller(), sender_id)  # another account's device: 404 first
            raise Conflict("this deployment runs no WhatsApp Web sessions (WAHA_BASE_URL is not set)")
        return self.sessions

    async def FindSenderAttempts(
        self, request: dispatcher_pb2.FindSenderAttemptsRequest, context: grpc.aio.ServicerContext
    ) -> dispatcher_pb2.FindSenderAttemptsResponse:
        # One branch per provider whose reports name only its message id (by its `session`).
        if request.provider == waha.NAME:
            if self.sessions is None:
                raise Conflict("this deployment runs no WhatsApp Web sessions (WAHA_BASE_URL is not set)")
            found = await self.sessions.attempts(
                current_caller(),
                provider=request.provider,
                session=request.session,
                message_ids=list(request.provider_message_ids),
            )
        elif request.provider == wablas.NAME and self.messages is not None:
            found = await wablas_messages.attempts(
                self.messages, current_caller(), session=request.session, message_ids=list(request.provider_message_ids)
            )
        else:
            raise InvalidArgument(f"message ids of {request.provider or 'no provider'} devices are not kept")
        return dispatcher_pb2.FindSenderAttemptsResponse(attempt_ids=found)
