"""gRPC clients of the backend services, with the caller and request id on every call."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pregonero.accounts.v1 import accounts_pb2_grpc
from pregonero.campaigns.v1 import address_book_pb2_grpc, campaigns_pb2_grpc, messages_pb2_grpc
from pregonero.dispatcher.v1 import dispatcher_pb2_grpc

from services.runtime.database_health import DATABASE
from services.runtime.rpc import channel
from services.runtime.service_auth import Keyring

from .config import GatewaySettings


class Backends:
    def __init__(self, settings: GatewaySettings, keyring: Keyring) -> None:
        self.addrs = {
            "accounts": settings.accounts_addr,
            "campaigns": settings.campaigns_addr,
            "dispatcher": settings.dispatcher_addr,
        }
        self.channels = {name: channel(addr, audience=name, keyring=keyring) for name, addr in self.addrs.items()}
        self.accounts = accounts_pb2_grpc.AccountsServiceStub(self.channels["accounts"])
        self.campaigns = campaigns_pb2_grpc.CampaignsServiceStub(self.channels["campaigns"])
        self.messages = messages_pb2_grpc.ScheduledMessagesServiceStub(self.channels["campaigns"])
        self.address_book = address_book_pb2_grpc.AddressBookServiceStub(self.channels["campaigns"])
        self.dispatcher = dispatcher_pb2_grpc.DispatcherServiceStub(self.channels["dispatcher"])

    async def health(self, deadline_s: float = 1.5) -> dict[str, str]:
        async def one(name: str) -> tuple[str, str]:
            stub = health_pb2_grpc.HealthStub(self.channels[name])
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=deadline_s)
            except grpc.aio.AioRpcError:
                return name, "UNAVAILABLE"
            return name, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

        return dict(await asyncio.gather(*(one(n) for n in self.channels)))

    async def database(self, deadline_s: float = 1.5) -> float | None:
        """The database as the backends reach it (runtime/database_health.py): the quickest
        check's round trip in ms when one of them does, None when none does or none answers.
        The gateway keeps no data, and holds no database credentials to ask it itself."""

        async def one(name: str) -> float | None:
            stub = health_pb2_grpc.HealthStub(self.channels[name])
            started = time.perf_counter()
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=DATABASE), timeout=deadline_s)
            except grpc.aio.AioRpcError:
                return None
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                return None
            return (time.perf_counter() - started) * 1000

        answers = [ms for ms in await asyncio.gather(*(one(n) for n in self.channels)) if ms is not None]
        return min(answers, default=None)

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close()
