"""Dead letters published again by the service that publishes their subject, asked over NATS
request/reply, so that no other service's user needs to publish it: the internet-facing
gateway asks for a replay (routes/admin.py), it does not publish results or work itself.

Every service answers `replay.<its user>` (Runtime.open), its replicas in one queue group so
that each request is handled once. A request carries the DEADLETTER sequence and nothing
else: the replayer reads the dead letter itself, publishes it again only if its subject is
one the service publishes (`nats_auth.owner_of`, the table nats-server enforces), deletes it,
and answers with the outcome. It answers only to an inbox: with nats-server's
`allow_responses` a service may publish once on any reply subject it receives, and a request
naming a stream subject as its reply would otherwise make it publish there."""

from __future__ import annotations

import enum
import logging

from nats import errors as nats_errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import bus, nats_auth, tracing
from .errors import Conflict, NotFound, Unavailable

log = logging.getLogger("pregonero.replays")

QUEUE = "replayers"
# Reading, publishing and deleting one message: far less. Past it the service is taken for down.
TIMEOUT_S = 5.0
MAX_SEQ = 2**63 - 1


class ReplayRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(gt=0, le=MAX_SEQ)  # the dead letter's sequence in DEADLETTER


class Outcome(enum.StrEnum):
    REPLAYED = "replayed"
    NOT_FOUND = "not_found"  # no such dead letter (or a concurrent replay took it)
    REFUSED = "refused"  # not a subject this service publishes, or a malformed request
    FAILED = "failed"  # NATS failed the replayer midway: it may be asked again


class ReplayReply(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    outcome: Outcome
    message: str = ""


async def answer_replays(nc: NATS, js: JetStreamContext, *, service: str) -> None:
    """Take `service`'s replay requests from now on, until the connection drains."""

    async def on_request(msg: Msg) -> None:
        if not msg.reply.startswith(nats_auth.DEFAULT_INBOX):  # `_INBOX.` or `_INBOX_<user>.`
            log.warning("replay request dropped: its reply subject %r is not an inbox", msg.reply)
            return
        with tracing.incoming("dead-letter replay", [msg.headers]):  # the admin's request id and trace
            reply = await _replay(js, msg.data, service=service)
        try:
            await msg.respond(reply.model_dump_json().encode())
        except nats_errors.Error as exc:  # the asker sees a timeout and may ask again
            log.warning("replay answer lost: %s", exc)

    await nc.subscribe(nats_auth.replay_subject(service), queue=QUEUE, cb=on_request)
    await nc.flush()  # subscribed before the service reports ready


async def _replay(js: JetStreamContext, data: bytes, *, service: str) -> ReplayReply:
    try:
        seq = ReplayRequest.model_validate_json(data).id
    except ValidationError as exc:
        return ReplayReply(outcome=Outcome.REFUSED, message=f"malformed replay request: {exc.errors()[0]['msg']}")
    try:
        await bus.replay_dead_letter(js, seq, publishes=lambda subject: nats_auth.owner_of(subject) == service)
    except NotFound as exc:
        return ReplayReply(outcome=Outcome.NOT_FOUND, message=exc.message)
    except Conflict as exc:
        log.warning("replay refused: %s", exc.message)
        return ReplayReply(outcome=Outcome.REFUSED, message=exc.message)
    except Exception as exc:  # noqa: BLE001 - answered, so the admin is told rather than kept waiting
        log.warning("replaying dead letter %d failed: %r", seq, exc)
        return ReplayReply(outcome=Outcome.FAILED, message=f"{service} could not replay dead letter {seq}: {exc!r}")
    return ReplayReply(outcome=Outcome.REPLAYED)


async def request_replay(nc: NATS, seq: int, *, owner: str, within: float | None = None) -> ReplayReply:
    """Ask `owner` to replay dead letter `seq`. Unavailable, naming it, when none of its
    replicas answers within `within` seconds (TIMEOUT_S): none running, or all stuck."""
    try:
        msg = await nc.request(
            nats_auth.replay_subject(owner),
            ReplayRequest(id=seq).model_dump_json().encode(),
            timeout=TIMEOUT_S if within is None else within,
            headers=tracing.outgoing({}) or None,
        )
    except (nats_errors.NoRespondersError, TimeoutError) as exc:
        raise Unavailable(f"{owner} did not answer the replay request: is it running?") from exc
    try:
        return ReplayReply.model_validate_json(msg.data)
    except ValidationError as exc:
        raise Unavailable(f"{owner} answered the replay request with something else than an outcome") from exc
