"""The shared durable consumer on a real NATS JetStream: batches acked once handled; a
transient failure retried for as long as it lasts; a message that can never succeed
dead-lettered (payload and provenance kept) without holding up the ones behind it; and a
dead letter replayed onto its subject."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import nats
import pytest
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pregonero.events.v1 import events_pb2

from services.runtime import bus
from services.runtime.errors import InvalidArgument, NotFound, Unavailable

pytestmark = pytest.mark.timeout(90)

# Small delays so an outage of many deliveries lasts a second or two, not minutes.
FAST = bus.Backoff(first=0.02, cap=0.1)


@contextlib.asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[tuple[NATS, JetStreamContext]]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await bus.ensure_topology(js)
    try:
        yield nc, js
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def consuming(js: JetStreamContext, subject: str, handle: bus.Handler, **options: Any) -> AsyncIterator[str]:
    """`bus.consume` running in the background under a durable of its own (its name)."""
    durable = f"test-{uuid.uuid4().hex[:8]}"
    task = asyncio.create_task(bus.consume(js, subject, durable=durable, handle=handle, **options))
    try:
        yield durable
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def eventually(what: str, probe: Callable[[], Awaitable[Any]], within: float = 45.0) -> Any:
    """The first truthy answer of `probe`; the bound only ends a test that would hang."""
    deadline = asyncio.get_running_loop().time() + within
    last = None
    while asyncio.get_running_loop().time() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: still {last!r}")


def event(batch_id: str) -> bytes:
    return events_pb2.BatchEvent(batch_id=batch_id, type="job_completed").SerializeToString()


GARBAGE = b"\x0a\xff not a protobuf"


async def publish_all(js: JetStreamContext, subject: str, payloads: list[bytes]) -> None:
    for data in payloads:
        await js.publish(subject, data)


# --- classification -------------------------------------------------------------------------


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "from a backend")


def wrapped(cause: BaseException) -> Exception:
    try:
        raise RuntimeError("wrapper") from cause
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (asyncpg.CannotConnectNowError("the database system is starting up"), bus.Failure.TRANSIENT),
        (asyncpg.ConnectionDoesNotExistError("connection was closed"), bus.Failure.TRANSIENT),
        (asyncpg.TooManyConnectionsError("too many"), bus.Failure.TRANSIENT),
        (asyncpg.AdminShutdownError("terminating"), bus.Failure.TRANSIENT),
        (asyncpg.SerializationError("could not serialize"), bus.Failure.TRANSIENT),
        (asyncpg.DeadlockDetectedError("deadlock"), bus.Failure.TRANSIENT),
        (asyncpg.InterfaceError("pool is closing"), bus.Failure.TRANSIENT),
        (ConnectionRefusedError(111, "refused"), bus.Failure.TRANSIENT),
        (TimeoutError(), bus.Failure.TRANSIENT),
        (nats.errors.TimeoutError(), bus.Failure.TRANSIENT),
        (nats.errors.NoRespondersError(), bus.Failure.TRANSIENT),
        (Unavailable("accounts is restarting"), bus.Failure.TRANSIENT),
        (rpc_error(grpc.StatusCode.UNAVAILABLE), bus.Failure.TRANSIENT),
        (rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), bus.Failure.TRANSIENT),
        (rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED), bus.Failure.TRANSIENT),
        (rpc_error(grpc.StatusCode.ABORTED), bus.Failure.TRANSIENT),
        (wrapped(asyncpg.CannotConnectNowError("starting up")), bus.Failure.TRANSIENT),
        (ExceptionGroup("some", [KeyError("x"), ConnectionResetError()]), bus.Failure.TRANSIENT),
        (DecodeError("corrupt"), bus.Failure.POISON),
        (NotFound("account x not found"), bus.Failure.POISON),
        (InvalidArgument("amount is out of range"), bus.Failure.POISON),
        (ValueError("badly formed hexadecimal UUID string"), bus.Failure.POISON),
        (bus.Poison("unknown account"), bus.Failure.POISON),
        (rpc_error(grpc.StatusCode.NOT_FOUND), bus.Failure.POISON),
        (asyncpg.exceptions.NumericValueOutOfRangeError("numeric field overflow"), bus.Failure.POISON),
        (KeyError("a bug"), bus.Failure.UNKNOWN),
        (rpc_error(grpc.StatusCode.INTERNAL), bus.Failure.UNKNOWN),
        (asyncpg.UniqueViolationError("duplicate key"), bus.Failure.UNKNOWN),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_failures_are_told_apart(exc: BaseException, kind: bus.Failure) -> None:
    assert bus.classify(exc) is kind


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [bus.Backoff().delay(n) for n in (1, 2, 3, 5, 6, 50)] == [1.0, 2.0, 4.0, 16.0, 30.0, 30.0]


# --- the consumer -----------------------------------------------------------------------------


async def test_a_transient_failure_is_retried_for_as_long_as_it_lasts(
    own_nats: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An outage longer than the poison bound: nothing dropped, nothing dead-lettered, and
    each delivery tried once (the batch is not handled again one message at a time)."""
    # Down until every message has been delivered twice as often as poison_after allows.
    poison_after, down_for = 3, 6
    errors: list[Exception] = [
        asyncpg.CannotConnectNowError("the database system is starting up"),
        ConnectionRefusedError(111, "Connect call failed"),
        rpc_error(grpc.StatusCode.UNAVAILABLE),
    ]
    calls: list[list[tuple[bytes, int]]] = []
    applied: Counter[bytes] = Counter()

    async def handle(msgs: list[Msg]) -> None:
        calls.append([(m.data, m.metadata.num_delivered) for m in msgs])
        if any(m.metadata.num_delivered <= down_for for m in msgs):
            raise errors[len(calls) % len(errors)]
        applied.update(m.data for m in msgs)

    payloads = [event(f"b-{i}") for i in range(20)]
    caplog.set_level(logging.WARNING, logger="pregonero.bus")
    async with jetstream(own_nats) as (_, js):
        subject = f"events.test.{uuid.uuid4().hex}"
        await publish_all(js, subject, payloads)
        async with consuming(js, subject, handle, poison_after=poison_after, backoff=FAST):

            async def all_applied() -> bool:
                return set(applied) == set(payloads)

            await eventually("every message applied after the outage", all_applied)
        assert await bus.count_dead_letters(js) == 0
    assert all(n == 1 for n in applied.values()), applied
    deliveries = Counter(pair for call in calls for pair in call)
    assert all(n == 1 for n in deliveries.values()), "a delivery handled twice: one by one during an outage"
    failed_calls = len(calls) - sum(1 for call in calls if all(n > down_for for _, n in call))
    assert failed_calls >= down_for > poison_after
    retries = [r for r in caplog.records if "failed transiently" in r.getMessage()]
    assert 1 <= len(retries) < failed_calls, "the retry warning is rate-limited"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_an_undecodable_message_is_dead_lettered_and_replayed(own_nats: str) -> None:
    applied: Counter[str] = Counter()
    failures: list[int] = []

    async def handle(msgs: list[Msg]) -> None:
        for m in msgs:
            try:
                events_pb2.BatchEvent.FromString(m.data)
            except DecodeError:
                failures.append(m.metadata.num_delivered)
                raise
        applied.update(events_pb2.BatchEvent.FromString(m.data).batch_id for m in msgs)

    async with jetstream(own_nats) as (nc, js):
        subject = f"events.test.{uuid.uuid4().hex}"
        await publish_all(js, subject, [event("a"), event("b")])
        ack = await js.publish(subject, GARBAGE, headers={"X-Request-Id": "rid-poison", "Nats-Msg-Id": "orig-1"})
        await publish_all(js, subject, [event("c"), event("d")])
        async with consuming(js, subject, handle, backoff=FAST) as durable:

            async def dead_lettered() -> list[bus.DeadLetter]:
                return await bus.list_dead_letters(js)

            (entry,) = await eventually("the undecodable message dead-lettered", dead_lettered)

            async def around_applied() -> bool:
                return set(applied) == {"a", "b", "c", "d"}

            await eventually("the messages around it applied", around_applied)
            assert set(failures) == {1}, "poison is dead-lettered at once, never redelivered"
            assert entry.subject == subject and entry.consumer == durable
            assert (entry.stream, entry.stream_seq, entry.deliveries) == (bus.EVENTS_STREAM, ack.seq, 1)
            assert entry.error_class == "google.protobuf.message.DecodeError"
            assert "Wire format was corrupt" in entry.error and entry.at is not None
            assert entry.size == len(GARBAGE)
            raw = await js.get_msg(bus.DEADLETTER_STREAM, seq=entry.id)
            assert raw.data == GARBAGE, "the payload byte for byte"
            assert raw.headers is not None
            assert raw.headers["X-Request-Id"] == "rid-poison"
            assert raw.headers["Nats-Msg-Id"] == f"{durable}:{ack.seq}"

            # The same delivery dead-lettered a second time (a lost term) is dropped.
            again = await js.pull_subscribe(
                subject,
                durable=f"again-{uuid.uuid4().hex[:8]}",
                stream=bus.EVENTS_STREAM,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=ack.seq),
            )
            (poison,) = await again.fetch(1, timeout=10)
            assert poison.data == GARBAGE
            await bus.dead_letter(js, poison, durable=durable, error=DecodeError("again"), deliveries=1)
            assert await bus.count_dead_letters(js) == 1

            # Replayed: published again on its subject (a new message id, so not deduplicated)
            # and gone from DEADLETTER. Still undecodable, it comes back as a new dead letter.
            replayed: list[Msg] = []

            async def collect(msg: Msg) -> None:
                replayed.append(msg)

            sub = await nc.subscribe(subject, cb=collect)
            assert (await bus.replay_dead_letter(js, entry.id)).subject == subject

            async def republished() -> list[Msg]:
                return replayed

            (copy,) = await eventually("the replay published on the original subject", republished)
            await sub.unsubscribe()
            assert copy.data == GARBAGE and copy.headers is not None
            assert copy.headers["Nats-Msg-Id"] == f"replay:{entry.id}"
            assert copy.headers["X-Request-Id"] == "rid-poison"
            assert not any(k.startswith(bus.DL) for k in copy.headers)
            with pytest.raises(NotFoundError):
                await js.get_msg(bus.DEADLETTER_STREAM, seq=entry.id)

            async def dead_again() -> list[bus.DeadLetter]:
                return [e for e in await bus.list_dead_letters(js) if e.stream_seq > ack.seq]

            (second,) = await eventually("the replayed message consumed again", dead_again)
            assert second.id > entry.id and second.subject == subject
            assert [e.id for e in await bus.list_dead_letters(js)] == [second.id]
            assert await bus.list_dead_letters(js, after_seq=second.id) == []
        assert applied == Counter({"a": 1, "b": 1, "c": 1, "d": 1})

        with pytest.raises(NotFound):
            await bus.replay_dead_letter(js, entry.id)
        with pytest.raises(NotFound):
            await bus.replay_dead_letter(js, 0)


async def test_an_unknown_failure_is_retried_then_dead_lettered(own_nats: str) -> None:
    bug_deliveries: list[int] = []
    applied: set[bytes] = set()

    async def handle(msgs: list[Msg]) -> None:
        bug = [m for m in msgs if m.data == b"bug"]
        if bug:
            bug_deliveries.append(bug[0].metadata.num_delivered)
            raise KeyError("a bug in the handler")
        applied.update(m.data for m in msgs)

    async with jetstream(own_nats) as (_, js):
        subject = f"events.test.{uuid.uuid4().hex}"
        await publish_all(js, subject, [b"a", b"b", b"bug", b"c", b"d"])
        async with consuming(js, subject, handle, poison_after=3, backoff=FAST) as durable:

            async def dead_lettered() -> list[bus.DeadLetter]:
                return await bus.list_dead_letters(js)

            (entry,) = await eventually("the failing message dead-lettered", dead_lettered)
            assert (entry.consumer, entry.deliveries, entry.error_class) == (durable, 3, "builtins.KeyError")
            assert set(applied) == {b"a", b"b", b"c", b"d"}
            await asyncio.sleep(0.5)  # a terminated message never comes back
        assert sorted(set(bug_deliveries)) == [1, 2, 3], "redelivered until the bound, then set aside"
        assert await bus.count_dead_letters(js) == 1


async def test_an_outage_while_isolating_a_bad_message_stops_the_one_by_one_pass(own_nats: str) -> None:
    """The batch fails on a bug, so its messages are tried alone; the database then goes
    away: the rest of the batch is handed back at once instead of each failing on its own."""
    alone: list[tuple[bytes, int]] = []
    applied: Counter[bytes] = Counter()
    state = {"outage": 0}

    async def handle(msgs: list[Msg]) -> None:
        if len(msgs) == 1:
            alone.append((msgs[0].data, msgs[0].metadata.num_delivered))
        if any(m.data == b"bug" for m in msgs):
            if len(msgs) == 1 and state["outage"] == 0:
                state["outage"] = 1  # the database goes down just after the bug is seen alone
            raise KeyError("a bug")
        if 0 < state["outage"] <= 3:
            state["outage"] += 1
            raise asyncpg.CannotConnectNowError("the database system is shutting down")
        applied.update(m.data for m in msgs)

    async with jetstream(own_nats) as (_, js):
        subject = f"events.test.{uuid.uuid4().hex}"
        await publish_all(js, subject, [b"a", b"bug", b"c", b"d"])
        async with consuming(js, subject, handle, poison_after=2, backoff=FAST):

            async def settled() -> bool:
                return set(applied) == {b"a", b"c", b"d"} and await bus.count_dead_letters(js) == 1

            await eventually("the good ones applied, the bad one dead-lettered", settled)
    assert all(n == 1 for n in applied.values()), applied
    if (b"c", 1) in alone:  # the first fetch held the whole batch (as it does): c met the outage
        assert (b"d", 1) not in alone, "d was tried alone against a database known to be down"


async def test_a_consumer_outlives_a_nats_restart(tmp_path: Any) -> None:
    """NATS killed and started again on its file store: the consumer loop keeps running and
    applies what is published after the restart (a loop that died would stop the service)."""
    import signal

    from services.runtime.devstack import free_port, start_nats

    port = free_port()
    proc, url = start_nats(tmp_path, port=port)
    nc = await bus.connect(url, name="restart-test")
    js = nc.jetstream()
    await bus.ensure_topology(js)
    seen: list[bytes] = []

    async def handle(msgs: list[Msg]) -> None:
        seen.extend(m.data for m in msgs)

    task = asyncio.create_task(bus.consume(js, "events.restart.>", durable="restart-test", handle=handle))
    try:
        await js.publish("events.restart.1", b"before", headers={"Nats-Msg-Id": "before"})
        await _until(lambda: seen == [b"before"])
        proc.stop(signal.SIGKILL)
        proc, _ = start_nats(tmp_path, port=port)
        await _until(lambda: nc.is_connected, within=30)
        for _ in range(60):  # JetStream answers once it has recovered its store
            try:
                await js.publish("events.restart.1", b"after", headers={"Nats-Msg-Id": "after"}, timeout=1)
                break
            except nats.errors.Error:
                await asyncio.sleep(0.25)
        await _until(lambda: seen == [b"before", b"after"], within=30)
        assert not task.done(), "the consumer loop died with the server"
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await nc.close()
        proc.stop()


async def _until(probe: Callable[[], Any], within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not probe():
        assert asyncio.get_running_loop().time() < deadline, "not reached in time"
        await asyncio.sleep(0.05)
