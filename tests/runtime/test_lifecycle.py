"""Every service process: starts, migrates, serves health SERVING, and on SIGTERM turns
NOT_SERVING and exits 0 within its grace period."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.db import migration_files
from services.runtime.devstack import Stack, grpc_serving
from services.runtime.lifecycle import stop_tasks

SERVICES = ("accounts", "campaigns", "dispatcher")
REPO = Path(__file__).resolve().parents[2]


def stack_on(nats_url: str, database_url: str, tmp_path: Path) -> Stack:
    return Stack(data_dir=tmp_path, database_url=database_url, nats_url=nats_url)


@pytest.mark.parametrize("service", SERVICES)
def test_sigterm_turns_not_serving_then_exits_zero(service: str, own_nats: str, fresh_db: str, tmp_path: Path) -> None:
    stack = stack_on(own_nats, fresh_db, tmp_path)
    grace = 3.0
    proc = stack.start_service(service, SHUTDOWN_GRACE_SECONDS=str(grace))
    addr = stack.addrs[service]
    assert grpc_serving(addr)

    seen: list[int] = []
    watching = threading.Event()

    def watch() -> None:
        with grpc.insecure_channel(addr) as ch:
            try:
                for reply in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=30):
                    seen.append(reply.status)
                    watching.set()
            except grpc.RpcError:
                pass  # the server went away after announcing NOT_SERVING

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    assert watching.wait(10)
    started = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    try:
        code = proc.popen.wait(timeout=grace + 10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{service} still running {grace + 10:.0f}s after SIGTERM:\n{proc.tail()}")
    watcher.join(5)
    assert code == 0, proc.tail()
    assert time.monotonic() - started < grace + 5
    assert seen[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen, seen


@pytest.mark.parametrize("service", SERVICES)
async def test_two_replicas_on_an_empty_database_both_start(
    service: str, own_nats: str, fresh_db: str, tmp_path: Path
) -> None:
    stack = stack_on(own_nats, fresh_db, tmp_path)
    try:
        procs = [stack.start_service(service, wait=False), stack.start_service(service, wait=False)]
        deadline = time.monotonic() + 60
        addrs = []
        for p in procs:
            env_port = _port_of(p)
            addrs.append(f"127.0.0.1:{env_port}")
        while time.monotonic() < deadline and not all(_serving(a) for a in addrs):
            assert all(p.popen.poll() is None for p in procs), [p.tail() for p in procs]
            await asyncio.sleep(0.2)
        assert all(_serving(a) for a in addrs), [p.tail() for p in procs]
        conn = await asyncpg.connect(fresh_db)
        try:
            rows = await conn.fetch(f"SELECT version FROM {service}.schema_migrations ORDER BY version")
        finally:
            await conn.close()
        expected = [v for v, _, _ in migration_files(REPO / "services" / service / "migrations")]
        assert [r["version"] for r in rows] == expected
    finally:
        stack.procs.extend(procs)
        stack.stop()


def _serving(addr: str) -> bool:
    try:
        return grpc_serving(addr)
    except grpc.RpcError:
        return False


def _port_of(proc) -> int:  # type: ignore[no-untyped-def]
    import psutil

    return int(psutil.Process(proc.popen.pid).environ()["GRPC_PORT"])


def test_service_without_database_fails_fast(infra: Stack, tmp_path: Path) -> None:
    stack = Stack(data_dir=tmp_path, database_url="postgresql://postgres@127.0.0.1:1/none", nats_url=infra.nats_url)
    proc = stack.start_service("accounts", wait=False)
    assert proc.popen.wait(timeout=60) != 0


async def test_stopping_ends_a_loop_that_lost_a_cancellation() -> None:
    """As a loop around nats-py's fetch does on Python 3.11 when the cancellation lands as the
    fetch's own wait_for completes: the CancelledError never reaches the loop."""
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed < 3:
                    swallowed += 1
                    continue
                raise

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0.05)
    async with asyncio.timeout(5):
        await stop_tasks([task])
    assert task.cancelled() and swallowed == 3
