"""A bulk send through a WhatsApp Cloud API device, end to end: the device is registered
through the REST API with its access token and business number, the dispatcher sends
through Graph (a local server speaking its messages API), and what Graph refused shows in
the job's results with Graph's reason."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from tests.dispatcher.fake_graph import ACCESS_TOKEN, PHONE_NUMBER_ID, FakeGraph, Refusal
from tests.e2e.test_bulk import ADMIN, add_device, deactivate_all, make_file, phones, send_file, wait_job
from tests.http_server import running_in_thread


@pytest.fixture
def graph() -> Iterator[FakeGraph]:
    with running_in_thread(FakeGraph()) as fake:
        yield fake


def test_a_bulk_send_goes_out_through_the_cloud_api_device(base_url: str, graph: FakeGraph) -> None:
    deactivate_all(base_url)
    numbers = phones(31, 40)
    undeliverable = numbers[7]
    graph.refusals[undeliverable.lstrip("+")] = Refusal(400, 131026, "Message undeliverable")
    device = add_device(
        base_url,
        provider="whatsapp_cloud",
        secret=ACCESS_TOKEN,
        rate_per_minute=0,
        provider_config={"phone_number_id": PHONE_NUMBER_ID, "base_url": graph.url},
    )
    try:
        r = send_file(base_url, make_file(numbers), message="Hola @valor1, su pedido @valor2")
        assert r.status_code == 200, r.text
        job = wait_job(base_url, r.json()["job"]["id"])
    finally:
        httpx.put(f"{base_url}/devices/{device}", headers=ADMIN, json={"status": "inactive"})

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
