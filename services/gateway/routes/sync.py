"""`POST /api/sync`: a client that was offline sends the scheduler operations it queued; they
are applied in order, each once however often the queue is sent.

Each operation goes through the app itself, in process, with the caller's own Authorization,
so every rule of the real route applies (validation, account scope, rate limits). Before it
runs, the accounts service records a claim keyed by the caller's user and `client_op_id`;
after, its outcome (status and body). A repeat gets the stored outcome without running again
(see services/accounts/sync_operations.py for why an operation claimed without an outcome is
not run again, and why a 429 or 503 gives the claim back)."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
from fastapi import APIRouter, Depends, Request
from pregonero.accounts.v1 import sync_pb2, sync_pb2_grpc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.runtime.logs import REQUEST_ID_KEY, current_request_id

from ..auth import Principal, require_principal
from ..errors import error_body

router = APIRouter(tags=["sync"])

OPERATION_TIMEOUT_S = 60.0
MAX_OPERATIONS = 100
MAX_BODY_BYTES = 64 * 1024
# What accounts keeps of a reply (its own bound is 1 MiB).
MAX_KEPT_BYTES = 512 * 1024
# The scheduler's routes: what an offline client can have queued.
PREFIXES = ("/api/messages", "/api/groups", "/api/contacts", "/api/opt-outs", "/api/notifications")
# Refused before the operation could start: nothing happened, so the client may send it again.
NOT_STARTED = frozenset({429, 503})
# The host the in-process calls name (they never leave this process).
INTERNAL_BASE = "http://pregonero.sync"

Claimed = sync_pb2.ClaimOperationResponse


class Operation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    client_op_id: str = Field(min_length=1, max_length=128, description="The client's own id: once per id")
    method: Literal["POST", "PUT", "PATCH", "DELETE"]
    path: str = Field(max_length=2048, examples=["/api/notifications/12"], description="One of the scheduler's routes")
    body: Any = Field(None, description="The JSON body, as the route takes it")

    @field_validator("client_op_id")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable():
            raise ValueError("client_op_id must be printable characters")
        return value

    @field_validator("path")
    @classmethod
    def _scheduler_route(cls, value: str) -> str:
        parts = urlsplit(value)
        path = parts.path
        # Nothing a router could read differently from this check: no host, no escapes, no dots.
        if (
            parts.scheme
            or parts.netloc
            or parts.fragment
            or not path.startswith("/")
            or any(c in path for c in "%\\")
            or "//" in path
            or any(segment in (".", "..") for segment in path.split("/"))
            or not any(path == p or path.startswith(p + "/") for p in PREFIXES)
        ):
            raise ValueError(f"path must be one of the scheduler's routes, under {', '.join(PREFIXES)}")
        return value

    @field_validator("body")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        if len(json.dumps(value)) > MAX_BODY_BYTES:
            raise ValueError(f"body must take at most {MAX_BODY_BYTES} bytes as JSON")
        return value

    def digest(self) -> bytes:
        text = json.dumps([self.method, self.path, self.body], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).digest()


class SyncRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    operations: list[Operation] = Field(max_length=MAX_OPERATIONS, description="Applied in this order")


class OperationResult(BaseModel):
    client_op_id: str
    status: int = Field(description="The route's HTTP status")
    body: Any = Field(description="The route's JSON body (null when it had none)")
    replayed: bool = Field(description="True when this is the stored outcome of an earlier sync")


class SyncReply(BaseModel):
    results: list[OperationResult]


def _stub(request: Request) -> sync_pb2_grpc.SyncServiceStub:
    return sync_pb2_grpc.SyncServiceStub(request.app.state.backends.channels["accounts"])


def _body_of(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text


@router.post(
    "/api/sync",
    response_model=SyncReply,
    summary="Apply the operations an offline client queued, each once",
    description=f"At most {MAX_OPERATIONS} operations of the scheduler's routes, each body at most "
    f"{MAX_BODY_BYTES // 1024} KiB. Each result is the route's own status and body; an operation "
    "sent again gets its first outcome back (`replayed`), one whose id was used for other content "
    "gets 409. A 429 or 503 is not kept: send that operation again later.",
)
async def sync(request: Request, principal: Annotated[Principal, Depends(require_principal)], body: SyncRequest) -> Any:
    stub = _stub(request)
    headers = {"Authorization": request.headers["authorization"], REQUEST_ID_KEY: current_request_id()}
    results: list[dict[str, Any]] = []
    transport = httpx.ASGITransport(app=request.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=INTERNAL_BASE, timeout=OPERATION_TIMEOUT_S) as app:
        for op in body.operations:
            claim = await stub.ClaimOperation(
                sync_pb2.ClaimOperationRequest(
                    client_op_id=op.client_op_id, method=op.method, path=op.path, digest=op.digest()
                ),
            )
            result = {"client_op_id": op.client_op_id, "replayed": False}
            if claim.state == Claimed.FINISHED:
                result.update(status=claim.status, body=json.loads(claim.body_json), replayed=True)
            elif claim.state == Claimed.CONFLICT:
                message = f"client_op_id {op.client_op_id} was used before for a different operation"
                result.update(status=409, body=error_body(409, message))
            elif claim.state == Claimed.PENDING:
                message = (
                    f"operation {op.client_op_id} was started before and its outcome was not recorded; "
                    "it may have taken effect, so it is not run again (check, then send it with a new id)"
                )
                result.update(status=409, body=error_body(409, message))
            else:
                payload = {"json": op.body} if op.body is not None else {}
                response = await app.request(op.method, op.path, headers=headers, **payload)
                outcome = _body_of(response)
                result.update(status=response.status_code, body=outcome)
                if response.status_code in NOT_STARTED:
                    await stub.ReleaseOperation(
                        sync_pb2.ReleaseOperationRequest(client_op_id=op.client_op_id),
                    )
                else:
                    kept = json.dumps(outcome)
                    if len(kept) > MAX_KEPT_BYTES:
                        kept = json.dumps({"note": "the reply was too large to keep; read the resource instead"})
                    await stub.FinishOperation(
                        sync_pb2.FinishOperationRequest(
                            client_op_id=op.client_op_id, status=response.status_code, body_json=kept
                        ),
                    )
            results.append(result)
    return {"results": results}
