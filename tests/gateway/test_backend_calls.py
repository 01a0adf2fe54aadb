"""A route's backend calls act for the request's caller and carry its request id and a
deadline, though the route passes none of them: authentication makes the caller the one the
request acts for (auth.acting_for), and the channel adds the rest (runtime/rpc.py). Here the
whole gateway app in process, over a real signed channel to a backend that verifies the token."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator
from typing import Annotated, Any

import grpc
import httpx
import pytest
from fastapi import Depends, FastAPI
from pregonero.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc

from services.gateway.app import create_app
from services.gateway.auth import require_caller
from services.gateway.config import GatewaySettings
from services.runtime import identity
from services.runtime.identity import Caller
from services.runtime.logs import current_request_id
from tests import signing

pytestmark = pytest.mark.timeout(10)


class EchoDispatcher(dispatcher_pb2_grpc.DispatcherServiceServicer):
    """GetSender answers with what the call carried: the caller it acts for, its request id
    and how long it was given."""

    async def GetSender(  # noqa: N802 - gRPC's name
        self, request: dispatcher_pb2.SenderRef, context: grpc.aio.ServicerContext
    ) -> dispatcher_pb2.Sender:
        caller = identity.current_caller()
        left = context.time_remaining() or 0.0
        return dispatcher_pb2.Sender(
            id=request.id,
            device_name=f"{caller.role}|{caller.account_id}|{caller.user_id}",
            token=current_request_id(),
            rate_per_minute=round(left),
        )


class Backends:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.dispatcher = dispatcher_pb2_grpc.DispatcherServiceStub(channel)


@pytest.fixture
async def gateway() -> AsyncIterator[httpx.AsyncClient]:
    server = signing.server("dispatcher")
    dispatcher_pb2_grpc.add_DispatcherServiceServicer_to_server(EchoDispatcher(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = signing.channel(f"127.0.0.1:{port}", "dispatcher")
    app = create_app(GatewaySettings(pregonero_static_tokens="ana=account:acme,root=admin"))
    # What the lifespan would open (ASGITransport runs none): the one backend these routes call.
    app.state.backends = Backends(channel)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            yield client
    finally:
        await channel.close()
        await server.stop(0)


@pytest.mark.parametrize(("token", "caller"), [("ana", "member|acme|operator"), ("root", "admin|default|operator")])
async def test_a_routes_backend_call_carries_its_caller_request_id_and_deadline(
    gateway: httpx.AsyncClient, token: str, caller: str
) -> None:
    from services.runtime.rpc import DEFAULT_DEADLINE_S

    r = await gateway.get("/devices/7", headers={"Authorization": f"Bearer {token}", "X-Request-Id": f"rid-{token}"})
    assert r.status_code == 200, r.text
    device = r.json()
    assert device["id"] == 7 and device["device_name"] == caller
    assert device["token"] == f"rid-{token}" == r.headers["x-request-id"]
    assert 0 < device["rate_per_minute"] <= DEFAULT_DEADLINE_S
    # The caller stays the request's: nothing of it is left for the next one.
    assert identity.caller_var.get() is None


async def test_requests_do_not_share_their_caller(gateway: httpx.AsyncClient) -> None:
    first = await gateway.get("/devices/1", headers={"Authorization": "Bearer ana"})
    anonymous = await gateway.get("/devices/2")  # no anonymous account configured: refused
    again = await gateway.get("/devices/3", headers={"Authorization": "Bearer root"})
    assert first.json()["device_name"].startswith("member|acme")
    assert anonymous.status_code == 401
    assert again.json()["device_name"].startswith("admin|default")
    assert first.headers["x-request-id"] != again.headers["x-request-id"] == again.json()["token"]


# Why the dependencies that authenticate are async: FastAPI awaits an async dependency in the
# request's task, so what it sets in a contextvar holds in the route's body; it runs a sync one
# in a worker thread, in a copy of the context, and what that sets is lost.
seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="")


async def set_in_task() -> None:
    seen.set("async")


def set_in_thread() -> None:
    seen.set("sync")


async def test_a_contextvar_set_by_an_async_dependency_holds_in_the_route_and_a_sync_ones_does_not() -> None:
    app = FastAPI()

    @app.get("/async", dependencies=[Depends(set_in_task)])
    async def by_async() -> str:
        return seen.get()

    @app.get("/sync", dependencies=[Depends(set_in_thread)])
    async def by_sync() -> str:
        return seen.get()

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        # Each in a task of its own, as a server runs requests (ASGITransport runs the app in
        # the caller's task, where one request's contextvars would stay for the next).
        assert (await asyncio.create_task(client.get("/async"))).json() == "async"
        assert (await asyncio.create_task(client.get("/sync"))).json() == ""


async def test_authenticating_makes_the_caller_the_one_the_route_acts_for() -> None:
    from services.gateway.auth import Authenticator

    app = FastAPI()
    app.state.auth = Authenticator(GatewaySettings(pregonero_static_tokens="ana=account:acme"))

    @app.get("/who")
    async def who(caller: Annotated[Caller, Depends(require_caller)]) -> dict[str, Any]:
        acting = identity.caller_var.get()
        return {"same": acting == caller, "account": acting.account_id if acting else None}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        r = await asyncio.create_task(client.get("/who", headers={"Authorization": "Bearer ana"}))
    assert r.json() == {"same": True, "account": "acme"}
