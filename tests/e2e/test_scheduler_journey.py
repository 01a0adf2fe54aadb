"""The WhatsApp scheduler's journey end to end, as its frontend meets it, through Envoy on the
real stack: an account of the test's own (topped-up credit, a user whose profile says
`America/Santiago`, one unthrottled simulated device), 1,000 contacts imported from a CSV into
two overlapping groups, a few opted out and a couple inactive, and a message to both groups
scheduled 10 s ahead in Santiago's wall-clock time. It starts on time, every phone of the
union gets exactly one message and the excluded ones none (the simulated provider's record is
the proof), the user's socket shows `scheduled → sending → sent` and the progress, stats and
dashboard agree with the record, and the credit is charged once per message."""

from __future__ import annotations

import contextlib
import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from services.runtime.devstack import Stack
from tests.conftest import ADMIN_TOKEN, new_member, wait_for
from tests.e2e.test_bulk import sends_to
from tests.e2e.test_credit import balance

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SANTIAGO = ZoneInfo("America/Santiago")
PRICE = Decimal("0.01")
CONTACTS = 1000
LEAD_S = 10
FIRST_NAMES = ("Ana", "José", "María Ñuñez", "Luis", "Sofía")
CONTENT = "Hola {{name}}, te escribimos al {{phone}}"

pytestmark = pytest.mark.timeout(180)


def render(name: str, phone: str) -> str:
    return f"Hola {name}, te escribimos al {phone}"


def parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def csv(rows: list[tuple[str, str, str]]) -> bytes:
    lines = ["Nombre,Teléfono,Grupo", *(",".join(row) for row in rows)]
    return ("\n".join(lines) + "\n").encode()


class Socket:
    """`/ws/{user_id}` read on a thread of its own: every event, with when it arrived."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True, name="ws-reader")
        self.thread.start()

    def _read(self) -> None:
        try:
            for raw in self.ws:
                event = json.loads(raw)
                with self.changed:
                    self.events.append((time.time(), event))
                    self.changed.notify_all()
        except ConnectionClosed:
            pass

    def send(self, message: dict[str, Any]) -> None:
        self.ws.send(json.dumps(message))

    def wait(self, what: str, found: Callable[[dict[str, Any]], bool], timeout: float = 30) -> tuple[float, dict]:
        """The first event (from the start) `found` accepts, and when it arrived."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                hit = next(((at, e) for at, e in self.events if found(e)), None)
                if hit is not None:
                    return hit
                left = deadline - time.monotonic()
                if left <= 0 or not self.thread.is_alive():
                    kinds = [e.get("type") for _, e in self.events]
                    raise AssertionError(f"socket: no {what} within {timeout}s; got {kinds}")
                self.changed.wait(left)

    def about(self, message_id: str) -> list[tuple[float, dict[str, Any]]]:
        with self.changed:
            return [(at, e) for at, e in self.events if e.get("message_id") == message_id]


@contextlib.contextmanager
def user_socket(base_url: str, user_id: str, token: str) -> Iterator[Socket]:
    with connect(f"{base_url.replace('http', 'ws')}/ws/{user_id}", open_timeout=10, close_timeout=5) as ws:
        ws.send(json.dumps({"type": "auth", "token": token}))
        hello = json.loads(ws.recv(timeout=10))
        assert hello["type"] == "authenticated" and hello["user_id"] == user_id, hello
        yield Socket(ws)


def test_a_scheduled_message_to_1000_imported_contacts_goes_out_on_time_once_each_and_is_paid_once(
    base_url: str, suite: Stack
) -> None:
    # --- an account of the test's own, topped up; its user lives in Santiago ------------------
    account_id = f"journey-{uuid.uuid4().hex[:8]}"
    r = httpx.post(
        f"{base_url}/api/v1/accounts",
        headers=ADMIN,
        json={
            "account_id": account_id,
            "account_name": "Journey",
            "country": "CL",
            # Not Santiago: only the user's profile makes the time below Santiago's.
            "timezone": "Europe/Madrid",
            "initial_credits": "5",
            "cost_per_whatsapp_message": str(PRICE),
        },
    )
    assert r.status_code == 200, r.text
    r = httpx.post(
        f"{base_url}/api/v1/accounts/{account_id}/topup",
        headers={**ADMIN, "Idempotency-Key": f"journey-{account_id}"},
        json={"credits": 10, "reason": "journey"},
    )
    assert r.status_code == 200 and r.json()["new_balance"] == 15, r.text

    login = new_member(base_url, account_id)
    token, user_id = login["access_token"], login["user"]["id"]
    api = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    sim = httpx.Client(base_url=suite.simulator_url, timeout=30)
    try:
        assert api.get("/api/auth/me").json()["effective_timezone"] == "Europe/Madrid"
        r = api.patch("/api/auth/me", json={"timezone": "America/Santiago"})
        assert r.status_code == 200, r.text
        assert r.json()["timezone"] == r.json()["effective_timezone"] == "America/Santiago"

        with user_socket(base_url, user_id, token) as socket:
            journey(base_url, api, sim, socket, suite, account_id)
    finally:
        api.close()
        sim.close()


def journey(base_url: str, api: httpx.Client, sim: httpx.Client, socket: Socket, suite: Stack, account_id: str) -> None:
    # --- its own active simulated device; the socket hears it connect --------------------------
    r = api.post(
        "/devices", json={"token": f"jr-{uuid.uuid4().hex[:8]}", "secret": "s3cret-value", "rate_per_minute": 0}
    )
    assert r.status_code == 200, r.text
    device_id = r.json()["device"]["id"]
    socket.wait(
        "whatsapp_status of the new device",
        lambda e: e["type"] == "whatsapp_status" and e["device_id"] == device_id and e["status"] == "connected",
    )

    # --- 1,000 contacts: A = 0-599 (column), B = 600-999 (column) + 400-599 (import into B) ----
    block = random.randrange(1000)  # numbers of this run only; no other test sends to +56996…
    phones = [f"+56996{block:03d}{i:03d}" for i in range(CONTACTS)]
    names = {p: f"{FIRST_NAMES[i % len(FIRST_NAMES)]} {i:04d}" for i, p in enumerate(phones)}
    tag = uuid.uuid4().hex[:6]
    group_a, group_b = f"Norte {tag}", f"Sur {tag}"
    # Every third phone written as a Chilean national number: stored (and sent to) as E.164.
    written = [p.removeprefix("+56") if i % 3 == 0 else p for i, p in enumerate(phones)]
    rows = [(names[p], written[i], group_a if i < 600 else group_b) for i, p in enumerate(phones)]
    r = api.post("/api/contacts/import", files={"file": ("contactos.csv", csv(rows), "text/csv")})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "created": CONTACTS,
        "updated": 0,
        "skipped": 0,
        "invalid": 0,
        "invalid_rows": [],
        "group_id": None,
    }, r.json()
    groups = {g["name"]: g for g in api.get("/api/groups").json()}
    assert set(groups) == {group_a, group_b}
    a_id, b_id = groups[group_a]["id"], groups[group_b]["id"]
    r = api.post(
        "/api/contacts/import",
        files={"file": ("mas.csv", csv([(names[p], p, "") for p in phones[400:600]]), "text/csv")},
        data={"group_id": b_id, "on_duplicate": "skip"},
    )
    assert r.status_code == 200, r.text
    assert (r.json()["created"], r.json()["skipped"], r.json()["group_id"]) == (0, 200, b_id), r.json()
    for group_id, members in ((a_id, phones[:600]), (b_id, phones[400:])):
        assert api.get(f"/api/groups/{group_id}").json()["contact_count"] == 600
        listed = api.get("/api/contacts", params={"group_id": group_id, "limit": 1000})
        assert {c["phone"] for c in listed.json()} == set(members) and listed.headers["X-Total-Count"] == "600"
    assert api.get("/api/contacts", params={"limit": 1}).headers["X-Total-Count"] == str(CONTACTS)

    # --- excluded: opted out (A only, both, B only) and inactive (A only, both, B only) ------
    opted_out = {phones[5], phones[450], phones[820]}
    for phone in sorted(opted_out):
        r = api.post("/api/opt-outs", json={"phone": phone})
        assert r.status_code == 201, r.text
    inactive = {phones[17], phones[510], phones[990]}
    for phone in sorted(inactive):
        found = api.get("/api/contacts", params={"search": phone.removeprefix("+")}).json()
        assert [c["phone"] for c in found] == [phone], found
        r = api.put(f"/api/contacts/{found[0]['id']}", json={"is_active": False})
        assert r.status_code == 200 and r.json()["is_active"] is False, r.text
    expected = set(phones) - opted_out - inactive
    n = len(expected)
    assert n == CONTACTS - 6

    # --- the message, 10 s ahead in Santiago's wall-clock time, no offset ----------------------
    local = (datetime.now(SANTIAGO) + timedelta(seconds=LEAD_S)).replace(tzinfo=None, microsecond=0)
    due = local.replace(tzinfo=SANTIAGO).astimezone(UTC)
    r = api.post(
        "/api/messages", json={"content": CONTENT, "scheduled_for": local.isoformat(), "group_ids": [a_id, b_id]}
    )
    assert r.status_code == 201, r.text
    created = r.json()
    message_id = created["id"]
    assert created["status"] == "draft" and created["recipient_count"] == n, created
    assert parse(created["scheduled_for"]) == due, (created["scheduled_for"], local.isoformat())
    assert {g["id"] for g in created["groups"]} == {a_id, b_id}

    socket.send({"type": "subscribe_message", "message_id": message_id})
    socket.wait("subscribed", lambda e: e == {"type": "subscribed", "message_id": message_id}, 10)

    preview = api.get(f"/api/messages/{message_id}/preview").json()
    assert preview["recipient_count"] == n and Decimal(str(preview["unit_price"])) == PRICE, preview
    assert Decimal(str(preview["estimated_cost"])) == n * PRICE, preview
    assert len(preview["samples"]) == 5
    for sample in preview["samples"]:
        assert sample["phone"] in expected and sample["name"] == names[sample["phone"]]
        assert sample["text"] == render(sample["name"], sample["phone"])

    before = balance(base_url, account_id)
    assert (before["credit_balance"], before["credit_used"], before["credit_reserved"]) == (15, 0, 0), before
    r = api.post(f"/api/messages/{message_id}/schedule")
    assert r.status_code == 200 and r.json()["status"] == "scheduled", r.text
    assert time.time() < due.timestamp(), "setting up took longer than the lead time"

    # --- live: scheduled, then sending on time, progress, sent -----------------------------------
    def status(name: str) -> Callable[[dict[str, Any]], bool]:
        wanted = ("message_status_update", message_id, name)
        return lambda e: (e["type"], e.get("message_id"), e.get("status")) == wanted

    socket.wait("status scheduled", status("scheduled"), 10)
    sending_seen, sending = socket.wait("status sending", status("sending"), LEAD_S + 30)
    socket.wait("status sent", status("sent"), 60)
    final_progress = {"type": "message_progress", "message_id": message_id, "sent": n, "total": n, "failed": 0}
    socket.wait("the final progress", lambda e: e == final_progress, 30)

    started = parse(sending["timestamp"]) - due
    assert timedelta(0) <= started < timedelta(seconds=5), f"started {started} after its time"
    assert sending_seen - due.timestamp() < 5.5, f"sending seen {sending_seen - due.timestamp():.2f}s after its time"
    assert "late" not in sending

    events = socket.about(message_id)
    kinds = [(e["type"], e.get("status")) for _, e in events if e["type"] != "subscribed"]
    statuses = [s for t, s in kinds if t == "message_status_update"]
    assert statuses == ["scheduled", "sending", "sent"], kinds
    first_progress = kinds.index(("message_progress", None))
    assert kinds.index(("message_status_update", "sending")) < first_progress, kinds
    progress = [e for _, e in events if e["type"] == "message_progress"]
    assert progress[-1] == final_progress, progress
    assert all(p["total"] == n and p["failed"] == 0 for p in progress), progress
    assert [p["sent"] for p in progress] == sorted(p["sent"] for p in progress), progress

    # --- the provider's record: each phone of the union once, the excluded ones never ---------
    record = sends_to(suite, phones)
    by_phone = Counter(e[2] for e in record)
    assert by_phone == Counter(expected), (
        f"{len(record)} sends; twice: {[p for p, c in by_phone.items() if c > 1][:5]}; "
        f"missing: {sorted(expected - set(by_phone))[:5]}; excluded reached: {sorted(set(by_phone) - expected)}"
    )
    assert not set(by_phone) & (opted_out | inactive)
    assert {e[1] for e in record} == {device_id}
    for attempt_id, _, phone, _ in record:
        shown = sim.get(f"/v1/messages/{attempt_id}")
        assert shown.status_code == 200, shown.text
        assert shown.json()["text"] == render(names[phone], phone), shown.json()
    sent_at = sorted(e[3] for e in record)
    assert sent_at[0] >= due.timestamp(), "a message went before its time"

    # --- the message, its stats and the dashboard agree with the record ----------------------
    sent = api.get(f"/api/messages/{message_id}").json()
    assert sent["status"] == "sent" and sent["late"] is False and sent["sent_at"] is not None, sent
    assert (sent["recipient_count"], sent["sent_count"], sent["failed_count"]) == (n, len(record), 0), sent
    assert abs(parse(sent["started_at"]) - parse(sending["timestamp"])) < timedelta(seconds=1), sent
    stats = api.get(f"/api/messages/{message_id}/stats").json()
    assert stats["recipient_count"] == n and stats["sent"] == len(record), stats
    assert (stats["failed"], stats["pending"], stats["delivery_rate"]) == (0, 0, 100.0), stats
    assert stats["delivered"] <= stats["sent"] and stats["read"] <= stats["delivered"], stats
    dashboard = api.get("/api/messages/dashboard").json()
    assert dashboard["by_status"] == {"sent": 1} and dashboard["total_messages"] == 1, dashboard
    assert dashboard["messages_sent_today"] == 1 and dashboard["recipients_sent_today"] == len(record), dashboard
    assert dashboard["delivery_rate"] == 100.0 and dashboard["next_24h"] == [], dashboard
    # Opted-out contacts are still active contacts; the inactive ones are not.
    assert dashboard["active_groups"] == 2 and dashboard["active_contacts"] == CONTACTS - len(inactive), dashboard

    # --- credit: charged once per message, every hold settled ---------------------------------
    cost = len(record) * PRICE
    after = wait_for(
        "holds settled and the sends charged",
        lambda: (b := balance(base_url, account_id))["credit_reserved"] == 0 and b["credit_used"] >= cost and b,
        timeout=30,
    )
    assert after["credit_used"] == cost, after
    assert after["credit_balance"] == before["credit_balance"] == 15, after
    assert before["credit_available"] - after["credit_available"] == cost, (before, after)
    entries = ledger(base_url, account_id)
    captures = [e for e in entries if e["kind"] == "capture"]
    assert captures and sum(Decimal(str(e["cost"])) for e in captures) == cost, captures
    assert sum(Decimal(str(e["used_change"])) for e in entries) == cost
    assert sum(Decimal(str(e["held_change"])) for e in entries) == 0  # every hold captured or released
    assert all(e["cost"] == 0 for e in entries if e["kind"] != "capture")


def ledger(base_url: str, account_id: str) -> list[dict[str, Any]]:
    """Every ledger entry of the account, newest first."""
    entries: list[dict[str, Any]] = []
    while True:
        r = httpx.get(
            f"{base_url}/api/v1/accounts/{account_id}/transactions",
            headers=ADMIN,
            params={"limit": 500, "skip": len(entries)},
        )
        assert r.status_code == 200, r.text
        entries.extend(r.json())
        if not r.json() or len(entries) >= int(r.headers["X-Total-Count"]):
            return entries
