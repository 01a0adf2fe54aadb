"""A WhatsApp device's state reaches its account's `/ws/{user_id}` sockets as `whatsapp_status`
when it is created, deactivated, reactivated and deleted through the REST API (dispatcher →
NATS → gateway, through Envoy)."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.conftest import MEMBER_TOKEN

MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}  # account acme

pytestmark = pytest.mark.timeout(60)


def next_state(ws: ClientConnection, device_id: int) -> dict[str, Any]:
    """The next whatsapp_status of that device (other tests' devices and events are skipped)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        event = json.loads(ws.recv(timeout=15))
        if event["type"] == "whatsapp_status" and event["device_id"] == device_id:
            return event  # type: ignore[no-any-return]
    raise AssertionError(f"no whatsapp_status for device {device_id}")


def test_device_changes_are_pushed_to_the_accounts_socket(base_url: str) -> None:
    with connect(base_url.replace("http", "ws") + "/ws/operator", open_timeout=10, close_timeout=5) as ws:
        ws.send(json.dumps({"type": "auth", "token": MEMBER_TOKEN}))
        assert json.loads(ws.recv(timeout=10))["type"] == "authenticated"

        r = httpx.post(f"{base_url}/devices", headers=MEMBER, json={"token": "ws-state", "secret": "secret-0001"})
        assert r.status_code == 200, r.text
        device_id = r.json()["device"]["id"]
        assert next_state(ws, device_id) == {"type": "whatsapp_status", "status": "connected", "device_id": device_id}

        r = httpx.put(f"{base_url}/devices/{device_id}", headers=MEMBER, json={"status": "inactive"})
        assert r.status_code == 200, r.text
        assert next_state(ws, device_id)["status"] == "disconnected"
        # A change that is not of its state tells nothing; the reactivation does.
        assert httpx.put(f"{base_url}/devices/{device_id}", headers=MEMBER, json={"device_name": "x"}).is_success
        assert httpx.put(f"{base_url}/devices/{device_id}", headers=MEMBER, json={"status": "active"}).is_success
        assert next_state(ws, device_id)["status"] == "connected"

        assert httpx.delete(f"{base_url}/devices/{device_id}", headers=MEMBER).status_code == 200
        assert next_state(ws, device_id)["status"] == "disconnected"
