"""Real WhatsApp devices end to end (issue 12's "done when"), through Envoy, against the local
Wablas and WAHA the suite's dispatcher is pointed at (tests/conftest.py `session_wablas`,
`session_waha`): a 2,000-row bulk file over two `wablas` devices and one `waha` session;
WhatsApp drops the session in the middle (the fake WAHA fails it after a set number of
sends, while the Wablas devices are paced to a rate that cannot have finished the job by
then), the user restarts it and it asks for a QR on the account's socket; the job completes
on the Wablas devices, every recipient is in the fakes' records once, and the status
callbacks (Wablas's Tracking URL, which the dispatcher set on each device, and WAHA's acks)
become the recipients' `delivery`."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.conftest import wait_for
from tests.dispatcher.fake_wablas import FakeWablas
from tests.dispatcher.fake_waha import QR_PNG, FakeWaha, signed
from tests.e2e.test_bulk import make_file, phones, send_file
from tests.e2e.test_scheduled_messages import account
from tests.e2e.test_waha import session_of

pytestmark = pytest.mark.timeout(60)

ROWS = 2_000
WAHA_SENDS = 300  # WhatsApp drops the session after this many of its messages
WABLAS_RATE = 6_000  # a minute, each: 1,700 messages take the two of them over 8 s


@pytest.fixture
def fakes(session_wablas: FakeWablas, session_waha: FakeWaha) -> tuple[FakeWablas, FakeWaha]:
    session_wablas.throttled, session_wablas.hang, session_wablas.odd = 0, set(), []
    session_waha.throttled, session_waha.hang_s = 0, 0.0
    return session_wablas, session_waha


def state(ws: ClientConnection, device_id: int, status: str) -> dict[str, Any]:
    """That device's next `whatsapp_status` with `status`, skipping the others."""
    deadline = time.monotonic() + 20
    while (left := deadline - time.monotonic()) > 0:
        event = json.loads(ws.recv(timeout=left))
        if event["type"] == "whatsapp_status" and event["device_id"] == device_id and event["status"] == status:
            return event  # type: ignore[no-any-return]
    raise AssertionError(f"no whatsapp_status {status} for device {device_id}")


def test_a_bulk_file_over_wablas_and_waha_devices_survives_a_dropped_session(
    base_url: str, fakes: tuple[FakeWablas, FakeWaha]
) -> None:
    wablas, waha = fakes
    _, key = account(base_url, credits="100", device_rate=None)
    tokens = [f"wab-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    for token in tokens:
        wablas.add_device(token, f"sec-{token}").quota = 5_000

    with connect(base_url.replace("http", "ws") + "/ws/owner", open_timeout=10, close_timeout=5) as ws:
        ws.send(json.dumps({"type": "auth", "token": key["Authorization"].removeprefix("Bearer ")}))
        assert json.loads(ws.recv(timeout=10))["type"] == "authenticated"

        wablas_ids = []
        for token in tokens:
            body = {"provider": "wablas", "token": token, "secret": f"sec-{token}", "rate_per_minute": WABLAS_RATE}
            r = httpx.post(f"{base_url}/devices", headers=key, json=body)
            assert r.status_code == 200, r.text
            wablas_ids.append(r.json()["device"]["id"])
        r = httpx.post(f"{base_url}/devices", headers=key, json={"provider": "waha", "rate_per_minute": 0})
        assert r.status_code == 200, r.text
        waha_id = r.json()["device"]["id"]

        # The dispatcher pointed each Wablas device's status callbacks at its own URL.
        wait_for("tracking URLs set", lambda: all(t in wablas.tracking_urls for t in tokens), 15)
        for token, device_id in zip(tokens, wablas_ids, strict=True):
            assert f"/webhooks/wablas?device={device_id}&key=" in wablas.tracking_urls[token]

        session = session_of(waha, waha_id)
        state(ws, waha_id, "qr_needed")
        waha.link(session)
        state(ws, waha_id, "connected")
        waha.sessions[session].fail_after = WAHA_SENDS

        def polled() -> list[dict[str, Any]] | None:
            devices = httpx.get(f"{base_url}/devices", headers=key).json()["devices"]
            shown = [d for d in devices if d["id"] in wablas_ids]
            return shown if all(d["connection"] == "connected" for d in shown) else None

        for device in wait_for("wablas devices polled", polled, 15):
            assert (device["quota_left"], device["daily_limit"]) == (5_000, 0)

        numbers = phones(90, ROWS)
        r = send_file(base_url, make_file(numbers), message="Hola @valor1", headers=key)
        assert r.status_code == 200, r.text
        job_id = r.json()["job"]["id"]

        # WhatsApp drops the session mid-job; the user restarts it and it asks for a QR.
        assert state(ws, waha_id, "disconnected")
        progress = httpx.get(f"{base_url}/jobs/{job_id}", headers=key).json()["progress"]
        assert progress["sent"] < ROWS - WAHA_SENDS, progress  # the Wablas devices had work left
        r = httpx.post(f"{base_url}/devices/{waha_id}/restart", headers=key)
        assert r.status_code == 200, r.text
        asked = state(ws, waha_id, "qr_needed")
        assert base64.b64decode(asked["qr_code"]) == QR_PNG

        def finished() -> dict[str, Any] | None:
            job = httpx.get(f"{base_url}/jobs/{job_id}", headers=key).json()
            return job if job["status"] in ("completed", "failed", "cancelled") else None

        job = wait_for("job finished", finished, 30)

    results = httpx.get(f"{base_url}/jobs/{job_id}/results", headers=key, params={"limit": 10_000}).json()["results"]
    failed = [(r["phone"], r.get("error")) for r in results if r["status"] != "sent"]
    assert (job["status"], job["progress"]["sent"], failed[:5]) == ("completed", ROWS, [])

    at_wablas = {t: [m for m in wablas.accepted if m["device"] == t] for t in tokens}
    at_waha = [m for m in waha.sent if m["session"] == session]
    everyone = [m["phone"] for sent in at_wablas.values() for m in sent]
    everyone += [m["chatId"].removesuffix("@c.us") for m in at_waha]
    assert Counter(everyone) == Counter(n.lstrip("+") for n in numbers)  # every recipient, once
    assert len(at_waha) == WAHA_SENDS and all(at_wablas.values())  # the rest went out through Wablas

    # Delivery reports: Wablas posts to each device's Tracking URL (up to 100 statuses a
    # body, no ref_id), WAHA signs its acks.
    for token, sent in at_wablas.items():
        for start in range(0, len(sent), 100):
            body = [{"id": m["id"], "phone": m["phone"], "status": "delivered"} for m in sent[start : start + 100]]
            r = httpx.post(wablas.tracking_urls[token], json=body)
            assert r.status_code == 200 and r.json() == {"received": len(body)}, r.text
    acked = at_waha[:5]
    for m in acked:
        payload = {"id": m["id"], "from": m["chatId"], "fromMe": True, "ackName": "READ"}
        raw = waha.event(session, "message.ack", payload)
        assert httpx.post(f"{base_url}/webhooks/waha", content=raw, headers=signed(raw)).json() == {"received": 1}

    read = {"+" + m["chatId"].removesuffix("@c.us") for m in acked}
    delivered = {"+" + m["phone"] for sent in at_wablas.values() for m in sent}

    def reported() -> Counter[str | None] | None:
        rows = httpx.get(f"{base_url}/jobs/{job_id}/results", headers=key, params={"limit": 10_000}).json()
        by_phone = {r["phone"]: r["delivery"] for r in rows["results"]}
        if any(by_phone[p] != "delivered" for p in delivered) or any(by_phone[p] != "read" for p in read):
            return None
        return Counter(by_phone.values())

    shown = wait_for("delivery reports in the results", reported, 20)
    assert shown == Counter({"delivered": len(delivered), "read": len(read), None: WAHA_SENDS - len(read)})
