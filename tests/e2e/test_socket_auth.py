"""Socket credentials end to end, through Envoy: a token offered as `Sec-WebSocket-Protocol`,
sockets closed by a logout and by a revoked API key (through this replica: at once), and a
`?token=` that the gateway does not read and Envoy's access log (deploy/envoy/envoy.yaml) does
not write down."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from services.runtime.devstack import Stack, envoy_binary, free_port, http_ok, render_envoy_config, spawn, wait_until
from tests.conftest import ADMIN_TOKEN, new_member, wait_for

pytestmark = pytest.mark.timeout(60)

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def account(base_url: str) -> str:
    account_id = f"e2e-sockets-{uuid.uuid4().hex[:8]}"
    r = httpx.post(f"{base_url}/api/v1/accounts", headers=ADMIN, json={"account_id": account_id})
    assert r.status_code in (200, 201), r.text
    return account_id


def open_socket(base_url: str, path: str, token: str | None = None, **kw: Any) -> ClientConnection:
    protocols: Any = ["bearer", token] if token else None
    return connect(base_url.replace("http", "ws", 1) + path, subprotocols=protocols, open_timeout=10, **kw)


def closed_for(ws: ClientConnection) -> tuple[int | None, str]:
    """(close code, the reason told): told within a second of the revocation. (The close itself
    completes a second later: Envoy's delayed close of the client's connection.)"""
    started = time.monotonic()
    told = json.loads(ws.recv(timeout=5))
    assert time.monotonic() - started < 1
    assert (told["type"], told["error"]) == ("error", "unauthorized"), told
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=5)
    return ws.close_code, str(told["message"])


def test_a_logout_closes_the_sessions_socket(base_url: str, account: str) -> None:
    session = new_member(base_url, account)
    user_id, access = session["user"]["id"], session["access_token"]
    with open_socket(base_url, f"/ws/{user_id}", access) as ws:
        assert ws.subprotocol == "bearer"
        assert json.loads(ws.recv(timeout=10))["type"] == "authenticated"
        r = httpx.post(f"{base_url}/api/auth/logout", headers={"Authorization": f"Bearer {access}"})
        assert r.status_code == 204, r.text
        assert closed_for(ws) == (4401, "the session has ended; log in again")


def test_a_revoked_api_key_closes_its_socket(base_url: str, account: str) -> None:
    r = httpx.post(f"{base_url}/api/auth/api-keys", headers=ADMIN, json={"name": "sockets", "account_id": account})
    assert r.status_code == 201, r.text
    key = r.json()
    with open_socket(base_url, "/ws/operator", key["key"]) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "authenticated"
        r = httpx.delete(f"{base_url}/api/auth/api-keys/{key['id']}", headers=ADMIN)
        assert r.status_code == 204, r.text
        assert closed_for(ws) == (4401, "invalid or revoked API key")


def test_a_query_token_is_not_read_and_not_in_envoys_access_log(suite: Stack, tmp_path: Path) -> None:
    # An Envoy of this test's own on the same configuration, whose log is written at once (the
    # suite's flushes every 10 s), in front of the suite's gateway.
    listen, admin = free_port(), free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(
        render_envoy_config(
            listen_host="127.0.0.1", listen_port=listen, gateway_port=suite.gateway_port, admin_port=admin
        )
    )
    argv = [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", "warn"]
    envoy = spawn("edge-envoy", [*argv, "--file-flush-interval-msec", "50"])
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), timeout=30, what="envoy", proc=envoy)
        secret, request_id = f"leak-{uuid.uuid4().hex}", uuid.uuid4().hex
        job = "00000000-0000-4000-8000-000000000000"
        path = f"/ws/job/{job}?token={secret}"
        with open_socket(f"http://127.0.0.1:{listen}", path, additional_headers={"X-Request-Id": request_id}) as ws:
            ws.send(json.dumps({"type": "auth", "token": "not-a-token"}))  # else it waits for one
            told = json.loads(ws.recv(timeout=10))
            assert (told["error"], told["message"]) == ("unauthorized", "invalid or expired token")
        logged = wait_for("the socket's access log line", lambda: [x for x in envoy.lines if request_id in x], 10)
        assert json.loads(logged[0])["path"] == f"/ws/job/{job}"
        assert not [x for x in envoy.lines + suite.service_procs["gateway"].lines if secret in x]
    finally:
        envoy.stop()
