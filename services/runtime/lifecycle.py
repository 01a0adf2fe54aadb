"""One lifecycle for every process.

start: logs → traces (tracing.py, when exported) → metrics endpoint (metrics.py) → Postgres
pool → migrations → NATS + topology + dead-letter replays (answered by every service,
dead_letter_replays.py) → gRPC server → health SERVING (which also answers about the
database: database_health.py).
SIGTERM/SIGINT: health NOT_SERVING → server.stop(grace) → background tasks stopped →
NATS drained → pool closed → exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from . import bus, db, dead_letter_replays, metrics, nats_auth, tracing
from .database_health import HealthWithDatabase
from .logs import setup_logging
from .rpc import SERVER_OPTIONS, ServerInterceptor
from .service_auth import Callers, Keyring
from .settings import BaseServiceSettings, GrpcServiceSettings

log = logging.getLogger("pregonero.lifecycle")


@dataclass
class Runtime:
    """The connections a service is built from, opened and closed in one place."""

    settings: BaseServiceSettings
    # Signs this process's calls to the other services and verifies theirs.
    keyring: Keyring = field(init=False)
    pool: asyncpg.Pool | None = None
    nc: NATS | None = None
    js: JetStreamContext | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # Work that finishes rather than stops on shutdown (calls in progress), with how long it may take.
    drainers: list[tuple[Callable[[], Awaitable[None]], float]] = field(default_factory=list)
    metrics_server: tuple[Any, Any] | None = None

    def __post_init__(self) -> None:
        # Before anything is opened: a process without its keys could serve nobody.
        self.keyring = Keyring.from_settings(self.settings)

    def serve_metrics(self) -> None:
        """This process's /metrics, on METRICS_PORT (0: a free port, logged)."""
        self.metrics_server = metrics.serve_metrics(self.settings.metrics_port, self.settings.metrics_host)

    async def open(self, *, schema: str | None, migrations: Path | None, database: bool = True) -> None:
        """`database=False`: no pool (the gateway keeps no data, and holds no credentials for it)."""
        s = self.settings
        if database:
            self.pool = await db.create_pool(
                s.database_url, schema=schema, min_size=s.db_pool_min, max_size=s.db_pool_max
            )
            if schema and migrations:
                async with self.pool.acquire() as conn:
                    await db.migrate(conn, schema=schema, directory=migrations)
        self.nc = await bus.connect(s.nats_url, name=s.service_name)
        self.js = self.nc.jetstream()
        await bus.ensure_topology(self.js)
        # The NATS user it logs in as (its service's name without one, development only).
        user = nats_auth.user_of(s.nats_url)
        service = user if user in nats_auth.ROLES else s.service_name
        if service in nats_auth.ROLES:
            await dead_letter_replays.answer_replays(self.nc, self.js, service=service)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """A background loop (consumer, feeder). If it dies unexpectedly the process stops,
        so an orchestrator restarts it instead of leaving a zombie replica."""
        task = asyncio.create_task(coro, name=name)

        def done(t: asyncio.Task[Any]) -> None:
            if not t.cancelled() and t.exception() is not None and not self.stopping.is_set():
                log.error("background task %s died", name, exc_info=t.exception())
                self.stopping.set()

        task.add_done_callback(done)
        self.tasks.append(task)
        return task

    def on_stop(self, drain: Callable[[], Awaitable[None]], *, timeout: float) -> None:
        """`drain` runs when the process stops, before the background loops are cancelled."""
        self.drainers.append((drain, timeout))

    async def drain(self) -> None:
        async def one(drain: Callable[[], Awaitable[None]], seconds: float) -> None:
            try:
                async with asyncio.timeout(seconds):
                    await drain()
            except TimeoutError:
                log.warning("drain did not finish within %.0fs", seconds)

        await asyncio.gather(*(one(d, t) for d, t in self.drainers), return_exceptions=True)

    async def close(self) -> None:
        await stop_tasks(self.tasks)
        if self.nc is not None and self.nc.is_connected:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        if self.pool is not None:
            await self.pool.close()
        metrics.stop_metrics(self.metrics_server)


async def stop_tasks(tasks: list[asyncio.Task[Any]], *, within: float = 10.0) -> None:
    """Cancel the tasks and wait until they have ended. A cancellation is repeated while a
    task goes on: on Python 3.11 `asyncio.wait_for` (inside nats-py's fetch, among others)
    swallows one that lands just as the awaited call completes (CPython gh-86296), and a
    loop that lost it would keep the process up for ever."""
    deadline = asyncio.get_running_loop().time() + within
    pending = [t for t in tasks if not t.done()]
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            log.warning("tasks still running at exit: %s", ", ".join(t.get_name() for t in pending))
            return
        _, still = await asyncio.wait(pending, timeout=min(0.5, left))
        pending = list(still)
    for task in tasks:  # collect their outcomes, so none is reported as never retrieved
        if not task.cancelled():
            task.exception()


# A service's own wiring: add servicers to the server, start background loops; returns the
# fully-qualified gRPC service names it serves (for health and reflection).
Setup = Callable[[Runtime, grpc.aio.Server], Awaitable[list[str]]]


def install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def grpc_server(
    settings: BaseServiceSettings, keyring: Keyring, callers: Mapping[str, frozenset[str]] | None = None
) -> grpc.aio.Server:
    """A server that checks every caller. Reflection describes every RPC to whoever asks: a
    help while developing (grpcurl needs no token for it), a map for an attacker in
    production, where add_health does not register it."""
    interceptor = ServerInterceptor(keyring, Callers(callers, reflection=settings.is_development))
    return grpc.aio.server(interceptors=[*tracing.grpc_server_interceptors(), interceptor], options=SERVER_OPTIONS)


def add_health(
    server: grpc.aio.Server, settings: BaseServiceSettings, names: list[str], pool: asyncpg.Pool | None = None
) -> health.aio.HealthServicer:
    """Health for probes, and reflection outside production only."""
    # Also answers about the database (database_health.py): the gateway's /health reports it.
    health_servicer = HealthWithDatabase(pool)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if settings.is_development:
        reflection.enable_server_reflection(
            [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server,
        )
    return health_servicer


async def serve_grpc(
    settings: GrpcServiceSettings,
    *,
    schema: str,
    migrations: Path,
    setup: Setup,
    callers: Mapping[str, frozenset[str]] | None = None,
) -> None:
    """`callers`: the RPCs other services than the gateway may call (service_auth.Callers)."""
    setup_logging(settings.service_name, settings.log_level)
    tracing.setup_tracing(settings.service_name)
    rt = Runtime(settings)
    install_signal_handlers(rt.stopping)
    rt.serve_metrics()
    await rt.open(schema=schema, migrations=migrations)

    server = grpc_server(settings, rt.keyring, callers)
    names = await setup(rt, server)
    health_servicer = add_health(server, settings, names, rt.pool)
    port = server.add_insecure_port(settings.grpc_listen)
    await server.start()
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving on %s:%d", settings.grpc_host, port)

    await rt.stopping.wait()
    log.info("shutting down: grace %.1fs", settings.shutdown_grace_seconds)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(settings.shutdown_grace_seconds)
    await rt.drain()
    await rt.close()
    log.info("stopped")


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Entry point of every `python -m services.<svc>`."""
    asyncio.run(main())


class Rounds:
    """A background loop of rounds: `step` does one round and says how much it did; when it
    did nothing, the loop sleeps until `wake()` or `idle_wait` seconds. A failed round is
    logged and retried a second later: the loop itself must never die."""

    def __init__(self, step: Callable[[], Awaitable[int]], *, name: str, idle_wait: float) -> None:
        self.step, self.name, self.idle_wait = step, name, idle_wait
        self.wakeup = asyncio.Event()

    def wake(self) -> None:
        self.wakeup.set()

    async def run(self) -> None:
        while True:
            done = 0
            try:
                done = await self.step()
            except Exception:  # noqa: BLE001 - retried below
                log.exception("%s round failed", self.name)
                await asyncio.sleep(1)
            if not done:
                self.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), self.idle_wait)
