"""WhatsApp bulk send end to end, as the bulk sender client meets it: through Envoy, real
services, the simulated provider as its own server (its record is what was really sent)."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from services.runtime.devstack import Stack
from tests.conftest import ADMIN_TOKEN, MEMBER_TOKEN, wait_for

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def phones(prefix: int, n: int) -> list[str]:
    """n Chilean mobiles of a test's own (prefix below 100, n up to 100,000), +569 4…: a range
    `phonenumbers` takes as valid whatever the digits after it (+569 0… and 1… are not allocated)."""
    return [f"+5694{prefix:02d}{i:05d}" for i in range(n)]


def make_file(numbers: list[str], *, header: bool = True) -> bytes:
    lines = ["phone|@valor1|@valor2"] if header else []
    lines += [f"{p}|name{i}|order{i}" for i, p in enumerate(numbers)]
    return ("\n".join(lines) + "\n").encode()


def add_device(base_url: str, **fields: Any) -> int:
    body = {"token": f"tok-{uuid.uuid4().hex[:8]}", "secret": "s3cret-value", **fields}
    r = httpx.post(f"{base_url}/devices", headers=ADMIN, json=body)
    assert r.status_code == 200, r.text
    return int(r.json()["device"]["id"])


def deactivate_all(base_url: str) -> None:
    for d in httpx.get(f"{base_url}/devices", headers=ADMIN).json()["devices"]:
        httpx.put(f"{base_url}/devices/{d['id']}", headers=ADMIN, json={"status": "inactive"})


def send_file(
    base_url: str,
    data: bytes,
    *,
    message: str = "Hola @valor1, pedido @valor2",
    devices_limit: int = 5,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return httpx.post(
        f"{base_url}/messages/send-bulk-file",
        headers=ADMIN if headers is None else headers,
        files={"file": ("contacts.csv", data, "text/csv")},
        data={"message": message, "devices_limit": str(devices_limit)},
        timeout=120,
    )


def get_job(base_url: str, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base_url}/jobs/{job_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


def wait_job(base_url: str, job_id: str, *, statuses: tuple[str, ...] = ("completed",), timeout: float = 60) -> dict:
    def reached() -> dict | None:
        job = get_job(base_url, job_id)
        return job if job["status"] in statuses else None

    return wait_for(f"job {job_id} in {statuses}", reached, timeout)  # type: ignore[no-any-return]


def wait_sent(base_url: str, job_id: str, at_least: int, timeout: float = 30) -> None:
    wait_for("sending starts", lambda: get_job(base_url, job_id)["progress"]["sent"] >= at_least, timeout, every=0.05)


def record(suite: Stack) -> list[list[Any]]:
    """Every send the simulated provider accepted: [attempt_id, sender_id, to, accepted_at]."""
    entries: list[list[Any]] = []
    since = 0
    while True:
        page = httpx.get(f"{suite.simulator_url}/v1/record", params={"since": since, "limit": 10_000}).json()
        entries.extend(page["entries"])
        if page["next"] >= page["count"]:
            return entries
        since = page["next"]


def sends_to(suite: Stack, numbers: list[str]) -> list[list[Any]]:
    wanted = set(numbers)
    return [e for e in record(suite) if e[2] in wanted]


@pytest.fixture(scope="module", autouse=True)
def clean_devices(base_url: str) -> None:
    deactivate_all(base_url)


def test_bulk_file_completes_with_live_progress_and_no_duplicates(base_url: str, suite: Stack) -> None:
    deactivate_all(base_url)
    add_device(base_url, rate_per_minute=0, provider_config={"failure_ratio": 0.1, "seed": 7})
    add_device(base_url, rate_per_minute=0)
    numbers = phones(10, 1500)
    data = make_file(numbers).replace(b"\n+56941000003|", b"\n\n+56941000003|") + b"not-a-phone|x\n"
    r = send_file(base_url, data, devices_limit=5)
    assert r.status_code == 200, r.text
    body = r.json()
    job = body["job"]
    assert body["status"] == "success" and "1500" in body["message"]
    assert job["status"] == "pending" and job["total_numbers"] == 1500 and job["invalid_rows"] == 1
    assert job["progress"] == {
        "sent": 0,
        "failed": 0,
        "total": 1500,
        "percentage": 0.0,
        "cancelled": 0,
        "pending": 1500,
        "in_flight": 0,
        "suspended": 0,
    }

    events: list[dict[str, Any]] = []
    ws_url = base_url.replace("http", "ws") + f"/ws/job/{job['id']}"
    bearer: Any = ["bearer", ADMIN_TOKEN]
    with connect(ws_url, subprotocols=bearer, open_timeout=10, close_timeout=5) as ws:
        ws.send(json.dumps({"type": "ping", "timestamp": 123}))
        while True:
            event = json.loads(ws.recv(timeout=60))
            events.append(event)
            if event["type"] in ("job_completed", "job_failed"):
                break
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["connected", "subscribed"]
    assert {"type": "pong", "timestamp": 123} in events
    completed = events[-1]
    assert completed["type"] == "job_completed" and completed["status"] == "completed"
    results = completed["results"]
    assert results["sent"] + results["failed"] == results["total"] == 1500
    assert results["failed"] > 0 and results["devices_used"] == 2
    per_recipient = [e for e in events if e["type"] == "progress" and "phone" in e]
    errors = [e for e in events if e["type"] == "error"]
    # A late subscriber may miss the first events, never the last ones.
    assert per_recipient and per_recipient[-1]["progress"]["sent"] + per_recipient[-1]["progress"]["failed"] <= 1500
    assert all(e["phone"] in set(numbers) and e["device_id"] for e in per_recipient)
    assert len(errors) <= results["failed"]

    sent = sends_to(suite, numbers)
    by_phone = Counter(e[2] for e in sent)
    assert len(by_phone) == results["sent"] and max(by_phone.values()) == 1
    final = get_job(base_url, job["id"])
    assert final["status"] == "completed" and final["progress"]["percentage"] == 100.0

    # Per-recipient outcomes, keyset paged, agree with the counters and the provider.
    seen: dict[str, str] = {}
    after = 0
    while True:
        page = httpx.get(
            f"{base_url}/jobs/{job['id']}/results", headers=ADMIN, params={"limit": 400, "after": after}
        ).json()
        seen.update({row["phone"]: row["status"] for row in page["results"]})
        if not page["next_after"]:
            break
        after = page["next_after"]
    assert Counter(seen.values()) == Counter({"sent": results["sent"], "failed": results["failed"]})
    assert {p for p, s in seen.items() if s == "sent"} == set(by_phone)

    listed = httpx.get(f"{base_url}/jobs", headers=ADMIN, params={"limit": 5})
    assert listed.status_code == 200 and listed.json()[0]["id"] == job["id"]
    assert int(listed.headers["x-total-count"]) >= 1

    # Retrying the failed ones sends to exactly those, once each.
    failed_phones = {p for p, s in seen.items() if s == "failed"}
    r = httpx.post(f"{base_url}/jobs/{job['id']}/retry-failed", headers=ADMIN)
    assert r.status_code == 200, r.text
    retried = wait_job(base_url, job["id"])
    assert retried["progress"]["sent"] + retried["progress"]["failed"] == 1500
    again = Counter(e[2] for e in sends_to(suite, numbers))
    assert max(again.values()) == 1
    assert set(again) - set(by_phone) <= failed_phones


def test_template_is_rendered_per_recipient(base_url: str, suite: Stack) -> None:
    deactivate_all(base_url)
    add_device(base_url, rate_per_minute=0)
    numbers = phones(11, 3)
    data = b"phone|@valor1|@valor2\n" + f"{numbers[0]}|ana|7\n{numbers[1]}|luis\n{numbers[2]}\n".encode()
    r = send_file(base_url, data, message="Hola @valor1, pedido @valor2 (@valor10)")
    job = wait_job(base_url, r.json()["job"]["id"])
    assert job["progress"]["sent"] == 3
    texts = {
        e[2]: httpx.get(f"{suite.simulator_url}/v1/messages/{e[0]}").json()["text"] for e in sends_to(suite, numbers)
    }
    assert texts == {
        numbers[0]: "Hola ana, pedido 7 (---)",
        numbers[1]: "Hola luis, pedido --- (---)",
        numbers[2]: "Hola ---, pedido --- (---)",
    }


def test_rate_limits_hold_per_device_and_overall(base_url: str, suite: Stack) -> None:
    deactivate_all(base_url)
    ids = [add_device(base_url, rate_per_minute=600) for _ in range(3)]
    numbers = phones(12, 240)
    r = send_file(base_url, make_file(numbers), devices_limit=3)
    assert r.status_code == 200, r.text
    wait_job(base_url, r.json()["job"]["id"], timeout=60)
    sent = sends_to(suite, numbers)
    assert len(sent) == 240
    by_device: dict[int, list[float]] = defaultdict(list)
    for _, sender, _, at in sent:
        by_device[sender].append(at)
    assert set(by_device) == set(ids)
    for times in by_device.values():
        times.sort()
        # No 1-second window holds more than 10 sends (600/minute).
        j = 0
        for i, t in enumerate(times):
            while times[j] <= t - 1.0:
                j += 1
            assert i - j + 1 <= 10, f"{i - j + 1} sends within one second"
    all_times = sorted(at for _, _, _, at in sent)
    per_minute = (len(all_times) - 1) / (all_times[-1] - all_times[0]) * 60
    assert 1620 <= per_minute <= 1980, per_minute  # within 10% of 3 × 600/minute


def test_pause_stops_within_a_second_and_resume_finishes(base_url: str, suite: Stack) -> None:
    deactivate_all(base_url)
    add_device(base_url, rate_per_minute=1200)
    numbers = phones(13, 150)
    job_id = send_file(base_url, make_file(numbers)).json()["job"]["id"]
    wait_sent(base_url, job_id, 20)
    r = httpx.post(f"{base_url}/jobs/{job_id}/pause", headers=ADMIN)
    paused_at = time.time()
    assert r.status_code == 200 and r.json()["job"]["status"] == "paused"
    time.sleep(2.0)
    sent = sends_to(suite, numbers)
    assert sent and max(e[3] for e in sent) <= paused_at + 1.0
    assert len(sent) < 150
    assert get_job(base_url, job_id)["status"] == "paused"
    r = httpx.post(f"{base_url}/jobs/{job_id}/resume", headers=ADMIN)
    assert r.status_code == 200
    job = wait_job(base_url, job_id)
    assert job["progress"]["sent"] == 150
    assert Counter(e[2] for e in sends_to(suite, numbers)) == Counter(numbers)


def test_cancel_leaves_the_rest_cancelled(base_url: str, suite: Stack) -> None:
    deactivate_all(base_url)
    add_device(base_url, rate_per_minute=1200)
    numbers = phones(14, 200)
    job_id = send_file(base_url, make_file(numbers)).json()["job"]["id"]
    wait_sent(base_url, job_id, 10)
    r = httpx.post(f"{base_url}/jobs/{job_id}/cancel", headers=ADMIN)
    cancelled_at = time.time()
    assert r.status_code == 200 and r.json()["job"]["status"] == "cancelled"
    job = wait_job(base_url, job_id, statuses=("cancelled",))
    time.sleep(1.5)
    job = get_job(base_url, job_id)
    sent = sends_to(suite, numbers)
    assert max(e[3] for e in sent) <= cancelled_at + 1.0
    p = job["progress"]
    assert p["sent"] == len(sent) and p["sent"] + p["cancelled"] == 200 and p["in_flight"] == 0
    assert job["finished_at"] is not None
    # A cancelled job cannot be resumed.
    assert httpx.post(f"{base_url}/jobs/{job_id}/resume", headers=ADMIN).status_code == 409


BAD_FILES = [
    (b"", 400, "empty"),
    (b"phone|@valor1\n", 400, "no recipients"),
    ("phone|@valor1\n+56911111111|José\n".encode("latin-1"), 400, "UTF-8"),
    (b"\x00\x01\x02binary\xff\xfe" * 50, 400, "binary"),
    (b"nombre|apellido\nana|perez\n", 400, "phone"),
]


def _counts(suite: Stack) -> tuple[int, int]:
    import asyncio

    import asyncpg

    async def go() -> tuple[int, int]:
        conn = await asyncpg.connect(suite.database_url)
        try:
            return (
                await conn.fetchval("SELECT count(*) FROM campaigns.batches"),
                await conn.fetchval("SELECT count(*) FROM campaigns.jobs"),
            )
        finally:
            await conn.close()

    return asyncio.run(go())


@pytest.mark.parametrize(("data", "status", "words"), BAD_FILES)
def test_bad_files_get_a_clear_error_and_change_nothing(
    base_url: str, suite: Stack, data: bytes, status: int, words: str
) -> None:
    add_device(base_url, rate_per_minute=0)
    before = _counts(suite)
    r = send_file(base_url, data)
    assert r.status_code == status, r.text
    body = r.json()
    assert words.lower() in body["message"].lower() and body["detail"] == body["message"]
    assert _counts(suite) == before


def test_a_nul_in_the_message_is_400_and_changes_nothing(base_url: str, suite: Stack) -> None:
    add_device(base_url, rate_per_minute=0)
    before = _counts(suite)
    r = send_file(base_url, make_file(phones(16, 2)), message="Hola\x00 @valor1")
    assert r.status_code == 400 and "NUL" in r.json()["message"], r.text
    assert _counts(suite) == before


def test_paging_beyond_the_wire_limits_is_422(base_url: str, suite: Stack) -> None:
    r = httpx.get(f"{base_url}/jobs", headers=ADMIN, params={"skip": 2**31})
    assert r.status_code == 422 and "skip" in r.json()["message"], r.text
    r = httpx.get(f"{base_url}/jobs/{uuid.uuid4()}/results", headers=ADMIN, params={"after": 2**63})
    assert r.status_code == 422 and "after" in r.json()["message"], r.text


def test_more_than_a_million_recipients_is_413(base_url: str, suite: Stack) -> None:
    add_device(base_url, rate_per_minute=0)
    before = _counts(suite)
    data = b"".join(b"+5698%07d\n" % i for i in range(1_000_001))
    r = send_file(base_url, data)
    assert r.status_code == 413, r.text
    assert "1,000,000" in r.json()["message"]
    assert _counts(suite) == before


def test_no_active_device_is_400_and_member_sees_only_its_jobs(base_url: str, suite: Stack) -> None:
    member = {"Authorization": f"Bearer {MEMBER_TOKEN}"}
    r = send_file(base_url, make_file(phones(15, 3)), headers=member)
    assert r.status_code == 400 and "device" in r.json()["message"]
    admin_jobs = httpx.get(f"{base_url}/jobs", headers=ADMIN).json()
    assert admin_jobs
    assert httpx.get(f"{base_url}/jobs", headers=member).json() == []
    assert httpx.get(f"{base_url}/jobs/{admin_jobs[0]['id']}", headers=member).status_code == 404
    assert httpx.post(f"{base_url}/jobs/{admin_jobs[0]['id']}/cancel", headers=member).status_code == 404
    assert httpx.get(f"{base_url}/jobs/not-a-uuid", headers=ADMIN).status_code == 404
    assert (
        httpx.post(
            f"{base_url}/messages/send-bulk-file", files={"file": ("a.csv", b"x")}, data={"message": "x"}
        ).status_code
        == 401
    )


def test_a_template_over_whatsapps_limit_is_400_and_changes_nothing(base_url: str, suite: Stack) -> None:
    add_device(base_url, rate_per_minute=0)
    before = _counts(suite)
    r = send_file(base_url, make_file(phones(17, 2)), message="Hola @valor1 " + "x" * 4090)
    assert r.status_code == 400, r.text
    assert "4,103 characters" in r.json()["message"] and "4,096" in r.json()["message"]
    assert _counts(suite) == before


def test_a_row_that_renders_too_long_is_invalid_and_not_sent(base_url: str, suite: Stack) -> None:
    deactivate_all(base_url)
    add_device(base_url, rate_per_minute=0)
    numbers = phones(18, 3)
    data = f"phone|@valor1|@valor2\n{numbers[0]}|ana|1\n{numbers[1]}|{'a' * 4090}|2\n{numbers[2]}|luis|3\n".encode()
    r = send_file(base_url, data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["invalid_rows"] == 1 and body["job"]["total_numbers"] == 2
    assert body["invalid"] == [
        {
            "line": 3,
            "value": numbers[1],
            "reason": "message too long: 4,105 characters with this row's values, WhatsApp takes at most 4,096",
        }
    ]
    job = wait_job(base_url, body["job"]["id"])
    assert job["progress"]["sent"] == 2
    assert sorted(e[2] for e in sends_to(suite, numbers)) == [numbers[0], numbers[2]]
