"""NATS users on the suite's real nats-server (nats_auth.py): a client without credentials is
refused, a service's user can neither forge another's subjects nor read DISPATCH or another
service's inbox, and none of the refused attempts changes a stream. The gateway's user, which
faces the internet, publishes no results or work even to replay a dead letter: it asks the
service that publishes the subject (dead_letter_replays.py), and the replay still works."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from services.runtime import bus, dead_letter_replays, nats_auth
from services.runtime.dead_letter_replays import Outcome
from services.runtime.devstack import Stack
from services.runtime.errors import NotFound, Unavailable
from tests.conftest import bus_client, collected

pytestmark = pytest.mark.timeout(60)


def test_the_table_names_the_durables_the_services_use() -> None:
    from services.accounts import charges, notifications
    from services.campaigns import account_events, delivery, device_events, results_applier
    from services.dispatcher import call_engine

    used = {
        "accounts": {charges.DURABLE, notifications.BATCH_DURABLE},
        "campaigns": {results_applier.DURABLE, account_events.DURABLE, delivery.DURABLE, device_events.DURABLE},
        "dispatcher": {"dispatch-whatsapp", call_engine.DURABLE},  # engine.py: dispatch-<channel>
        "gateway": set(),
    }
    assert {user: {c.durable for c in role.consumers} for user, role in nats_auth.ROLES.items()} == used


def test_results_and_work_have_one_publisher_and_dispatch_one_reader() -> None:
    def publishers(subject: str) -> set[str]:
        return {u for u in nats_auth.ROLES if subject in nats_auth.permissions(u)["publish"]}

    assert publishers("events.job.>") == {"dispatcher"}
    assert publishers("dispatch.>") == {"campaigns"}
    assert publishers(nats_auth.KV_SUBJECTS) == {"campaigns"}
    readers = {c.stream for u in nats_auth.ROLES for c in nats_auth.ROLES[u].consumers if u != "dispatcher"}
    assert nats_auth.DISPATCH not in readers
    for user in nats_auth.ROLES:
        subs = nats_auth.permissions(user)["subscribe"]
        assert subs[0] == f"_INBOX_{user}.>" and not any(s.startswith(("_INBOX.", "dispatch.")) for s in subs)


def test_each_consumed_subject_is_replayed_by_its_one_publisher_and_only_the_gateway_asks() -> None:
    def may_publish(user: str, subject: str) -> bool:
        return any(nats_auth.subject_matches(p, subject) for p in nats_auth.permissions(user)["publish"])

    for role in nats_auth.ROLES.values():
        for c in role.consumers:  # where dead letters come from
            subject = c.filter.replace(">", "x.y").replace("*", "x")
            owner = nats_auth.owner_of(subject)
            assert owner is not None and may_publish(owner, subject), subject
    owners = {s: nats_auth.owner_of(f"{s}.x") for s in ("events.job", "dispatch.whatsapp", "events.delivery")}
    assert owners == {"events.job": "dispatcher", "dispatch.whatsapp": "campaigns", "events.delivery": "gateway"}
    for subject in ("events.job.*", "events.job.>", "events.job", "events..x", "events.job.x y", "events.test.x"):
        assert nats_auth.owner_of(subject) is None, subject
    consumed = ("events.job.x", "dispatch.whatsapp.x", "events.account.x", "events.batch.x", "events.device.x")
    assert not [s for s in consumed if may_publish("gateway", s)]
    assert [u for u in nats_auth.ROLES if may_publish(u, "replay.dispatcher")] == ["gateway"]
    for user in nats_auth.ROLES:
        assert nats_auth.permissions(user)["subscribe"][-1] == f"replay.{user}"
        assert f"{nats_auth.JS_API}.STREAM.MSG.DELETE.{nats_auth.DEADLETTER}" in nats_auth.permissions(user)["publish"]


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("events.job.>", "events.job.a", True),
        ("events.job.>", "events.job.a.b", True),
        ("events.job.>", "events.job", False),
        ("events.device.*", "events.device.a", True),
        ("events.device.*", "events.device.a.b", False),
        ("events.*.a", "events.job.a", True),
        ("events.job.a", "events.job.a", True),
        ("events.job.a", "events.job.b", False),
        ("events.job.a", "events.job.a.b", False),
    ],
)
def test_subject_patterns_match_as_nats_server_does(pattern: str, subject: str, matches: bool) -> None:
    assert nats_auth.subject_matches(pattern, subject) is matches


# --- on the real server ----------------------------------------------------------------------


def _host_url(infra: Stack) -> str:
    """The server's address, no user: what any pod on the network can reach."""
    return "nats://" + infra.nats_url.rpartition("@")[2]


class Refusals:
    """A connection's asynchronous errors: nats-server answers a forbidden publish or
    subscription with a 'Permissions Violation' and keeps the connection open."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    async def on_error(self, exc: Exception) -> None:
        self.errors.append(str(exc))

    async def after(self, nc: NATS) -> list[str]:
        await nc.flush()  # the server answers in order: its -ERR comes before the PONG
        await asyncio.sleep(0.05)
        seen, self.errors = self.errors, []
        return seen

    async def refused(self, nc: NATS, what: str) -> bool:
        return any(f"permissions violation for {what}" in e.lower() for e in await self.after(nc))


@contextlib.asynccontextmanager
async def connected_as(url: str) -> AsyncIterator[tuple[NATS, Refusals]]:
    refusals = Refusals()
    nc = await nats.connect(
        url,
        error_cb=refusals.on_error,
        inbox_prefix=nats_auth.inbox_prefix(nats_auth.user_of(url)),
        allow_reconnect=False,
        connect_timeout=2,
    )
    try:
        yield nc, refusals
    finally:
        await nc.close()


@pytest.fixture
async def operator(infra: Stack) -> AsyncIterator[JetStreamContext]:
    nc, js = await bus_client(infra.nats_url)
    # Work waiting in DISPATCH for the dispatcher, on a consumer of its own: what must not leak.
    await js.add_consumer(
        bus.DISPATCH_STREAM, ConsumerConfig(durable_name="dispatch-authtest", filter_subject="dispatch.authtest.>")
    )
    await js.publish("dispatch.authtest.acme", b"+15550100 hello", headers={"Nats-Msg-Id": uuid.uuid4().hex})
    try:
        yield js
    finally:
        await js.delete_consumer(bus.DISPATCH_STREAM, "dispatch-authtest")
        await js.purge_stream(bus.DISPATCH_STREAM, subject="dispatch.authtest.>")
        await nc.close()


async def test_a_client_without_credentials_is_refused_and_changes_nothing(
    infra: Stack, operator: JetStreamContext
) -> None:
    waiting = await _waiting(operator)
    token = uuid.uuid4().hex
    forged = [f"events.job.{token}", f"dispatch.authtest.{token}"]
    wrong = nats_auth.NatsUsers({"campaigns": "not-the-password"}).url(_host_url(infra), "campaigns")
    for url in (_host_url(infra), wrong):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            async with connected_as(url) as (nc, _):
                # Never reached; were it, these are the publishes it came for.
                for subject in forged:
                    await nc.publish(subject, b"forged")
    await _nothing_changed(operator, forged, waiting)


async def test_a_service_user_cannot_forge_results_nor_read_dispatch_nor_other_inboxes(
    infra: Stack, operator: JetStreamContext
) -> None:
    users = infra.nats_users
    assert users is not None
    waiting = await _waiting(operator)
    token = uuid.uuid4().hex
    forged = [f"events.job.{token}", f"events.device.{token}", f"events.account.{token}", f"deadletter.{token}"]
    async with connected_as(users.url(infra.nats_url, "campaigns")) as (nc, refusals):
        # Results (credit) and device states are the dispatcher's, account events accounts'.
        for subject in forged:
            await nc.publish(subject, b"forged")
            assert await refusals.refused(nc, "publish"), subject
        # Reading the tenants' phones and texts: live, through the dispatcher's consumer, or
        # through a consumer of its own on DISPATCH, or the dispatcher's replies.
        for subject in ("dispatch.>", "_INBOX_dispatcher.>", "_INBOX.>", "$JS.ACK.DISPATCH.>"):
            await nc.subscribe(subject)
            assert await refusals.refused(nc, "subscription"), subject
        js = nc.jetstream(timeout=0.5)
        sub = await js.pull_subscribe_bind(durable="dispatch-authtest", stream=bus.DISPATCH_STREAM)
        with pytest.raises(nats.errors.TimeoutError):
            await sub.fetch(1, timeout=0.5)
        assert await refusals.refused(nc, "publish")
        for request in (
            f"$JS.API.CONSUMER.MSG.NEXT.{bus.DISPATCH_STREAM}.dispatch-authtest",
            f"$JS.API.CONSUMER.CREATE.{bus.DISPATCH_STREAM}.mine.dispatch.>",
            f"$JS.API.STREAM.MSG.GET.{bus.DISPATCH_STREAM}",
            f"$JS.API.STREAM.PURGE.{bus.EVENTS_STREAM}",
        ):
            await nc.publish(request, b"{}", reply=f"{nats_auth.inbox_prefix('campaigns')}.x")
            assert await refusals.refused(nc, "publish"), request
        # What it may do still works: its own publishes go through.
        await nc.publish(f"events.message.authtest-{uuid.uuid4().hex}", b"ok")
        assert await refusals.after(nc) == []
    # Work is campaigns' alone to publish.
    forged.append(f"dispatch.authtest.{token}")
    for user in ("accounts", "dispatcher"):
        async with connected_as(users.url(infra.nats_url, user)) as (nc, refusals):
            await nc.publish(forged[-1], b"forged")
            assert await refusals.refused(nc, "publish"), user
            # Only the gateway asks for replays, and each service takes only its own.
            await nc.publish("replay.campaigns", b'{"id": 1}')
            assert await refusals.refused(nc, "publish"), user
            await nc.subscribe("replay.campaigns")
            assert await refusals.refused(nc, "subscription"), user
    # The gateway faces the internet: not even to replay a dead letter may it publish results
    # (credit is captured from them), work or account events.
    gateway_forged = [f"events.job.{token}", f"dispatch.whatsapp.{token}", f"events.account.{token}"]
    async with connected_as(users.url(infra.nats_url, "gateway")) as (nc, refusals):
        for subject in gateway_forged:
            await nc.publish(subject, b"forged")
            assert await refusals.refused(nc, "publish"), subject
        await nc.subscribe("replay.dispatcher")
        assert await refusals.refused(nc, "subscription")
    await _nothing_changed(operator, [*forged, *gateway_forged], waiting)


async def _nothing_changed(js: JetStreamContext, forged: list[str], waiting: tuple[int, int, int]) -> None:
    """None of the forged subjects reached a stream (the suite's own traffic may, meanwhile),
    and the work waiting in DISPATCH still waits, delivered to no one."""
    streams = {"events": bus.EVENTS_STREAM, "dispatch": bus.DISPATCH_STREAM, "deadletter": bus.DEADLETTER_STREAM}
    for subject in forged:
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.get_last_msg(streams[subject.split(".")[0]], subject)
    assert await _waiting(js) == waiting


async def _waiting(js: JetStreamContext) -> tuple[int, int, int]:
    info = await js.consumer_info(bus.DISPATCH_STREAM, "dispatch-authtest")
    return info.num_pending, info.num_ack_pending, info.delivered.stream_seq


# --- dead letters replayed by their subject's publisher, on a bus of the test's own -----------


async def _set_aside(js: JetStreamContext, stream: str, subject: str, data: bytes, *, durable: str) -> int:
    """`data` published on `subject`, then dead-lettered by `durable` as a consumer does; its id."""
    await js.publish(subject, data, headers={"Nats-Msg-Id": uuid.uuid4().hex, "X-Request-Id": "rid-replay"})
    sub = await js.pull_subscribe(subject, durable=durable, stream=stream)
    (msg,) = await sub.fetch(1, timeout=5)
    await bus.dead_letter(js, msg, durable=durable, error=bus.Poison("unknown account"), deliveries=1)
    await msg.term()
    await js.delete_consumer(stream, durable)
    (entry,) = [e for e in await bus.list_dead_letters(js) if e.subject == subject]
    return entry.id


@contextlib.asynccontextmanager
async def replayers(stack: Stack, *services: str) -> AsyncIterator[None]:
    """`services` answering replay requests, each logged in as its own user, as Runtime.open does."""
    assert stack.nats_users is not None
    conns = [await bus.connect(stack.nats_users.url(stack.nats_url, s), name=s) for s in services]
    try:
        for service, nc in zip(services, conns, strict=True):
            await dead_letter_replays.answer_replays(nc, nc.jetstream(), service=service)
        yield
    finally:
        for nc in conns:
            await nc.drain()


async def test_the_gateway_asks_the_publisher_to_replay_a_dead_letter(own_nats_users: Stack) -> None:
    users = own_nats_users.nats_users
    assert users is not None
    op, js = await bus_client(own_nats_users.nats_url)
    token = uuid.uuid4().hex
    result, work = f"events.job.{token}", f"dispatch.whatsapp.{token}"
    result_id = await _set_aside(js, bus.EVENTS_STREAM, result, b"a result", durable="accounts-charges")
    work_id = await _set_aside(js, bus.DISPATCH_STREAM, work, b"a chunk", durable="dispatch-whatsapp")
    gateway = await bus.connect(users.url(own_nats_users.nats_url, "gateway"), name="gateway")
    try:
        async with replayers(own_nats_users, "dispatcher", "campaigns"), collected(op, result, bytes) as seen:
            reply = await dead_letter_replays.request_replay(gateway, result_id, owner="dispatcher")
            assert reply.outcome is Outcome.REPLAYED, reply
            copy = await js.get_last_msg(bus.EVENTS_STREAM, result)
            assert copy.data == b"a result" and copy.headers is not None
            assert copy.headers["Nats-Msg-Id"] == f"replay:{result_id}"
            assert copy.headers["X-Request-Id"] == "rid-replay"
            assert not any(k.startswith(bus.DL) for k in copy.headers)
            assert seen == [b"a result"]
            with pytest.raises(NotFound):
                await bus.read_dead_letter(js, result_id)
            again = await dead_letter_replays.request_replay(gateway, result_id, owner="dispatcher")
            assert again.outcome is Outcome.NOT_FOUND

            # Work is not the dispatcher's to publish: refused, and the dead letter stays.
            reply = await dead_letter_replays.request_replay(gateway, work_id, owner="dispatcher")
            assert reply.outcome is Outcome.REFUSED and work in reply.message
            assert (await bus.read_dead_letter(js, work_id)).subject == work
            reply = await dead_letter_replays.request_replay(gateway, work_id, owner="campaigns")
            assert reply.outcome is Outcome.REPLAYED
            assert (await js.get_last_msg(bus.DISPATCH_STREAM, work)).data == b"a chunk"

            # A request that names a stream subject as its reply is dropped: answering it
            # would publish there (nats-server lets a service answer what it receives).
            forged = f"events.job.{uuid.uuid4().hex}"
            await gateway.publish("replay.dispatcher", b'{"id": 1}', reply=forged)
            await gateway.publish("replay.dispatcher", b'{"id": "1; drop"}', reply=f"{forged}.x")
            bad = await gateway.request("replay.dispatcher", b'{"id": 1, "subject": "events.job.x"}', timeout=5)
            assert dead_letter_replays.ReplayReply.model_validate_json(bad.data).outcome is Outcome.REFUSED
            for subject in (forged, f"{forged}.x"):
                with pytest.raises(nats.js.errors.NotFoundError):
                    await js.get_last_msg(bus.EVENTS_STREAM, subject)

        # Nobody answers for accounts (not running), or an answer never comes (stuck): unavailable.
        with pytest.raises(Unavailable, match="accounts"):
            await dead_letter_replays.request_replay(gateway, result_id, owner="accounts")
        await op.subscribe("replay.accounts")
        with pytest.raises(Unavailable, match="accounts"):
            await dead_letter_replays.request_replay(gateway, result_id, owner="accounts", within=0.3)
    finally:
        await gateway.close()
        await op.close()
    # Every service stayed within its grants: the server refused none of them anything.
    assert not [line for line in own_nats_users.procs[0].lines if "Violation" in line]
