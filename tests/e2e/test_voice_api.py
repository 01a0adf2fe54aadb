"""SpeechAI voice campaigns as the dashboard meets them, through Envoy: a contacts file
previewed and turned into a campaign, the campaign read by either id, paused and resumed,
its calls listed, cancelled and deleted, the campaign cancelled with a reason and deleted,
then the dashboard's aggregates. Real fixture files (tests/fixtures/), a fresh account.

The campaign is scheduled a day ahead, so no call is placed while the test steers it."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.runtime.devstack import Stack
from tests.conftest import ADMIN_TOKEN, MEMBER_TOKEN
from tests.workbook_bombs import MIB, SHARED_STRINGS, huge_shared_strings, plain_workbook, with_part

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}  # account acme
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
OBJECT_ID = re.compile(r"^[0-9a-f]{24}$")
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")
CALL_SETTINGS = {
    "max_call_duration": 300,
    "ring_timeout": 30,
    "max_attempts": 3,
    "retry_delay_hours": 24,
    "allowed_hours": {"start": "09:00", "end": "20:00"},
    "days_of_week": [1, 2, 3, 4, 5],
    "timezone": "America/Santiago",
}
# What the dashboard reads (API_COMPAT.md), and the extras this API adds.
BATCH_FIELDS = {
    "_id",
    "batch_id",
    "account_id",
    "name",
    "description",
    "is_active",
    "created_at",
    "total_jobs",
    "pending_jobs",
    "completed_jobs",
    "failed_jobs",
    "suspended_jobs",
    "total_cost",
    "total_minutes",
    "estimated_cost",
    "call_settings",
    "priority",
    "status",
    "updated_at",
    "cancelled_jobs",
    "in_progress_jobs",
    "scheduled_jobs",
    "use_case",
    "country",
    "suspension_reason",
}
JOB_FIELDS = {
    "_id",
    "job_id",
    "batch_id",
    "account_id",
    "status",
    "attempts",
    "max_attempts",
    "mode",
    "created_at",
    "started_at",
    "contact",
    "payload",
    "fecha_pago_cliente",
    "monto_pago_cliente",
    "call_result",
    "call_duration_seconds",
    "call_started_at",
    "call_ended_at",
    "finished_at",
    "estimated_cost",
    "to_number",
}


@pytest.fixture(scope="module")
def api(base_url: str, suite: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{base_url}/api/v1", headers=ADMIN, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def account(api: httpx.Client) -> str:
    account_id = f"e2e-voice-{uuid.uuid4().hex[:8]}"
    r = api.post(
        "/accounts",
        json={"account_id": account_id, "account_name": "Voice E2E", "country": "CL", "initial_credits": 1000},
    )
    assert r.status_code == 200, r.text
    return account_id


def upload(api: httpx.Client, path: str, fixture: str, headers: Any = None, **data: Any) -> httpx.Response:
    with (FIXTURES / fixture).open("rb") as f:
        return api.post(
            path,
            files={"file": (fixture, f, "application/octet-stream")},
            data={k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in data.items()},
            headers=headers,
        )


def tomorrow() -> str:
    return (datetime.now(UTC) + timedelta(days=1)).isoformat()


def assert_batch(body: dict[str, Any]) -> None:
    assert BATCH_FIELDS <= set(body), BATCH_FIELDS - set(body)
    assert OBJECT_ID.match(body["_id"]) and body["batch_id"]
    assert isinstance(body["call_settings"], dict) and isinstance(body["is_active"], bool)
    for key in ("total_cost", "total_minutes", "estimated_cost"):
        assert isinstance(body[key], int | float), key
    assert ISO.match(body["created_at"])


def assert_job(body: dict[str, Any]) -> None:
    assert JOB_FIELDS <= set(body), JOB_FIELDS - set(body)
    assert OBJECT_ID.match(body["_id"]) and body["mode"] == "single"
    assert {"name", "phones", "dni", "next_phone_index"} <= set(body["contact"])
    assert body["contact"]["phones"] and all(p.startswith("+56") for p in body["contact"]["phones"])
    assert {"debt_amount", "due_date", "company_name", "reference_number"} <= set(body["payload"])
    assert {"cantidad_cupones", "fecha_maxima"} <= set(body["payload"]["additional_info"])
    summary = body["call_result"]["summary"]
    assert {"combined_cost", "total_duration_seconds"} <= set(summary["call_cost"])
    assert {"call_summary", "user_sentiment"} <= set(summary["call_analysis"])
    assert isinstance(body["estimated_cost"], int | float)


@pytest.fixture(scope="module")
def campaign(api: httpx.Client, account: str) -> dict[str, Any]:
    """The Chilean basic file as a campaign of the fresh account, scheduled for tomorrow."""
    r = upload(
        api,
        "/batches/excel/create",
        "chile_cobranza_basica.xlsx",
        account_id=account,
        batch_name="Cobranza E2E",
        batch_description="end to end",
        allow_duplicates=False,
        processing_type="basic",
        call_settings_json=json.dumps(CALL_SETTINGS),
        priority=2,
        scheduled_at=tomorrow(),
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_preview_counts_the_file_and_creates_nothing(api: httpx.Client, account: str) -> None:
    r = upload(api, "/batches/excel/preview", "chile_cobranza_basica.xlsx", account_id=account)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and body["filename"] == "chile_cobranza_basica.xlsx"
    counts = {k: body[k] for k in ("total_rows", "valid_rows", "invalid_rows", "duplicates", "estimated_cost")}
    assert body["preview"] == counts
    assert body["total_rows"] > body["valid_rows"] > 0 and body["invalid_rows"] > 0
    assert body["detectedFormat"] == "chile_debt_collection"
    assert isinstance(body["sampleRows"], list) and body["sampleRows"]
    assert body["invalid_details"] and {"row", "reason"} <= set(body["invalid_details"][0])
    assert isinstance(body["warnings"], list)
    assert api.get("/batches", params={"account_id": account}).json() == []


def test_create_reply_has_both_shapes(campaign: dict[str, Any], account: str) -> None:
    assert campaign["success"] is True
    assert campaign["jobs_created"] > 0 and campaign["jobs_created"] == campaign["total_jobs"]
    assert campaign["contacts_processed"] == campaign["total_debtors"]
    assert campaign["duplicates_skipped"] == campaign["duplicates_found"] == 0
    assert campaign["batch_name"] == "Cobranza E2E" and isinstance(campaign["estimated_cost"], int | float)
    assert OBJECT_ID.match(campaign["_id"]) and campaign["batch_id"] == campaign["batch"]["batch_id"]
    batch = campaign["batch"]
    assert_batch(batch)
    assert (batch["account_id"], batch["country"], batch["use_case"]) == (account, "CL", "debt_collection")
    assert batch["call_settings"]["allowed_hours"] == CALL_SETTINGS["allowed_hours"] and batch["priority"] == 2


def test_the_same_debtors_again_are_duplicates(api: httpx.Client, account: str, campaign: dict[str, Any]) -> None:
    r = upload(api, "/batches/excel/preview", "chile_cobranza_basica.xlsx", account_id=account)
    assert r.status_code == 200 and r.json()["duplicates"] == campaign["jobs_created"], r.text


def test_list_and_get_by_either_id(api: httpx.Client, account: str, campaign: dict[str, Any]) -> None:
    r = api.get("/batches", params={"account_id": account})
    assert r.status_code == 200 and isinstance(r.json(), list)
    assert int(r.headers["X-Total-Count"]) >= 1
    assert campaign["batch_id"] in [b["batch_id"] for b in r.json()]
    by_id = api.get(f"/batches/{campaign['batch_id']}").json()
    by_object_id = api.get(f"/batches/{campaign['_id']}").json()
    assert_batch(by_id)
    assert by_id["_id"] == by_object_id["_id"] == campaign["_id"]
    assert api.get("/batches/batch-does-not-exist").status_code == 404


def test_pause_and_resume(api: httpx.Client, campaign: dict[str, Any]) -> None:
    r = api.patch(f"/batches/{campaign['_id']}", json={"is_active": False})
    assert r.status_code == 200, r.text
    assert r.json()["message"] == "Batch paused" and "is_active" in r.json()["updated_fields"]
    assert r.json()["batch"]["is_active"] is False
    status = api.get(f"/batches/{campaign['batch_id']}/status").json()
    assert status["is_active"] is False and status["total_jobs"] == campaign["jobs_created"]
    # Tomorrow's campaign: every job waits for its time, none is due yet.
    assert (status["scheduled_jobs"], status["pending_jobs"]) == (campaign["jobs_created"], 0)
    r = api.patch(f"/batches/{campaign['batch_id']}", json={"is_active": True})
    assert r.json()["message"] == "Batch resumed" and r.json()["batch"]["is_active"] is True
    # The legacy routes do the same.
    assert api.put(f"/batches/{campaign['batch_id']}/pause").json()["batch"]["is_active"] is False
    assert api.put(f"/batches/{campaign['batch_id']}/resume").json()["batch"]["is_active"] is True
    r = api.patch(f"/batches/{campaign['batch_id']}", json={"name": "Renombrada", "priority": 3})
    assert r.json()["message"] == "Batch updated" and r.json()["batch"]["name"] == "Renombrada"
    assert api.patch(f"/batches/{campaign['batch_id']}", json={"priority": 9}).status_code == 422


def test_jobs_of_the_campaign(api: httpx.Client, campaign: dict[str, Any]) -> None:
    r = api.get(f"/batches/{campaign['_id']}/jobs")
    assert r.status_code == 200, r.text
    jobs = r.json()
    assert isinstance(jobs, list) and int(r.headers["X-Total-Count"]) == campaign["jobs_created"] == len(jobs)
    for job in jobs:
        assert_job(job)
        # Tomorrow's campaign: every job waits for its start.
        assert job["batch_id"] == campaign["batch_id"] and job["status"] == "scheduled"
    r = api.get("/jobs", params={"batch_id": campaign["batch_id"], "limit": 2})
    assert len(r.json()) == 2 and int(r.headers["X-Total-Count"]) == campaign["jobs_created"]
    # The filters tell a job waiting for its time from one that is due.
    r = api.get("/jobs", params={"batch_id": campaign["batch_id"], "status": "scheduled"})
    assert len(r.json()) == int(r.headers["X-Total-Count"]) == campaign["jobs_created"]
    assert all(job["status"] == "scheduled" for job in r.json())
    r = api.get("/jobs", params={"batch_id": campaign["batch_id"], "status": "pending"})
    assert r.json() == [] and r.headers["X-Total-Count"] == "0"
    one = jobs[0]
    assert api.get(f"/jobs/{one['job_id']}").json()["_id"] == one["_id"]
    assert api.get(f"/jobs/{one['_id']}").json()["job_id"] == one["job_id"]


def test_cancel_retry_and_delete_a_job(api: httpx.Client, campaign: dict[str, Any]) -> None:
    jobs = api.get(f"/batches/{campaign['batch_id']}/jobs").json()
    first, second = jobs[0], jobs[1]
    r = api.put(f"/jobs/{first['_id']}/cancel")
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    assert r.json()["job"]["status"] == "cancelled"
    assert api.get(f"/batches/{campaign['batch_id']}/status").json()["cancelled_jobs"] >= 1
    r = api.put(f"/jobs/{first['job_id']}/retry")
    assert r.status_code == 200 and r.json()["job"]["status"] != "cancelled", r.text
    r = api.delete(f"/jobs/{second['job_id']}")
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    assert api.get(f"/jobs/{second['job_id']}").status_code == 404
    total = int(api.get(f"/batches/{campaign['batch_id']}/jobs").headers["X-Total-Count"])
    assert total == campaign["jobs_created"] - 1


def api_job(base_url: str, campaign: dict[str, Any]) -> str:
    r = httpx.get(f"{base_url}/api/v1/batches/{campaign['batch_id']}/jobs", params={"limit": 1}, headers=ADMIN)
    return str(r.json()[0]["job_id"])


def test_a_member_sees_nothing_of_it(base_url: str, campaign: dict[str, Any]) -> None:
    with httpx.Client(base_url=f"{base_url}/api/v1", headers=MEMBER, timeout=30) as member:
        for path in (f"/batches/{campaign['batch_id']}", f"/batches/{campaign['_id']}/jobs"):
            assert member.get(path).status_code == 404
        assert member.patch(f"/batches/{campaign['_id']}", json={"is_active": False}).status_code == 404
        job = api_job(base_url, campaign)
        assert member.get(f"/jobs/{job}").status_code == 404
        assert member.put(f"/jobs/{job}/cancel").status_code == 404
        assert campaign["batch_id"] not in [b["batch_id"] for b in member.get("/batches").json()]
        assert all(j["account_id"] == "acme" for j in member.get("/jobs").json())


def test_summary(api: httpx.Client, campaign: dict[str, Any]) -> None:
    body = api.get(f"/batches/{campaign['batch_id']}/summary").json()
    assert {"batch_id", "name", "status", "total_jobs", "pending_jobs", "completed_jobs", "completion_rate"} <= set(
        body
    )
    assert isinstance(body["hourly_stats"], list)


def test_other_files_and_routes(api: httpx.Client, account: str) -> None:
    r = upload(api, "/batches/argentina/marketing", "argentina.csv", account_id=account, scheduled_at=tomorrow())
    assert r.status_code == 200, r.text
    batch = r.json()["batch"]
    assert (batch["country"], batch["use_case"]) == ("AR", "marketing") and r.json()["jobs_created"] > 0
    assert api.delete(f"/batches/{batch['batch_id']}", params={"delete_jobs": "true"}).status_code == 200

    r = upload(api, "/batches/chile/lottery", "chile_cobranza_basica.xlsx", account_id=account)
    assert r.status_code in (400, 404) and "debt_collection" in r.json()["message"]
    r = upload(api, "/batches/excel/create", "bad_not_really.xlsx", account_id=account)
    assert r.status_code == 400 and r.json()["message"], r.text
    r = upload(api, "/batches/excel/create", "chile_cobranza_basica.xlsx", account_id=account, call_settings_json="{")
    assert r.status_code == 400 and "call_settings_json" in r.json()["message"]

    r = api.post(
        "/batches",
        json={"account_id": account, "name": "Sin archivo", "priority": 4, "call_settings": CALL_SETTINGS},
    )
    assert r.status_code == 200, r.text
    assert_batch(r.json()["batch"])
    assert r.json()["batch"]["total_jobs"] == 0 and r.json()["batch"]["priority"] == 4
    assert api.delete(f"/batches/{r.json()['batch_id']}").json()["success"] is True


def test_cancel_then_delete_the_campaign(api: httpx.Client, campaign: dict[str, Any]) -> None:
    r = api.post(f"/batches/{campaign['_id']}/cancel", params={"reason": "Cliente solicitó detención"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True and body["reason"] == "Cliente solicitó detención"
    assert body["batch"]["status"] == "cancelled" and body["batch"]["is_active"] is False
    status = api.get(f"/batches/{campaign['batch_id']}/status").json()
    assert status["pending_jobs"] == 0 and status["cancelled_jobs"] >= campaign["jobs_created"] - 1
    pending = api.get("/jobs", params={"batch_id": campaign["batch_id"], "status": "pending"})
    assert pending.json() == []

    r = api.delete(f"/batches/{campaign['batch_id']}", params={"delete_jobs": "false"})
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    assert api.get(f"/batches/{campaign['batch_id']}").status_code == 404


def test_dashboard(api: httpx.Client, account: str) -> None:
    stats = api.get("/dashboard/stats", params={"account_id": account}).json()
    for key in ("total_batches", "active_batches", "total_jobs", "pending_jobs", "completed_jobs", "failed_jobs"):
        assert isinstance(stats[key], int), key
    assert isinstance(stats["total_cost"], int | float) and isinstance(stats["total_minutes"], int | float)
    # Every campaign of this account starts tomorrow: what waits is scheduled, nothing is due.
    assert stats["pending_jobs"] == 0 and isinstance(stats["scheduled_jobs"], int)

    body = api.get("/dashboard/overview", params={"account_id": account}).json()
    assert body["success"] is True and ISO.match(body["timestamp"])
    assert body["account"]["account_id"] == account and isinstance(body["account"]["credit_balance"], int | float)
    assert {"jobs_today", "success_rate_percentage", "active_batches", "pending_jobs"} <= set(body["metrics"])
    assert {"jobs", "batches"} <= set(body["detailed_stats"])
    assert {"total", "active", "paused", "completed"} <= set(body["batches"])
    assert {"total", "pending", "in_progress", "completed", "failed"} <= set(body["jobs"])
    assert (body["jobs"]["pending"], body["jobs"]["scheduled"]) == (0, stats["scheduled_jobs"])
    assert {"total_spent", "total_minutes", "average_per_call"} <= set(body["costs"])
    assert isinstance(body["recent_activity"], list)

    history = api.get("/calls/history", params={"account_id": account}).json()
    assert isinstance(history["calls"], list) and isinstance(history["total"], int)
    # Everyone's view, for an admin: no one account to describe.
    assert api.get("/dashboard/overview").json()["account"] is None


def test_use_cases(api: httpx.Client) -> None:
    body = api.get("/use-cases").json()
    assert [u["id"] for u in body["use_cases"]] == ["debt_collection", "marketing"]
    assert all(u["processing_types"] == ["basic", "acquisition"] for u in body["use_cases"])


@pytest.mark.parametrize(
    "fixture", ["bad_binary.csv", "bad_empty.csv", "bad_header_only.csv", "bad_latin1.csv", "bad_not_really.xlsx"]
)
def test_every_bad_file_is_400_with_a_message_and_creates_nothing(
    api: httpx.Client, account: str, fixture: str
) -> None:
    before = api.get("/batches", params={"account_id": account}).headers["X-Total-Count"]
    for path in ("/batches/excel/preview", "/batches/excel/create"):
        r = upload(api, path, fixture, account_id=account)
        assert r.status_code == 400, (path, r.text)
        assert r.json()["message"] and r.json()["code"] == "bad_request"
    assert api.get("/batches", params={"account_id": account}).headers["X-Total-Count"] == before


def test_a_campaign_beyond_the_credit_is_refused(api: httpx.Client) -> None:
    account_id = f"voice-poor-{uuid.uuid4().hex[:6]}"
    r = api.post("/accounts", json={"account_id": account_id, "account_name": "Poor", "initial_credits": 1})
    assert r.status_code == 200, r.text
    r = upload(api, "/batches/excel/create", "chile_cobranza_basica.xlsx", account_id=account_id)
    assert r.status_code == 400 and "insufficient credit" in r.json()["message"], r.text
    assert api.get("/batches", params={"account_id": account_id}).json() == []
    # An unlimited account is never refused for its cost.
    r = api.patch(f"/accounts/{account_id}", json={"plan_type": "unlimited"})
    assert r.status_code == 200, r.text
    r = upload(
        api, "/batches/excel/create", "chile_cobranza_basica.xlsx", account_id=account_id, scheduled_at=tomorrow()
    )
    assert r.status_code == 200, r.text


def test_the_active_filter_means_pending_or_processing(api: httpx.Client, account: str) -> None:
    r = upload(api, "/batches/excel/create", "argentina.csv", account_id=account, scheduled_at=tomorrow())
    assert r.status_code == 200, r.text
    active = api.get("/batches", params={"account_id": account, "status": "active"})
    assert active.status_code == 200 and active.json(), active.text
    assert {b["status"] for b in active.json()} <= {"pending", "processing"}
    assert r.json()["batch_id"] in {b["batch_id"] for b in active.json()}
    assert int(active.headers["X-Total-Count"]) == len(active.json())
    # The dashboard's own words are taken too (tests/e2e/test_dashboard_compat.py); others are not.
    assert api.get("/batches", params={"status": "exploded"}).status_code == 400


def test_a_zip_bomb_is_400_naming_its_limit_and_creates_nothing(
    api: httpx.Client, account: str, tmp_path: Path
) -> None:
    # 80 MiB of shared strings in an upload of about 100 KiB.
    bomb = with_part(
        plain_workbook(tmp_path / "plain.xlsx"), tmp_path / "bomb.xlsx", SHARED_STRINGS, huge_shared_strings(80 * MIB)
    )
    before = api.get("/batches", params={"account_id": account}).headers["X-Total-Count"]
    for path in ("/batches/excel/preview", "/batches/excel/create"):
        with bomb.open("rb") as f:
            r = api.post(
                path,
                files={"file": ("deudores.xlsx", f, "application/octet-stream")},
                data={"account_id": account},
            )
        assert r.status_code == 400, (path, r.text)
        message = r.json()["message"]
        assert "64 MiB" in message and "xl/sharedStrings.xml" in message, message
    assert api.get("/batches", params={"account_id": account}).headers["X-Total-Count"] == before
