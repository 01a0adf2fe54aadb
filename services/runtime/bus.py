"""NATS JetStream: connection, the streams and KV bucket of DESIGN.md, publishing, and the
durable consumer every service reads its events with.

The consumer never drops work that can still succeed. A failure is one of three kinds
(`classify`): transient (the database, a service or NATS is away for a while) is retried
with back-off for as long as it lasts; poison (the message can never succeed: undecodable,
invalid, names what does not exist) goes to the DEADLETTER stream at once; anything else is
a bug, retried a few times in case it was not, then dead-lettered. A dead letter keeps the
original payload and where it came from, so an admin can list it and replay it once fixed."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import grpc
import nats
from google.protobuf.message import DecodeError, Message
from nats import errors as nats_errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js import errors as js_errors
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError

from . import metrics, nats_auth, tracing
from .errors import Conflict, InvalidArgument, NotFound, Unavailable

log = logging.getLogger("pregonero.bus")

DISPATCH_STREAM = "DISPATCH"
EVENTS_STREAM = "EVENTS"
DEADLETTER_STREAM = "DEADLETTER"
DEADLETTER_SUBJECTS = "deadletter.>"
BATCH_STATE_BUCKET = "batch_state"
# A dispatcher's JobOutcome.error when none of the job's senders is active: campaigns fails
# the batch on it (it can no longer proceed).
NO_ACTIVE_SENDER = "no active device for this job"
# A dispatcher's JobOutcome.error on a `requeue` when the job's active senders are all unable
# to send for now (disconnected, waiting for a QR scan, at their daily cap): campaigns
# suspends the batch until one of them connects again.
NO_CONNECTED_SENDER = "no connected device for this job"

# Duplicate window: a re-published chunk with the same Nats-Msg-Id inside it is dropped by
# the server, which is what makes a feeder retry after a crash safe.
DUPLICATE_WINDOW_S = 120.0

STREAMS = (
    js_api.StreamConfig(
        name=DISPATCH_STREAM,
        subjects=["dispatch.>"],
        retention=js_api.RetentionPolicy.WORK_QUEUE,
        storage=js_api.StorageType.FILE,
        duplicate_window=DUPLICATE_WINDOW_S,
    ),
    js_api.StreamConfig(
        name=EVENTS_STREAM,
        subjects=["events.>"],
        retention=js_api.RetentionPolicy.LIMITS,
        storage=js_api.StorageType.FILE,
        max_age=7 * 24 * 3600.0,
        duplicate_window=DUPLICATE_WINDOW_S,
    ),
    js_api.StreamConfig(
        name=DEADLETTER_STREAM,
        subjects=[DEADLETTER_SUBJECTS],
        retention=js_api.RetentionPolicy.LIMITS,
        storage=js_api.StorageType.FILE,
        # Long enough for someone to notice, fix the cause and replay.
        max_age=30 * 24 * 3600.0,
        # A message dead-lettered whose term() was lost comes back (after ack_wait, or once
        # a crashed replica is replaced): the same delivery dead-lettered again within a
        # day is dropped by its Nats-Msg-Id.
        duplicate_window=24 * 3600.0,
    ),
)


async def connect(url: str, *, name: str) -> NATS:
    """Connected as the user `url` names; replies come to that user's own inbox prefix, the
    only one its NATS permissions let it read (nats_auth.py)."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    return await nats.connect(
        url,
        name=name,
        inbox_prefix=nats_auth.inbox_prefix(nats_auth.user_of(url)),
        error_cb=on_error,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        # Shutdown drains; a subscription that cannot drain must not hold the exit for long.
        drain_timeout=5,
    )


async def ensure_topology(js: JetStreamContext) -> None:
    """Create or update the streams and the KV bucket; safe when replicas race."""
    for config in STREAMS:
        assert config.name is not None  # every stream above is named (StreamConfig allows none)
        try:
            await js.stream_info(config.name)
        except NotFoundError:
            try:
                await js.add_stream(config)
            except BadRequestError:
                pass  # another replica created it first
        # An existing stream is left as it is: in production an operator (NACK) owns its
        # replicas and limits, and a service must not shrink them on start.
    try:
        await js.key_value(BATCH_STATE_BUCKET)
    except (BucketNotFoundError, NotFoundError):
        try:
            await js.create_key_value(bucket=BATCH_STATE_BUCKET, history=1)
        except BadRequestError:
            await js.key_value(BATCH_STATE_BUCKET)  # another replica won the race


async def publish(js: JetStreamContext, subject: str, message: Message, *, msg_id: str) -> None:
    """Every publish carries a Nats-Msg-Id (dedup), the request id (log correlation) and,
    when tracing, the trace context (tracing.py)."""
    await js.publish(subject, message.SerializeToString(), headers=tracing.outgoing({"Nats-Msg-Id": msg_id}))


# --- telling failures apart -------------------------------------------------------------


class Poison(Exception):
    """Raised by a handler for a message that can never succeed: it is dead-lettered at once."""


class Failure(enum.Enum):
    TRANSIENT = "transient"  # retried with back-off for as long as it lasts
    POISON = "poison"  # dead-lettered at once
    UNKNOWN = "unknown"  # a bug: retried up to POISON_DELIVERIES deliveries, then dead-lettered


_POISON_TYPES: tuple[type[BaseException], ...] = (
    Poison,
    DecodeError,
    NotFound,
    InvalidArgument,
    # Includes UnicodeDecodeError and asyncpg's DataError (a query argument of the wrong kind).
    ValueError,
    # SQLSTATE class 22: the database refuses the message's values (overflow, bad text).
    asyncpg.exceptions.DataError,
)
_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    # Includes ConnectionError (refused, reset), TimeoutError and nats-py's timeouts.
    OSError,
    Unavailable,
    asyncpg.PostgresConnectionError,  # class 08, ConnectionDoesNotExistError among them
    # The pool or the connection closing under the query. (asyncpg raises it too for a wrong
    # number of query arguments: a bug that any test of the query meets first.)
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,  # 57: admin shutdown, cannot connect now, statement timeout
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
    asyncpg.exceptions.TransactionRollbackError,  # 40: serialization failure, deadlock
    nats_errors.ConnectionClosedError,
    nats_errors.ConnectionDrainingError,
    nats_errors.ConnectionReconnectingError,
    nats_errors.NoRespondersError,
    nats_errors.NoServersError,
    nats_errors.OutboundBufferLimitError,
    nats_errors.StaleConnectionError,
    nats_errors.FlushTimeoutError,
    js_errors.NoStreamResponseError,
    js_errors.ServiceUnavailableError,
    js_errors.ServerError,
)
# A backend's gRPC status: its own NotFound and InvalidArgument arrive as these codes.
_POISON_CODES = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT})
_TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


def classify(exc: BaseException) -> Failure:
    """What a handler's failure says of its message. Poison is checked first: asyncpg's
    DataError is both an InterfaceError and a ValueError, and it is the data that is wrong."""
    if isinstance(exc, BaseExceptionGroup):  # a handler's TaskGroup: an outage decides
        kinds = {classify(e) for e in exc.exceptions}
        return next((k for k in (Failure.TRANSIENT, Failure.POISON) if k in kinds), Failure.UNKNOWN)
    if isinstance(exc, grpc.aio.AioRpcError):
        code = exc.code()
        if code in _TRANSIENT_CODES:
            return Failure.TRANSIENT
        return Failure.POISON if code in _POISON_CODES else Failure.UNKNOWN
    if isinstance(exc, _POISON_TYPES):
        return Failure.POISON
    if isinstance(exc, _TRANSIENT_TYPES):
        return Failure.TRANSIENT
    # A wrapper raised `from` the real cause (a domain error over a driver's) is that cause.
    if exc.__cause__ is not None:
        return classify(exc.__cause__)
    return Failure.UNKNOWN


@dataclass(frozen=True)
class Backoff:
    """Delay before the n-th retry: `first` doubling, at most `cap` seconds."""

    first: float = 1.0
    cap: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.first * 2.0 ** max(attempt - 1, 0), self.cap)


class _Throttled:
    """One warning per `every` seconds at most: an outage retries many times a second and
    must not flood the log. The warnings held back are counted into the next one."""

    def __init__(self, every: float) -> None:
        self.every = every
        self.last = -math.inf
        self.held = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            self.held += 1
            return
        held, self.held, self.last = self.held, 0, now
        if held:
            log.warning(message + " (and %d times more since the last report)", *args, held)
        else:
            log.warning(message, *args)


# --- the consumer -------------------------------------------------------------------------

# An unclassified failure (a bug) is retried this many deliveries, then dead-lettered: one bad
# event must not hold up every event behind it, and a dead letter can be replayed once fixed.
POISON_DELIVERIES = 10
RETRY_LOG_EVERY_S = 10.0

Handler = Callable[[list[Msg]], Awaitable[None]]


async def consume(
    js: JetStreamContext,
    subject: str,
    *,
    durable: str,
    handle: Handler,
    fetch: int = 64,
    deliver_new: bool = False,
    poison_after: int = POISON_DELIVERIES,
    backoff: Backoff = Backoff(),
) -> None:
    """A durable pull consumer that hands its messages over in batches: `handle` gets up to
    `fetch` messages and they are acked once it returns. Handlers must be idempotent (they
    are: every event carries the key that makes its second application a no-op).

    A batch that fails transiently is handed back whole (nak with a delay) and the consumer
    pauses as long before its next fetch, so an outage costs one attempt per pause. Any
    other failure sends the batch through one message at a time to find the one at fault:
    the others are acked, the poison one dead-lettered, an unclassified one retried up to
    `poison_after` deliveries and then dead-lettered."""
    sub = await js.pull_subscribe(
        subject,
        durable=durable,
        stream=EVENTS_STREAM,
        # No max_deliver and no server back-off: deliveries are unlimited (a transient
        # failure is retried for as long as it lasts) and every failure naks with its own
        # delay, which the server honours; ack_wait only covers a consumer that died.
        config=js_api.ConsumerConfig(
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=30,
            max_ack_pending=4096,
            deliver_policy=js_api.DeliverPolicy.NEW if deliver_new else js_api.DeliverPolicy.ALL,
        ),
    )
    consumer = _Consumer(js, durable, handle, poison_after=poison_after, backoff=backoff)
    try:
        while True:
            msgs = await pull(sub, fetch, name=durable)
            if msgs:
                await consumer.take(msgs)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


_pull_log: dict[str, _Throttled] = {}


async def pull(sub: JetStreamContext.PullSubscription, batch: int, *, name: str) -> list[Msg]:
    """Up to `batch` messages, or none after a second. While NATS is away (restarting, a
    reconnect under way) it answers none after a pause instead of raising: a consumer loop
    must outlive the bus it reads, or one NATS restart would stop every service."""
    try:
        return await sub.fetch(batch, timeout=1)
    except (TimeoutError, NatsTimeout):
        return []
    except (nats_errors.Error, OSError) as exc:
        _pull_log.setdefault(name, _Throttled(RETRY_LOG_EVERY_S)).warning("%s: fetch failed (%r); retrying", name, exc)
        await asyncio.sleep(1.0)
        return []


class _Consumer:
    """What `consume` does with each fetched batch, and what it remembers between them."""

    def __init__(
        self, js: JetStreamContext, durable: str, handle: Handler, *, poison_after: int, backoff: Backoff
    ) -> None:
        self.js, self.durable, self.handle = js, durable, handle
        self.poison_after, self.backoff = poison_after, backoff
        self.outage = 0  # consecutive transient failures: how long to pause before the next fetch
        self.retry_log = _Throttled(RETRY_LOG_EVERY_S)

    async def take(self, msgs: list[Msg]) -> None:
        again = sum(1 for m in msgs if _deliveries(m) > 1)
        if again:
            metrics.CONSUMER_REDELIVERIES.labels(self.durable).inc(again)
        try:
            with tracing.incoming(self.durable, [m.headers for m in msgs]):
                await self.handle(msgs)
        except Exception as exc:  # noqa: BLE001 - classified below: retried, isolated or dead-lettered
            failure = exc
        else:
            self.outage = 0
            # An ack lost (NATS restarting) only means the message comes again: handlers are idempotent.
            results = await asyncio.gather(*(m.ack() for m in msgs), return_exceptions=True)
            if any(isinstance(r, Exception) for r in results):
                self.retry_log.warning("%s: acks lost; those messages come again", self.durable)
            return
        # Out of the except block, so what fails next is not logged as raised while handling this.
        kind = classify(failure)
        if kind is Failure.TRANSIENT:
            await self._retry_later(msgs, failure)
        elif len(msgs) == 1:
            await self._failed(msgs[0], failure, kind)
        else:
            log.warning(
                "%s: a batch of %d messages failed (%s: %s); handling them one by one",
                self.durable,
                len(msgs),
                type(failure).__name__,
                failure,
            )
            await self._one_by_one(msgs)

    async def _one_by_one(self, msgs: list[Msg]) -> None:
        for i, msg in enumerate(msgs):
            try:
                with tracing.incoming(self.durable, [msg.headers]):
                    await self.handle([msg])
            except Exception as exc:  # noqa: BLE001 - classified as above
                kind = classify(exc)
                if kind is Failure.TRANSIENT:
                    # The database went away mid-way: the rest would only fail the same way.
                    await self._retry_later(msgs[i:], exc)
                    return
                await self._failed(msg, exc, kind)
                continue
            self.outage = 0
            await msg.ack()

    async def _retry_later(self, msgs: list[Msg], exc: BaseException) -> None:
        self.outage += 1
        pause = self.backoff.delay(self.outage)
        self.retry_log.warning(
            "%s: %d messages (the first on %s) failed transiently (%s: %s); retrying within %.3gs",
            self.durable,
            len(msgs),
            msgs[0].subject,
            type(exc).__name__,
            _one_line(str(exc)),
            pause,
        )
        await asyncio.gather(*(m.nak(delay=self.backoff.delay(_deliveries(m))) for m in msgs))
        await asyncio.sleep(pause)

    async def _failed(self, msg: Msg, exc: BaseException, kind: Failure) -> None:
        """A message that failed on its own, not transiently: again later, or dead-lettered."""
        deliveries = _deliveries(msg)
        if kind is Failure.UNKNOWN and deliveries < self.poison_after:
            log.warning(
                "%s: message on %s (stream seq %d) failed, delivery %d of %d; it comes back",
                self.durable,
                msg.subject,
                _stream_seq(msg),
                deliveries,
                self.poison_after,
                exc_info=exc if deliveries == 1 else None,
            )
            await msg.nak(delay=self.backoff.delay(deliveries))
            return
        try:
            await dead_letter(self.js, msg, durable=self.durable, error=exc, deliveries=deliveries)
        except Exception as dl_exc:  # noqa: BLE001 - not set aside: it must come back
            log.warning(
                "%s: dead-lettering stream seq %d failed (%s); it comes back", self.durable, _stream_seq(msg), dl_exc
            )
            await msg.nak(delay=self.backoff.delay(deliveries))
            return
        metrics.CONSUMER_DEAD_LETTERED.labels(self.durable).inc()
        log.error(
            "%s: message on %s (stream seq %d) dead-lettered after %d deliveries: %s: %s",
            self.durable,
            msg.subject,
            _stream_seq(msg),
            deliveries,
            type(exc).__name__,
            exc,
            exc_info=exc if kind is Failure.UNKNOWN else None,  # a bug: its traceback is the clue
        )
        await msg.term()


def _deliveries(msg: Msg) -> int:
    return msg.metadata.num_delivered or 1


def _stream_seq(msg: Msg) -> int:
    return msg.metadata.sequence.stream


# --- the dead-letter stream -----------------------------------------------------------------

# Headers of a dead letter, beside the original message's own (request id, trace context).
DL = "Pregonero-DL-"
DL_SUBJECT = DL + "Subject"
DL_STREAM = DL + "Stream"
DL_SEQUENCE = DL + "Sequence"
DL_CONSUMER = DL + "Consumer"
DL_DELIVERIES = DL + "Deliveries"
DL_ERROR_CLASS = DL + "Error-Class"
DL_ERROR = DL + "Error"
DL_AT = DL + "At"
MAX_ERROR_CHARS = 1000


@dataclass(frozen=True)
class DeadLetter:
    id: int  # its sequence in DEADLETTER
    subject: str  # where it was published, and where a replay publishes it again
    stream: str
    stream_seq: int
    consumer: str
    error_class: str
    error: str
    deliveries: int
    at: datetime | None
    size: int


async def dead_letter(js: JetStreamContext, msg: Msg, *, durable: str, error: BaseException, deliveries: int) -> None:
    """Set `msg` aside in DEADLETTER, its payload as it was. Twice the same delivery is once."""
    seq = _stream_seq(msg)
    cls = type(error)
    headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith(("Nats-", DL))}
    headers.update(
        {
            "Nats-Msg-Id": f"{durable}:{seq}",
            DL_SUBJECT: msg.subject,
            DL_STREAM: msg.metadata.stream,
            DL_SEQUENCE: str(seq),
            DL_CONSUMER: durable,
            DL_DELIVERIES: str(deliveries),
            DL_ERROR_CLASS: f"{cls.__module__}.{cls.__qualname__}",
            DL_ERROR: _one_line(str(error) or cls.__name__)[:MAX_ERROR_CHARS],
            DL_AT: datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
    )
    await js.publish(f"deadletter.{durable}", msg.data, headers=headers, stream=DEADLETTER_STREAM)


async def list_dead_letters(js: JetStreamContext, *, limit: int = 100, after_seq: int = 0) -> list[DeadLetter]:
    """The oldest dead letters after `after_seq` (keyset paging on their DEADLETTER sequence)."""
    entries: list[DeadLetter] = []
    seq = after_seq + 1
    while len(entries) < limit:
        try:
            raw = await js.get_msg(DEADLETTER_STREAM, seq=seq, subject=DEADLETTER_SUBJECTS, next=True)
        except NotFoundError:
            break
        entries.append(_entry(raw))
        seq = (raw.seq or seq) + 1
    return entries


async def count_dead_letters(js: JetStreamContext) -> int:
    info = await js.stream_info(DEADLETTER_STREAM)
    return info.state.messages


async def read_dead_letter(js: JetStreamContext, seq: int) -> DeadLetter:
    """The dead letter `seq`; NotFound when there is none of that sequence."""
    return _entry(await _get_dead_letter(js, seq))


async def replay_dead_letter(
    js: JetStreamContext, seq: int, *, publishes: Callable[[str], bool] | None = None
) -> DeadLetter:
    """Publish a dead letter's payload again on its original subject, then drop it from
    DEADLETTER. Every consumer of that subject gets it again, not only the one that failed
    it: they are idempotent. Its own Nats-Msg-Id, so the stream does not take it for the
    original; two admins replaying the same one at once publish it once.

    `publishes`: the subjects this process may publish again (a service its own, see
    dead_letter_replays.py); another's is refused (Conflict). None: any (the operator's tools)."""
    raw = await _get_dead_letter(js, seq)
    entry = _entry(raw)
    if publishes is not None and not publishes(entry.subject):
        raise Conflict(f"dead letter {seq} is on {entry.subject}, which this service does not publish")
    headers = {k: v for k, v in (raw.headers or {}).items() if not k.startswith(("Nats-", DL))}
    headers["Nats-Msg-Id"] = f"replay:{seq}"
    await js.publish(entry.subject, raw.data or b"", headers=headers)
    with contextlib.suppress(NotFoundError):  # a concurrent replay deleted it first
        await js.delete_msg(DEADLETTER_STREAM, seq)
    log.info("dead letter %d replayed on %s (from %s)", seq, entry.subject, entry.consumer)
    return entry


async def _get_dead_letter(js: JetStreamContext, seq: int) -> js_api.RawStreamMsg:
    raw = None
    if seq > 0:
        with contextlib.suppress(NotFoundError):
            raw = await js.get_msg(DEADLETTER_STREAM, seq=seq)
    if raw is None or not (raw.headers or {}).get(DL_SUBJECT):  # absent, or not one of ours
        raise NotFound(f"dead letter {seq} not found")
    return raw


def _entry(raw: js_api.RawStreamMsg) -> DeadLetter:
    h = raw.headers or {}
    at = h.get(DL_AT)
    return DeadLetter(
        id=raw.seq or 0,
        subject=h.get(DL_SUBJECT, ""),
        stream=h.get(DL_STREAM, ""),
        stream_seq=_int(h.get(DL_SEQUENCE)),
        consumer=h.get(DL_CONSUMER, ""),
        error_class=h.get(DL_ERROR_CLASS, ""),
        error=h.get(DL_ERROR, ""),
        deliveries=_int(h.get(DL_DELIVERIES)),
        at=datetime.fromisoformat(at) if at else None,
        size=len(raw.data or b""),
    )


def _int(text: str | None) -> int:
    return int(text) if text and text.isdigit() else 0


def _one_line(text: str) -> str:
    """Fit for a header value: one line (a newline would end the header), ASCII (nats-py's
    reader of stored messages takes header values as ASCII)."""
    return " ".join(text.split()).encode("ascii", "backslashreplace").decode("ascii")
