"""Outside development the simulated voice line and simulated WhatsApp devices are refused
unless PREGONERO_DEMO says the deployment is a demo: the dispatcher does not start on the
simulated line, a device cannot be made simulated (a 400 at the gateway), and a simulated
device already on record sends nothing. No database: each guard stands before the SQL."""

from __future__ import annotations

from typing import Any, cast

import pytest

from services.dispatcher.config import SIMULATED_DEVICES_REFUSED, DispatcherSettings
from services.dispatcher.crypto import SecretBox
from services.dispatcher.providers.base import SenderConfig, SendRequest
from services.dispatcher.providers.simulated import RefusedSimulatedProvider
from services.dispatcher.repo import SendersRepo
from services.dispatcher.senders import Senders
from services.runtime.errors import InvalidArgument
from services.runtime.identity import MEMBER, Caller

pytestmark = pytest.mark.timeout(10)

RETELL = {"retell_api_key": "a real key", "retell_agent_id": "agent_1", "retell_from_number": "+56221234567"}
ACME = Caller(role=MEMBER, account_id="acme", user_id="u1")


def settings(environment: str, **kw: Any) -> DispatcherSettings:
    # Real secrets, as production requires: what is refused is the setting under test.
    return DispatcherSettings(
        database_url="postgresql://x/y",
        nats_url="nats://dispatcher:s3cret@nats:4222",
        pregonero_secret_key="k" * 40,
        environment=environment,
        **kw,
    )


def test_the_simulated_voice_line_runs_only_in_development_or_a_demo() -> None:
    for environment in ("development", "test"):
        assert settings(environment).voice_provider == "simulated"
    with pytest.raises(ValueError, match="VOICE_PROVIDER=simulated .* ENVIRONMENT=production.*PREGONERO_DEMO=true"):
        settings("production")
    demo = settings("production", pregonero_demo=True)
    assert demo.simulation_allowed and demo.unconfigured_providers().get("simulated") is None
    real = settings("production", voice_provider="retell", **RETELL)
    assert not real.simulation_allowed and real.unconfigured_providers()["simulated"] == SIMULATED_DEVICES_REFUSED


def test_retell_placeholders_are_refused_outside_development() -> None:
    shipped = {**RETELL, "retell_agent_id": "changeme", "retell_from_number": "changeme"}
    with pytest.raises(ValueError, match="RETELL_AGENT_ID, RETELL_FROM_NUMBER outside development"):
        settings("production", voice_provider="retell", **shipped)
    assert settings("test", voice_provider="retell", **shipped).retell_agent_id == "changeme"


def refusing_senders() -> Senders:
    # No repository: the refusal must come before any SQL.
    unconfigured = settings("production", voice_provider="retell", **RETELL).unconfigured_providers()
    return Senders(cast(SendersRepo, None), SecretBox("k"), unconfigured=unconfigured)


async def test_a_device_cannot_be_created_or_made_simulated_in_production() -> None:
    senders = refusing_senders()
    for provider in ("simulated", ""):  # "" is the default provider: simulated
        with pytest.raises(InvalidArgument, match="simulated provider .* PREGONERO_DEMO=true"):
            await senders.create(ACME, token="t", secret="s", provider=provider)
    with pytest.raises(InvalidArgument, match="simulated provider .* PREGONERO_DEMO=true"):
        await senders.update(ACME, 1, '{"provider": "simulated"}')
    # A deployment names the default (deploy/k8s: wablas): then a device naming none is one of
    # its devices, refused here only because this deployment has no Wablas server.
    senders.default_provider = "wablas"
    with pytest.raises(InvalidArgument, match="wablas is not configured"):
        await senders.create(ACME, token="t", secret="s")


async def test_a_simulated_device_on_record_sends_nothing() -> None:
    sender = SenderConfig(id=7, account_id="acme", provider="simulated")
    provider = RefusedSimulatedProvider(SIMULATED_DEVICES_REFUSED)
    result = await provider.send(SendRequest(attempt_id="b:1:+56912345678", sender=sender, to="+56912345678", text="x"))
    # A device that cannot send now: nothing went out, the work moves to a real device.
    assert result.device_unavailable and result.status == "rate_limited" and not result.provider_message_id
    assert result.error == SIMULATED_DEVICES_REFUSED
    assert await provider.lookup("b:1:+56912345678", sender) is None
