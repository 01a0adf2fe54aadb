"""A bulk send through a WhatsApp Cloud API device, end to end: the device is registered
through the REST API with its access token and business number, the dispatcher sends
through Graph (a local server speaking its messages API), and what Graph refused shows in
the job's results with Graph's reason. Graph's status webhooks then say which messages were
delivered, read or failed after all."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.conftest import WHATSAPP_APP_SECRET, WHATSAPP_VERIFY_TOKEN
from tests.dispatcher.fake_graph import ACCESS_TOKEN, PHONE_NUMBER_ID, FakeGraph, Refusal
from tests.e2e.test_bulk import ADMIN, add_device, deactivate_all, make_file, phones, send_file, wait_job


@pytest.fixture
def graph(session_graph: FakeGraph) -> FakeGraph:
    """The session's Graph (the dispatcher's WHATSAPP_GRAPH_URL), emptied of earlier tests' traffic."""
    session_graph.refusals.clear()
    session_graph.accepted.clear()
    session_graph.message_ids.clear()
    session_graph.paths.clear()
    return session_graph


def send_through_cloud(base_url: str, graph: FakeGraph, numbers: list[str], message: str) -> tuple[dict[str, Any], int]:
    """A bulk send through a Cloud API device (the only active one), to its end."""
    deactivate_all(base_url)
    device = add_device(
        base_url,
        provider="whatsapp_cloud",
        secret=ACCESS_TOKEN,
        rate_per_minute=0,
        provider_config={"phone_number_id": PHONE_NUMBER_ID},
    )
    try:
        r = send_file(base_url, make_file(numbers), message=message)
        assert r.status_code == 200, r.text
        return wait_job(base_url, r.json()["job"]["id"]), device
    finally:
        httpx.put(f"{base_url}/devices/{device}", headers=ADMIN, json={"status": "inactive"})


@pytest.fixture
def cloud_job(base_url: str, graph: FakeGraph) -> tuple[dict[str, Any], list[str]]:
    """A completed bulk send of 10 recipients through a Cloud API device."""
    numbers = phones(32, 10)
    job, _ = send_through_cloud(base_url, graph, numbers, "Hola @valor1")
    assert job["progress"]["sent"] == 10
    return job, numbers


def test_a_bulk_send_goes_out_through_the_cloud_api_device(base_url: str, graph: FakeGraph) -> None:
    numbers = phones(31, 40)
    undeliverable = numbers[7]
    graph.refusals[undeliverable.lstrip("+")] = Refusal(400, 131026, "Message undeliverable")
    job, device = send_through_cloud(base_url, graph, numbers, "Hola @valor1, su pedido @valor2")

    assert (job["progress"]["sent"], job["progress"]["failed"]) == (39, 1)
    received = Counter("+" + m["to"] for m in graph.accepted)
    assert set(received) == set(numbers) - {undeliverable} and max(received.values()) == 1
    texts = {"+" + m["to"]: m["text"]["body"] for m in graph.accepted}
    assert texts[numbers[0]] == "Hola name0, su pedido order0"
    assert texts[numbers[39]] == "Hola name39, su pedido order39"

    rows = httpx.get(f"{base_url}/jobs/{job['id']}/results", headers=ADMIN, params={"status": "failed"}).json()
    (failed,) = rows["results"]
    assert failed["phone"] == undeliverable and failed["device_id"] == device
    assert "131026" in failed["error"] and "Message undeliverable" in failed["error"]


def status(graph: FakeGraph, number: str, state: str, at: int, **extra: Any) -> dict[str, Any]:
    """One entry of a Graph status webhook, about the message sent to `number`."""
    sent = next(m for m in graph.accepted if m["to"] == number.lstrip("+"))
    return {
        "id": graph.message_ids[sent["to"]],
        "status": state,
        "timestamp": str(at),
        "recipient_id": sent["to"],
        "biz_opaque_callback_data": sent["biz_opaque_callback_data"],
        **extra,
    }


def webhook(statuses: list[dict[str, Any]]) -> bytes:
    value = {"messaging_product": "whatsapp", "metadata": {"phone_number_id": PHONE_NUMBER_ID}, "statuses": statuses}
    body = {
        "object": "whatsapp_business_account",
        "entry": [{"id": "WABA", "changes": [{"field": "messages", "value": value}]}],
    }
    return json.dumps(body).encode()


def signed(body: bytes, secret: str = WHATSAPP_APP_SECRET) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={digest}", "Content-Type": "application/json"}


def results_by_phone(base_url: str, job_id: str) -> dict[str, dict[str, Any]]:
    rows = httpx.get(f"{base_url}/jobs/{job_id}/results", headers=ADMIN).json()["results"]
    return {row["phone"]: row for row in rows}


def test_meta_subscribes_with_the_verify_token(base_url: str) -> None:
    params = {"hub.mode": "subscribe", "hub.verify_token": WHATSAPP_VERIFY_TOKEN, "hub.challenge": "1158201444"}
    r = httpx.get(f"{base_url}/webhooks/whatsapp", params=params)
    assert r.status_code == 200 and r.text == "1158201444"
    r = httpx.get(f"{base_url}/webhooks/whatsapp", params={**params, "hub.verify_token": "guess"})
    assert r.status_code == 403 and "verify_token" in r.json()["message"]


def test_status_webhooks_show_delivered_read_and_failed(
    base_url: str, graph: FakeGraph, cloud_job: tuple[dict[str, Any], list[str]]
) -> None:
    job, numbers = cloud_job
    t = 1_795_000_000
    body = webhook(
        [
            status(graph, numbers[0], "sent", t),
            status(graph, numbers[0], "delivered", t + 2),
            status(graph, numbers[1], "read", t + 9),  # the delivered report comes later
            status(graph, numbers[2], "failed", t + 3, errors=[{"code": 131047, "title": "Re-engagement message"}]),
        ]
    )
    forged = httpx.post(f"{base_url}/webhooks/whatsapp", content=body, headers=signed(body, secret="not-the-secret"))
    assert forged.status_code == 401
    r = httpx.post(f"{base_url}/webhooks/whatsapp", content=body, headers=signed(body))
    assert r.status_code == 200 and r.json() == {"received": 4}
    late = webhook([status(graph, numbers[1], "delivered", t + 5), status(graph, numbers[0], "read", t + 20)])
    assert httpx.post(f"{base_url}/webhooks/whatsapp", content=late, headers=signed(late)).status_code == 200
    # A retried delivery of the same body changes nothing.
    assert httpx.post(f"{base_url}/webhooks/whatsapp", content=body, headers=signed(body)).status_code == 200

    def iso(at: int) -> str:
        return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        rows = results_by_phone(base_url, job["id"])
        if rows[numbers[0]]["delivery"] == "read" and rows[numbers[1]]["delivered_at"]:
            break
        time.sleep(0.1)
    first, second, third, fourth = (rows[n] for n in numbers[:4])
    assert (first["delivery"], first["delivered_at"], first["read_at"]) == ("read", iso(t + 2), iso(t + 20))
    # Read first, delivered after: read stays, and delivery counts from the earlier report.
    assert (second["delivery"], second["delivered_at"], second["read_at"]) == ("read", iso(t + 5), iso(t + 9))
    assert third["delivery"] == "failed" and third["delivery_error"] == "(131047) Re-engagement message"
    assert third["status"] == "sent"  # Graph accepted it: it was sent, and paid for
    assert fourth["delivery"] is None and fourth["status"] == "sent"


@pytest.mark.parametrize(
    ("body", "status", "word"),
    [
        (b"not json", 400, "not JSON"),
        (b'{"object": "page", "entry": []}', 400, "whatsapp_business_account"),
    ],
)
def test_bad_webhook_bodies_are_refused(base_url: str, body: bytes, status: int, word: str) -> None:
    r = httpx.post(f"{base_url}/webhooks/whatsapp", content=body, headers=signed(body))
    assert r.status_code == status and word in r.json()["message"]
    unsigned = httpx.post(f"{base_url}/webhooks/whatsapp", content=body)
    assert unsigned.status_code == 401
