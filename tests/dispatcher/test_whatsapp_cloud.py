"""The `whatsapp_cloud` adapter over HTTP against a local server speaking Graph's messages API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.dispatcher.providers.base import SenderConfig, SendRequest
from services.dispatcher.providers.whatsapp_cloud import LookupUnsupported, WhatsAppCloudProvider, check_config
from services.runtime.devstack import free_port
from tests.dispatcher.fake_graph import ACCESS_TOKEN, PHONE_NUMBER_ID, FakeGraph, Refusal
from tests.http_server import running


@pytest.fixture
async def graph() -> AsyncIterator[FakeGraph]:
    async with running(FakeGraph()) as fake:
        yield fake


@pytest.fixture
async def provider(graph: FakeGraph) -> AsyncIterator[WhatsAppCloudProvider]:
    # Graph's address is the operator's setting (WHATSAPP_GRAPH_URL), not the sender's.
    p = WhatsAppCloudProvider(base_url=graph.url, timeout_s=5)
    yield p
    await p.close()


def sender(*, secret: str = ACCESS_TOKEN, **config: Any) -> SenderConfig:
    return SenderConfig(
        id=7,
        account_id="acc-1",
        provider="whatsapp_cloud",
        secret=secret,
        config={"phone_number_id": PHONE_NUMBER_ID, **config},
    )


def message(s: SenderConfig, to: str = "+56912345678", text: str = "Hola María, su cuota vence hoy.") -> SendRequest:
    return SendRequest(attempt_id=f"b:1:{to}", sender=s, to=to, text=text)


async def test_a_text_message_is_sent_with_the_senders_token_and_number(
    graph: FakeGraph, provider: WhatsAppCloudProvider
) -> None:
    result = await provider.send(message(sender()))
    assert result.status == "sent" and result.provider_message_id.startswith("wamid.")
    assert graph.paths == [f"/v21.0/{PHONE_NUMBER_ID}/messages"]
    assert graph.accepted == [
        {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": "56912345678",
            "type": "text",
            "text": {"preview_url": False, "body": "Hola María, su cuota vence hoy."},
            "biz_opaque_callback_data": "b:1:+56912345678",
        }
    ]


async def test_a_template_sender_puts_the_text_in_the_template_body(
    graph: FakeGraph, provider: WhatsAppCloudProvider
) -> None:
    s = sender(template={"name": "recordatorio_pago", "language": "es_CL"}, api_version="v20.0")
    result = await provider.send(message(s, to="+5491155556666", text="María"))
    assert result.status == "sent"
    assert graph.paths == [f"/v20.0/{PHONE_NUMBER_ID}/messages"]
    (body,) = graph.accepted
    assert body["type"] == "template" and body["to"] == "5491155556666"
    assert body["template"] == {
        "name": "recordatorio_pago",
        "language": {"code": "es_CL"},
        "components": [{"type": "body", "parameters": [{"type": "text", "text": "María"}]}],
    }


@pytest.mark.parametrize(
    ("refusal", "status", "retry_after", "error"),
    [
        (Refusal(429, 130429, "Rate limit hit", retry_after="7"), "rate_limited", 7.0, "130429"),
        (Refusal(400, 131056, "Pair rate limit hit"), "rate_limited", 5.0, "Pair rate limit hit"),
        (Refusal(400, 131026, "Message undeliverable"), "failed", 0.0, "(131026): Message undeliverable"),
        (Refusal(400, 132001, "Template name does not exist in the translation"), "failed", 0.0, "132001"),
    ],
)
async def test_graph_errors_become_a_slow_down_or_a_failure(
    graph: FakeGraph, provider: WhatsAppCloudProvider, refusal: Refusal, status: str, retry_after: float, error: str
) -> None:
    graph.refusals["56987654321"] = refusal
    result = await provider.send(message(sender(), to="+56987654321"))
    assert (result.status, result.retry_after) == (status, retry_after)
    assert error in result.error
    assert graph.accepted == []


async def test_a_wrong_token_or_an_unreachable_graph_fails_the_attempt(
    graph: FakeGraph, provider: WhatsAppCloudProvider
) -> None:
    wrong = await provider.send(message(sender(secret="EAAG-revoked")))
    assert wrong.status == "failed" and "401" in wrong.error and "Invalid OAuth access token" in wrong.error
    unreachable = WhatsAppCloudProvider(base_url=f"http://127.0.0.1:{free_port()}", timeout_s=5)
    try:
        down = await unreachable.send(message(sender()))
    finally:
        await unreachable.close()
    assert down.status == "failed" and "ConnectError" in down.error
    assert graph.accepted == []


async def test_a_lost_outcome_cannot_be_looked_up(graph: FakeGraph, provider: WhatsAppCloudProvider) -> None:
    # The dispatcher turns this into `unknown`: never a second message.
    with pytest.raises(LookupUnsupported):
        await provider.lookup("b:1:+56912345678", sender())


@pytest.mark.parametrize(
    ("config", "message_part"),
    [
        ({}, "phone_number_id is required"),
        ({"phone_number_id": "abc"}, "phone_number_id is required"),
        ({"phone_number_id": "1", "token": "x"}, "unknown whatsapp_cloud config keys: token"),
        ({"phone_number_id": "1", "template": "recordatorio"}, "template must be"),
        ({"phone_number_id": "1", "template": {"name": "t", "language": 5}}, "template.language"),
        ({"phone_number_id": "1", "base_url": "http://x"}, "unknown whatsapp_cloud config keys: base_url"),
        ({"phone_number_id": "1", "api_version": "v1/../../x"}, "api_version must be a Graph version"),
    ],
)
def test_a_bad_sender_config_is_refused_with_its_reason(config: dict[str, Any], message_part: str) -> None:
    with pytest.raises(ValueError, match=message_part):
        check_config(config)
    check_config({"phone_number_id": "1", "template": {"name": "t"}})  # the smallest good one
