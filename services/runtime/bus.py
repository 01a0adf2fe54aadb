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


async def consume(
    js: JetStreamContext,
    subject: str,
    *,
    durable: str,
    handle: Callable[[list[Msg]], Awaitable[None]],
    fetch: int = 64,
    deliver_new: bool = False,
) -> None:
    """A durable pull consumer that hands its messages over in batches: `handle` gets up to
    `fetch` messages and they are acked once it returns. When it raises, nothing is acked and
    JetStream redelivers the batch, so handlers must be idempotent (they are: every event
    carries the key that makes its second application a no-op)."""
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
            except Exception:  # noqa: BLE001 - not acked: redelivered and handled again
                log.exception("handling %d messages of %s failed", len(msgs), durable)
                await asyncio.sleep(1)
                continue
            await asyncio.gather(*(m.ack() for m in msgs))
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
