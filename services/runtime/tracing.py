"""Traces: OpenTelemetry over HTTP, gRPC, SQL and NATS, exported by OTLP/HTTP to
`OTEL_EXPORTER_OTLP_ENDPOINT` when it is set.

Unset, nothing is installed: no SDK provider, no instrumentation, no interceptor, and the
helpers below return before building anything, so a process that does not trace pays one
flag test per message. Set, `setup_tracing` installs a provider that batches spans to the
collector (service.name: `OTEL_SERVICE_NAME`, else the service's own name) and instruments
FastAPI, asyncpg and httpx; `grpc_server_interceptors` and `grpc_client_interceptors` add
gRPC's to the servers and channels of rpc.py and lifecycle.py.

A NATS message carries what a gRPC call carries in its metadata: the request id and the W3C
trace context (`traceparent`, `tracestate`) in its headers (`outgoing`). A consumer takes
both up for its work (`incoming`): its log lines carry the request id, and its span is a
child of the publisher's, or, for a batch of messages from several traces, a new trace linked
to each of them. Work that goes on later in other tasks takes a snapshot (`current`) and
re-enters it (`resumed`): the dispatcher's sends of one chunk, the feeder's releases of one
batch (whose origin is kept on its row)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from .logs import REQUEST_ID_KEY, request_id_var

log = logging.getLogger("pregonero.tracing")

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
# Probes ask every few seconds; their spans would bury the ones worth reading.
UNTRACED_URLS = "/health,/ready,/live,/metrics"
HEALTH_SERVICE = "grpc.health.v1.Health"

_on = False
_tracer: trace.Tracer = trace.get_tracer("pregonero")


def enabled() -> bool:
    return _on


def setup_tracing(service_name: str) -> bool:
    """Install the SDK and the instrumentations when OTEL_EXPORTER_OTLP_ENDPOINT is set; say
    whether it did. Once per process (a second call changes nothing)."""
    global _on, _tracer
    if _on:
        return True
    if not os.environ.get(ENDPOINT_ENV):
        return False
    # Imported here: a process that does not trace does not load the SDK either.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    # OTEL_TRACES_SAMPLER, when set, is the operator's choice; ours otherwise (_entries_only).
    sampler = None if os.environ.get("OTEL_TRACES_SAMPLER") else _entries_only()
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}), sampler=sampler)
    # The exporter reads the endpoint (adding /v1/traces), headers and timeout from OTEL_* itself.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    AsyncPGInstrumentor().instrument(tracer_provider=provider)
    HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    _tracer = trace.get_tracer("pregonero")
    _on = True
    log.info("tracing to %s as %s", os.environ[ENDPOINT_ENV], name)
    return True


def _entries_only() -> Any:
    """A trace starts only where work enters: a request served, a message consumed (spans of
    kind SERVER or CONSUMER); below those, everything follows its parent. A background loop's
    poll of the database (a CLIENT span with no parent, every second) starts none."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler

    class EntriesOnly(Sampler):
        def should_sample(  # type: ignore[no-untyped-def]
            self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None
        ):
            entry = kind in (trace.SpanKind.SERVER, trace.SpanKind.CONSUMER)
            return (ALWAYS_ON if entry else ALWAYS_OFF).should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return "EntriesOnly"

    return ParentBased(root=EntriesOnly())


def instrument_app(app: Any) -> None:
    """The gateway's FastAPI app, when tracing."""
    if not _on:
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, excluded_urls=UNTRACED_URLS)


def grpc_server_interceptors() -> list[Any]:
    """To put before the server's own interceptor, so the handler runs inside the span."""
    if not _on:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    return [aio_server_interceptor(filter_=filters.negate(filters.service_name(HEALTH_SERVICE)))]


def grpc_client_interceptors() -> list[Any]:
    """One per call shape, before the signing ones: the trace context is in the metadata they sign over."""
    if not _on:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


# --- NATS -------------------------------------------------------------------------------


def outgoing(headers: dict[str, str]) -> dict[str, str]:
    """`headers` with the request id and, when tracing, the current trace context added."""
    rid = request_id_var.get()
    if rid:
        headers[REQUEST_ID_KEY] = rid
    if _on:
        from opentelemetry import propagate  # loads the propagators OTEL_PROPAGATORS names: only when tracing

        propagate.inject(headers)
    return headers


def live_headers() -> dict[str, str] | None:
    """For a core NATS push that has no headers of its own: the trace context and request id
    when tracing, None (the push as it always was) when not."""
    return outgoing({}) if _on else None


@contextlib.contextmanager
def incoming(name: str, carriers: Sequence[Mapping[str, str] | None]) -> Iterator[None]:
    """Inside: the request id the messages carry (when they agree on one) and, when tracing, a
    consumer span `name` that continues their trace (one), or starts one linked to each of
    theirs (several)."""
    rids = {c.get(REQUEST_ID_KEY, "") for c in carriers if c}
    token = request_id_var.set(rids.pop() if len(rids) == 1 else "")
    try:
        if not _on:
            yield
            return
        from opentelemetry import propagate

        parents = [propagate.extract(c) for c in carriers if c and "traceparent" in c]
        by_id = {(s.trace_id, s.span_id): s for s in (trace.get_current_span(p).get_span_context() for p in parents)}
        spans = list(by_id.values())
        if len({s.trace_id for s in spans}) == 1:  # one trace: continued, from the first message's span
            parent, links = parents[0], [trace.Link(s) for s in spans[1:]]
        else:  # several traces (or none): a trace of its own, linked to each
            parent, links = otel_context.Context(), [trace.Link(s) for s in spans]
        attributes: dict[str, str | int] = {"messaging.system": "nats", "messaging.batch.message_count": len(carriers)}
        with _tracer.start_as_current_span(
            name, context=parent, kind=trace.SpanKind.CONSUMER, links=links, attributes=attributes
        ):
            yield
    finally:
        request_id_var.reset(token)


# --- work that goes on elsewhere --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Origin:
    """The request id and trace context a piece of work was started under."""

    request_id: str = ""
    context: otel_context.Context | None = None


NO_ORIGIN = Origin()


def current() -> Origin:
    """The request id and (when tracing) the trace context of now, to resume elsewhere."""
    rid = request_id_var.get()
    if not _on:
        return Origin(rid) if rid else NO_ORIGIN
    return Origin(rid, otel_context.get_current())


class resumed:  # noqa: N801 - used as a function: `with resumed(origin):`
    """Inside: the request id and trace context of `origin`, whichever task this is. A class,
    not a generator: the dispatcher enters one per send."""

    __slots__ = ("origin", "token", "attached")

    def __init__(self, origin: Origin) -> None:
        self.origin = origin

    def __enter__(self) -> None:
        self.token = request_id_var.set(self.origin.request_id)
        context = self.origin.context
        self.attached = otel_context.attach(context) if context is not None else None

    def __exit__(self, *exc: object) -> None:
        if self.attached is not None:
            otel_context.detach(self.attached)
        request_id_var.reset(self.token)


def stored() -> str:
    """The request id and trace context of now as JSON, for a row whose work goes on later
    (a batch released by the feeder long after its upload); "{}" when there is neither."""
    return json.dumps(outgoing({}), separators=(",", ":"))


def from_stored(text: str | Mapping[str, str] | None) -> Mapping[str, str] | None:
    """What `stored` wrote, to give `incoming` as a carrier."""
    if not text:
        return None
    if isinstance(text, str):
        try:
            value = json.loads(text)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None
    return text
