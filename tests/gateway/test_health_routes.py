"""Health answers 503 with the error body's fields beside its findings when a part is down
(the healthy answers are checked end to end in tests/e2e/test_health.py), while the probes'
/ready and /live stay 200: a backend down is not a gateway down."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import pytest
from fastapi import FastAPI

from services.gateway import errors
from services.gateway.auth import Authenticator
from services.gateway.config import GatewaySettings
from services.gateway.routes import health, system

pytestmark = pytest.mark.timeout(10)


class Backends:
    async def health(self, deadline_s: float = 1.5) -> dict[str, str]:
        return {"accounts": "SERVING", "campaigns": "UNAVAILABLE", "dispatcher": "SERVING"}

    async def database(self, deadline_s: float = 1.5) -> float | None:
        return None  # no backend reaches it

    @property
    def dispatcher(self) -> Any:
        async def down(*args: Any, **kwargs: Any) -> Any:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")

        return SimpleNamespace(ListSenders=down)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    app.state.auth = Authenticator(
        GatewaySettings(database_url="postgresql://x/y", pregonero_static_tokens="ana=account:acme")
    )
    # No pool: the gateway has none (the database is the backends' to report).
    app.state.runtime = SimpleNamespace(nc=None, js=None)
    app.state.backends = Backends()
    errors.install(app)
    app.include_router(health.router)
    app.include_router(system.router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


async def test_every_failed_part_is_named_in_a_503(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/health")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unhealthy" and body["code"] == "unavailable"
    for part in ("database unreachable", "campaigns is UNAVAILABLE", "NATS is not connected"):
        assert part in body["message"] and part in body["detail"]
    assert body["database"]["status"] == "disconnected" and body["services"]["campaigns"] == "UNAVAILABLE"


@pytest.mark.parametrize(
    ("path", "finding"),
    [
        ("/api/health/db", "database unreachable"),
        ("/api/health/queue", "NATS is not connected"),
        ("/api/health/redis", "NATS is not connected"),
    ],
)
async def test_each_part_answers_503_on_its_own(client: httpx.AsyncClient, path: str, finding: str) -> None:
    r = await client.get(path)
    assert r.status_code == 503 and finding in r.json()["message"]


async def test_whatsapp_is_503_when_the_dispatcher_does_not_answer(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/health/whatsapp", headers={"Authorization": "Bearer ana"})
    assert r.status_code == 503 and "dispatcher" in r.json()["message"]
    assert r.json()["whatsapp"]["account_id"] == "acme"


async def test_a_backend_down_leaves_the_gateway_ready_and_health_names_it(client: httpx.AsyncClient) -> None:
    for probe, status in (("/ready", "ready"), ("/live", "alive")):
        r = await client.get(probe)
        assert r.status_code == 200 and r.json()["status"] == status
    r = await client.get("/health")
    assert r.status_code == 503
    body = r.json()
    # The shape the dashboards read, with the part that is down named.
    assert body["status"] == "unhealthy" and body["services"]["campaigns"] == "UNAVAILABLE"
    assert body["services"]["accounts"] == "SERVING" and body["database"] == "disconnected"
    assert set(body) >= {"timestamp", "nats", "dead_letters"}


async def test_the_gateway_is_not_ready_before_it_has_started() -> None:
    app = FastAPI()  # the lifespan has not run: no backends yet
    errors.install(app)
    app.include_router(system.router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/ready")
    assert r.status_code == 503 and r.json()["code"] == "unavailable"
