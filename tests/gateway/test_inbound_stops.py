"""Which inbound WhatsApp messages are opt-out replies (the webhook's parsing: odd bodies are
skipped, never an error)."""

from __future__ import annotations

from typing import Any

from services.gateway.routes.webhooks import Stop, stops_of


def body(*values: Any) -> dict[str, Any]:
    return {"object": "whatsapp_business_account", "entry": [{"changes": [{"value": v} for v in values]}]}


def value(*messages: Any, number_id: Any = "1065") -> dict[str, Any]:
    return {"metadata": {"phone_number_id": number_id}, "messages": list(messages)}


def text(sender: Any, words: Any, kind: str = "text") -> dict[str, Any]:
    return {"from": sender, "type": kind, "text": {"body": words}}


def test_stop_baja_and_no_trimmed_in_any_case() -> None:
    payload = body(
        value(text("56911111111", " Stop "), text("56922222222", "baja"), text("56933333333", "No")),
        value(text("56911111111", "STOP"), number_id="2077"),
    )
    assert stops_of(payload) == [
        Stop("1065", "+56911111111"),
        Stop("1065", "+56922222222"),
        Stop("1065", "+56933333333"),
        Stop("2077", "+56911111111"),
    ]


def test_other_messages_and_odd_shapes_are_skipped() -> None:
    payload = body(
        value(
            text("56911111111", "STOP"),
            text("56911111111", "stop"),  # the same sender twice: once
            text("56922222222", "no gracias"),
            text("56933333333", "STOP", kind="image"),
            text("+56944444444", "STOP"),  # Meta writes no +
            text("123", "STOP"),
            text(56955555555, "STOP"),
            text("56966666666", ["STOP"]),
            {"from": "56977777777", "type": "text", "text": "STOP"},
            "STOP",
        ),
        value(text("56988888888", "STOP"), number_id=1065),
        value(text("56988888888", "STOP"), number_id="10a"),
        {"messages": [text("56999999999", "STOP")]},
        "not an object",
    )
    assert stops_of(payload) == [Stop("1065", "+56911111111")]
    assert stops_of({"object": "whatsapp_business_account", "entry": "x"}) == []
    assert stops_of({"object": "whatsapp_business_account"}) == []
