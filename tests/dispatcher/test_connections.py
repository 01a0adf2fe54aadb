"""Device connections on a real PostgreSQL and NATS: the poller records what a provider says
and publishes a DeviceEvent only on a change, tells the engine, survives a failing or hanging
provider; ReportSenderState is for the suite's webhooks only; endpoints are the operator's;
the daily cap and its reset at the device's local midnight."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta

import asyncpg
import grpc
import pytest
from pregonero.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc
from pregonero.events.v1 import events_pb2

from services.dispatcher.config import DispatcherSettings
from services.dispatcher.connections import Connections, day_ends_at, device_day
from services.dispatcher.crypto import SecretBox
from services.dispatcher.device_states import DeviceStates
from services.dispatcher.providers.base import DeviceState, SenderConfig
from services.dispatcher.repo import AttemptQ, AttemptsRepo, SenderQ, SendersRepo
from services.dispatcher.senders import Senders
from services.dispatcher.server import DispatcherServicer
from services.runtime.db import check_queries, create_pool
from services.runtime.devstack import Stack
from services.runtime.errors import InvalidArgument, NotFound
from services.runtime.identity import ADMIN, MEMBER, Caller
from tests import signing
from tests.conftest import bus_client, collected

pytestmark = pytest.mark.timeout(20)

INTERNAL = Caller(role=ADMIN, account_id="", user_id="webhooks")


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database, schema="dispatcher", max_size=4)
    try:
        await check_queries(pool, SenderQ)  # the boot check: every query prepares
        await check_queries(pool, AttemptQ)
        yield pool
    finally:
        await pool.close()


def member() -> Caller:
    return Caller(role=MEMBER, account_id=f"cx-{uuid.uuid4().hex[:10]}", user_id="u1")


class Engine:
    """What the send engine is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str]] = []

    def sender_unavailable(self, sender_id: int, reason: str) -> None:
        self.calls.append(("unavailable", sender_id, reason))

    def sender_available(self, sender_id: int) -> None:
        self.calls.append(("available", sender_id, ""))


class Devices:
    """A provider with device states: each device says what the test scripts, or fails."""

    name = "simulated"

    def __init__(self) -> None:
        self.states: dict[int, DeviceState | Exception | None] = {}  # None: hangs
        self.asked: list[int] = []

    async def device_state(self, sender: SenderConfig) -> DeviceState:
        self.asked.append(sender.id)
        state = self.states.get(sender.id, DeviceState("connected"))
        if state is None:
            await asyncio.sleep(60)
        if isinstance(state, Exception):
            raise state
        assert isinstance(state, DeviceState)
        return state


def events(seen: list[events_pb2.DeviceEvent]) -> list[tuple[int, str, str, str]]:
    return [(e.sender_id, e.status, e.reason, e.qr_code) for e in seen]


async def test_the_poller_records_states_and_publishes_only_changes(infra: Stack, pool: asyncpg.Pool) -> None:
    nc, js = await bus_client(infra.nats_url)
    states = DeviceStates(js)
    senders = Senders(SendersRepo(pool), SecretBox("k"), states)
    caller = member()
    devices, engine = Devices(), Engine()
    connections = Connections(
        repo=SendersRepo(pool),
        senders=senders,
        states=states,
        providers={"simulated": devices},
        engine=engine,
        poll_seconds=0.05,
        timeout_seconds=0.5,
    )
    try:
        first = (await senders.create(caller, token="t", secret="s"))["id"]
        second = (await senders.create(caller, token="t", secret="s"))["id"]
        other = (await senders.create(member(), token="t", secret="s", status="inactive"))["id"]

        async def poll() -> None:
            await asyncio.sleep(0.06)  # every device is due again
            await connections.round()

        async with collected(nc, f"events.device.{caller.account_id}", events_pb2.DeviceEvent.FromString) as seen:
            devices.states[second] = DeviceState("qr_needed", "SCAN_QR_CODE", qr_code="UE5H")
            await poll()
            await poll()  # the same again: recorded, not news
            devices.states[first] = DeviceState("connected", quota_left=420)
            devices.states[second] = DeviceState("disconnected", "logged out")
            await poll()
            devices.states[second] = RuntimeError("gateway down")
            await poll()
            devices.states[second] = DeviceState("connected")
            await poll()
            await nc.flush()
        assert other not in devices.asked  # inactive devices are not asked about
        assert [e for e in events(seen) if e[0] == first] == [(first, "connected", "", "")]
        assert [e for e in events(seen) if e[0] == second] == [
            (second, "qr_needed", "SCAN_QR_CODE", "UE5H"),
            (second, "qr_needed", "SCAN_QR_CODE", "UE5H"),  # a QR again: the person scanning needs it
            (second, "disconnected", "logged out", ""),
            # unknown (the provider failed) has no word on the sockets; connected again has
            (second, "connected", "", ""),
        ]
        assert [c for c in engine.calls if c[1] in (first, second)] == [
            ("unavailable", second, "SCAN_QR_CODE"),
            ("unavailable", second, "logged out"),
            # unknown: the provider cannot say, so the device is not kept from sending
            ("available", second, ""),
        ]
        row = await senders.get(caller, first)
        assert (row["connection"], row["quota_left"]) == ("connected", 420)
        assert row["connection_checked_at"] is not None
    finally:
        await nc.close()


async def test_a_failing_or_silent_provider_makes_the_device_unknown(pool: asyncpg.Pool) -> None:
    senders = Senders(SendersRepo(pool), SecretBox("k"))
    caller = member()
    devices = Devices()
    connections = Connections(
        repo=SendersRepo(pool),
        senders=senders,
        states=DeviceStates(None),
        providers={"simulated": devices},
        poll_seconds=60,
        timeout_seconds=0.2,
    )
    broken = (await senders.create(caller, token="t", secret="s"))["id"]
    silent = (await senders.create(caller, token="t", secret="s"))["id"]
    devices.states[broken] = ValueError("bad json")
    devices.states[silent] = None
    configs = await senders.load_for_dispatch([broken, silent])
    await asyncio.gather(connections.ask(configs[broken]), connections.ask(configs[silent]))
    rows = {i: await senders.get(caller, i) for i in (broken, silent)}
    assert (rows[broken]["connection"], rows[broken]["connection_reason"]) == ("unknown", "simulated: ValueError")
    assert (rows[silent]["connection"], rows[silent]["connection_reason"]) == ("unknown", "simulated did not answer")


async def test_the_engine_learns_unavailable_devices_from_the_database(pool: asyncpg.Pool) -> None:
    """A replica that did not record the change (or missed its event) still hears it."""
    senders = Senders(SendersRepo(pool), SecretBox("k"))
    caller = member()
    recorder = Connections(repo=SendersRepo(pool), senders=senders, states=DeviceStates(None), providers={})
    engine = Engine()
    replica = Connections(
        repo=SendersRepo(pool), senders=senders, states=DeviceStates(None), providers={}, engine=engine
    )
    device = (await senders.create(caller, token="t", secret="s"))["id"]
    capped = (await senders.create(caller, token="t", secret="s", daily_limit=1))["id"]
    await recorder.record(device, DeviceState("qr_needed", "SCAN_QR_CODE"))
    await AttemptsRepo(pool).claim_sends(rows=[(f"{uuid.uuid4()}:1:1", str(uuid.uuid4()), 1, capped, 1)])
    await replica.resync()
    await replica.resync()  # told once
    mine = (device, capped)
    assert sorted(c for c in engine.calls if c[1] in mine) == sorted(
        [("unavailable", capped, "daily limit reached"), ("unavailable", device, "SCAN_QR_CODE")]
    )
    await recorder.record(device, DeviceState("connected"))
    await replica.resync()
    assert [c for c in engine.calls if c[1] in mine][-1] == ("available", device, "")


@pytest.fixture
async def stub(pool: asyncpg.Pool) -> AsyncIterator[dispatcher_pb2_grpc.DispatcherServiceStub]:
    senders = Senders(SendersRepo(pool), SecretBox("k"))
    connections = Connections(repo=SendersRepo(pool), senders=senders, states=DeviceStates(None), providers={})
    server = signing.server("dispatcher")
    dispatcher_pb2_grpc.add_DispatcherServiceServicer_to_server(DispatcherServicer(senders, connections), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = signing.channel(f"127.0.0.1:{port}", "dispatcher")
    try:
        yield dispatcher_pb2_grpc.DispatcherServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(0)


async def test_only_the_suites_webhooks_report_device_states(
    pool: asyncpg.Pool, stub: dispatcher_pb2_grpc.DispatcherServiceStub
) -> None:
    caller = member()
    repo = SendersRepo(pool)
    device = (await Senders(repo, SecretBox("k")).create(caller, token="t", secret="s"))["id"]
    session = f"s-{uuid.uuid4().hex[:8]}"
    assert await repo.set_session(sender_id=device, account_id=caller.account_id, session=session)
    report = dispatcher_pb2.ReportSenderStateRequest(
        provider="simulated", session=session, connection="qr_needed", reason="SCAN_QR_CODE", qr_code="UE5H"
    )
    for who in (caller, Caller(role=ADMIN, account_id=caller.account_id, user_id="ops")):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ReportSenderState(report, metadata=who.metadata(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await repo.get(sender_id=device, account_id=caller.account_id))["connection"] == "unknown"

    sender = await stub.ReportSenderState(report, metadata=INTERNAL.metadata(), timeout=5)
    assert (sender.id, sender.connection, sender.connection_reason, sender.session) == (
        device,
        "qr_needed",
        "SCAN_QR_CODE",
        session,
    )
    for session_name, connection, code in (
        ("nope", "connected", grpc.StatusCode.NOT_FOUND),
        (session, "asleep", grpc.StatusCode.INVALID_ARGUMENT),
    ):
        bad = dispatcher_pb2.ReportSenderStateRequest(provider="simulated", session=session_name, connection=connection)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.ReportSenderState(bad, metadata=INTERNAL.metadata(), timeout=5)
        assert failed.value.code() == code


async def test_report_finds_the_device_by_its_session_only(pool: asyncpg.Pool) -> None:
    repo = SendersRepo(pool)
    connections = Connections(repo=repo, senders=Senders(repo, SecretBox("k")), states=DeviceStates(None), providers={})
    with pytest.raises(InvalidArgument):
        await connections.report(INTERNAL, provider="simulated", session="", connection="connected")
    with pytest.raises(NotFound):
        await connections.report(INTERNAL, provider="waha", session="never-made", connection="connected")


async def test_a_tenant_cannot_name_where_requests_go(pool: asyncpg.Pool) -> None:
    unset = DispatcherSettings(database_url="postgresql://x/y").unconfigured_providers()
    senders = Senders(SendersRepo(pool), SecretBox("k"), unconfigured=unset)
    caller = member()
    for provider, config in (
        ("whatsapp_cloud", '{"phone_number_id": "1065", "base_url": "http://attacker.example"}'),
        ("simulated", '{"base_url": "http://127.0.0.1:9"}'),
    ):
        with pytest.raises(InvalidArgument, match="base_url is set by the operator"):
            await senders.create(caller, token="t", secret="s", provider=provider, provider_config_json=config)
    row = await senders.create(caller, token="t", secret="s")
    with pytest.raises(InvalidArgument, match="base_url is set by the operator"):
        await senders.update(caller, row["id"], '{"provider_config": {"base_url": "http://attacker.example"}}')
    for provider in ("wablas", "waha"):
        with pytest.raises(InvalidArgument, match=f"{provider} is not configured on this deployment"):
            await senders.create(caller, token="t", secret="s", provider=provider)
    with pytest.raises(InvalidArgument, match="timezone must be an IANA zone"):
        await senders.create(caller, token="t", secret="s", provider_config_json='{"timezone": "Mars/Olympus"}')
    with pytest.raises(InvalidArgument, match="daily_limit must be between 0 and 100000"):
        await senders.create(caller, token="t", secret="s", daily_limit=100_001)
    zone = '{"timezone": "America/Argentina/Buenos_Aires"}'
    zoned = await senders.create(caller, token="t", secret="s", provider_config_json=zone)
    assert (
        "timezone" not in (await senders.load_for_dispatch([zoned["id"]]))[zoned["id"]].config
    )  # the suite's, not the provider's


def test_provider_endpoints_are_operator_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = DispatcherSettings(database_url="postgresql://x/y")
    assert defaults.whatsapp_graph_url == "https://graph.facebook.com" and defaults.device_poll_seconds == 30
    monkeypatch.setenv("WHATSAPP_GRAPH_URL", "http://127.0.0.1:8081/")
    monkeypatch.setenv("WABLAS_BASE_URL", "https://texas.wablas.com")
    monkeypatch.setenv("WAHA_BASE_URL", "http://waha:3000")
    monkeypatch.setenv("WAHA_WEBHOOK_URL", "https://api.example.com/webhooks/waha")
    settings = DispatcherSettings(database_url="postgresql://x/y")
    assert settings.whatsapp_graph_url == "http://127.0.0.1:8081"
    assert settings.unconfigured_providers() == {}
    monkeypatch.setenv("WABLAS_BASE_URL", "texas.wablas.com")
    with pytest.raises(ValueError, match="is not an http"):
        DispatcherSettings(database_url="postgresql://x/y")
    monkeypatch.setenv("WABLAS_BASE_URL", "https://texas.wablas.com")
    with pytest.raises(ValueError, match="WAHA_WEBHOOK_HMAC_KEY"):
        DispatcherSettings(
            database_url="postgresql://x/y",
            nats_url="nats://dispatcher:s3cret@nats:4222",
            environment="production",
            pregonero_secret_key="k" * 40,
        )


@pytest.mark.parametrize(
    ("zone", "at", "day", "ends"),
    [
        # Chile in summer (UTC-3): the day turns at 03:00 UTC.
        ("", "2026-12-07T02:59:59+00:00", date(2026, 12, 6), "2026-12-07T03:00:00+00:00"),
        ("", "2026-12-07T03:00:00+00:00", date(2026, 12, 7), "2026-12-08T03:00:00+00:00"),
        # Chile in winter (UTC-4).
        ("America/Santiago", "2026-07-01T03:59:59+00:00", date(2026, 6, 30), "2026-07-01T04:00:00+00:00"),
        # Chile's clocks go forward at its midnight (2026-09-06): that day starts at 01:00 -03.
        ("America/Santiago", "2026-09-06T03:59:59+00:00", date(2026, 9, 5), "2026-09-06T04:00:00+00:00"),
        ("America/Argentina/Buenos_Aires", "2026-12-07T02:59:59+00:00", date(2026, 12, 6), "2026-12-07T03:00:00+00:00"),
        ("Europe/Madrid", "2026-12-06T23:00:00+00:00", date(2026, 12, 7), "2026-12-07T23:00:00+00:00"),
    ],
)
async def test_a_devices_day_is_its_local_day(pool: asyncpg.Pool, zone: str, at: str, day: date, ends: str) -> None:
    instant = datetime.fromisoformat(at)
    assert device_day(zone, instant) == day
    assert day_ends_at(zone, instant) == datetime.fromisoformat(ends)
    assert device_day(zone, day_ends_at(zone, instant)) == day + timedelta(days=1)
    config = f'{{"timezone": "{zone}"}}' if zone else "{}"
    # The database counts in the same day (the claim and GET /devices use sender_day).
    assert await pool.fetchval("SELECT sender_day($1::jsonb, $2)", config, instant) == day


async def test_the_daily_cap_holds_and_starts_again_on_the_devices_next_day(pool: asyncpg.Pool) -> None:
    senders = Senders(SendersRepo(pool), SecretBox("k"))
    attempts = AttemptsRepo(pool)
    caller = member()
    device = (await senders.create(caller, token="t", secret="s", daily_limit=3))["id"]
    free = (await senders.create(caller, token="t", secret="s"))["id"]
    batch = str(uuid.uuid4())

    def rows(sender: int, n: int, start: int = 0) -> list[tuple[str, str, int, int, int]]:
        return [(f"{batch}:{sender}:{i}", batch, i, sender, 1) for i in range(start, start + n)]

    claimed = await attempts.claim_sends(rows=rows(device, 5) + rows(free, 5))
    assert len([a for a in claimed if f":{device}:" in a]) == 3  # the first three asked for
    assert {f"{batch}:{device}:{i}" for i in range(3)} <= claimed and len(claimed) == 8
    assert not await attempts.claim_sends(rows=rows(device, 1, start=10))
    assert (await senders.get(caller, device))["sent_today"] == 3
    assert (await senders.get(caller, free))["sent_today"] == 5
    with pytest.raises(asyncpg.CheckViolationError, match="over its daily limit"):
        await pool.execute("UPDATE sender_days SET sent = sent + 1 WHERE sender_id = $1", device)

    # Its local midnight: today's count becomes yesterday's, and a new day has room again.
    await pool.execute("UPDATE sender_days SET day = day - 1 WHERE sender_id = $1", device)
    assert (await senders.get(caller, device))["sent_today"] == 0
    assert len(await attempts.claim_sends(rows=rows(device, 2, start=20))) == 2
    # A lower cap than what was sent today takes effect at once.
    await senders.update(caller, device, '{"daily_limit": 1}')
    version = await pool.fetchval("SELECT version FROM senders WHERE id = $1", device)
    assert not await attempts.claim_sends(rows=[(f"{batch}:x", batch, 99, device, version)])
