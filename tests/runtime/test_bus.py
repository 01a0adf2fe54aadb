"""The shared durable consumer on a real NATS JetStream: batches acked once handled, and a
message that never succeeds set aside without holding up the ones behind it."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter

import nats
from nats.aio.msg import Msg

from services.runtime import bus


async def test_a_poison_message_is_set_aside_and_the_rest_go_through(own_nats: str) -> None:
    nc = await nats.connect(own_nats)
    js = nc.jetstream()
    await bus.ensure_topology(js)
    subject = f"events.test.{uuid.uuid4().hex}"
    handled: Counter[bytes] = Counter()
    poison_deliveries: set[int] = set()

    async def handle(msgs: list[Msg]) -> None:
        poison = [m for m in msgs if m.data == b"poison"]
        if poison:
            poison_deliveries.add(poison[0].metadata.num_delivered)
            raise ValueError("cannot handle this one")
        handled.update(m.data for m in msgs)

    for data in (b"a", b"b", b"poison", b"c", b"d"):
        await js.publish(subject, data)
    consumer = asyncio.create_task(
        bus.consume(js, subject, durable=f"test-{uuid.uuid4().hex[:8]}", handle=handle, poison_after=3, retry_delay=0.1)
    )
    try:
        for _ in range(150):
            if 3 in poison_deliveries and set(handled) == {b"a", b"b", b"c", b"d"}:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # a terminated message never comes back
        assert set(handled) == {b"a", b"b", b"c", b"d"}
        assert poison_deliveries == {1, 2, 3}, "redelivered until set aside after the third delivery"
        # Each good message was handled and acked once its batch (or itself) succeeded.
        assert all(count == 1 for count in handled.values()), handled
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        await nc.close()
