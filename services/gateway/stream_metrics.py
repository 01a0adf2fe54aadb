"""The streams' backlog as JetStream counts it: each durable consumer's lag, what it has
taken and not acked, what it has had redelivered, and the dead letters waiting. Read by the
gateway (its NATS user may list every consumer; one reading costs three stream infos and two
consumer listings), every SAMPLE_EVERY_S seconds. Each gateway replica reports the same
figures: the alerts take their max."""

from __future__ import annotations

import asyncio
import logging

from nats.js import JetStreamContext
from prometheus_client import Gauge

log = logging.getLogger("pregonero.gateway.streams")

SAMPLE_EVERY_S = 10.0

# Sampled from JetStream (sample_streams): the backlog as the server counts it.
CONSUMER_PENDING = Gauge(
    "pregonero_consumer_pending_messages",
    "Messages of the stream not yet delivered to the durable consumer (its lag).",
    ["stream", "consumer"],
)
CONSUMER_ACK_PENDING = Gauge(
    "pregonero_consumer_ack_pending_messages",
    "Messages delivered to the durable consumer and not yet acknowledged.",
    ["stream", "consumer"],
)
CONSUMER_REDELIVERED = Gauge(
    "pregonero_consumer_redelivered_messages",
    "Messages the durable consumer has had delivered more than once and not yet acknowledged.",
    ["stream", "consumer"],
)
STREAM_MESSAGES = Gauge("pregonero_stream_messages", "Messages a stream holds.", ["stream"])
DEAD_LETTERS = Gauge("pregonero_dead_letters", "Messages waiting in the DEADLETTER stream for an admin.")
STREAMS_SAMPLED = Gauge(
    "pregonero_streams_sampled_timestamp_seconds", "When the streams' backlog was last read (Unix time)."
)


async def sample_streams(js: JetStreamContext, streams: tuple[str, ...], *, dead_letters: str) -> None:
    """One reading of the streams' backlog into the gauges above. Durable consumers only: an
    ephemeral one's generated name would be a new series every time."""
    for stream in streams:
        info = await js.stream_info(stream)
        STREAM_MESSAGES.labels(stream).set(info.state.messages)
        for consumer in await js.consumers_info(stream):
            if not consumer.config.durable_name:
                continue
            name = consumer.config.durable_name
            CONSUMER_PENDING.labels(stream, name).set(consumer.num_pending or 0)
            CONSUMER_ACK_PENDING.labels(stream, name).set(consumer.num_ack_pending or 0)
            CONSUMER_REDELIVERED.labels(stream, name).set(consumer.num_redelivered or 0)
    info = await js.stream_info(dead_letters)
    DEAD_LETTERS.set(info.state.messages)
    STREAM_MESSAGES.labels(dead_letters).set(info.state.messages)
    STREAMS_SAMPLED.set_to_current_time()


async def sample_streams_forever(
    js: JetStreamContext, streams: tuple[str, ...], *, dead_letters: str, every: float = SAMPLE_EVERY_S
) -> None:
    """`sample_streams` every `every` seconds; a failed reading is skipped (the timestamp
    gauge shows how old the last one is)."""
    while True:
        try:
            async with asyncio.timeout(every):
                await sample_streams(js, streams, dead_letters=dead_letters)
        except Exception as exc:  # noqa: BLE001 - NATS away: the next reading comes
            log.warning("reading the streams' backlog failed: %r", exc)
        await asyncio.sleep(every)
