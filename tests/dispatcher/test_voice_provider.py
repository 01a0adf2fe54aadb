"""The simulated voice provider: behaviour parsing, outcomes predictable from the attempt id,
the outcome mix, durations and time scaling, calls in progress, look-ups and duplicates; and
what a call costs."""

from __future__ import annotations

import asyncio
import collections
import time
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import pytest

from services.dispatcher.providers.base import SenderConfig
from services.dispatcher.providers.voice import (
    FAILURE_ERRORS,
    CallRequest,
    CallResult,
    SimulatedVoiceBehaviour,
    SimulatedVoiceProvider,
    VoiceProvider,
    call_cost,
)

pytestmark = pytest.mark.timeout(60)

INSTANT = {"time_scale": 0}
VARIABLES = {
    "nombre": "María Pérez",
    "empresa": "Banco Ejemplo",
    "monto_total": "$1.234.567",
    "fecha_actual": "2024-06-03",
}


def line(config: dict[str, Any] | None = None) -> SenderConfig:
    return SenderConfig(id=1, account_id="acme", provider="simulated", phone="+56221234567", config=config or {})


def request(attempt_id: str, config: dict[str, Any] | None = None, **kwargs: Any) -> CallRequest:
    return CallRequest(
        attempt_id=attempt_id,
        sender=line(INSTANT if config is None else config),
        to="+56912345678",
        variables=kwargs.pop("variables", VARIABLES),
        **kwargs,
    )


def without_times(result: CallResult) -> tuple:
    return (
        result.status,
        result.call_id,
        result.duration_ms,
        result.transcript,
        result.summary,
        result.sentiment,
        result.recording_url,
        result.collected,
        result.error,
    )


# --- behaviour -------------------------------------------------------------------------------


def test_behaviour_defaults_and_full_parse() -> None:
    assert SimulatedVoiceBehaviour.from_config(None) == SimulatedVoiceBehaviour.from_config({})
    assert SimulatedVoiceBehaviour.from_config({}) == SimulatedVoiceBehaviour(
        answer_ratio=0.6,
        busy_ratio=0.1,
        voicemail_ratio=0.1,
        failure_ratio=0.05,
        duration_s=60.0,
        duration_spread_s=30.0,
        time_scale=1.0,
        seed=0,
    )
    parsed = SimulatedVoiceBehaviour.from_config(
        {
            "answer_ratio": 0.5,
            "busy_ratio": 0.2,
            "voicemail_ratio": 0.1,
            "failure_ratio": 0.2,
            "duration_s": 90,
            "duration_spread_s": 10,
            "time_scale": 0.01,
            "seed": 7,
        }
    )
    assert parsed == SimulatedVoiceBehaviour(
        answer_ratio=0.5,
        busy_ratio=0.2,
        voicemail_ratio=0.1,
        failure_ratio=0.2,
        duration_s=90.0,
        duration_spread_s=10.0,
        time_scale=0.01,
        seed=7,
    )


def test_setting_one_ratio_zeroes_the_others() -> None:
    parsed = SimulatedVoiceBehaviour.from_config({"answer_ratio": 1})
    assert (parsed.answer_ratio, parsed.busy_ratio, parsed.voicemail_ratio, parsed.failure_ratio) == (1, 0, 0, 0)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([], "must be an object"),
        ({"answer_rate": 0.5}, "provider_config: unknown key answer_rate"),
        ({"answer_ratio": 1.5}, "answer_ratio"),
        ({"busy_ratio": -0.1}, "busy_ratio"),
        ({"failure_ratio": True}, "failure_ratio"),
        ({"voicemail_ratio": "0.1"}, "voicemail_ratio"),
        ({"answer_ratio": 0.7, "busy_ratio": 0.4}, "add up to at most 1"),
        ({"duration_s": -1}, "duration_s"),
        ({"duration_spread_s": float("inf")}, "duration_spread_s"),
        ({"time_scale": -0.5}, "time_scale"),
        ({"seed": "1"}, "seed"),
        ({"seed": False}, "seed"),
    ],
)
def test_bad_behaviour_is_refused(config: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimulatedVoiceBehaviour.from_config(config)


async def test_a_line_with_a_bad_config_places_no_call() -> None:
    provider = SimulatedVoiceProvider()
    result = await provider.call(request("a-1", {"answer_ratio": 2}))
    assert result.status == "failed"
    assert result.error.startswith("InvalidConfig: provider_config.answer_ratio: must be at most 1")
    assert provider.calls == {} and await provider.lookup("a-1") is None


# --- outcomes --------------------------------------------------------------------------------


async def test_outcomes_are_predictable_from_the_attempt_id() -> None:
    ids = [f"attempt-{i}" for i in range(200)]
    first, second = SimulatedVoiceProvider(), SimulatedVoiceProvider()
    # Order does not matter: each call's dice come from its own id.
    one = {i: without_times(await first.call(request(i))) for i in ids}
    two = {i: without_times(await second.call(request(i))) for i in reversed(ids)}
    assert one == two
    assert len({r[1] for r in one.values()}) == len(ids)  # call ids are unique
    reseeded = SimulatedVoiceProvider()
    other = {i: without_times(await reseeded.call(request(i, {**INSTANT, "seed": 1}))) for i in ids}
    assert [r[0] for r in other.values()] != [r[0] for r in one.values()]


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"answer_ratio": 0.3, "busy_ratio": 0.3, "voicemail_ratio": 0.2, "failure_ratio": 0.1},
        {"answer_ratio": 1.0},
    ],
)
async def test_the_outcome_mix_follows_the_ratios(config: dict[str, Any]) -> None:
    behaviour = SimulatedVoiceBehaviour.from_config(config)
    provider = SimulatedVoiceProvider()
    n = 2000
    counts = collections.Counter(
        [(await provider.call(request(f"mix-{i}", {**config, **INSTANT}))).status for i in range(n)]
    )
    expected = {
        "completed": behaviour.answer_ratio,
        "busy": behaviour.busy_ratio,
        "voicemail": behaviour.voicemail_ratio,
        "failed": behaviour.failure_ratio,
    }
    expected["no_answer"] = 1 - sum(expected.values())
    for status, share in expected.items():
        # Four standard deviations of a binomial count: never flaky, still catches a wrong mix.
        tolerance = 4 * (n * share * (1 - share)) ** 0.5
        assert abs(counts[status] - n * share) <= tolerance, (status, counts)


async def test_what_each_outcome_carries() -> None:
    provider = SimulatedVoiceProvider()
    config = {**INSTANT, "duration_s": 60, "duration_spread_s": 30}
    results = [await provider.call(request(f"kind-{i}", config)) for i in range(400)]
    by_status = collections.defaultdict(list)
    for result in results:
        by_status[result.status].append(result)
    assert set(by_status) == {"completed", "no_answer", "busy", "voicemail", "failed"}
    for result in by_status["no_answer"] + by_status["busy"] + by_status["failed"]:
        assert result.duration_ms == 0 and not result.transcript and result.sentiment is None
    assert {r.error for r in by_status["failed"]} <= set(FAILURE_ERRORS)
    for result in by_status["voicemail"]:
        assert 5_000 <= result.duration_ms <= 20_000 and "Buzón de voz" in result.transcript
    for result in by_status["completed"]:
        assert 30_000 <= result.duration_ms <= 90_000
        assert result.transcript.startswith("Agente: Hola, ¿hablo con María Pérez?")
        assert "Banco Ejemplo" in result.transcript and result.summary
        assert result.recording_url.endswith(f"{result.call_id}.wav") and result.public_log_url
        assert result.sentiment in ("Positive", "Neutral", "Negative")
    assert {r.sentiment for r in by_status["completed"]} == {"Positive", "Neutral", "Negative"}


async def test_promises_to_pay_fall_within_a_week_and_the_debt() -> None:
    provider = SimulatedVoiceProvider()
    results = [await provider.call(request(f"promise-{i}", {**INSTANT, "answer_ratio": 1})) for i in range(200)]
    promises = [r for r in results if r.collected]
    assert 60 <= len(promises) <= 140  # about half of the answered calls
    today = date(2024, 6, 3)
    for result in promises:
        assert result.sentiment == "Positive"
        promised = date.fromisoformat(result.collected["fecha_pago_cliente"])
        assert today + timedelta(days=1) <= promised <= today + timedelta(days=7)
        amount = int(result.collected["monto_pago_cliente"])
        assert amount in (1_234_567, 617_284)  # all of it, or half rounded up
        assert f"{promised:%d-%m-%Y}" in result.summary
    assert all(not r.collected for r in results if r.sentiment != "Positive")


async def test_a_promise_without_known_debt_or_date_still_makes_sense() -> None:
    provider = SimulatedVoiceProvider()
    results = [
        await provider.call(request(f"bare-{i}", {**INSTANT, "answer_ratio": 1}, variables={})) for i in range(40)
    ]
    promises = [r for r in results if r.collected]
    assert promises
    for result in promises:
        assert 10_000 <= int(result.collected["monto_pago_cliente"]) <= 500_000
        date.fromisoformat(result.collected["fecha_pago_cliente"])
    assert all("¿hablo con el titular?" in r.transcript for r in results)


async def test_conversations_are_cut_at_the_maximum_duration() -> None:
    provider = SimulatedVoiceProvider()
    config = {**INSTANT, "answer_ratio": 1, "duration_s": 600, "duration_spread_s": 0}
    result = await provider.call(request("long", config, max_call_duration_s=60))
    assert result.duration_ms == 60_000


# --- time ----------------------------------------------------------------------------------------


async def test_time_scale_shortens_the_wait() -> None:
    provider = SimulatedVoiceProvider()
    config = {"answer_ratio": 1, "duration_s": 50, "duration_spread_s": 0, "time_scale": 0.01}
    started = time.monotonic()
    result = await provider.call(request("scaled", config))
    elapsed = time.monotonic() - started
    assert result.duration_ms == 50_000  # billed in simulated time
    # 50 s of conversation after 2-10 s of ringing, at 1/100 (the upper bound leaves room for
    # a loaded machine; unscaled it would be a minute).
    assert 0.52 <= elapsed < 2.0
    assert result.started_at is not None and result.ended_at is not None
    assert 0.52 <= (result.ended_at - result.started_at).total_seconds() < 2.0


async def test_unanswered_calls_ring_for_the_ring_timeout() -> None:
    provider = SimulatedVoiceProvider()
    started = time.monotonic()
    result = await provider.call(request("ringing", {"time_scale": 0.01, "answer_ratio": 0}, ring_timeout_s=40))
    assert result.status == "no_answer" and result.duration_ms == 0
    assert 0.40 <= time.monotonic() - started < 2.0


async def test_calls_in_progress_are_counted() -> None:
    provider = SimulatedVoiceProvider()
    config = {"answer_ratio": 1, "duration_s": 20, "duration_spread_s": 0, "time_scale": 0.01}
    calls = [asyncio.create_task(provider.call(request(f"busy-line-{i}", config))) for i in range(25)]
    await asyncio.sleep(0)  # one turn of the loop: every call has started, none can have ended
    assert provider.in_progress == 25
    results = await asyncio.gather(*calls)
    assert provider.in_progress == 0 and provider.max_in_progress == 25
    assert len(provider.calls) == 25 and all(r.status == "completed" for r in results)
    # One at a time, the maximum stays where it was.
    await provider.call(request("after", {**config, "time_scale": 0}))
    assert provider.max_in_progress == 25


# --- record, look-ups and duplicates -------------------------------------------------------------


async def test_lookup_finds_placed_calls_and_awaits_calls_in_progress() -> None:
    provider: VoiceProvider = SimulatedVoiceProvider()
    assert await provider.lookup("never") is None
    config = {"answer_ratio": 1, "duration_s": 10, "duration_spread_s": 0, "time_scale": 0.01}
    call = asyncio.create_task(provider.call(request("looked-up", config)))
    await asyncio.sleep(0)  # one turn: the call has started (a timed sleep could outlast it)
    during = await provider.lookup("looked-up")  # ends with the call
    result = await call
    assert during == result and await provider.lookup("looked-up") is result
    await provider.close()


async def test_a_repeated_attempt_gets_the_original_call() -> None:
    provider = SimulatedVoiceProvider()
    config = {"answer_ratio": 1, "duration_s": 10, "duration_spread_s": 0, "time_scale": 0.01}
    first = asyncio.create_task(provider.call(request("once", config)))
    await asyncio.sleep(0)  # one turn: the call has started (a timed sleep could outlast it)
    while_ringing = asyncio.create_task(provider.call(request("once", config)))
    results = await asyncio.gather(first, while_ringing)
    afterwards = await provider.call(request("once", config))
    assert results[0] == results[1] == afterwards
    assert provider.duplicate_attempts == 2 and list(provider.calls) == ["once"]
    assert provider.max_in_progress == 1


async def test_a_cancelled_call_is_recorded_as_failed() -> None:
    provider = SimulatedVoiceProvider()
    call = asyncio.create_task(provider.call(request("hung-up", {"answer_ratio": 1, "time_scale": 1})))
    await asyncio.sleep(0)  # one turn: the call has started (a timed sleep could outlast it)
    waiter = asyncio.create_task(provider.lookup("hung-up"))
    await asyncio.sleep(0)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    recorded = await waiter
    assert recorded is not None and (recorded.status, recorded.error) == ("failed", "Cancelled")
    assert provider.in_progress == 0 and provider.calls["hung-up"] is recorded


# --- cost ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("duration_ms", "per_minute", "setup", "expected"),
    [
        (0, "100", "10", "10.0000"),  # nothing connected: the setup only
        (1, "100", "10", "11.6667"),  # 1 started second = 1/60 minute, rounded up
        (60_000, "100", "10", "110.0000"),
        (60_001, "100", "10", "111.6667"),  # 61 started seconds
        (61_001, "100", "0", "103.3334"),  # 62 s: 103.3333… rounded up
        (90_000, "0.05", "0.01", "0.0850"),
        (59_000, "1", "0", "0.9834"),  # 0.98333… up
        (30_000, "0", "0", "0.0000"),
        (3_600_000, "12.3456", "0.5", "741.2360"),
    ],
)
def test_call_cost(duration_ms: int, per_minute: str, setup: str, expected: str) -> None:
    cost = call_cost(duration_ms, cost_per_minute=Decimal(per_minute), cost_per_call_setup=Decimal(setup))
    assert cost == Decimal(expected) and str(cost) == expected


def test_call_cost_refuses_negatives() -> None:
    with pytest.raises(ValueError, match="duration_ms"):
        call_cost(-1, cost_per_minute=Decimal(1), cost_per_call_setup=Decimal(0))
    with pytest.raises(ValueError, match="prices"):
        call_cost(1000, cost_per_minute=Decimal(-1), cost_per_call_setup=Decimal(0))
