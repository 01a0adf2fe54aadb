"""Scale-out on one machine (`PREGONERO_SCALE`, as `make run` takes it): two gateways behind
Envoy, two campaigns and two dispatchers, each kind balanced round robin by its callers.

One bulk job on that layout goes out once per recipient; both dispatchers take a share (their
own metrics say how much), the feeders of the two campaigns replicas release each recipient
once between them, and both gateways answer the client's requests. The bigger case (50,000
recipients, a voice batch, a replica of each kind stopped mid-job) is left for `make bench`."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.runtime.devstack import Stack, parse_scale
from tests.conftest import ADMIN_TOKEN, separate_stack
from tests.e2e.test_bulk import add_device, make_file, phones, record, send_file, wait_job

pytestmark = pytest.mark.timeout(180)
RECIPIENTS = 3000


@pytest.fixture(scope="module")
def scaled(infra: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own (its database and NATS: on the suite's bus its dispatchers would
    share the suite's durable consumers), two processes of every kind but accounts."""
    stack = separate_stack(
        infra, tmp_path_factory.mktemp("scaled"), scale=parse_scale("gateway=2,campaigns=2,dispatcher=2")
    )
    stack.extra_env.update({"PREGONERO_STATIC_TOKENS": f"{ADMIN_TOKEN}=admin", "LOG_LEVEL": "WARNING"})
    try:
        stack.start_services()
        yield stack
    finally:
        stack.stop()


def total(url: str, metric: str) -> float:
    """The sum of a counter's samples over all its labels, as one process serves it."""
    text = httpx.get(url, timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == f"{metric}_total"
    )


def test_one_job_over_two_of_each_goes_out_once_with_every_replica_working(scaled: Stack) -> None:
    base_url = f"http://127.0.0.1:{scaled.http_port}"
    for _ in range(4):
        add_device(base_url, rate_per_minute=0)
    numbers = phones(83, RECIPIENTS)
    r = send_file(base_url, make_file(numbers))
    assert r.status_code == 200, r.text
    wait_job(base_url, r.json()["job"]["id"], timeout=90)

    sent_to = [entry[2] for entry in record(scaled)]
    assert sorted(sent_to) == sorted(numbers), "each recipient exactly once"

    urls = scaled.metrics_urls
    sent = {name: total(urls[name], "pregonero_messages_sent") for name in ("dispatcher", "dispatcher-2")}
    assert sum(sent.values()) == RECIPIENTS and all(sent.values()), sent
    released = {name: total(urls[name], "pregonero_messages_released") for name in ("campaigns", "campaigns-2")}
    assert sum(released.values()) == RECIPIENTS, released
    answered = {name: total(urls[name], "pregonero_http_requests") for name in ("gateway", "gateway-2")}
    assert all(answered.values()), answered


def test_scale_names_known_kinds_and_bounded_counts() -> None:
    assert parse_scale("gateway=2, dispatcher=3") == {"gateway": 2, "dispatcher": 3}
    assert parse_scale("") == {}
    for bad in ("postgres=2", "dispatcher=0", "dispatcher=9", "dispatcher=two", "gateway"):
        with pytest.raises(ValueError, match="PREGONERO_SCALE"):
            parse_scale(bad)
