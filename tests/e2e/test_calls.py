"""Voice calls end to end: a Chilean contact file through the REST API, the dialer, the
dispatcher's simulated voice line (calls at 1/100 of their length) and the results. What the
dispatcher recorded of every call is the ground truth for concurrency and phone rotation."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from openpyxl import Workbook

from services.runtime.devstack import Stack
from tests.conftest import ADMIN_TOKEN, wait_for

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
LINES = 10
DEBTORS = 500

pytestmark = pytest.mark.timeout(240)


def rut(number: int) -> str:
    """A valid Chilean RUT (mod 11 check digit) in its formatted form."""
    total, factor = 0, 2
    for digit in reversed(str(number)):
        total += int(digit) * factor
        factor = 2 if factor == 7 else factor + 1
    check = 11 - total % 11
    dv = {11: "0", 10: "K"}.get(check, str(check))
    return f"{number:,}".replace(",", ".") + f"-{dv}"


def workbook(n: int) -> bytes:
    wb = Workbook()
    ws = wb.active
    ws.append(
        [
            "RUT",
            "Nombre",
            "Saldo actualizado",
            "FechaVencimiento",
            "diasRetraso",
            "Teléfono móvil",
            "Teléfono Residencial",
        ]
    )
    # Mobiles +569 71…, a range `phonenumbers` takes as valid (+569 70… is not allocated).
    for i in range(n):
        ws.append(
            [rut(15_000_000 + i), f"Deudor {i}", 10_000 + i, "15/10/2026", 5, f"9{71000000 + i}", f"22{3000000 + i}"]
        )
    out = io.BytesIO()
    wb.save(out)
    return out.getvalue()


def new_account(base_url: str) -> tuple[str, dict[str, str]]:
    account_id = f"calls-{uuid.uuid4().hex[:8]}"
    body = {
        "account_id": account_id,
        "account_name": "Cobranzas",
        "country": "CL",
        "timezone": "America/Santiago",
        "initial_credits": "10000",
        "features": {"max_concurrent_calls": LINES},
    }
    r = httpx.post(f"{base_url}/api/v1/accounts", headers=ADMIN, json=body)
    assert r.status_code in (200, 201), r.text
    r = httpx.post(f"{base_url}/api/auth/api-keys", headers=ADMIN, json={"name": "dashboard", "account_id": account_id})
    assert r.status_code == 201, r.text
    return account_id, {"Authorization": f"Bearer {r.json()['key']}"}


async def dispatcher_calls(database_url: str, batch_id: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(
            "SELECT attempt_id, status, created_at, finished_at FROM dispatcher.attempts WHERE batch_id = $1",
            uuid.UUID(batch_id),
        )
    finally:
        await conn.close()


def most_at_once(calls: list[asyncpg.Record]) -> int:
    edges = sorted([(c["created_at"], 1) for c in calls] + [(c["finished_at"], -1) for c in calls])
    up = peak = 0
    for _, step in edges:
        up += step
        peak = max(peak, up)
    return peak


# Marketing: the hours are the batch's own (debt collection would add Chile's legal ones,
# and these tests must pass at any hour). One round: a failed first phone moves to the second.
ALL_DAY = {
    "max_attempts": 1,
    "allowed_hours": {"start": "00:00", "end": "23:59"},
    "days_of_week": [0, 1, 2, 3, 4, 5, 6],
    "timezone": "America/Santiago",
}


def upload_campaign(
    base_url: str, key: dict[str, str], account_id: str, debtors: int, settings: dict[str, Any], **data: str
) -> dict[str, Any]:
    r = httpx.post(
        f"{base_url}/api/v1/batches/chile/marketing",
        headers=key,
        files={"file": ("deudores.xlsx", workbook(debtors), "application/vnd.ms-excel")},
        data={"account_id": account_id, "call_settings_json": json.dumps(settings), **data},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def get_batch(base_url: str, key: dict[str, str], batch_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{base_url}/api/v1/batches/{batch_id}", headers=key).json())


def completed(base_url: str, key: dict[str, str], batch_id: str, timeout: float) -> dict[str, Any]:
    return wait_for(
        "the batch completes",
        lambda: (b := get_batch(base_url, key, batch_id))["status"] == "completed" and b,
        timeout=timeout,
    )


def stop_dispatcher(suite: Stack, sig: int) -> int:
    """Stop the suite's dispatcher with `sig`; its exit code."""
    old = suite.service_procs["dispatcher"]
    old.popen.send_signal(sig)
    return old.popen.wait(60)


def start_dispatcher(suite: Stack) -> None:
    """Another dispatcher on the same port, as an orchestrator would start it."""
    port = int(suite.addrs["dispatcher"].rsplit(":", 1)[1])
    new = suite.start_service("dispatcher", port=port)
    suite.procs.append(new)
    suite.service_procs["dispatcher"] = new


def test_five_hundred_calls_keep_to_ten_lines_rotate_phones_and_stop_at_max_attempts(
    base_url: str, suite: Stack
) -> None:
    account_id, key = new_account(base_url)
    settings = {**ALL_DAY, "max_call_duration": 120, "ring_timeout": 20}
    created = upload_campaign(base_url, key, account_id, DEBTORS, settings, batch_name="Prueba")
    assert created["jobs_created"] == DEBTORS and created["duplicates_skipped"] == 0
    batch_id = created["batch_id"]

    batch = completed(base_url, key, batch_id, timeout=180)
    assert batch["completed_jobs"] + batch["failed_jobs"] == DEBTORS

    calls = asyncio.run(dispatcher_calls(suite.database_url, batch_id))
    assert all(c["finished_at"] is not None for c in calls)
    peak = most_at_once(calls)
    assert peak <= LINES, f"{peak} calls at once on {LINES} lines"
    assert peak >= LINES - 2, f"only {peak} calls at once: the lines were not used"

    by_job: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for c in calls:
        _, job, attempt = c["attempt_id"].split(":")
        by_job[job].append((attempt, c["status"]))
    assert len(by_job) == DEBTORS
    failed_jobs = 0
    for job, tries in by_job.items():
        tries.sort()
        attempts = [a for a, _ in tries]
        # Round 1 only (max_attempts 1); the mobile first, the landline only after it failed.
        assert attempts in (["1.0"], ["1.0", "1.1"]), (job, tries)
        if attempts == ["1.0", "1.1"]:
            assert tries[0][1] != "completed", (job, tries)
        if tries[-1][1] != "completed":
            failed_jobs += 1
    assert failed_jobs == batch["failed_jobs"]

    jobs = httpx.get(f"{base_url}/api/v1/batches/{batch_id}/jobs", headers=key, params={"limit": 1000}).json()
    assert len(jobs) == DEBTORS
    for job in jobs:
        assert job["status"] in ("completed", "failed") and job["attempts"] == 1
        summary = job["call_result"]["summary"]
        assert summary["call_cost"]["combined_cost"] >= 0 and summary["duration_ms"] >= 0
        assert job["contact"]["phones"][0].startswith("+569") and job["contact"]["phones"][1].startswith("+562")

    # Paid call by call: what the batch says it cost is what the ledger charged; nothing stays held.
    def settled() -> dict[str, Any] | None:
        balance = httpx.get(f"{base_url}/api/v1/accounts/{account_id}/balance", headers=ADMIN).json()
        return balance if balance["credit_reserved"] == 0 else None

    balance = wait_for("holds released", settled, timeout=60)
    cost = Decimal(str(httpx.get(f"{base_url}/api/v1/batches/{batch_id}", headers=key).json()["total_cost"]))
    assert cost > 0 and Decimal(str(balance["credit_used"])) == cost
    # Served as added and charged: the 10000 added stay, what is left is 10000 - cost.
    assert Decimal(str(balance["credit_balance"])) == Decimal(10000)
    assert Decimal(str(balance["credit_available"])) == Decimal(10000) - cost


async def stuck_attempts(database_url: str, batch_id: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM dispatcher.attempts WHERE batch_id = $1 AND status = 'sending'",
                uuid.UUID(batch_id),
            )
        )
    finally:
        await conn.close()


def test_a_dispatcher_killed_mid_call_loses_no_job_and_places_no_call_twice(base_url: str, suite: Stack) -> None:
    account_id, key = new_account(base_url)
    batch_id = upload_campaign(base_url, key, account_id, 60, ALL_DAY)["batch_id"]

    def ended() -> int:
        b = get_batch(base_url, key, batch_id)
        return int(b["completed_jobs"] + b["failed_jobs"])

    wait_for("calls end", lambda: ended() >= 5, timeout=60)
    stop_dispatcher(suite, signal.SIGKILL)  # calls are up: their outcome dies with the process
    start_dispatcher(suite)

    done = completed(base_url, key, batch_id, timeout=120)
    assert done["completed_jobs"] + done["failed_jobs"] == 60, done
    assert asyncio.run(stuck_attempts(suite.database_url, batch_id)) == 0
    calls = asyncio.run(dispatcher_calls(suite.database_url, batch_id))
    tries: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for c in calls:
        _, job, attempt = c["attempt_id"].split(":")
        tries[job].append((attempt, c["status"]))
    # One round: each phone at most once (an attempt id is placed once, whatever the crash).
    assert all(sorted(a for a, _ in t) in (["1.0"], ["1.0", "1.1"]) for t in tries.values()), tries
    # Calls cut by the crash may have reached the debtor: their jobs are not called again.
    cut = [t for t in tries.values() if any(status == "unknown" for _, status in t)]
    assert cut, "the kill cut no call: the test did not test the crash"
    assert all(sorted(t)[-1][1] == "unknown" for t in cut), cut


def test_a_dispatcher_stopping_lets_its_calls_end_and_report(base_url: str, suite: Stack) -> None:
    account_id, key = new_account(base_url)
    batch_id = upload_campaign(base_url, key, account_id, 60, ALL_DAY)["batch_id"]

    def ended() -> int:
        b = get_batch(base_url, key, batch_id)
        return int(b["completed_jobs"] + b["failed_jobs"])

    wait_for("calls end", lambda: ended() >= 3, timeout=60)
    # A rolling update while the lines are busy: a clean exit, after every call it had placed
    # ended and was recorded.
    assert stop_dispatcher(suite, signal.SIGTERM) == 0
    assert asyncio.run(stuck_attempts(suite.database_url, batch_id)) == 0
    start_dispatcher(suite)
    done = completed(base_url, key, batch_id, timeout=120)
    assert done["completed_jobs"] + done["failed_jobs"] == 60
    unknown = httpx.get(f"{base_url}/api/v1/batches/{batch_id}/jobs", headers=key, params={"limit": 100}).json()
    assert not [j for j in unknown if "outcome unknown" in str(j["call_result"])], "a call was cut by the stop"


def test_scheduled_jobs_start_at_their_time(base_url: str, suite: Stack) -> None:
    account_id, key = new_account(base_url)
    start = datetime.now(UTC) + timedelta(seconds=4)
    settings = {k: ALL_DAY[k] for k in ("allowed_hours", "days_of_week")}
    batch_id = upload_campaign(base_url, key, account_id, 5, settings, scheduled_at=start.isoformat())["batch_id"]
    time.sleep(2)
    assert asyncio.run(dispatcher_calls(suite.database_url, batch_id)) == [], "called before its time"
    wait_for("calls start", lambda: asyncio.run(dispatcher_calls(suite.database_url, batch_id)), timeout=30)
    first = min(c["created_at"] for c in asyncio.run(dispatcher_calls(suite.database_url, batch_id)))
    assert first >= start
