"""The deployed clients' exact requests, through Envoy, where the suite used to break them
(issue 10): the bulk sender's single receiver device and its upload reply, and the SpeechAI
dashboard editing or duplicating a Chilean campaign with its own default time zone."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from services.runtime.devstack import Stack
from tests.conftest import ADMIN_TOKEN, wait_for

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BUENOS_AIRES = "America/Argentina/Buenos_Aires"


# --- WhatsApp bulk sender: one receiver device ---------------------------------------------------


def device_form(**fields: Any) -> dict[str, Any]:
    """The body the client's device form posts."""
    return {"token": f"inst-{uuid.uuid4().hex[:8]}", "secret": "api-secret-0001", "device_name": "", **fields}


def receivers(base_url: str) -> list[int]:
    r = httpx.get(f"{base_url}/devices", headers=ADMIN)
    assert r.status_code == 200, r.text
    return [d["id"] for d in r.json()["devices"] if d["is_receiver"]]


def test_marking_a_receiver_unmarks_the_previous_one(base_url: str, suite: Stack) -> None:
    r = httpx.post(
        f"{base_url}/devices", headers=ADMIN, json=device_form(device_name="Recepción", is_receiver=True, phone="")
    )
    assert r.status_code == 200, r.text
    first = r.json()["device"]
    assert first["is_receiver"] is True and receivers(base_url) == [first["id"]]

    r = httpx.post(
        f"{base_url}/devices", headers=ADMIN, json=device_form(device_name="Nuevo", is_receiver=True, phone="")
    )
    assert r.status_code == 200, r.text
    second = r.json()["device"]
    assert receivers(base_url) == [second["id"]]
    one = httpx.get(f"{base_url}/devices/{first['id']}", headers=ADMIN).json()
    assert one["is_receiver"] is False

    # The edit form sends every field back, the secret empty when it is not changed.
    edit = {k: one[k] for k in ("token", "device_name", "phone", "status")} | {"secret": "", "is_receiver": True}
    r = httpx.put(f"{base_url}/devices/{first['id']}", headers=ADMIN, json=edit)
    assert r.status_code == 200, r.text
    assert r.json()["device"]["is_receiver"] is True
    assert receivers(base_url) == [first["id"]]


def test_concurrent_receiver_marks_leave_exactly_one(base_url: str, suite: Stack) -> None:
    ids = [
        httpx.post(f"{base_url}/devices", headers=ADMIN, json=device_form()).json()["device"]["id"] for _ in range(4)
    ]

    def mark(device_id: int) -> int:
        r = httpx.put(f"{base_url}/devices/{device_id}", headers=ADMIN, json={"is_receiver": True}, timeout=30)
        return r.status_code

    def add() -> int:
        r = httpx.post(f"{base_url}/devices", headers=ADMIN, json=device_form(is_receiver=True), timeout=30)
        return r.status_code

    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            codes = list(pool.map(mark, ids)) + [f.result() for f in [pool.submit(add) for _ in range(4)]]
            assert codes == [200] * 8
            assert len(receivers(base_url)) == 1


# --- WhatsApp bulk sender: what the upload reply says about the file -----------------------------


def browser_file(rows: list[list[str]]) -> bytes:
    """As the client builds it: a header row, `|` between values, `\\n` line ends, empty values as ''."""
    return ("phone|@valor1|@valor2\n" + "".join("|".join(row) + "\n" for row in rows)).encode()


def send(base_url: str, data: bytes) -> httpx.Response:
    return httpx.post(
        f"{base_url}/messages/send-bulk-file",
        headers=ADMIN,
        files={"file": ("contactos.csv", data, "text/csv")},
        data={"message": "Hola @valor1, tu pedido @valor2", "devices_limit": "1"},
        timeout=120,
    )


@pytest.fixture
def fast_device(base_url: str) -> Iterator[int]:
    """The only active device of the account, with no rate limit, for the test's duration."""
    for d in httpx.get(f"{base_url}/devices", headers=ADMIN).json()["devices"]:
        httpx.put(f"{base_url}/devices/{d['id']}", headers=ADMIN, json={"status": "inactive"})
    r = httpx.post(f"{base_url}/devices", headers=ADMIN, json=device_form(rate_per_minute=0))
    assert r.status_code == 200, r.text
    device_id = int(r.json()["device"]["id"])
    yield device_id
    httpx.put(f"{base_url}/devices/{device_id}", headers=ADMIN, json={"status": "inactive"})


def sent_to(suite: Stack, numbers: set[str]) -> Counter[str]:
    entries: list[list[Any]] = []
    since = 0
    while True:
        page = httpx.get(f"{suite.simulator_url}/v1/record", params={"since": since, "limit": 10_000}).json()
        entries.extend(page["entries"])
        if page["next"] >= page["count"]:
            break
        since = page["next"]
    return Counter(e[2] for e in entries if e[2] in numbers)


def test_upload_reply_reports_duplicates_and_invalid_rows(base_url: str, suite: Stack, fast_device: int) -> None:
    # +569 20… to 29…: ranges `phonenumbers` takes as valid (not all of +569 6… are).
    base = 56_920_000_000 + uuid.uuid4().int % 1_000_000 * 10
    good = [f"+{base + i}" for i in range(4)]
    rows = [
        [good[0], "Ana", "A-1"],
        [good[1], "Beto", ""],
        ["abc", "Nadie", "X"],  # line 4
        [good[0], "Ana otra vez", "A-2"],  # a duplicate: sent once
        ["", "sin teléfono", ""],  # line 6
        [good[2], "", ""],
        ["12", "corto", ""],  # line 8
        [good[1], "Beto", ""],  # another duplicate
        [good[3], "Dora", "D-4"],
    ]
    r = send(base_url, browser_file(rows))
    assert r.status_code == 200, r.text
    body = r.json()
    # Every field the client and the guide read is still there, unchanged.
    assert body["status"] == "success" and "Procesando 4 mensajes" in body["message"]
    job = body["job"]
    assert job["status"] == "pending" and job["total_numbers"] == 4 and job["invalid_rows"] == 3
    assert job["progress"]["total"] == 4 and job["devices_limit"] == 1 and job["results"] == {}
    # What of the file is not sent, and why.
    assert body["duplicates"] == 2
    assert body["invalid_rows"] == 3
    assert body["invalid"] == [
        {"line": 4, "value": "abc", "reason": "invalid for CL: not a phone number"},
        {"line": 6, "value": "", "reason": "missing phone"},
        {"line": 8, "value": "12", "reason": "invalid for CL: too short"},
    ]

    def done() -> dict[str, Any] | None:
        current = httpx.get(f"{base_url}/jobs/{job['id']}", headers=ADMIN).json()
        return current if current["status"] in ("completed", "failed") else None

    finished = wait_for("the upload's job ends", done, timeout=60)
    assert finished["progress"]["sent"] == 4
    assert sent_to(suite, set(good)) == Counter({p: 1 for p in good})  # duplicates sent once


def test_upload_reply_lists_the_first_hundred_invalid_rows(base_url: str, suite: Stack, fast_device: int) -> None:
    base = 56_972_000_000 + uuid.uuid4().int % 1_000_000 * 10  # +569 72… to 81…: valid ranges
    rows = [[f"+{base}", "ok", ""]] + [[f"tel-{i}", f"v{i}", ""] for i in range(150)]
    r = send(base_url, browser_file(rows))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["invalid_rows"] == body["job"]["invalid_rows"] == 150 and body["duplicates"] == 0
    assert len(body["invalid"]) == 100
    assert body["invalid"][0] == {"line": 3, "value": "tel-0", "reason": "invalid for CL: not a phone number"}
    assert body["invalid"][-1] == {"line": 102, "value": "tel-99", "reason": "invalid for CL: too short"}


# --- SpeechAI dashboard: a Chilean campaign edited with the dashboard's zone ---------------------


@pytest.fixture(scope="module")
def api(base_url: str, suite: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{base_url}/api/v1", headers=ADMIN, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def chilean_account(api: httpx.Client) -> str:
    account_id = f"cobranza-{uuid.uuid4().hex[:8]}"
    r = api.post(
        "/accounts",
        json={
            "account_id": account_id,
            "account_name": "Cobranza Chile",
            "country": "CL",
            "plan_type": "credit_based",
            "initial_credits": 1000,
            "settings": {"timezone": "America/Santiago"},
        },
    )
    assert r.status_code == 200, r.text
    return account_id


def call_settings(timezone: str, start: str = "07:00", end: str = "21:00") -> dict[str, Any]:
    """The dashboard's call settings form, as it sends it."""
    return {
        "max_call_duration": 300,
        "ring_timeout": 30,
        "max_attempts": 3,
        "retry_delay_hours": 24,
        "allowed_hours": {"start": start, "end": end},
        "days_of_week": [0, 1, 2, 3, 4, 5, 6],
        "timezone": timezone,
    }


LEGAL = {
    "allowed_hours": {"start": "08:00", "end": "20:00"},
    "days_of_week": [1, 2, 3, 4, 5, 6],
    "timezone": "America/Santiago",
    "skip_holidays": True,
}


def assert_legal(batch: dict[str, Any]) -> None:
    legal = batch["legal_window"]
    assert legal is not None and {k: legal[k] for k in LEGAL} == LEGAL
    assert "Chile" in legal["basis"]


def test_editing_a_chilean_campaign_with_the_dashboards_zone(api: httpx.Client, chilean_account: str) -> None:
    r = api.post(
        "/batches",
        json={
            "account_id": chilean_account,
            "name": "Cobranza marzo",
            "description": "cartera vencida",
            "priority": 2,
            "call_settings": call_settings("America/Santiago", "09:00", "19:00"),
            "allow_duplicates": False,
        },
    )
    assert r.status_code == 200, r.text
    batch_id = r.json()["batch_id"]

    # The edit form: every field, call_settings with the dashboard's default zone.
    r = api.patch(
        f"/batches/{batch_id}",
        json={
            "name": "Cobranza marzo",
            "description": "cartera vencida",
            "priority": 2,
            "call_settings": call_settings(BUENOS_AIRES),
        },
    )
    assert r.status_code == 200, r.text
    edited = api.get(f"/batches/{batch_id}").json()
    # The window is kept as asked, in the zone sent; the law is applied on top, and said so.
    assert edited["call_settings"]["timezone"] == BUENOS_AIRES
    assert edited["call_settings"]["allowed_hours"] == {"start": "07:00", "end": "21:00"}
    assert_legal(edited)
    # What the dashboard read, sent back unchanged, is accepted again.
    r = api.patch(f"/batches/{batch_id}", json={"call_settings": edited["call_settings"]})
    assert r.status_code == 200, r.text


def test_duplicating_a_chilean_campaign_with_the_dashboards_zone(api: httpx.Client, chilean_account: str) -> None:
    r = api.post(
        "/batches",
        json={
            "account_id": chilean_account,
            "name": "Cobranza marzo (copia)",
            "description": "cartera vencida",
            "priority": 1,
            "call_settings": call_settings(BUENOS_AIRES),
            "allow_duplicates": False,
        },
    )
    assert r.status_code == 200, r.text
    assert_legal(r.json()["batch"])
    listed = api.get(f"/accounts/{chilean_account}/batches").json()
    assert all(b["legal_window"] is not None for b in listed)


def test_a_window_that_never_meets_the_law_is_still_refused(api: httpx.Client, chilean_account: str) -> None:
    r = api.post(
        "/batches",
        json={
            "account_id": chilean_account,
            "name": "De madrugada",
            "priority": 1,
            "call_settings": call_settings(BUENOS_AIRES, "05:00", "07:30"),
        },
    )
    assert r.status_code == 400, r.text
    assert "legal 08:00-20:00" in r.json()["message"]


def test_other_campaigns_have_no_legal_window(api: httpx.Client) -> None:
    account_id = f"ventas-ar-{uuid.uuid4().hex[:8]}"
    r = api.post(
        "/accounts",
        json={"account_id": account_id, "account_name": "Ventas AR", "country": "AR", "initial_credits": 100},
    )
    assert r.status_code == 200, r.text
    r = api.post(
        "/batches",
        json={"account_id": account_id, "name": "Promo", "priority": 1, "call_settings": call_settings(BUENOS_AIRES)},
    )
    assert r.status_code == 200, r.text
    assert r.json()["batch"]["legal_window"] is None
