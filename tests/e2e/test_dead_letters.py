"""Dead letters through the whole suite: an event no consumer can handle is set aside (not
dropped), an admin lists it and replays it through the gateway, a member may do neither,
and /health counts what waits. The suite's own consumers do the dead-lettering."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import nats
import pytest
from pregonero.events.v1 import events_pb2

from services.runtime import bus
from services.runtime.devstack import Stack
from tests.conftest import ADMIN_TOKEN, MEMBER_TOKEN, wait_for

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}
LIST = "/api/v1/admin/dead-letters"
GARBAGE = b"\x0a\xff not a protobuf"


async def _publish(nats_url: str, subject: str, data: bytes) -> int:
    nc = await nats.connect(nats_url)
    try:
        ack = await nc.jetstream().publish(subject, data, headers={"Nats-Msg-Id": uuid.uuid4().hex})
        return ack.seq
    finally:
        await nc.close()


async def _set_aside(nats_url: str, subject: str) -> int:
    """A dead letter of `subject` as a consumer writes it, without the original on a stream."""
    nc = await nats.connect(nats_url)
    try:
        headers = {"Nats-Msg-Id": uuid.uuid4().hex, bus.DL_SUBJECT: subject, bus.DL_STREAM: bus.EVENTS_STREAM}
        ack = await nc.jetstream().publish("deadletter.test", GARBAGE, headers=headers, stream=bus.DEADLETTER_STREAM)
        return ack.seq
    finally:
        await nc.close()


def publish(suite: Stack, subject: str, data: bytes) -> int:
    """Straight onto the suite's bus, as a producer would; its sequence in EVENTS."""
    return asyncio.run(_publish(suite.nats_url, subject, data))


async def _settled(nats_url: str, durable: str, seq: int) -> bool:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().consumer_info(bus.EVENTS_STREAM, durable)
        return (info.ack_floor.stream_seq or 0) >= seq
    finally:
        await nc.close()


def settled(suite: Stack, durable: str, seq: int) -> bool:
    """Whether `durable` has acked (or set aside) everything up to `seq`."""
    return asyncio.run(_settled(suite.nats_url, durable, seq))


def dead_letters(base_url: str) -> list[dict[str, Any]]:
    """Every dead letter, page after page (the bus is shared with the rest of the suite)."""
    entries: list[dict[str, Any]] = []
    while True:
        after = entries[-1]["id"] if entries else 0
        r = httpx.get(f"{base_url}{LIST}", headers=ADMIN, params={"limit": 500, "after": after})
        assert r.status_code == 200, r.text
        assert int(r.headers["X-Total-Count"]) >= len(r.json())
        if not r.json():
            return entries
        entries += r.json()


def of(base_url: str, subject: str) -> list[dict[str, Any]]:
    return [e for e in dead_letters(base_url) if e["subject"] == subject]


@pytest.fixture
def forget(suite: Stack) -> Iterator[list[str]]:
    """Subjects whose dead letters the test leaves behind: removed, so /health counts none of them."""
    subjects: list[str] = []
    yield subjects

    async def clean() -> None:
        nc = await nats.connect(suite.nats_url)
        try:
            js = nc.jetstream()
            for entry in await bus.list_dead_letters(js, limit=10_000):
                if entry.subject in subjects:
                    await js.delete_msg(bus.DEADLETTER_STREAM, entry.id)
        finally:
            await nc.close()

    asyncio.run(clean())


def test_an_undecodable_event_is_dead_lettered_listed_and_replayed(
    base_url: str, suite: Stack, forget: list[str]
) -> None:
    subject = f"events.delivery.test-{uuid.uuid4().hex[:12]}"
    forget.append(subject)
    seq = publish(suite, subject, GARBAGE)
    (entry,) = wait_for("the undecodable event dead-lettered", lambda: of(base_url, subject))
    assert entry["consumer"] == "campaigns-delivery" and entry["stream"] == bus.EVENTS_STREAM
    assert entry["stream_seq"] == seq and entry["deliveries"] == 1 and entry["size"] == len(GARBAGE)
    assert entry["error_class"].endswith("DecodeError") and entry["at"].endswith("Z")

    page = httpx.get(f"{base_url}{LIST}", headers=ADMIN, params={"limit": 1, "after": entry["id"] - 1})
    assert page.status_code == 200 and [e["id"] for e in page.json()] == [entry["id"]]
    health = httpx.get(f"{base_url}/health").json()
    assert isinstance(health["dead_letters"], int) and health["dead_letters"] >= 1

    r = httpx.post(f"{base_url}{LIST}/{entry['id']}/replay", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["replayed"] is True and r.json()["id"] == entry["id"]
    # Published again on its subject, the consumer meets it again: still undecodable, it is
    # a new dead letter of a new delivery, and the replayed one is gone.
    (again,) = wait_for("the replayed event consumed again", lambda: of(base_url, subject))
    assert again["id"] > entry["id"] and again["stream_seq"] > seq
    r = httpx.post(f"{base_url}{LIST}/{entry['id']}/replay", headers=ADMIN)
    assert r.status_code == 404, r.text


def test_results_for_an_unknown_account_are_dead_lettered_not_dropped(
    base_url: str, suite: Stack, forget: list[str]
) -> None:
    batch_id = str(uuid.uuid4())
    subject = f"events.job.{batch_id}"
    forget.append(subject)
    chunk = events_pb2.ResultChunk(
        batch_id=batch_id,
        account_id=f"ghost-{uuid.uuid4().hex[:8]}",
        chunk_key=f"{batch_id}:0",
        hold_id=f"hold-{uuid.uuid4().hex[:8]}",
        outcomes=[events_pb2.JobOutcome(job_id=1, attempt_id=f"{batch_id}:1:1", status="sent", cost="0.01")],
    )
    seq = publish(suite, subject, chunk.SerializeToString())
    (entry,) = wait_for("the charge dead-lettered", lambda: of(base_url, subject))
    assert entry["consumer"] == "accounts-charges" and entry["stream_seq"] == seq
    assert entry["error_class"] == "services.runtime.bus.Poison" and "unknown account" in entry["error"]
    # The results applier acks it (its batch does not exist: nothing to apply), as before.
    wait_for("campaigns-results past it", lambda: settled(suite, "campaigns-results", seq))
    assert [e["consumer"] for e in of(base_url, subject)] == ["accounts-charges"]

    # Replayed by the dispatcher, the one publisher of results (the gateway's NATS user may
    # not publish them): the charge meets the same unknown account and is set aside again.
    r = httpx.post(f"{base_url}{LIST}/{entry['id']}/replay", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["replayed"] is True and r.json()["subject"] == subject
    (again,) = wait_for("the replayed result charged again", lambda: of(base_url, subject))
    assert again["consumer"] == "accounts-charges" and again["id"] > entry["id"] and again["stream_seq"] > seq
    r = httpx.post(f"{base_url}{LIST}/{entry['id']}/replay", headers=ADMIN)
    assert r.status_code == 404, r.text


def test_a_dead_letter_no_service_publishes_is_not_replayed(base_url: str, suite: Stack, forget: list[str]) -> None:
    """Only the service that publishes a subject replays it: on a subject no service publishes
    (an operator's test traffic here) the replay is refused and the dead letter stays."""
    subject = f"events.ghost.{uuid.uuid4().hex[:12]}"
    forget.append(subject)
    entry_id = asyncio.run(_set_aside(suite.nats_url, subject))
    r = httpx.post(f"{base_url}{LIST}/{entry_id}/replay", headers=ADMIN)
    assert r.status_code == 409 and subject in r.json()["message"], r.text
    assert [e["id"] for e in of(base_url, subject)] == [entry_id]


def test_dead_letters_are_for_admins_only(base_url: str) -> None:
    r = httpx.get(f"{base_url}{LIST}", headers=MEMBER)
    assert r.status_code == 403, r.text
    r = httpx.post(f"{base_url}{LIST}/1/replay", headers=MEMBER)
    assert r.status_code == 403, r.text
    assert httpx.get(f"{base_url}{LIST}").status_code == 401


@pytest.mark.parametrize("bad", [str(2**62), "abc", "0", "-1", "1.5", "²", "9" * 20, "9" * 21])
def test_replaying_what_is_not_there_is_not_found(base_url: str, bad: str) -> None:
    r = httpx.post(f"{base_url}{LIST}/{bad}/replay", headers=ADMIN)
    assert 400 <= r.status_code < 500, r.text
    if len(bad) <= 20:
        assert r.status_code == 404, r.text


@pytest.mark.parametrize("params", [{"limit": 501}, {"limit": 0}, {"after": -1}, {"after": "x"}])
def test_listing_refuses_bad_paging(base_url: str, params: dict[str, Any]) -> None:
    assert httpx.get(f"{base_url}{LIST}", headers=ADMIN, params=params).status_code == 422
