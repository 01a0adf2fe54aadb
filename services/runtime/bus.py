"""NATS JetStream: connection, the streams and KV bucket of DESIGN.md, and publishing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats
from google.protobuf.message import Message
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError

from .logs import REQUEST_ID_KEY, current_request_id

log = logging.getLogger("pregonero.bus")

DISPATCH_STREAM = "DISPATCH"
EVENTS_STREAM = "EVENTS"
BATCH_STATE_BUCKET = "batch_state"

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
)


async def connect(url: str, *, name: str) -> NATS:
    async def on_error(exc: Exception) -> None:
        log.warning("nats error: %s", exc)

    return await nats.connect(
        url,
        name=name,
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
    """Every publish carries a Nats-Msg-Id (dedup) and the request id (log correlation)."""
    headers = {"Nats-Msg-Id": msg_id}
    rid = current_request_id()
    if rid:
        headers[REQUEST_ID_KEY] = rid
    await js.publish(subject, message.SerializeToString(), headers=headers)


# A message that fails this many deliveries on its own is set aside (term) and logged: one bad
# event must not stop every event behind it. It stays in the EVENTS stream for a replay.
POISON_DELIVERIES = 10


async def consume(
    js: JetStreamContext,
    subject: str,
    *,
    durable: str,
    handle: Callable[[list[Msg]], Awaitable[None]],
    fetch: int = 64,
    deliver_new: bool = False,
    poison_after: int = POISON_DELIVERIES,
    retry_delay: float = 2.0,
) -> None:
    """A durable pull consumer that hands its messages over in batches: `handle` gets up to
    `fetch` messages and they are acked once it returns. Handlers must be idempotent (they
    are: every event carries the key that makes its second application a no-op).

    When a batch fails, its messages are handled one by one, so one that cannot be handled
    (undecodable, or refused every time) is found: the others are acked, it is redelivered
    after a pause (retry_delay × deliveries, at most 30 s), and after `poison_after`
    deliveries it is terminated and logged."""
    sub = await js.pull_subscribe(
        subject,
        durable=durable,
        stream=EVENTS_STREAM,
        config=js_api.ConsumerConfig(
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=30,
            max_ack_pending=4096,
            deliver_policy=js_api.DeliverPolicy.NEW if deliver_new else js_api.DeliverPolicy.ALL,
        ),
    )
    try:
        while True:
            try:
                msgs = await sub.fetch(fetch, timeout=1)
            except (TimeoutError, NatsTimeout):
                continue
            try:
                await handle(msgs)
            except Exception:  # noqa: BLE001 - isolated below
                if len(msgs) == 1:
                    await _set_back(msgs[0], durable, poison_after=poison_after, retry_delay=retry_delay)
                else:
                    log.warning("a batch of %d messages of %s failed; handling them one by one", len(msgs), durable)
                    await _one_by_one(msgs, handle, durable, poison_after=poison_after, retry_delay=retry_delay)
                continue
            await asyncio.gather(*(m.ack() for m in msgs))
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def _one_by_one(
    msgs: list[Msg],
    handle: Callable[[list[Msg]], Awaitable[None]],
    durable: str,
    *,
    poison_after: int,
    retry_delay: float,
) -> None:
    for msg in msgs:
        try:
            await handle([msg])
        except Exception:  # noqa: BLE001 - redelivered, or set aside when it never succeeds
            await _set_back(msg, durable, poison_after=poison_after, retry_delay=retry_delay)
            continue
        await msg.ack()


async def _set_back(msg: Msg, durable: str, *, poison_after: int, retry_delay: float) -> None:
    """A message that failed on its own: again later, or set aside for good."""
    deliveries = msg.metadata.num_delivered if msg.metadata else 0
    if deliveries >= poison_after:
        log.exception("%s: message on %s failed %d times; set aside", durable, msg.subject, deliveries)
        await msg.term()
    else:
        log.exception("%s: message on %s failed; it comes back", durable, msg.subject)
        await msg.nak(delay=min(retry_delay * deliveries, 30.0))
