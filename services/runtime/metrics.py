"""Prometheus metrics every process shares, and the endpoint that serves them.

Each process serves its registry on its own port (`METRICS_PORT`, 0: a free one, logged), in a
thread of prometheus-client's, never through the public edge. The metrics a single service
keeps are defined where their events happen (the dispatcher's engine, the feeder, the
ledger); this module holds what several use: gRPC calls (rpc.py's interceptors), consumers
(bus.py). The streams' backlog is read by the gateway alone (gateway/stream_metrics.py).

Labels are bounded sets: method names, status codes, stream and durable consumer names,
channels and provider names; never an account, a batch, a phone number or a raw path."""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import Counter, Histogram, start_http_server

log = logging.getLogger("pregonero.metrics")

# Seconds: a few ms for a cached read up to the 30-s deadlines of bulk RPCs.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

GRPC_SERVER_HANDLED = Counter(
    "pregonero_grpc_server_handled",
    "gRPC calls this server completed, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_SERVER_SECONDS = Histogram(
    "pregonero_grpc_server_handling_seconds",
    "Time this server took to complete a gRPC call.",
    ["grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)
GRPC_CLIENT_HANDLED = Counter(
    "pregonero_grpc_client_handled",
    "Unary gRPC calls this process made to another service, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_CLIENT_SECONDS = Histogram(
    "pregonero_grpc_client_handling_seconds",
    "Time a unary gRPC call to another service took, answer included.",
    ["grpc_service", "grpc_method"],
    buckets=LATENCY_BUCKETS,
)

CONSUMER_REDELIVERIES = Counter(
    "pregonero_consumer_redeliveries",
    "Messages a durable consumer of this process received again (an earlier delivery failed or timed out).",
    ["consumer"],
)
CONSUMER_DEAD_LETTERED = Counter(
    "pregonero_consumer_dead_lettered",
    "Messages a durable consumer of this process set aside in the DEADLETTER stream.",
    ["consumer"],
)


def serve_metrics(port: int, host: str = "127.0.0.1") -> tuple[WSGIServer, threading.Thread]:
    """Serve the registry at http://host:port/metrics from a daemon thread; port 0 takes a
    free one (logged, and readable from the returned server's `server_address`)."""
    server, thread = start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, server.server_address[1])
    return server, thread


def stop_metrics(served: tuple[WSGIServer, threading.Thread] | None) -> None:
    """Stop serving, without waiting out the server's 0.5-s poll: a daemon thread does."""
    if served is None:
        return
    server = served[0]

    def stop() -> None:
        server.shutdown()
        server.server_close()

    threading.Thread(target=stop, name="metrics-stop", daemon=True).start()


def code_name(code: object) -> str:
    """A status code's name (grpc.aio hands the servicer's back as the enum or as its number)."""
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        for known in grpc.StatusCode:
            if known.value[0] == code:
                return known.name
    return grpc.StatusCode.UNKNOWN.name if code is not None else grpc.StatusCode.OK.name


def split_method(full: str | bytes) -> tuple[str, str]:
    """`/pregonero.accounts.v1.AccountsService/Hold` → (service, method)."""
    text = full.decode() if isinstance(full, bytes) else full
    service, _, method = text.lstrip("/").rpartition("/")
    return service, method
