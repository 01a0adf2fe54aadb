"""WhatsApp Web devices (provider waha) end to end, through Envoy, against a local WAHA
(tests/dispatcher/fake_waha.py, the suite's WAHA_BASE_URL) that posts its signed webhooks to
the gateway: a device created without credentials gets its session, shows its QR (PNG and
base64), and its state changes reach the account's socket as `whatsapp_status`; logout and
restart act on the session; a bulk send goes out through it, and WAHA's acks become the
recipients' delivery reports, duplicates and late ones changing nothing; a session that fails
mid-job leaves no recipient lost or sent twice."""

from __future__ import annotations

import base64
import json
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from services.runtime.devstack import Stack
from tests.conftest import MEMBER_TOKEN, wait_for
from tests.dispatcher.fake_waha import HMAC_KEY, QR_PNG, FakeWaha, signed
from tests.e2e.test_bulk import ADMIN, add_device, deactivate_all, make_file, phones, send_file, sends_to, wait_job
from tests.e2e.test_device_states import next_state

MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}  # account acme

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def waha(session_waha: FakeWaha) -> FakeWaha:
    session_waha.throttled, session_waha.hang_s = 0, 0.0
    return session_waha


def add_waha_device(base_url: str, headers: dict[str, str], **fields: Any) -> dict[str, Any]:
    r = httpx.post(f"{base_url}/devices", headers=headers, json={"provider": "waha", **fields})
    assert r.status_code == 200, r.text
    return r.json()["device"]  # type: ignore[no-any-return]


def session_of(waha: FakeWaha, device_id: int, status: str = "SCAN_QR_CODE") -> str:
    name = f"pregonero-{device_id}"
    wait_for(f"session {name} {status}", lambda: name in waha.sessions and waha.sessions[name].status == status, 15)
    return name


def test_a_session_device_shows_its_qr_and_its_states_reach_the_socket(base_url: str, waha: FakeWaha) -> None:
    with connect(base_url.replace("http", "ws") + "/ws/operator", open_timeout=10, close_timeout=5) as ws:
        ws.send(json.dumps({"type": "auth", "token": MEMBER_TOKEN}))
        assert json.loads(ws.recv(timeout=10))["type"] == "authenticated"

        device = add_waha_device(base_url, MEMBER, device_name="Ventas")  # no token, no secret
        device_id = device["id"]
        assert device["provider"] == "waha" and device["token"] == ""
        assert next_state(ws, device_id)["status"] == "disconnected"  # created: not linked yet
        session = session_of(waha, device_id)
        hook = waha.sessions[session].config["webhooks"][0]
        assert hook["url"].endswith("/webhooks/waha") and hook["hmac"] == {"key": HMAC_KEY}
        # WAHA said SCAN_QR_CODE: the socket gets the QR to show.
        asked = next_state(ws, device_id)
        assert asked["status"] == "qr_needed" and base64.b64decode(asked["qr_code"]) == QR_PNG

        r = httpx.get(f"{base_url}/devices/{device_id}/qr", headers=MEMBER)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == QR_PNG
        r = httpx.get(f"{base_url}/devices/{device_id}/qr", headers=MEMBER, params={"format": "json"})
        assert r.json() == {"qr_code": base64.b64encode(QR_PNG).decode(), "status": "qr_needed"}
        r = httpx.get(f"{base_url}/devices/{device_id}/qr", headers={**MEMBER, "Accept": "application/json"})
        assert r.json()["status"] == "qr_needed"
        # Another account's device is not found; a device without a session has no QR.
        for theirs in ("qr", "logout", "restart"):
            call = httpx.get if theirs == "qr" else httpx.post
            assert call(f"{base_url}/devices/{device_id}/{theirs}", headers=ADMIN).status_code == 404  # other account
        other = httpx.post(f"{base_url}/devices", headers=MEMBER, json={"token": "t-qr", "secret": "s-qr-0001"})
        other_id = other.json()["device"]["id"]
        r = httpx.get(f"{base_url}/devices/{other_id}/qr", headers=MEMBER)
        assert r.status_code == 409 and "not a WhatsApp Web session" in r.json()["message"]
        httpx.delete(f"{base_url}/devices/{other_id}", headers=MEMBER)

        waha.link(session)  # the phone scanned it: WORKING, posted by WAHA
        assert next_state(ws, device_id)["status"] == "connected"
        shown = httpx.get(f"{base_url}/devices/{device_id}", headers=MEMBER).json()
        assert shown["status"] == "active"
        r = httpx.get(f"{base_url}/devices/{device_id}/qr", headers=MEMBER)
        assert r.status_code == 409 and "linked already" in r.json()["message"]

        waha.fail(session)  # WhatsApp dropped the session
        assert next_state(ws, device_id)["status"] == "disconnected"

        calls = len(waha.calls)
        r = httpx.post(f"{base_url}/devices/{device_id}/restart", headers=MEMBER)
        assert r.status_code == 200 and r.json()["device"]["id"] == device_id
        assert f"POST /api/sessions/{session}/restart" in waha.calls[calls:]
        assert next_state(ws, device_id)["status"] == "qr_needed"
        waha.link(session)
        assert next_state(ws, device_id)["status"] == "connected"
        r = httpx.post(f"{base_url}/devices/{device_id}/logout", headers=MEMBER)
        assert r.status_code == 200
        assert f"POST /api/sessions/{session}/logout" in waha.calls[calls:]
        assert next_state(ws, device_id)["status"] == "qr_needed"

        assert httpx.delete(f"{base_url}/devices/{device_id}", headers=MEMBER).status_code == 200
        wait_for("session deleted at WAHA", lambda: session not in waha.sessions, 15)


def test_webhooks_are_checked_before_anything_is_read(base_url: str, waha: FakeWaha) -> None:
    body = json.dumps({"event": "session.status", "session": "pregonero-1", "payload": {"status": "WORKING"}}).encode()
    url = f"{base_url}/webhooks/waha"
    assert httpx.post(url, content=body).status_code == 401
    assert httpx.post(url, content=body, headers=signed(body, "not-the-key")).status_code == 401
    # An event of a session no device has (another application's on the same WAHA): ignored.
    body = json.dumps({"event": "session.status", "session": "someone-else", "payload": {"status": "FAILED"}}).encode()
    r = httpx.post(url, content=body, headers=signed(body))
    assert r.status_code == 200 and r.json() == {"ignored": "unknown session"}
    for bad, status in ((b"{", 400), (json.dumps({"event": "message.ack"}).encode(), 400), (b"x" * 70_000, 413)):
        r = httpx.post(url, content=bad, headers=signed(bad))
        assert r.status_code == status, r.text


def test_a_bulk_send_through_a_session_and_its_acks(base_url: str, waha: FakeWaha) -> None:
    deactivate_all(base_url)
    device = add_waha_device(base_url, ADMIN, rate_per_minute=0)
    session = session_of(waha, device["id"])
    waha.link(session)  # its WORKING webhook is answered (so recorded) when this returns
    numbers = phones(51, 6)
    before = len(waha.sent)
    try:
        r = send_file(base_url, make_file(numbers), message="Hola @valor1")
        assert r.status_code == 200, r.text
        job = wait_job(base_url, r.json()["job"]["id"])
    finally:
        httpx.put(f"{base_url}/devices/{device['id']}", headers=ADMIN, json={"status": "inactive"})
    assert job["progress"]["sent"] == 6
    sent = [m for m in waha.sent[before:] if m["session"] == session]
    assert Counter(m["chatId"] for m in sent) == Counter(f"{n.lstrip('+')}@c.us" for n in numbers)
    by_phone = {"+" + m["chatId"].removesuffix("@c.us"): m for m in sent}
    assert by_phone[numbers[0]]["text"] == "Hola name0"

    def ack(number: str, name: str, at_ms: int) -> httpx.Response:
        payload = {"id": by_phone[number]["id"], "from": by_phone[number]["chatId"], "fromMe": True, "ackName": name}
        body = json.loads(waha.event(session, "message.ack", payload))
        body["timestamp"] = at_ms
        raw = json.dumps(body).encode()
        return httpx.post(f"{base_url}/webhooks/waha", content=raw, headers=signed(raw))

    t = 1_795_000_000_000
    assert ack(numbers[0], "DEVICE", t + 2_000).json() == {"received": 1}
    assert ack(numbers[0], "READ", t + 9_000).json() == {"received": 1}
    assert ack(numbers[1], "READ", t + 5_000).status_code == 200  # read first ...
    assert ack(numbers[1], "DEVICE", t + 3_000).status_code == 200  # ... delivered late
    assert ack(numbers[0], "DEVICE", t + 2_000).status_code == 200  # a duplicate
    assert ack(numbers[2], "ERROR", t + 4_000).status_code == 200
    assert ack(numbers[3], "PENDING", t + 1_000).json() == {"received": 0}

    def rows() -> dict[str, dict[str, Any]] | None:
        found = {
            r["phone"]: r for r in httpx.get(f"{base_url}/jobs/{job['id']}/results", headers=ADMIN).json()["results"]
        }
        done = found[numbers[0]]["delivery"] == "read" and found[numbers[1]]["delivered_at"]
        return found if done and found[numbers[2]]["delivery"] == "failed" else None

    found = wait_for("acks applied", rows, 15)
    first, second, third, fourth = (found[n] for n in numbers[:4])
    assert (first["delivery"], first["delivered_at"], first["read_at"]) == ("read", iso(t + 2_000), iso(t + 9_000))
    assert (second["delivery"], second["delivered_at"]) == ("read", iso(t + 3_000))  # never back to delivered
    assert third["delivery"] == "failed" and third["status"] == "sent"
    assert fourth["delivery"] is None


def iso(at_ms: int) -> str:
    return datetime.fromtimestamp(at_ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def test_a_session_that_fails_mid_job_loses_and_doubles_nothing(base_url: str, waha: FakeWaha, suite: Stack) -> None:
    deactivate_all(base_url)
    other = add_device(base_url, rate_per_minute=0)  # simulated
    device = add_waha_device(base_url, ADMIN, rate_per_minute=0)
    session = session_of(waha, device["id"])
    waha.link(session)
    waha.sessions[session].fail_after = 5  # WhatsApp drops it after five messages
    numbers = phones(52, 40)
    before = len(waha.sent)
    try:
        r = send_file(base_url, make_file(numbers), message="Hola @valor1")
        assert r.status_code == 200, r.text
        job = wait_job(base_url, r.json()["job"]["id"])
    finally:
        for d in (other, device["id"]):
            httpx.put(f"{base_url}/devices/{d}", headers=ADMIN, json={"status": "inactive"})
    at_waha = Counter("+" + m["chatId"].removesuffix("@c.us") for m in waha.sent[before:])
    at_simulated = Counter(e[2] for e in sends_to(suite, numbers))
    assert len(at_waha) == 5 and max(at_waha.values()) == 1
    assert not set(at_waha) & set(at_simulated) and max(at_simulated.values()) == 1  # nobody twice
    # The sends at WAHA when it refused (422: not WORKING) came back `device_unavailable`: their
    # claims were given back and they went out through the other device. Nobody failed.
    assert set(at_waha) | set(at_simulated) == set(numbers)
    progress = job["progress"]
    assert (progress["sent"], progress["failed"]) == (40, 0)
