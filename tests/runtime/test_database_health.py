"""The backends tell the database's state through their health service, and the gateway,
which holds no database credentials, reads it there: connected while one backend reaches
it. In-process gRPC servers with fake pools."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.gateway.clients import Backends
from services.gateway.config import GatewaySettings
from services.runtime.lifecycle import add_health
from services.runtime.settings import BaseServiceSettings
from tests import signing

pytestmark = pytest.mark.timeout(10)


class Pool:
    def __init__(self, *, up: bool) -> None:
        self.up = up

    async def fetchval(self, query: str) -> Any:
        if not self.up:
            raise OSError("connection refused")
        return 1


@pytest.fixture
async def backends() -> AsyncIterator[tuple[Backends, dict[str, Pool]]]:
    settings = BaseServiceSettings(database_url="postgresql://unused/x")
    pools = {name: Pool(up=True) for name in ("accounts", "campaigns", "dispatcher")}
    servers: list[grpc.aio.Server] = []
    addrs: dict[str, str] = {}
    for name, pool in pools.items():
        server = signing.server(name)
        servicer = add_health(server, settings, [], pool)  # type: ignore[arg-type]
        addrs[name] = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        servers.append(server)
    gateway = Backends(
        GatewaySettings(
            accounts_addr=addrs["accounts"], campaigns_addr=addrs["campaigns"], dispatcher_addr=addrs["dispatcher"]
        ),
        signing.RINGS["gateway"],
    )
    try:
        yield gateway, pools
    finally:
        await gateway.close()
        for server in servers:
            await server.stop(None)


async def test_the_database_is_connected_while_one_backend_reaches_it(
    backends: tuple[Backends, dict[str, Pool]],
) -> None:
    gateway, pools = backends
    assert (await gateway.database()) is not None
    pools["accounts"].up = pools["campaigns"].up = False
    assert (await gateway.database()) is not None
    pools["dispatcher"].up = False
    assert await gateway.database() is None
    # The servers stay SERVING: the probes never hear of the database.
    assert set((await gateway.health()).values()) == {"SERVING"}
