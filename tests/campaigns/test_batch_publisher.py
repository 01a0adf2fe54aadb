"""Progress events of a big results fetch reach the live pushes whole: NATS refuses a message
over 1 MiB, and one fetch of results carries tens of thousands of outcomes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from pregonero.events.v1 import events_pb2

from services.campaigns.batch_publisher import Notifier
from services.runtime.bus import BATCH_STATE_BUCKET
from tests.conftest import bus_client


@pytest.fixture
async def bus(own_nats: str) -> AsyncIterator[tuple[NATS, JetStreamContext]]:
    nc, js = await bus_client(own_nats)
    try:
        yield nc, js
    finally:
        await nc.close()


async def test_a_progress_event_over_the_payload_limit_arrives_whole_in_parts(
    bus: tuple[NATS, JetStreamContext],
) -> None:
    nc, js = bus
    notifier = Notifier(nc, js, await js.key_value(BATCH_STATE_BUCKET))
    outcomes = [
        events_pb2.JobOutcome(
            job_id=j,
            attempt_id=f"2f1c7a52-0b39-4c55-a0d1-6a3b1bd5f0f1:{j}:1",
            status="failed" if j % 3 == 0 else "sent",
            to=f"+569{j:08d}",
            error="device disconnected from WhatsApp Web, scan the QR again" if j % 3 == 0 else "",
            sender_id=7,
        )
        for j in range(1, 32_001)
    ]
    event = events_pb2.BatchEvent(
        batch_id="2f1c7a52-0b39-4c55-a0d1-6a3b1bd5f0f1",
        account_id="acc-1",
        type="progress",
        sent=21_334,
        failed=10_666,
        total=100_000,
        outcomes=outcomes,
    )
    assert event.ByteSize() > nc.max_payload, "the event must be over the limit for this test to mean anything"
    got: list[events_pb2.BatchEvent] = []
    sizes: list[int] = []
    whole = asyncio.Event()

    async def collect(msg: object) -> None:
        data = msg.data  # type: ignore[attr-defined]
        sizes.append(len(data))
        got.append(events_pb2.BatchEvent.FromString(data))
        if sum(len(e.outcomes) for e in got) >= len(outcomes):
            whole.set()

    sub = await nc.subscribe(f"events.batch.{event.batch_id}", cb=collect)
    try:
        await notifier.publish(event)
        await asyncio.wait_for(whole.wait(), 10)
    finally:
        await sub.unsubscribe()
    assert [o.job_id for e in got for o in e.outcomes] == [o.job_id for o in outcomes]
    assert len(got) > 1 and max(sizes) <= nc.max_payload
    # Every part carries the counters, so any one of them shows the batch as it is.
    assert {(e.sent, e.failed, e.total, e.type) for e in got} == {(21_334, 10_666, 100_000, "progress")}
