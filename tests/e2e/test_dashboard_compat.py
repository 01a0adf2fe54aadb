"""The deployed SpeechAI dashboard's flows that broke (issue 10), through Envoy with the
client's exact requests: the campaigns page's status filter, ids of the original backend
(and any malformed id) on every route with an id in its path, deleting a job while its call
is in progress, and the numbers the missing-endpoints document defines."""

from __future__ import annotations

import io
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from openpyxl import Workbook

from services.runtime.devstack import Stack
from tests.conftest import ADMIN_TOKEN, wait_for
from tests.e2e.test_isolation import operations, path_params, request_kwargs

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# The campaigns page's filter words, as its <select> sends them.
DASHBOARD_WORDS = ("PENDING", "RUNNING", "PAUSED", "COMPLETED", "CANCELLED", "ERROR")
# The original backend's job id the cancel-job document deletes, and ids no route may choke on.
LEGACY_ID = "68fd0cdc42cc4632daeb164f"
MALFORMED_IDS = (
    LEGACY_ID,
    "ffffffffffffffffffffffff",
    "000000000000000000000000",
    "9223372036854775808",
    "99999999999999999999999999999",
    "-1",
    "-9223372036854775809",
    "0",
    "job-99999999999999999999",
    "job-",
    "abc",
    "1e309",
    "12345678-1234-1234-1234-1234567890ab",
    "12345678-1234-1234-1234-1234567890ag",
    "batch-2025-10-25-144604-615037",
    "x" * 300,
)
# Marketing, at any hour (debt collection adds Chile's legal hours; these tests run at any time).
ALL_DAY = {
    "max_attempts": 3,
    "allowed_hours": {"start": "00:00", "end": "23:59"},
    "days_of_week": [0, 1, 2, 3, 4, 5, 6],
    "timezone": "America/Santiago",
}

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def api(base_url: str, suite: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{base_url}/api/v1", headers=ADMIN, timeout=60) as client:
        yield client


def new_account(api: httpx.Client, lines: int = 1) -> str:
    account_id = f"compat-{uuid.uuid4().hex[:8]}"
    r = api.post(
        "/accounts",
        json={
            "account_id": account_id,
            "account_name": "Dashboard compat",
            "country": "CL",
            "initial_credits": 10000,
            "features": {"max_concurrent_calls": lines},
        },
    )
    assert r.status_code == 200, r.text
    return account_id


def tomorrow() -> str:
    return (datetime.now(UTC) + timedelta(days=1)).isoformat()


def upload(api: httpx.Client, path: str, name: str, content: bytes, **data: Any) -> dict[str, Any]:
    r = api.post(path, files={"file": (name, content, "application/octet-stream")}, data=data)
    assert r.status_code == 200, r.text
    return dict(r.json())


def fixture_campaign(api: httpx.Client, account_id: str, **data: Any) -> dict[str, Any]:
    """The Chilean basic file as a campaign that starts tomorrow: no call is placed."""
    content = (FIXTURES / "chile_cobranza_basica.xlsx").read_bytes()
    return upload(
        api,
        "/batches/excel/create",
        "chile_cobranza_basica.xlsx",
        content,
        account_id=account_id,
        allow_duplicates="true",
        scheduled_at=tomorrow(),
        **data,
    )


def debtors_workbook(n: int, first: int) -> bytes:
    wb = Workbook()
    ws = wb.active
    ws.append(["RUT", "Nombre", "Saldo actualizado", "FechaVencimiento", "Teléfono móvil", "Teléfono Residencial"])
    for i in range(first, first + n):
        # Mobiles +569 8…, a range `phonenumbers` takes as valid (+569 1… is not allocated).
        ws.append([f"{i}-{rut_check(i)}", f"Deudor {i}", 10_000 + i, "15/10/2026", f"98{i % 10_000_000:07d}", ""])
    out = io.BytesIO()
    wb.save(out)
    return out.getvalue()


def rut_check(number: int) -> str:
    total, factor = 0, 2
    for digit in reversed(str(number)):
        total += int(digit) * factor
        factor = 2 if factor == 7 else factor + 1
    return {11: "0", 10: "K"}.get(11 - total % 11, str(11 - total % 11))


# --- 1. the campaigns page's status filter -----------------------------------------------------


def test_the_campaigns_page_filters_with_its_own_status_words(api: httpx.Client) -> None:
    account_id = new_account(api)
    waiting = fixture_campaign(api, account_id, batch_name="Espera")["batch"]
    paused = fixture_campaign(api, account_id, batch_name="Pausada")["batch"]
    cancelled = fixture_campaign(api, account_id, batch_name="Cancelada")["batch"]
    assert api.patch(f"/batches/{paused['batch_id']}", json={"is_active": False}).status_code == 200
    assert api.post(f"/batches/{cancelled['batch_id']}/cancel").status_code == 200

    def listed(status: str) -> set[str]:
        r = api.get("/batches", params={"status": status, "account_id": account_id})
        assert r.status_code == 200, (status, r.text)
        assert isinstance(r.json(), list) and int(r.headers["X-Total-Count"]) == len(r.json())
        return {b["batch_id"] for b in r.json()}

    # Exactly what the page sends (its <select> values), then other cases of the same words.
    for word in DASHBOARD_WORDS:
        listed(word)
        listed(word.lower())
        listed(word.capitalize())
    # A campaign that is not paused, cancelled or finished is one the page shows as running.
    assert listed("RUNNING") == listed("running") == {waiting["batch_id"]}
    assert listed("PENDING") == {waiting["batch_id"]}
    assert listed("PAUSED") == listed("Paused") == {paused["batch_id"]}
    assert listed("CANCELLED") == {cancelled["batch_id"]}
    assert listed("COMPLETED") == listed("ERROR") == set()
    # The suite's own words still work, and a word of neither vocabulary is still refused.
    assert listed("active") == {waiting["batch_id"]} and listed("paused") == {paused["batch_id"]}
    r = api.get("/batches", params={"status": "EXPLODED"})
    assert r.status_code == 400 and "RUNNING" in r.json()["message"], r.text


# --- 2. ids of the original backend, and malformed ones ------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/jobs/{id}"), ("DELETE", "/jobs/{id}"), ("PUT", "/jobs/{id}/cancel"), ("PUT", "/jobs/{id}/retry")],
)
def test_an_id_of_the_original_backend_is_not_found(api: httpx.Client, method: str, path: str) -> None:
    r = api.request(method, path.format(id=LEGACY_ID))
    assert r.status_code == 404, r.text
    assert r.json()["code"] == "not_found" and r.json()["message"]


def test_no_malformed_id_is_an_error_of_ours_on_any_route(base_url: str, api: httpx.Client) -> None:
    """Every operation of the OpenAPI document with an id in its path, with ids no resource
    has: huge and negative numbers, the old 24-hex form, uuid-ish strings, a very long one."""
    doc = api.get(f"{base_url}/openapi.json").json()
    ops = {key: op for key, op in operations(doc).items() if set(path_params(op)) - {"use_case"}}
    assert ("DELETE", "/api/v1/jobs/{job_id}") in ops and ("GET", "/devices/{device_id}") in ops
    failures = []
    with httpx.Client(base_url=base_url, headers=ADMIN, timeout=30) as client:
        for (method, path), op in sorted(ops.items()):
            kwargs = request_kwargs(doc, op)
            for bad in MALFORMED_IDS:
                url = path
                for name in path_params(op):
                    url = url.replace(f"{{{name}}}", "debt_collection" if name == "use_case" else bad)
                r = client.request(method, url, **kwargs)
                if r.status_code >= 500:
                    failures.append(f"{method} {url[:80]} -> {r.status_code} {r.text[:120]}")
                elif path.startswith(("/api/v1/jobs/", "/api/v1/batches/")) and r.status_code != 404:
                    # A voice id that names nothing is an unknown one, whatever its shape.
                    failures.append(f"{method} {url[:80]} -> {r.status_code}, not 404")
    assert not failures, "\n".join(failures)


def test_an_account_id_no_account_can_have_is_not_found(api: httpx.Client) -> None:
    """An admin naming an account by a string outside the account id alphabet (here, what a
    fuzzer sent) finds nothing; it used to break the campaigns service's call onward (500)."""
    for bad in ("ca\u00f1a-\U000f246b", "a b"):
        r = api.post("/batches", json={"name": "x", "account_id": bad})
        assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
        r = api.get("/jobs", params={"account_id": bad})
        assert r.status_code == 404, r.text


# --- 3. deleting a job whose call is in progress --------------------------------------------------


def test_deleting_a_job_being_called_cancels_it_and_the_call_ends_normally(api: httpx.Client, suite: Stack) -> None:
    account_id = new_account(api, lines=5)
    created = upload(
        api,
        "/batches/chile/marketing",
        "deudores.xlsx",
        debtors_workbook(30, first=15_000_000),
        account_id=account_id,
        call_settings_json=json.dumps(ALL_DAY),
    )
    batch_id = created["batch_id"]

    def first_calls() -> list[dict[str, Any]]:
        r = api.get("/jobs", params={"batch_id": batch_id, "status": "in_progress"})
        return [j for j in r.json() if j["attempts"] == 0]

    wait_for("the first calls are placed", first_calls, timeout=60)
    # Simulated calls last about a second: the dispatcher is held still (its calls with it) so
    # that the job deleted is still in its call when the DELETE arrives.
    dispatcher = suite.service_procs["dispatcher"].popen.pid
    os.kill(dispatcher, signal.SIGSTOP)
    try:
        time.sleep(1.0)  # results sent before the stop are booked
        job = wait_for("a job in its call", first_calls, timeout=10)[0]
        # The dashboard's bulk delete: one DELETE per selected job.
        r = api.delete(f"/jobs/{job['_id']}")
    finally:
        os.kill(dispatcher, signal.SIGCONT)
    assert r.status_code == 200, r.text
    assert r.json()["success"] is True and r.json()["message"] == "Job cancelled", r.json()

    ended = wait_for(
        "the call ends and the job with it",
        lambda: (j := api.get(f"/jobs/{job['job_id']}").json())["status"] != "in_progress" and j,
        timeout=30,
    )
    # The call ended normally (it is on record), nothing followed it, and the job stays, cancelled.
    assert ended["status"] == "cancelled", ended
    assert ended["attempts"] == 1 and ended["call_ended_at"] and ended["finished_at"], ended
    assert ended["call_result"]["summary"]["call_status"], ended["call_result"]
    time.sleep(1.5)
    again = api.get(f"/jobs/{job['job_id']}").json()
    assert (again["status"], again["attempts"], again["call_ended_at"]) == ("cancelled", 1, ended["call_ended_at"])
    api.post(f"/batches/{batch_id}/cancel")
    # The document's progress: completed jobs over all jobs, to two decimals.
    status = api.get(f"/batches/{batch_id}/status").json()
    assert status["cancelled_jobs"] >= 1
    expected = round(100 * status["completed_jobs"] / status["total_jobs"], 2)
    assert status["progress_percentage"] == expected, status


# --- 4. the numbers the missing-endpoints document defines ---------------------------------------


def test_jobs_today_counts_the_jobs_created_today(api: httpx.Client) -> None:
    account_id = new_account(api)
    created = fixture_campaign(api, account_id)
    # No call placed (the campaign starts tomorrow), yet its jobs were created today.
    assert created["jobs_created"] > 0
    body = api.get("/dashboard/overview", params={"account_id": account_id}).json()
    assert body["metrics"]["jobs_today"] == created["jobs_created"], body["metrics"]
    assert body["detailed_stats"]["jobs"]["today"] == created["jobs_created"]


def test_progress_and_summary_status_as_documented(api: httpx.Client) -> None:
    account_id = new_account(api)
    batch = fixture_campaign(api, account_id)
    jobs = api.get(f"/batches/{batch['batch_id']}/jobs").json()
    assert len(jobs) >= 3
    # A job that will not be called is done with, but not completed: no progress.
    assert api.put(f"/jobs/{jobs[0]['_id']}/cancel").status_code == 200
    status = api.get(f"/batches/{batch['batch_id']}/status").json()
    assert status["cancelled_jobs"] == 1 and status["completed_jobs"] == 0
    assert status["progress_percentage"] == 0
    summary = api.get(f"/batches/{batch['batch_id']}/summary").json()
    assert summary["progress_percentage"] == 0
    # The API reference's batch states: active | paused | completed | cancelled.
    assert summary["status"] == "active", summary["status"]
    api.patch(f"/batches/{batch['batch_id']}", json={"is_active": False})
    assert api.get(f"/batches/{batch['batch_id']}/summary").json()["status"] == "paused"
    api.post(f"/batches/{batch['batch_id']}/cancel")
    assert api.get(f"/batches/{batch['batch_id']}/summary").json()["status"] == "cancelled"
