"""Operator tools (`/api/v1/admin`, admins only): the dead letters, the events no consumer
could handle (bus.py), listed and replayed. The gateway reads the DEADLETTER stream itself:
there is no service that owns it, and a dead letter is of no account's. A replay is asked of
the service that publishes the dead letter's subject (runtime/dead_letter_replays.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from nats import errors as nats_errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from services.runtime import bus, dead_letter_replays, nats_auth
from services.runtime.dead_letter_replays import Outcome
from services.runtime.errors import NotFound, Unavailable
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
    seq = int(dead_letter_id)
    js = jetstream(request)
    nc: NATS = request.app.state.runtime.nc
    try:
        async with bus_call():
            entry = await bus.read_dead_letter(js, seq)
            # The service that publishes its subject publishes it again (the gateway's own
            # replayer for its webhooks' events): the gateway's NATS user may not publish
            # results, work or account events (runtime/nats_auth.py).
            owner = nats_auth.owner_of(entry.subject)
            if owner is None:
                raise ApiError(409, f"dead letter {seq} is on {entry.subject}, which no service publishes")
            reply = await dead_letter_replays.request_replay(nc, seq, owner=owner)
    except NotFound as exc:
        raise ApiError(404, exc.message) from exc
    except Unavailable as exc:
        raise ApiError(503, exc.message) from exc
    match reply.outcome:
        case Outcome.REPLAYED:
            return {"replayed": True, **dead_letter_json(entry)}
        case Outcome.NOT_FOUND:  # replayed (or removed) meanwhile
            raise ApiError(404, f"dead letter {seq} not found")
        case Outcome.REFUSED:
            raise ApiError(409, reply.message)
        case Outcome.FAILED:
            raise ApiError(503, reply.message)
