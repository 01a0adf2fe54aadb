"""Notifications and the audit log end to end, through Envoy: a finished bulk job notifies
its account, live on /ws/{user_id} and in /api/notifications; members see their own account's
only; top-ups land in the admin-only audit log."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from tests.conftest import ADMIN_TOKEN, MEMBER_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}

pytestmark = pytest.mark.timeout(60)


def finished_job_notification(base_url: str) -> tuple[str, dict[str, Any]]:
    """Runs a two-recipient job on its own device; (job id, the pushed notification)."""
    r = httpx.post(
        f"{base_url}/devices",
        headers=ADMIN,
        json={"token": f"n-{uuid.uuid4().hex[:8]}", "secret": "s3cret-123", "rate_per_minute": 0},
    )
    assert r.status_code == 200, r.text
    device_id = r.json()["device"]["id"]
    ws_url = base_url.replace("http", "ws") + "/ws/operator"
    try:
        with connect(ws_url, open_timeout=10, close_timeout=5) as ws:
            ws.send(json.dumps({"type": "auth", "token": ADMIN_TOKEN}))
            assert json.loads(ws.recv(timeout=10))["type"] == "authenticated"
            ws.send(json.dumps({"type": "ping", "timestamp": 7}))
            assert json.loads(ws.recv(timeout=10)) == {"type": "pong", "timestamp": 7}
            data = b"phone|@valor1\n+56930000001|Ana\n+56930000002|Luis\n"
            r = httpx.post(
                f"{base_url}/messages/send-bulk-file",
                headers=ADMIN,
                files={"file": ("c.csv", data, "text/csv")},
                data={"message": "Hola @valor1", "devices_limit": "1"},
                timeout=30,
            )
            assert r.status_code == 200, r.text
            job_id = str(r.json()["job"]["id"])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                event = json.loads(ws.recv(timeout=30))
                if event["type"] == "new_notification" and event["notification"]["data"].get("job_id") == job_id:
                    return job_id, event["notification"]
            raise AssertionError("no notification for the job")
    finally:
        httpx.put(f"{base_url}/devices/{device_id}", headers=ADMIN, json={"status": "inactive"})


def test_finished_job_notifies_its_account_live_and_in_the_list(base_url: str) -> None:
    job_id, pushed = finished_job_notification(base_url)
    assert pushed["type"] == "success" and pushed["kind"] == "batch_completed"
    assert pushed["data"]["total"] == 2 and pushed["read"] is False
    # The scheduler guide's names, beside the dashboards' own.
    assert pushed["is_read"] is False and pushed["created_at"] == pushed["timestamp"]
    assert (pushed["related_entity_type"], pushed["related_entity_id"]) == ("job", job_id)
    nid = pushed["id"]

    r = httpx.get(f"{base_url}/api/notifications", headers=ADMIN, params={"limit": 100})
    listed = r.json()
    assert nid in [n["id"] for n in listed]
    ids = [int(n["id"]) for n in listed]
    assert ids == sorted(ids, reverse=True)
    total = int(r.headers["X-Total-Count"])
    assert total >= len(listed)
    # offset skips the newest (ones made meanwhile by other tests' jobs are newer still).
    paged = httpx.get(f"{base_url}/api/notifications", headers=ADMIN, params={"limit": 100, "offset": 1}).json()
    older = [int(n["id"]) for n in paged if int(n["id"]) < ids[0]]
    assert older[: len(ids) - 1] == ids[1:]
    for bad in ({"offset": -1}, {"offset": "x"}):
        r = httpx.get(f"{base_url}/api/notifications", headers=ADMIN, params=bad)
        assert r.status_code == 422 and "offset" in r.json()["message"], r.text
    before = httpx.get(f"{base_url}/api/notifications/unread-count", headers=ADMIN).json()["count"]
    assert before >= 1

    # Another account's member: not in its list, and 404 on touching it.
    mine = httpx.get(f"{base_url}/api/notifications", headers=MEMBER).json()
    assert nid not in [n["id"] for n in mine]
    assert httpx.put(f"{base_url}/api/notifications/{nid}/read", headers=MEMBER).status_code == 404
    assert httpx.delete(f"{base_url}/api/notifications/{nid}", headers=MEMBER).status_code == 404

    r = httpx.put(f"{base_url}/api/notifications/{nid}/read", headers=ADMIN)
    assert r.status_code == 200 and r.json()["notification"]["read"] is True
    after = httpx.get(f"{base_url}/api/notifications/unread-count", headers=ADMIN).json()["count"]
    assert after == before - 1
    unread = httpx.get(f"{base_url}/api/notifications", headers=ADMIN, params={"unread_only": True}).json()
    assert nid not in [n["id"] for n in unread]

    r = httpx.delete(f"{base_url}/api/notifications/{nid}", headers=ADMIN)
    assert r.status_code == 204 and not r.content
    assert httpx.delete(f"{base_url}/api/notifications/{nid}", headers=ADMIN).status_code == 404
    pending = {
        n["id"] for n in httpx.get(f"{base_url}/api/notifications", headers=ADMIN, params={"unread_only": True}).json()
    }
    assert httpx.put(f"{base_url}/api/notifications/read-all", headers=ADMIN).status_code == 200
    # Jobs of other tests may finish meanwhile; what was unread before is read now.
    still = httpx.get(f"{base_url}/api/notifications", headers=ADMIN, params={"unread_only": True}).json()
    assert not pending & {n["id"] for n in still}


def test_socket_refuses_without_a_valid_token(base_url: str) -> None:
    ws_url = base_url.replace("http", "ws") + "/ws/someone"
    with connect(ws_url, open_timeout=10, close_timeout=5) as ws:
        ws.send(json.dumps({"type": "auth", "token": "wrong"}))
        assert json.loads(ws.recv(timeout=10))["error"] == "unauthorized"


def test_top_up_is_audited_for_admins_only(base_url: str) -> None:
    key = uuid.uuid4().hex
    r = httpx.post(
        f"{base_url}/api/v1/accounts/default/topup",
        headers={**ADMIN, "Idempotency-Key": key},
        json={"credits": 5, "reason": "audit test"},
    )
    assert r.status_code == 200, r.text
    r = httpx.get(
        f"{base_url}/api/v1/audit", headers=ADMIN, params={"action": "credits.topup", "account_id": "default"}
    )
    assert r.status_code == 200, r.text
    assert int(r.headers["X-Total-Count"]) >= 1
    entry = next(e for e in r.json() if e["details"].get("idempotency_key") == key)
    assert entry["action"] == "credits.topup" and entry["target"] == "default"
    assert entry["actor"]["role"] == "admin" and entry["details"]["reason"] == "audit test"
    assert httpx.get(f"{base_url}/api/v1/audit", headers=MEMBER).status_code == 403
