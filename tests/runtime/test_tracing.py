"""Traces off cost nothing (no provider, no interceptor, no header); on, a NATS message's
headers carry the trace and the request id, and a consumer takes both up."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pregonero.events.v1 import events_pb2

from services.runtime import bus, tracing
from services.runtime.logs import REQUEST_ID_KEY, request_id_var

pytestmark = pytest.mark.timeout(30)


class RecordingJetStream:
    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []

    async def publish(self, subject: str, payload: bytes, *, headers: dict[str, str]) -> None:
        self.headers.append(dict(headers))


async def test_without_an_endpoint_nothing_is_installed_and_messages_carry_no_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(tracing.ENDPOINT_ENV, raising=False)
    assert tracing.setup_tracing("campaigns") is False
    assert not tracing.enabled()
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)  # the API's proxy: no SDK
    assert tracing.grpc_server_interceptors() == [] and tracing.grpc_client_interceptors() == []
    assert tracing.live_headers() is None

    js = RecordingJetStream()
    token = request_id_var.set("rid-1")
    try:
        with trace.get_tracer("test").start_as_current_span("work"):  # a no-op span
            await bus.publish(js, "events.job.x", events_pb2.ResultChunk(), msg_id="m1")  # type: ignore[arg-type]
    finally:
        request_id_var.reset(token)
    assert js.headers == [{"Nats-Msg-Id": "m1", REQUEST_ID_KEY: "rid-1"}]
    assert tracing.current() == tracing.NO_ORIGIN


def test_a_consumer_takes_up_the_request_id_its_messages_agree_on() -> None:
    with tracing.incoming("c", [{REQUEST_ID_KEY: "a"}, {REQUEST_ID_KEY: "a"}, None]):
        assert request_id_var.get() == "a"
        origin = tracing.current()
    with tracing.incoming("c", [{REQUEST_ID_KEY: "a"}, {REQUEST_ID_KEY: "b"}]):
        assert request_id_var.get() == ""
    assert request_id_var.get() == ""
    with tracing.resumed(origin):
        assert request_id_var.get() == "a"
    assert request_id_var.get() == ""


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test alone: a provider of its own, never the global one."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_on", True)
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    yield exporter
    provider.shutdown()


def _ids(span: Any) -> tuple[int, int]:
    return span.context.trace_id, span.context.span_id


def test_a_message_carries_the_trace_to_its_consumer(spans: InMemorySpanExporter) -> None:
    with tracing._tracer.start_as_current_span("publisher", kind=trace.SpanKind.SERVER):
        token = request_id_var.set("rid-2")
        first = tracing.outgoing({"Nats-Msg-Id": "1"})
        request_id_var.reset(token)
    with tracing._tracer.start_as_current_span("another", kind=trace.SpanKind.SERVER):
        other = tracing.outgoing({})
    assert first["traceparent"] and first[REQUEST_ID_KEY] == "rid-2"

    with tracing.incoming("one", [first]):
        assert request_id_var.get() == "rid-2"
        origin = tracing.current()
    with tracing.resumed(origin), tracing._tracer.start_as_current_span("provider call"):
        pass
    with tracing.incoming("several", [first, other]):
        pass

    by_name = {s.name: s for s in spans.get_finished_spans()}
    publisher, one, call, several = (by_name[n] for n in ("publisher", "one", "provider call", "several"))
    assert one.kind is trace.SpanKind.CONSUMER
    assert one.context.trace_id == publisher.context.trace_id and one.parent.span_id == publisher.context.span_id
    assert call.context.trace_id == publisher.context.trace_id and call.parent.span_id == one.context.span_id
    # From two traces: a trace of its own, linked to both.
    assert several.parent is None and several.context.trace_id != publisher.context.trace_id
    assert {_ids(link) for link in several.links} == {_ids(publisher), _ids(by_name["another"])}
