"""The `retell` voice adapter over HTTP against a local server speaking that API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.dispatcher.config import DispatcherSettings
from services.dispatcher.providers import retell
from services.dispatcher.providers.base import SenderConfig
from services.dispatcher.providers.retell import RetellVoiceProvider
from services.dispatcher.providers.voice import CallRequest
from tests.dispatcher.fake_retell import API_KEY, FakeRetell, Script
from tests.http_server import running

AGENT = "agent_cobranza"
FROM = "+56229998877"
DB = "postgresql://unused/x"


@pytest.fixture
async def fake() -> AsyncIterator[FakeRetell]:
    async with running(FakeRetell()) as server:
        yield server


def provider(fake: FakeRetell, *, api_key: str = API_KEY) -> RetellVoiceProvider:
    return RetellVoiceProvider(base_url=fake.url, api_key=api_key, agent_id=AGENT, from_number=FROM, poll_seconds=0.01)


def request(to: str, **overrides: Any) -> CallRequest:
    fields: dict[str, Any] = {
        "attempt_id": f"b:1:{to}",
        "sender": SenderConfig(id=0, account_id="acc-1", provider="retell"),
        "to": to,
        "variables": {"nombre": "María Pérez", "monto_total": "150000"},
        **overrides,
    }
    return CallRequest(**fields)


async def test_an_answered_call_is_placed_with_its_variables_and_read_to_the_end(fake: FakeRetell) -> None:
    placed: list[tuple[str, str]] = []

    async def on_placed(call_id: str) -> None:
        # Told as soon as the provider took the call, before anyone followed it to its end.
        placed.append((call_id, fake.calls[call_id].gets))

    p = provider(fake)
    result = await p.call(request("+56912345678", on_placed=on_placed))
    await p.close()

    (call,) = fake.calls.values()
    assert call.body == {
        "from_number": FROM,
        "to_number": "+56912345678",
        "override_agent_id": AGENT,
        "retell_llm_dynamic_variables": {"nombre": "María Pérez", "monto_total": "150000"},
        "metadata": {"attempt_id": "b:1:+56912345678"},
    }
    assert placed == [(call.call_id, 0)]
    assert result.status == "completed"
    assert result.call_id == call.call_id
    assert result.duration_ms == 42_000
    assert result.started_at is not None and result.ended_at is not None
    assert (result.ended_at - result.started_at).total_seconds() == 42
    assert result.transcript.startswith("Agent: Buenos días.")
    assert result.summary == "El cliente promete pagar el lunes."
    assert result.sentiment == "Positive"
    assert result.recording_url.endswith(f"{call.call_id}.wav")
    assert result.collected == {"current_node": "cierre", "fecha_pago_cliente": "2026-12-01"}
    assert result.error == ""


@pytest.mark.parametrize(
    ("script", "status", "billed"),
    [
        (Script(disconnection_reason="dial_no_answer"), "no_answer", 0),
        (Script(disconnection_reason="dial_busy"), "busy", 0),
        (Script(disconnection_reason="dial_failed"), "failed", 0),
        (Script(disconnection_reason="voicemail_reached", duration_ms=9_000), "voicemail", 9_000),
        # The agent noticed a machine, the line hung up normally: still a voicemail.
        (Script(disconnection_reason="agent_hangup", duration_ms=7_000, in_voicemail=True), "voicemail", 7_000),
        (Script(disconnection_reason="error_llm_websocket_open", duration_ms=2_000), "failed", 2_000),
        (Script(disconnection_reason="max_duration_reached", duration_ms=180_000), "completed", 180_000),
    ],
)
async def test_how_the_call_ended_decides_its_outcome(
    fake: FakeRetell, script: Script, status: str, billed: int
) -> None:
    fake.scripts["+56911111111"] = script
    p = provider(fake)
    result = await p.call(request("+56911111111"))
    await p.close()
    assert (result.status, result.duration_ms) == (status, billed)
    assert bool(result.error) == (status == "failed")
    assert result.sentiment == ("Positive" if billed else None)  # nobody spoke, nobody felt


async def test_a_call_id_that_cannot_be_recorded_does_not_abandon_the_call(fake: FakeRetell) -> None:
    async def on_placed(call_id: str) -> None:
        raise OSError("database unreachable")

    p = provider(fake)
    result = await p.call(request("+56988888888", on_placed=on_placed))
    await p.close()
    assert result.status == "completed" and result.call_id in fake.calls


async def test_a_refused_call_is_a_failed_attempt_with_the_providers_reason(fake: FakeRetell) -> None:
    fake.scripts["+56922222222"] = Script(refuse=(429, "Concurrency limit reached"))
    placed: list[str] = []

    async def on_placed(call_id: str) -> None:
        placed.append(call_id)

    p = provider(fake)
    refused = await p.call(request("+56922222222", on_placed=on_placed))
    assert refused.status == "failed" and "429" in refused.error and "Concurrency limit reached" in refused.error
    await p.close()

    wrong_key = provider(fake, api_key="key_wrong")
    unauthorised = await wrong_key.call(request("+56933333333", on_placed=on_placed))
    await wrong_key.close()
    assert unauthorised.status == "failed" and "401" in unauthorised.error
    assert placed == [] and fake.calls == {}


async def test_provider_blips_while_following_a_call_do_not_end_it(fake: FakeRetell) -> None:
    p = provider(fake)
    fake.failing_gets = 3
    result = await p.call(request("+56944444444"))
    await p.close()
    assert result.status == "completed" and result.summary
    assert fake.failing_gets == 0


async def test_the_analysis_is_waited_for_a_while_then_the_call_ends_without_it(
    fake: FakeRetell, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.scripts["+56955555555"] = Script(analysis_after=3)
    p = provider(fake)
    late = await p.call(request("+56955555555"))
    assert late.status == "completed" and late.summary == "El cliente promete pagar el lunes."

    monkeypatch.setattr(retell, "ANALYSIS_WAIT_S", 0.05)
    fake.scripts["+56966666666"] = Script(analysis_after=10_000)
    never = await p.call(request("+56966666666"))
    await p.close()
    assert never.status == "completed" and never.duration_ms == 42_000
    assert never.summary == "" and never.sentiment is None


async def test_the_line_and_the_agent_can_be_chosen_per_call(fake: FakeRetell) -> None:
    p = provider(fake)
    await p.call(
        request(
            "+5491155556666",
            sender=SenderConfig(id=0, account_id="acc-1", provider="retell", config={"from_number": "+541140001234"}),
            agent_config={"agent_id": "agent_ar"},
        )
    )
    await p.close()
    (call,) = fake.calls.values()
    assert (call.body["from_number"], call.body["override_agent_id"]) == ("+541140001234", "agent_ar")


async def test_after_a_restart_a_call_in_progress_is_found_by_its_id_and_followed_to_its_end(
    fake: FakeRetell,
) -> None:
    fake.scripts["+56977777777"] = Script(polls_until_end=50)
    ids: list[str] = []
    placed = asyncio.Event()

    async def on_placed(call_id: str) -> None:
        ids.append(call_id)
        placed.set()

    before = provider(fake)
    calling = asyncio.create_task(before.call(request("+56977777777", on_placed=on_placed)))
    await placed.wait()
    calling.cancel()  # the dispatcher dies with the call up
    with pytest.raises(asyncio.CancelledError):
        await calling
    await before.close()
    assert fake.calls[ids[0]].gets < 50

    after = provider(fake)  # a new process: nothing in memory
    found = await after.lookup("b:1:+56977777777", ids[0])
    assert found is not None and found.status == "completed" and found.call_id == ids[0]
    assert len(fake.placed_to("+56977777777")) == 1, "looking up never places the call again"
    assert await after.lookup("b:1:x", "no-such-call") is None
    assert await after.lookup("b:1:x", "") is None, "no id on record: nothing to find"
    await after.close()


def test_the_retell_provider_needs_its_key_agent_and_number() -> None:
    with pytest.raises(ValueError, match="RETELL_API_KEY, RETELL_AGENT_ID"):
        DispatcherSettings(database_url=DB, voice_provider="retell", retell_from_number=FROM)
    settings = DispatcherSettings(
        database_url=DB, voice_provider="retell", retell_api_key="k", retell_agent_id=AGENT, retell_from_number=FROM
    )
    assert settings.voice_provider == "retell"
