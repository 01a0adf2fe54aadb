"""`POST /api/sync` in process: an operation refused before it could start (429 by a rate
limit) gives its claim back, so it can be sent again; every other outcome is kept. (The
rest is checked end to end in tests/e2e/test_sync.py and tests/accounts/test_sync_operations.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from pregonero.accounts.v1 import sync_pb2

from services.gateway import errors
from services.gateway.auth import Authenticator
from services.gateway.config import GatewaySettings
from services.gateway.routes import sync
from services.gateway.user_limits import per_user

pytestmark = pytest.mark.timeout(10)
Claimed = sync_pb2.ClaimOperationResponse


class FakeSyncStub:
    """The accounts service's claims, kept in a dict."""

    def __init__(self) -> None:
        self.ops: dict[str, tuple[int, str] | None] = {}
        self.calls: list[str] = []

    async def ClaimOperation(self, request: Any, **_: Any) -> Any:  # noqa: N802 - gRPC's name
        self.calls.append(f"claim {request.client_op_id}")
        if request.client_op_id not in self.ops:
            self.ops[request.client_op_id] = None
            return Claimed(state=Claimed.CLAIMED)
        outcome = self.ops[request.client_op_id]
        if outcome is None:
            return Claimed(state=Claimed.PENDING)
        return Claimed(state=Claimed.FINISHED, status=outcome[0], body_json=outcome[1])

    async def FinishOperation(self, request: Any, **_: Any) -> Any:  # noqa: N802
        self.calls.append(f"finish {request.client_op_id} {request.status}")
        self.ops[request.client_op_id] = (request.status, request.body_json)
        return sync_pb2.FinishOperationResponse()

    async def ReleaseOperation(self, request: Any, **_: Any) -> Any:  # noqa: N802
        self.calls.append(f"release {request.client_op_id}")
        del self.ops[request.client_op_id]
        return sync_pb2.ReleaseOperationResponse(released=True)


@pytest.fixture
async def app_and_stub(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[httpx.AsyncClient, FakeSyncStub]]:
    stub = FakeSyncStub()
    monkeypatch.setattr(sync, "_stub", lambda request: stub)
    app = FastAPI()
    app.state.auth = Authenticator(
        GatewaySettings(database_url="postgresql://x/y", pregonero_static_tokens="ana=account:acme")
    )
    errors.install(app)
    app.include_router(sync.router)
    made: list[str] = []

    @app.post("/api/groups", status_code=201, dependencies=[Depends(per_user("test.sync.groups", 1))])
    async def create_group(body: dict[str, Any]) -> dict[str, Any]:
        made.append(body["name"])
        return {"id": str(len(made)), "name": body["name"]}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        client.headers["Authorization"] = "Bearer ana"
        yield client, stub


async def test_a_rate_limited_operation_is_given_back_and_a_created_one_kept(
    app_and_stub: tuple[httpx.AsyncClient, FakeSyncStub],
) -> None:
    client, stub = app_and_stub
    ops = [
        {"client_op_id": "a", "method": "POST", "path": "/api/groups", "body": {"name": "uno"}},
        {"client_op_id": "b", "method": "POST", "path": "/api/groups", "body": {"name": "dos"}},
    ]
    r = await client.post("/api/sync", json={"operations": ops})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == [201, 429]
    assert results[0]["body"] == {"id": "1", "name": "uno"} and "a minute" in results[1]["body"]["message"]
    assert stub.calls == ["claim a", "finish a 201", "claim b", "release b"]

    again = (await client.post("/api/sync", json={"operations": ops})).json()["results"]
    assert again[0] == {**results[0], "replayed": True}
    assert again[1]["status"] == 429 and not again[1]["replayed"]  # claimed and tried again
    assert stub.calls[-3:] == ["claim a", "claim b", "release b"]
