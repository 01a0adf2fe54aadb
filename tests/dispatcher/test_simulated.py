"""The simulated provider: behaviour parsing, the failure mix, dedup on attempt ids, latency,
and the HTTP server whose record outlives its clients."""

from __future__ import annotations

import asyncio
import collections
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.dispatcher.providers.base import SenderConfig, SendRequest, SendResult
from services.dispatcher.providers.simulated import (
    DEFAULT_RECORD,
    FAILURE_ERRORS,
    HttpSimulatedProvider,
    SimulatedBehaviour,
    SimulatedProvider,
    SimulationRecord,
    make_simulated,
)
from services.runtime.devstack import free_port

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]


def sender(config: dict[str, Any] | None = None, sender_id: int = 1) -> SenderConfig:
    return SenderConfig(id=sender_id, account_id="acme", provider="simulated", config=config or {})


def req(s: SenderConfig, attempt_id: str | None = None, to: str = "+56912345678") -> SendRequest:
    return SendRequest(attempt_id=attempt_id or uuid.uuid4().hex, sender=s, to=to, text="hola")


# --- behaviour -------------------------------------------------------------------------


def test_behaviour_defaults_and_full_parse() -> None:
    assert SimulatedBehaviour.from_config({}) == SimulatedBehaviour(
        latency_ms=0.0, latency_jitter_ms=0.0, failure_ratio=0.0, rate_limit_ratio=0.0, seed=None
    )
    b = SimulatedBehaviour.from_config(
        {"latency_ms": 120, "latency_jitter_ms": 30.5, "failure_ratio": 0.1, "rate_limit_ratio": 0.25, "seed": 7}
    )
    assert (b.latency_ms, b.latency_jitter_ms, b.failure_ratio, b.rate_limit_ratio, b.seed) == (
        120.0,
        30.5,
        0.1,
        0.25,
        7,
    )
    assert SimulatedBehaviour.from_config(b.to_config()) == b


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ({"latency_ms": -1}, "latency_ms"),
        ({"latency_jitter_ms": -0.5}, "latency_jitter_ms"),
        ({"latency_ms": "50"}, "latency_ms"),
        ({"latency_ms": True}, "latency_ms"),
        ({"latency_ms": float("inf")}, "latency_ms"),
        ({"failure_ratio": 1.5}, "failure_ratio"),
        ({"failure_ratio": -0.1}, "failure_ratio"),
        ({"failure_ratio": float("nan")}, "failure_ratio"),
        ({"rate_limit_ratio": 2}, "rate_limit_ratio"),
        ({"rate_limit_ratio": None}, "rate_limit_ratio"),
        ({"failure_ratio": 0.6, "rate_limit_ratio": 0.6}, "failure_ratio + rate_limit_ratio"),
        ({"seed": "42"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": False}, "seed"),
        ({"failure_rate": 0.5}, "failure_rate"),
        (["latency_ms"], "object"),
    ],
)
def test_invalid_behaviour_is_refused_with_the_key_named(config: Any, names: str) -> None:
    with pytest.raises(ValueError, match=names.replace("+", r"\+")):
        SimulatedBehaviour.from_config(config)


async def test_invalid_config_fails_the_send_without_raising() -> None:
    provider = SimulatedProvider()
    result = await provider.send(req(sender({"failure_ratio": 3})))
    assert result.status == "failed" and "failure_ratio" in result.error
    assert provider.record.count() == 0 and provider.record.rejected == 1


# --- in process -------------------------------------------------------------------------


async def test_seeded_failure_ratio_is_honoured_and_reproducible() -> None:
    config = {"failure_ratio": 0.2, "seed": 1234}

    async def run() -> tuple[list[str], SimulationRecord]:
        provider = SimulatedProvider()
        s = sender(config)
        results = [await provider.send(req(s, f"a-{i}")) for i in range(2000)]
        return [r.status if r.status == "sent" else r.error for r in results], provider.record

    outcomes, record = await run()
    counts = collections.Counter(outcomes)
    failed = sum(counts[e] for e in FAILURE_ERRORS)
    assert 0.17 * 2000 <= failed <= 0.23 * 2000, counts
    # Both kinds of failure show up, and nothing else does.
    assert set(counts) == {"sent", *FAILURE_ERRORS}
    assert record.count() == counts["sent"] and record.rejected == failed
    assert (await run())[0] == outcomes


async def test_failures_and_rate_limits_share_one_draw() -> None:
    provider = SimulatedProvider()
    s = sender({"failure_ratio": 0.3, "rate_limit_ratio": 0.3, "seed": 5})
    statuses = collections.Counter([(await provider.send(req(s))).status for _ in range(2000)])
    assert 0.26 * 2000 <= statuses["failed"] <= 0.34 * 2000, statuses
    assert 0.26 * 2000 <= statuses["rate_limited"] <= 0.34 * 2000, statuses
    assert provider.record.count() == statuses["sent"]


async def test_rate_limited_replies_carry_retry_after_and_are_not_accepted() -> None:
    provider = SimulatedProvider()
    s = sender({"rate_limit_ratio": 1.0})
    results = [await provider.send(req(s, f"rl-{i}")) for i in range(20)]
    assert all(r.status == "rate_limited" and 0.5 <= r.retry_after <= 5 for r in results)
    assert provider.record.count() == 0 and provider.record.rejected == 20
    assert await provider.lookup("rl-0", s) is None


async def test_a_repeated_attempt_is_recorded_once_and_keeps_its_message_id() -> None:
    record = SimulationRecord()
    provider = SimulatedProvider(record)
    s = sender()
    first = await provider.send(req(s, "dup-1"))
    second = await provider.send(req(s, "dup-1"))
    assert first.status == second.status == "sent"
    assert first.provider_message_id.startswith("sim-")
    assert second.provider_message_id == first.provider_message_id
    assert record.count() == 1 and record.duplicate_attempts == 1
    # Idempotency wins over the dice: a sender now configured to fail still answers the
    # accepted attempt as accepted, and still does not send it again.
    failing = sender({"failure_ratio": 1.0})
    third = await provider.send(req(failing, "dup-1"))
    assert third.status == "sent" and third.provider_message_id == first.provider_message_id
    assert record.count() == 1 and record.duplicate_attempts == 2
    assert [e.attempt_id for e in record.entries()] == ["dup-1"]


async def test_a_refused_attempt_can_be_sent_again() -> None:
    record = SimulationRecord()
    provider = SimulatedProvider(record)
    assert (await provider.send(req(sender({"failure_ratio": 1.0}, sender_id=2), "retry-1"))).status == "failed"
    assert (await provider.send(req(sender({}, sender_id=2), "retry-1"))).status == "sent"
    assert record.count() == 1 and record.duplicate_attempts == 0 and record.rejected == 1


async def test_record_entries_lookup_and_reset() -> None:
    record = SimulationRecord()
    provider = SimulatedProvider(record)
    s = sender(sender_id=9)
    before = time.time()
    sent = await provider.send(req(s, "r-1", to="+5491112345678"))
    await provider.send(req(s, "r-2"))
    (entry, _) = record.entries()
    assert entry == ("r-1", 9, "+5491112345678", "hola", entry.accepted_at)
    assert before <= entry.accepted_at <= time.time()
    found = record.lookup("r-1")
    assert found is not None and found.message_id == sent.provider_message_id and found.entry == entry
    assert [e.attempt_id for e in record.entries(since=1)] == ["r-2"]
    looked = await provider.lookup("r-1", s)
    assert looked is not None and looked.status == "sent" and looked.provider_message_id == sent.provider_message_id
    record.reset()
    assert record.count() == 0 and record.entries() == [] and record.lookup("r-1") is None
    again = await provider.send(req(s, "r-1"))
    # Ids are never reused after a reset.
    assert again.provider_message_id != sent.provider_message_id


async def test_latency_is_applied() -> None:
    provider = SimulatedProvider()
    s = sender({"latency_ms": 50})
    started = time.perf_counter()
    assert (await provider.send(req(s))).status == "sent"
    assert time.perf_counter() - started >= 0.045
    # Sends sleep concurrently, not one after the other (that would take 20 x 50 ms = 1 s).
    started = time.perf_counter()
    await asyncio.gather(*(provider.send(req(s)) for _ in range(20)))
    assert 0.045 <= time.perf_counter() - started < 0.9


async def test_jitter_spreads_latency_around_the_mean() -> None:
    provider = SimulatedProvider()
    s = sender({"latency_ms": 30, "latency_jitter_ms": 20, "seed": 3})
    took = []
    for _ in range(12):
        started = time.perf_counter()
        await provider.send(req(s))
        took.append(time.perf_counter() - started)
    # The upper bound only rules out a runaway delay; a loaded machine adds its own wait.
    assert min(took) >= 0.009 and max(took) < 1.0
    assert max(took) - min(took) > 0.01  # not a constant delay


def test_zero_latency_send_completes_without_suspending() -> None:
    provider = SimulatedProvider()
    coro = provider.send(req(sender()))
    # The coroutine finishes on its first step: no sleep, no scheduling round-trip.
    with pytest.raises(StopIteration) as done:
        coro.send(None)
    assert done.value.value.status == "sent"


async def test_behaviour_follows_config_changes_but_survives_rebuilt_configs() -> None:
    provider = SimulatedProvider()
    assert (await provider.send(req(sender({}, sender_id=4)))).status == "sent"
    assert (await provider.send(req(sender({"failure_ratio": 1.0}, sender_id=4)))).status == "failed"

    # A caller that rebuilds SenderConfig (and its dict) per send sees one seeded stream,
    # exactly as a caller that reuses one object does.
    config = {"failure_ratio": 0.5, "seed": 11}
    reused = sender(dict(config), sender_id=5)
    same = [(await provider.send(req(reused))).status for _ in range(200)]
    other = SimulatedProvider()
    rebuilt = [(await other.send(req(sender(dict(config), sender_id=5)))).status for _ in range(200)]
    assert rebuilt == same and len(set(same)) == 2


async def test_make_simulated() -> None:
    local = make_simulated(None)
    assert isinstance(local, SimulatedProvider) and local.record is DEFAULT_RECORD
    remote = make_simulated("http://127.0.0.1:1/")
    try:
        assert isinstance(remote, HttpSimulatedProvider) and remote.base_url == "http://127.0.0.1:1"
    finally:
        await remote.close()


# --- over HTTP ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    # A file, not a pipe: nobody reads a pipe while tests run, and a full one blocks the server.
    log = tmp_path_factory.mktemp("sim_server") / "out.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.dispatcher.providers.sim_server", "--port", str(port)],
            env={**os.environ, "PYTHONPATH": f"{REPO / 'gen'}:{REPO}"},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"sim server exited: {log.read_text()}"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "sim server did not answer /health in 20s"
            time.sleep(0.1)
        yield url
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture
async def http_provider(sim_url: str) -> AsyncIterator[HttpSimulatedProvider]:
    async with httpx.AsyncClient() as admin:
        assert (await admin.post(f"{sim_url}/v1/reset")).status_code == 200
    provider = HttpSimulatedProvider(sim_url)
    yield provider
    await provider.close()


async def record_of(url: str, **params: int) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"{url}/v1/record", params=params)
        r.raise_for_status()
        return dict(r.json())


async def test_http_sends_and_lookups(sim_url: str, http_provider: HttpSimulatedProvider) -> None:
    s = sender(sender_id=21)
    sent = await http_provider.send(req(s, "h-1", to="+56911112222"))
    assert sent.status == "sent" and sent.provider_message_id.startswith("sim-")
    again = await http_provider.send(req(s, "h-1", to="+56911112222"))
    assert again.status == "sent" and again.provider_message_id == sent.provider_message_id
    looked = await http_provider.lookup("h-1", s)
    assert looked is not None and looked.status == "sent" and looked.provider_message_id == sent.provider_message_id
    assert await http_provider.lookup("never-sent", s) is None
    # Attempt ids are path-escaped.
    odd = "x/y?z #1"
    assert (await http_provider.send(req(s, odd))).status == "sent"
    assert await http_provider.lookup(odd, s) is not None
    async with httpx.AsyncClient() as client:
        detail = (await client.get(f"{sim_url}/v1/messages/h-1")).json()
    assert detail["to"] == "+56911112222" and detail["sender_id"] == 21
    assert detail["message_id"] == sent.provider_message_id and detail["accepted_at"] <= time.time()
    record = await record_of(sim_url)
    assert record["count"] == 2 and record["duplicate_attempts"] == 1 and record["rejected"] == 0


async def test_http_record_pages(sim_url: str, http_provider: HttpSimulatedProvider) -> None:
    s = sender(sender_id=22)
    ids = [f"p-{i:03d}" for i in range(25)]
    results = await asyncio.gather(*(http_provider.send(req(s, a)) for a in ids))
    assert all(r.status == "sent" for r in results)
    seen: list[list[Any]] = []
    since = 0
    while True:
        page = await record_of(sim_url, since=since, limit=10)
        assert page["count"] == 25
        if not page["entries"]:
            break
        assert len(page["entries"]) <= 10
        seen.extend(page["entries"])
        since = page["next"]
    assert sorted(e[0] for e in seen) == ids
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{sim_url}/v1/record", params={"since": "x"})).status_code == 400
        assert (await client.get(f"{sim_url}/v1/record", params={"since": -1})).status_code == 400
    assert all(len(e) == 4 and e[1] == 22 and e[2] == "+56912345678" for e in seen)


async def test_http_rate_limits_and_failures_map_to_results(sim_url: str, http_provider: HttpSimulatedProvider) -> None:
    limited = await http_provider.send(req(sender({"rate_limit_ratio": 1.0}, sender_id=23), "rl-1"))
    assert limited.status == "rate_limited" and limited.retry_after >= 1
    failed = await http_provider.send(req(sender({"failure_ratio": 1.0}, sender_id=24), "f-1"))
    assert failed.status == "failed" and failed.error in FAILURE_ERRORS
    invalid = await http_provider.send(req(sender({"failure_ratio": 7}, sender_id=25), "bad-1"))
    assert invalid.status == "failed" and "failure_ratio" in invalid.error
    record = await record_of(sim_url)
    assert record["count"] == 0 and record["rejected"] == 2
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{sim_url}/v1/messages", json={"behaviour": {"rate_limit_ratio": 1.0}})
        assert r.status_code == 400 and "attempt_id" in r.json()["error"]
        r = await client.post(
            f"{sim_url}/v1/messages", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400
        r = await client.post(
            f"{sim_url}/v1/messages",
            json={"attempt_id": "rl-2", "sender_id": 23, "to": "+1", "text": "", "behaviour": {"rate_limit_ratio": 1}},
        )
        assert r.status_code == 429 and r.headers["retry-after"] == "1"


async def test_http_seeded_failure_ratio(sim_url: str, http_provider: HttpSimulatedProvider) -> None:
    s = sender({"failure_ratio": 0.25, "seed": 99}, sender_id=26)
    slots = asyncio.Semaphore(16)  # as the dispatcher bounds a sender's sends in flight

    async def one(i: int) -> SendResult:
        async with slots:
            return await http_provider.send(req(s, f"s-{i}"))

    results = await asyncio.gather(*(one(i) for i in range(200)))
    failed = sum(r.status == "failed" for r in results)
    assert 0.15 * 200 <= failed <= 0.35 * 200
    record = await record_of(sim_url)
    assert record["count"] == 200 - failed and record["rejected"] == failed


async def test_http_record_outlives_its_client(sim_url: str, http_provider: HttpSimulatedProvider) -> None:
    s = sender(sender_id=27)
    sent = await http_provider.send(req(s, "survivor"))
    assert sent.status == "sent"
    await http_provider.close()
    fresh = HttpSimulatedProvider(sim_url)
    try:
        found = await fresh.lookup("survivor", s)
        assert found is not None and found.provider_message_id == sent.provider_message_id
    finally:
        await fresh.close()


async def test_http_unreachable_server() -> None:
    provider = HttpSimulatedProvider(f"http://127.0.0.1:{free_port()}", timeout=2)
    try:
        result = await provider.send(req(sender()))
        assert result.status == "failed" and result.error == "ConnectError"
        # "Not found" would license a second send; an unreachable server is not an answer.
        with pytest.raises(httpx.ConnectError):
            await provider.lookup("anything", sender())
    finally:
        await provider.close()


async def test_http_read_timeout_is_unknown_never_failed(sim_url: str) -> None:
    provider = HttpSimulatedProvider(sim_url, timeout=0.2)
    try:
        s = sender({"latency_ms": 500}, sender_id=28)
        result = await provider.send(req(s, "slow-1"))
        # The request reached the server: reporting it failed would let retry-failed send it twice.
        assert result.status == "unknown" and result.error == "ReadTimeout"
        # The outcome was only unknown: the server accepted it after all, and lookup says so.
        await asyncio.sleep(0.6)
        found = await provider.lookup("slow-1", s)
        assert found is not None and found.status == "sent"
    finally:
        await provider.close()


async def test_http_replies_without_a_json_error_and_failed_lookups() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, text="upstream down")

    client = httpx.AsyncClient(transport=httpx.MockTransport(broken))
    provider = HttpSimulatedProvider("http://sim.invalid", client)
    try:
        result = await provider.send(req(sender()))
        assert result.status == "failed" and result.error == "HTTP 503"
        with pytest.raises(httpx.HTTPStatusError):
            await provider.lookup("anything", sender())
        await provider.close()
        assert not client.is_closed  # a client handed in belongs to the caller
    finally:
        await client.aclose()


def test_bounded_record_keeps_the_newest_sends_with_stable_ids() -> None:
    record = SimulationRecord(capacity=10)
    ids = [record.accept(f"a{i}", 1, f"+5690000{i:04d}", "hi") for i in range(25)]
    assert record.count() == 25
    assert len(record.entries()) <= 10
    assert record.lookup("a0") is None  # dropped, not remembered
    newest = record.lookup("a24")
    assert newest is not None and newest.message_id == ids[24] and newest.entry.to == "+56900000024"
    assert record.accept("a24", 1, "+56900000024", "hi") == ids[24]
    assert record.duplicate_attempts == 1
    assert [e.attempt_id for e in record.entries(since=23)] == ["a23", "a24"]
