"""The dev stack launcher: real servers from wheels, a valid Envoy config, clean stops."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import yaml
from fastapi import FastAPI, Request

from services.gateway.auth import client_address, parse_networks
from services.gateway.config import GatewaySettings
from services.runtime.devstack import (
    ENVOY_PEER,
    EdgeLimits,
    Stack,
    dev_admin_token,
    envoy_binary,
    free_port,
    http_ok,
    render_envoy_config,
    spawn,
    wait_until,
)
from tests.http_server import serving_in_thread


def test_envoy_config_in_repo_validates(tmp_path: Path) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(
        render_envoy_config(listen_host="127.0.0.1", listen_port=18000, gateway_port=18080, admin_port=19901)
    )
    r = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_websocket_upgrades_are_enabled_in_envoy() -> None:
    text = render_envoy_config(listen_host="127.0.0.1", listen_port=1, gateway_port=2, admin_port=3)
    assert "upgrade_type: websocket" in text


def test_envoy_closes_idle_gateway_connections_first_and_resends_only_gets() -> None:
    """Envoy's idle timeout for its connections to the gateway is below the gateway's
    keep-alive (otherwise a request sent as the gateway closes one is lost: a 503); a request
    whose connection was reset is sent again only if it is a GET, one whose connection was
    never made (nothing sent) whatever its method."""
    config = yaml.safe_load(render_envoy_config(listen_host="127.0.0.1", listen_port=1, gateway_port=2, admin_port=3))
    (cluster,) = config["static_resources"]["clusters"]
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    idle = options["common_http_protocol_options"]["idle_timeout"]
    assert int(idle.removesuffix("s")) < GatewaySettings.model_fields["http_keep_alive_seconds"].default
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    gets, others = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert gets["match"]["headers"] == [{"name": ":method", "string_match": {"exact": "GET"}}]
    assert gets["route"]["retry_policy"]["retry_on"] == "connect-failure,reset"
    assert "headers" not in others["match"] and others["route"]["retry_policy"]["retry_on"] == "connect-failure"


def test_a_gateway_gone_costs_no_request_while_another_serves(tmp_path: Path) -> None:
    """Two gateway endpoints, one of them stopped (nothing listens on its port): every
    request, a POST included, is answered by the other, as when a replica is scaled down."""
    upstream = FastAPI()

    @upstream.post("/jobs")
    async def create() -> dict[str, str]:
        return {"ok": "yes"}

    @upstream.get("/jobs")
    async def listing() -> list[str]:
        return []

    with edge(tmp_path, upstream, dead_ports=1) as base, httpx.Client(base_url=base, timeout=5) as client:
        statuses = [client.post("/jobs").status_code for _ in range(20)]
        statuses += [client.get("/jobs").status_code for _ in range(20)]
    assert statuses == [200] * 40, statuses


@contextlib.contextmanager
def edge(tmp_path: Path, upstream: FastAPI, *, dead_ports: int = 0, limits: EdgeLimits | None = None) -> Iterator[str]:
    """A real Envoy with the repository's config in front of `upstream` (and of `dead_ports`
    gateway ports nothing listens on): its base URL."""
    admin, listen = free_port(), free_port()
    with serving_in_thread(upstream) as gateway:
        config = tmp_path / "envoy.yaml"
        config.write_text(
            render_envoy_config(
                listen_host="127.0.0.1",
                listen_port=listen,
                gateway_port=[int(gateway.rpartition(":")[2]), *(free_port() for _ in range(dead_ports))],
                admin_port=admin,
                limits=limits or EdgeLimits(),
            )
        )
        proc = spawn("edge-envoy", [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", "warn"])
        try:
            wait_until(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), timeout=30, what="envoy", proc=proc)
            yield f"http://127.0.0.1:{listen}"
        finally:
            proc.stop()


def test_envoy_limits_requests_per_client_with_a_bucket_for_all_behind_it() -> None:
    config = yaml.safe_load(render_envoy_config(listen_host="127.0.0.1", listen_port=1, gateway_port=2, admin_port=3))
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    first = manager["http_filters"][0]
    assert first["name"] == "envoy.filters.http.local_ratelimit"  # before anything reads the request
    limit = first["typed_config"]
    (action,) = limit["rate_limits"][0]["actions"]
    assert action == {"masked_remote_address": {"v4_prefix_mask_len": 32, "v6_prefix_mask_len": 64}}
    (per_client,) = limit["descriptors"]
    assert per_client["entries"] == [{"key": "masked_remote_address"}]  # no value: one bucket per client
    assert limit["max_dynamic_descriptors"] == EdgeLimits().max_clients
    # The suite, the bench and a browser are all 127.0.0.1 here: the defaults throttle none of them.
    defaults = EdgeLimits()
    assert per_client["token_bucket"]["tokens_per_fill"] == defaults.client_per_second >= 1000
    assert limit["token_bucket"]["max_tokens"] == defaults.total_burst > defaults.client_burst


def test_one_client_past_its_bucket_gets_429_and_another_goes_on(tmp_path: Path) -> None:
    """The rendered config in a real Envoy: 127.0.0.2 and 127.0.0.3 are two clients (all of
    127/8 is loopback). A forged X-Forwarded-For neither makes a new client at the edge nor
    reaches the gateway as the client; once the bucket for everyone is spent, a new client
    is refused too."""
    seen: list[str] = []
    upstream = FastAPI()

    @upstream.get("/")
    async def echo(request: Request) -> dict[str, str]:
        seen.append(request.headers.get("x-forwarded-for", ""))
        return {}

    limits = EdgeLimits(client_per_second=1, client_burst=3, total_per_second=1, total_burst=20)
    with edge(tmp_path, upstream, limits=limits) as base:

        def client(source: str) -> httpx.Client:
            transport = httpx.HTTPTransport(local_address=source)
            return httpx.Client(base_url=base, transport=transport, timeout=5)

        with client("127.0.0.2") as a, client("127.0.0.3") as b:
            replies = [a.get("/", headers={"X-Forwarded-For": f"198.51.100.{i}"}) for i in range(10)]
            statuses = [r.status_code for r in replies]
            # The burst of three, then refused (each second that turns meanwhile gives one back).
            assert statuses[:3] == [200] * 3 and 429 in statuses, statuses
            refused = next(r for r in replies if r.status_code == 429)
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["code"] == "too_many_requests"
            assert b.get("/").status_code == 200  # another client has its own bucket

        # What the gateway, trusting Envoy alone, makes of the forged header: Envoy's peer.
        trusted = parse_networks(ENVOY_PEER)
        assert {client_address("127.0.0.1", hops, trusted) for hops in seen} == {"127.0.0.2", "127.0.0.3"}

        # Fresh clients until the bucket for all (20, some spent above) runs out.
        fresh = []
        for n in range(4, 40):
            with client(f"127.0.0.{n}") as c:
                fresh.append(c.get("/").status_code)
            if fresh[-1] == 429:
                break
        assert fresh[0] == 200 and fresh[-1] == 429, fresh


def test_dev_admin_token_is_generated_once(tmp_path: Path) -> None:
    first = dev_admin_token(tmp_path)
    assert len(first) >= 32
    assert dev_admin_token(tmp_path) == first
    assert (tmp_path / "dev_admin_token").stat().st_mode & 0o077 == 0


def test_full_stack_starts_and_stops_without_leftovers(tmp_path: Path) -> None:
    """Its own PostgreSQL, NATS, the four services and Envoy; nothing survives stop()."""
    stack = Stack(data_dir=tmp_path, fast_postgres=True)
    stack.extra_env["PREGONERO_STATIC_TOKENS"] = "t=admin"
    # Clear inherited URLs so the launcher really starts its own servers.
    import os

    saved = {k: os.environ.pop(k) for k in ("DATABASE_URL", "NATS_URL") if k in os.environ}
    try:
        stack.start_infra()
        stack.start_services()
        pids = [p.popen.pid for p in stack.procs]
        assert {p.name for p in stack.procs} == {
            "postgres",
            "nats",
            "accounts",
            "campaigns",
            "dispatcher",
            "gateway",
            "envoy",
            "simulator",
        }
        r = httpx.get(f"http://127.0.0.1:{stack.http_port}/health", headers={"Authorization": "Bearer t"})
        assert r.status_code == 200 and r.json()["status"] == "healthy"
    finally:
        os.environ.update(saved)
        stack.stop()
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    # Data stays for the next run.
    assert (tmp_path / "postgres" / "PG_VERSION").exists()
