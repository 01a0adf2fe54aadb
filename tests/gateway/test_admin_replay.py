"""The replay route's answers when the service that would replay is away or refuses, on a real
NATS of the test's own with the gateway's own user (replays that succeed are checked end to
end in tests/e2e/test_dead_letters.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI

from services.gateway import errors
from services.gateway.auth import Authenticator
from services.gateway.config import GatewaySettings
from services.gateway.routes import admin
from services.runtime import bus, dead_letter_replays
from services.runtime.devstack import Stack
from tests.conftest import bus_client

pytestmark = pytest.mark.timeout(30)

ADMIN = {"Authorization": "Bearer root"}


@pytest.fixture
async def client(own_nats_users: Stack) -> AsyncIterator[httpx.AsyncClient]:
    assert own_nats_users.nats_users is not None
    nc = await bus.connect(own_nats_users.nats_users.url(own_nats_users.nats_url, "gateway"), name="gateway")
    app = FastAPI()
    app.state.auth = Authenticator(
        GatewaySettings(database_url="postgresql://x/y", pregonero_static_tokens="root=admin")
    )
    app.state.runtime = SimpleNamespace(nc=nc, js=nc.jetstream())
    errors.install(app)
    app.include_router(admin.router)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            yield c
    finally:
        await nc.close()


async def _dead_letter(nats_url: str, subject: str) -> int:
    nc, js = await bus_client(nats_url)
    try:
        headers = {"Nats-Msg-Id": uuid.uuid4().hex, bus.DL_SUBJECT: subject, bus.DL_STREAM: bus.EVENTS_STREAM}
        return (await js.publish("deadletter.test", b"x", headers=headers, stream=bus.DEADLETTER_STREAM)).seq
    finally:
        await nc.close()


async def test_a_replay_whose_service_is_down_is_503_naming_it(
    client: httpx.AsyncClient, own_nats_users: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    seq = await _dead_letter(own_nats_users.nats_url, f"events.job.{uuid.uuid4().hex}")
    r = await client.post(f"/api/v1/admin/dead-letters/{seq}/replay", headers=ADMIN)  # no dispatcher running
    assert r.status_code == 503 and "dispatcher" in r.json()["message"], r.text
    # Running but not answering (stuck): the same, once the request times out.
    nc, _ = await bus_client(own_nats_users.nats_url)
    try:
        await nc.subscribe("replay.dispatcher")
        monkeypatch.setattr(dead_letter_replays, "TIMEOUT_S", 0.3)
        r = await client.post(f"/api/v1/admin/dead-letters/{seq}/replay", headers=ADMIN)
        assert r.status_code == 503 and "dispatcher" in r.json()["message"], r.text
    finally:
        await nc.close()
    # The dead letter waits for the next try.
    r = await client.get("/api/v1/admin/dead-letters", headers=ADMIN)
    assert [e["id"] for e in r.json()] == [seq]


async def test_a_dead_letter_of_no_service_is_409_and_an_unknown_one_404(
    client: httpx.AsyncClient, own_nats_users: Stack
) -> None:
    seq = await _dead_letter(own_nats_users.nats_url, "events.nobody.x")
    r = await client.post(f"/api/v1/admin/dead-letters/{seq}/replay", headers=ADMIN)
    assert r.status_code == 409 and "events.nobody.x" in r.json()["message"], r.text
    r = await client.post(f"/api/v1/admin/dead-letters/{seq + 1}/replay", headers=ADMIN)
    assert r.status_code == 404, r.text
