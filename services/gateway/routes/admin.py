"""Operator tools (`/api/v1/admin`, admins only): the dead letters, the events no consumer
could handle (bus.py), listed and replayed. The gateway reads the DEADLETTER stream itself:
there is no service that owns it, and a dead letter is of no account's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from nats import errors as nats_errors
from nats.js import JetStreamContext

from services.runtime import bus
from services.runtime.errors import NotFound
from services.runtime.identity import Caller
from services.runtime.protos import iso

from ..auth import require_caller
from ..errors import ApiError

router = APIRouter(prefix="/api/v1/admin", tags=["admin"])

MAX_SEQ = 2**63 - 1  # a stream sequence is a uint64; beyond int64 nothing is stored


async def require_admin(caller: Annotated[Caller, Depends(require_caller)]) -> Caller:
    # Nothing here belongs to one account, so a member is refused outright (403), not
    # told 'not found' as for another account's resource.
    if not caller.is_admin:
        raise ApiError(403, "admins only", "forbidden")
    return caller


AdminDep = Annotated[Caller, Depends(require_admin)]


def jetstream(request: Request) -> JetStreamContext:
    js: JetStreamContext | None = request.app.state.runtime.js
    if js is None:
        raise ApiError(503, "the message bus is unavailable")
    return js


@asynccontextmanager
async def bus_call() -> AsyncIterator[None]:
    """NATS away (or slow) is a 503 like any backend's, not an internal error."""
    try:
        yield
    except (nats_errors.Error, TimeoutError) as exc:
        raise ApiError(503, "the message bus is unavailable") from exc


def dead_letter_json(entry: bus.DeadLetter) -> dict[str, Any]:
    return {
        "id": entry.id,
        "subject": entry.subject,
        "stream": entry.stream,
        "stream_seq": entry.stream_seq,
        "consumer": entry.consumer,
        "error_class": entry.error_class,
        "error": entry.error,
        "deliveries": entry.deliveries,
        "at": iso(entry.at),
        "size": entry.size,
    }


@router.get("/dead-letters", summary="Dead letters, oldest first (admin; array, total in X-Total-Count)")
async def list_dead_letters(
    request: Request,
    response: Response,
    _: AdminDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ, description="the last id of the previous page")] = 0,
) -> list[dict[str, Any]]:
    js = jetstream(request)
    async with bus_call():
        entries = await bus.list_dead_letters(js, limit=limit, after_seq=after)
        response.headers["X-Total-Count"] = str(await bus.count_dead_letters(js))
    return [dead_letter_json(e) for e in entries]


@router.post(
    "/dead-letters/{dead_letter_id}/replay",
    summary="Publish a dead letter again on its subject and remove it (admin)",
)
async def replay_dead_letter(
    request: Request,
    _: AdminDep,
    dead_letter_id: Annotated[str, Path(min_length=1, max_length=20)],
) -> dict[str, Any]:
    # Parsed here, after the role check: a malformed id names nothing (404), like an unknown one.
    if not (dead_letter_id.isascii() and dead_letter_id.isdigit()) or not 0 < int(dead_letter_id) <= MAX_SEQ:
        raise ApiError(404, f"dead letter {dead_letter_id} not found")
    js = jetstream(request)
    try:
        async with bus_call():
            entry = await bus.replay_dead_letter(js, int(dead_letter_id))
    except NotFound as exc:
        raise ApiError(404, exc.message) from exc
    return {"replayed": True, **dead_letter_json(entry)}
