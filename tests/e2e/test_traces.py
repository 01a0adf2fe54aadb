"""One bulk upload, one trace: a stack of its own exports to an OTLP/HTTP collector in the
test, and the upload's trace holds the gateway's request, campaigns' work, the dispatcher's
chunk (through NATS) and its request to the provider."""

from __future__ import annotations

import asyncio
import gzip
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from services.runtime.devstack import Stack
from tests.conftest import ADMIN_TOKEN, separate_stack, wait_for
from tests.e2e.test_bulk import add_device, make_file, phones, send_file, wait_job
from tests.http_server import serving_in_thread

pytestmark = pytest.mark.timeout(120)


class Collector:
    """POST /v1/traces as an OTLP/HTTP collector takes it: every span received, with the
    service.name of the process that sent it."""

    def __init__(self) -> None:
        self.url = ""
        self.spans: list[tuple[str, Span]] = []
        self.lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if (b"content-encoding", b"gzip") in scope["headers"]:
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        with self.lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((attributes.get("service.name", ""), s) for s in scope_spans.spans)
        reply = ExportTraceServiceResponse().SerializeToString()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x-protobuf")]}
        )
        await send({"type": "http.response.body", "body": reply})

    def trace(self, trace_id: bytes) -> list[tuple[str, Span]]:
        with self.lock:
            return [(service, s) for service, s in self.spans if s.trace_id == trace_id]

    def upload_traces(self) -> set[bytes]:
        with self.lock:
            return {
                s.trace_id
                for service, s in self.spans
                if service == "gateway" and s.kind == Span.SPAN_KIND_SERVER and "send-bulk-file" in s.name
            }


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    sink = Collector()
    with serving_in_thread(sink) as address:
        sink.url = f"http://{address}"
        yield sink


@pytest.fixture(scope="module")
def traced(infra: Stack, collector: Collector, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The four services on a database and a NATS of their own (on the suite's bus they would
    share its durable consumers), exporting to `collector`."""
    stack = separate_stack(infra, tmp_path_factory.mktemp("traced"))
    stack.extra_env.update(
        {
            "PREGONERO_STATIC_TOKENS": f"{ADMIN_TOKEN}=admin",
            "LOG_LEVEL": "WARNING",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: spans reach the collector within the test
        }
    )
    try:
        stack.start_services()
        yield stack
    finally:
        stack.stop()


def _attribute(span: Span, *keys: str) -> str:
    for a in span.attributes:
        if a.key in keys:
            return a.value.string_value
    return ""


def test_one_bulk_upload_is_one_trace_from_the_gateway_to_the_providers_request(
    traced: Stack, collector: Collector
) -> None:
    base_url = f"http://127.0.0.1:{traced.http_port}"
    add_device(base_url, rate_per_minute=0)
    numbers = phones(71, 3)
    r = send_file(base_url, make_file(numbers))
    assert r.status_code == 200, r.text
    wait_job(base_url, r.json()["job"]["id"], timeout=30)

    def whole() -> list[tuple[str, Span]] | None:
        for trace_id in collector.upload_traces():
            spans = collector.trace(trace_id)
            names = {(service, s.name) for service, s in spans}
            provider_calls = [
                s
                for service, s in spans
                if service == "dispatcher"
                and s.kind == Span.SPAN_KIND_CLIENT
                and _attribute(s, "url.full", "http.url").startswith(f"{traced.simulator_url}/v1/messages")
            ]
            if ("dispatcher", "dispatch-whatsapp") in names and len(provider_calls) == len(numbers):
                return spans
        return None

    spans = wait_for("the upload's trace, down to the provider's requests", whole, timeout=30)
    services = {service for service, _ in spans}
    assert {"gateway", "campaigns", "dispatcher"} <= services
    kinds = {(service, s.name): s.kind for service, s in spans}
    # The path through NATS: the feeder's release of the batch, the dispatcher's chunk, and
    # campaigns applying the chunk's results, each one a consumer span of this trace.
    assert kinds[("campaigns", "feeder release")] == Span.SPAN_KIND_CONSUMER
    assert kinds[("dispatcher", "dispatch-whatsapp")] == Span.SPAN_KIND_CONSUMER
    wait_for(
        "the results applied in the same trace",
        lambda: ("campaigns", "campaigns-results") in {(sv, s.name) for sv, s in collector.trace(spans[0][1].trace_id)},
        timeout=15,
    )

    # Every span of the trace hangs from another of it, but for the gateway's request. A span
    # is exported when it ends, after its children: a parent may come a batch after them.
    def roots() -> list[tuple[str, str]]:
        trace = collector.trace(spans[0][1].trace_id)
        ids = {s.span_id for _, s in trace}
        return [(service, s.name) for service, s in trace if s.parent_span_id not in ids]

    try:
        wait_for("only the gateway's request without a parent", lambda: [sv for sv, _ in roots()] == ["gateway"], 30)
    except AssertionError:
        raise AssertionError(f"spans whose parent is not in the trace: {roots()}") from None


def test_a_batch_keeps_its_uploads_request_id_and_trace_for_the_feeder(traced: Stack) -> None:
    """The feeder releases a batch long after its upload, maybe on another replica: the
    upload's request id and trace context are on the batch's row, where it finds them."""
    base_url = f"http://127.0.0.1:{traced.http_port}"
    add_device(base_url, rate_per_minute=0)
    rid = uuid.uuid4().hex
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "X-Request-Id": rid}
    r = send_file(base_url, make_file(phones(72, 1)), headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == rid

    async def origins() -> list[Any]:
        conn = await asyncpg.connect(traced.database_url)
        try:
            return list(
                await conn.fetch("SELECT origin::text FROM campaigns.batches WHERE origin->>'x-request-id' = $1", rid)
            )
        finally:
            await conn.close()

    (row,) = asyncio.run(origins())
    assert '"traceparent"' in row[0]
