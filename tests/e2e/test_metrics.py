"""Every process serves Prometheus metrics on its own port. Scraped before and after a small
bulk job, each one's counters move by what the job did there, the latency histograms are
there, the ledger shows no drift, and no label names an account, a batch or a number."""

from __future__ import annotations

import re
from collections.abc import Mapping

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.runtime.devstack import Stack
from tests.conftest import wait_for
from tests.e2e.test_bulk import phones
from tests.e2e.test_credit import job, new_account, upload

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
PROCESSES = ("accounts", "campaigns", "dispatcher", "gateway")
# A label value that looks like a phone number, an id of ours or a UUID is not a bounded one.
# 40 messages at 0.01, as a float sum of many small amounts may round it.
COST = 0.40 - 1e-6
UNBOUNDED = re.compile(r"\+?\d{7,}|[0-9a-f]{8}-[0-9a-f]{4}-|credit-[0-9a-f]{8}")


def scrape(url: str) -> Samples:
    r = httpx.get(url, timeout=5)
    assert r.status_code == 200, r.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the series whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def test_each_process_counts_a_bulk_job_and_the_ledger_has_no_drift(base_url: str, suite: Stack) -> None:
    urls: Mapping[str, str] = suite.metrics_urls
    assert set(urls) == set(PROCESSES)
    before = {name: scrape(url) for name, url in urls.items()}

    account_id, key = new_account(base_url, credits="5")  # 0.01 a message
    numbers = phones(81, 40)
    job_id = upload(base_url, key, numbers)
    wait_for("the job completes", lambda: job(base_url, key, job_id)["status"] == "completed")
    # Results reach accounts on their own way: the captures come shortly after the job ends.
    wait_for(
        "the captures are counted",
        lambda: moved(before["accounts"], scrape(urls["accounts"]), "pregonero_credit_captured_total") >= COST,
        timeout=30,
    )
    after = {name: scrape(url) for name, url in urls.items()}
    d, c, a, g = (after[n] for n in ("dispatcher", "campaigns", "accounts", "gateway"))
    b = before

    sent = dict(channel="whatsapp", provider="simulated")
    assert moved(b["dispatcher"], d, "pregonero_messages_sent_total", **sent) >= len(numbers)
    assert moved(b["dispatcher"], d, "pregonero_provider_request_seconds_count", provider="simulated") >= len(numbers)
    assert moved(b["campaigns"], c, "pregonero_messages_released_total", channel="whatsapp") >= len(numbers)
    assert moved(b["campaigns"], c, "pregonero_ingest_rows_total", kind="bulk_file", outcome="valid") >= len(numbers)
    assert moved(b["accounts"], a, "pregonero_credit_held_total", unit="credits") >= COST
    assert moved(b["accounts"], a, "pregonero_credit_captured_total", unit="credits") >= COST
    upload_route = dict(method="POST", route="/messages/send-bulk-file", code="200")
    assert moved(b["gateway"], g, "pregonero_http_requests_total", **upload_route) >= 1
    assert moved(b["gateway"], g, "pregonero_grpc_client_handled_total", grpc_method="GetBatch", grpc_code="OK") >= 1
    for name in PROCESSES:
        if name != "gateway":
            assert moved(b[name], after[name], "pregonero_grpc_server_handled_total", grpc_code="OK") > 0, name
            assert total(after[name], "pregonero_grpc_server_handling_seconds_bucket", le="+Inf") > 0, name
    assert total(g, "pregonero_http_request_duration_seconds_bucket", le="+Inf") > 0

    # Must read 0, and has been read (the first check runs at start).
    assert ("pregonero_ledger_drift", frozenset()) in a and total(a, "pregonero_ledger_drift") == 0
    assert total(a, "pregonero_ledger_drift_checked_timestamp_seconds") > 0
    # The streams' backlog, sampled by the gateway.
    assert ("pregonero_dead_letters", frozenset()) in g
    lag = frozenset({("stream", "DISPATCH"), ("consumer", "dispatch-whatsapp")})
    assert ("pregonero_consumer_pending_messages", lag) in g

    for name, samples in after.items():
        for metric, labels in samples:
            for label, value in labels:
                assert account_id not in value and job_id not in value, f"{name}: {metric}{{{label}={value!r}}}"
                assert not UNBOUNDED.search(value), f"{name}: {metric}{{{label}={value!r}}}"
