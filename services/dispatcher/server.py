"""gRPC servicer: proto in, domain call, proto out."""

from __future__ import annotations

import json

import asyncpg
import grpc
from pregonero.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc

from services.runtime.identity import current_caller
from services.runtime.protos import to_timestamp

from .crypto import masked
from .senders import Senders, provider_config_of


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
    )


class DispatcherServicer(dispatcher_pb2_grpc.DispatcherServiceServicer):
    def __init__(self, senders: Senders) -> None:
        self.senders = senders

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
