"""The voice routes' JSON, from proto messages to what the SpeechAI dashboard reads
(API_COMPAT.md), and the routes' own decisions (form checks, id scoping, streaming) against a
fake campaigns stub: no running services."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import pytest
from fastapi import FastAPI
from google.protobuf.timestamp_pb2 import Timestamp
from pregonero.accounts.v1 import accounts_pb2
from pregonero.campaigns.v1 import campaigns_pb2

from services.gateway import errors, ids
from services.gateway.auth import Authenticator
from services.gateway.config import GatewaySettings
from services.gateway.routes import batches, dashboard, jobs
from services.runtime.rpc import outgoing_metadata

ADMIN, MEMBER = "voice-admin", "voice-member"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
MEMBER_AUTH = {"Authorization": f"Bearer {MEMBER}"}
BATCH = "68fd0cdc8ac7d47a518bc017"  # a batch `_id`: the fake answers for any
ISO = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$"

JOB_FIELDS = (
    "_id job_id batch_id account_id status attempts max_attempts mode created_at started_at contact payload "
    "fecha_pago_cliente monto_pago_cliente call_result call_duration_seconds call_started_at call_ended_at "
    "finished_at estimated_cost to_number"
).split()
BATCH_FIELDS = (
    "_id batch_id account_id name description is_active created_at total_jobs pending_jobs completed_jobs "
    "failed_jobs suspended_jobs total_cost total_minutes estimated_cost call_settings priority status updated_at "
    "cancelled_jobs in_progress_jobs scheduled_jobs use_case country suspension_reason"
).split()
CALL_SETTINGS = {
    "max_call_duration": 300,
    "ring_timeout": 30,
    "max_attempts": 3,
    "retry_delay_hours": 24,
    "allowed_hours": {"start": "09:00", "end": "20:00"},
    "days_of_week": [1, 2, 3, 4, 5],
    "timezone": "America/Santiago",
}


def ts(text: str) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(datetime.fromisoformat(text).replace(tzinfo=UTC))
    return t


def voice_batch(**kw: Any) -> campaigns_pb2.Batch:
    fields: dict[str, Any] = {
        "batch_id": "batch-2025-10-25-144604-615037",
        "object_id": "68fd0cdc8ac7d47a518bc017",
        "account_id": "acme",
        "channel": "voice",
        "status": "processing",
        "name": "Cobranza octubre",
        "description": "testing",
        "progress": campaigns_pb2.Progress(total=12, pending=5, sent=4, failed=1, cancelled=1, suspended=1),
        "created_at": ts("2025-10-25T17:46:04"),
        "updated_at": ts("2025-10-25T18:01:29"),
        "total_cost": "1.2500",
        "total_minutes": "4.5",
        "estimated_cost": "5.64",
        "priority": 2,
        "call_settings_json": json.dumps(CALL_SETTINGS),
        "use_case": "debt_collection",
        "country": "CL",
        "completed_jobs": 3,
        "in_progress_jobs": 2,
        "scheduled_jobs": 1,
        "processing_type": "basic",
    }
    fields.update(kw)
    return campaigns_pb2.Batch(**fields)


CALL_RESULT = {
    "success": True,
    "status": "ended",
    "summary": {
        "call_status": "ended",
        "duration_ms": 45000,
        "call_cost": {"combined_cost": 0.47, "total_duration_seconds": 45},
        "call_analysis": {"call_summary": "Promete pagar el viernes", "user_sentiment": "Positive"},
        "recording_url": "https://example.test/rec.wav",
        "public_log_url": "https://example.test/log",
        "transcript": "Agente: Hola...",
        "collected_dynamic_variables": {"fecha_pago_cliente": "2025-11-07"},
    },
}


def voice_job(**kw: Any) -> campaigns_pb2.Job:
    fields: dict[str, Any] = {
        "job_id": "job-17",
        "object_id": "68fd0cdc42cc4632daeb164f",
        "batch_id": "batch-2025-10-25-144604-615037",
        "batch_object_id": "68fd0cdc8ac7d47a518bc017",
        "account_id": "acme",
        "status": "pending",
        "attempts": 0,
        "max_attempts": 3,
        "created_at": ts("2025-10-25T17:46:04"),
        "contact_name": "Juan Pérez",
        "contact_dni": "12.345.678-5",
        "phones": ["+56912345678", "+56221234567"],
        "payload_json": json.dumps(
            {
                "debt_amount": 1500.0,
                "due_date": "2025-11-30",
                "company_name": "Retail Express",
                "additional_info": {"cantidad_cupones": 3},
            }
        ),
        "estimated_cost": "0.47",
    }
    fields.update(kw)
    return campaigns_pb2.Job(**fields)


# --- JSON shaping --------------------------------------------------------------------------


def test_job_json_has_every_field_the_dashboard_reads_before_the_first_call() -> None:
    body = jobs.job_json(voice_job())
    assert set(JOB_FIELDS) <= set(body)
    assert body["_id"] == "68fd0cdc42cc4632daeb164f" and body["job_id"] == "job-17"
    assert body["mode"] == "single"
    assert body["contact"] == {
        "name": "Juan Pérez",
        "phones": ["+56912345678", "+56221234567"],
        "dni": "12.345.678-5",
        "next_phone_index": 0,
    }
    payload = body["payload"]
    assert payload["debt_amount"] == 1500.0 and payload["reference_number"] is None
    assert payload["additional_info"] == {"cantidad_cupones": 3, "fecha_maxima": None}
    # No call yet: the objects are there, their members null or empty.
    result = body["call_result"]
    assert result["success"] is None and result["status"] is None
    summary = result["summary"]
    assert summary["call_cost"] == {"combined_cost": None, "total_duration_seconds": None}
    assert summary["call_analysis"] == {"call_summary": None, "user_sentiment": None}
    assert summary["collected_dynamic_variables"] == {}
    for key in ("call_status", "duration_ms", "recording_url", "public_log_url", "transcript"):
        assert summary[key] is None
    assert body["estimated_cost"] == 0.47 and isinstance(body["estimated_cost"], float)
    for key in ("monto_pago_cliente", "call_duration_seconds", "call_started_at", "started_at", "finished_at"):
        assert body[key] is None
    assert body["created_at"] == "2025-10-25T17:46:04Z"
    json.dumps(body)  # serialisable as it is


def test_job_json_after_a_call() -> None:
    body = jobs.job_json(
        voice_job(
            status="completed",
            attempts=1,
            call_result_json=json.dumps(CALL_RESULT),
            fecha_pago_cliente="2025-11-07",
            monto_pago_cliente="1500.00",
            call_duration_seconds="45",
            call_started_at=ts("2025-10-26T10:00:00"),
            call_ended_at=ts("2025-10-26T10:00:45"),
            started_at=ts("2025-10-26T09:59:58"),
            finished_at=ts("2025-10-26T10:00:46"),
            to_number="+56912345678",
            cost="0.4700",
        )
    )
    assert body["call_result"] == CALL_RESULT
    assert body["monto_pago_cliente"] == 1500.0 and body["call_duration_seconds"] == 45.0
    assert body["fecha_pago_cliente"] == "2025-11-07" and body["to_number"] == "+56912345678"
    assert body["call_ended_at"] == "2025-10-26T10:00:45Z"
    assert body["cost"] == 0.47


def test_job_json_completes_a_partial_call_result_and_keeps_extra_keys() -> None:
    partial = {"success": False, "status": "no_answer", "summary": {"call_cost": {"combined_cost": 0.02}}, "x": 1}
    body = jobs.job_json(voice_job(call_result_json=json.dumps(partial), payload_json='{"producto": "plan"}'))
    result = body["call_result"]
    assert result["x"] == 1 and result["status"] == "no_answer"
    assert result["summary"]["call_cost"] == {"combined_cost": 0.02, "total_duration_seconds": None}
    assert result["summary"]["call_analysis"] == {"call_summary": None, "user_sentiment": None}
    assert body["payload"]["producto"] == "plan" and body["payload"]["additional_info"]["fecha_maxima"] is None


def test_batch_json_has_every_field_with_numbers_and_objects() -> None:
    body = batches.batch_json(voice_batch())
    assert set(BATCH_FIELDS) <= set(body)
    assert body["_id"] == "68fd0cdc8ac7d47a518bc017"
    assert body["is_active"] is True and body["status"] == "processing"
    assert body["call_settings"] == CALL_SETTINGS
    assert body["priority"] == 2
    assert (body["total_cost"], body["total_minutes"], body["estimated_cost"]) == (1.25, 4.5, 5.64)
    for key in ("total_cost", "total_minutes", "estimated_cost"):
        assert isinstance(body[key], float)
    counters = {k: body[k] for k in BATCH_FIELDS if k.endswith("_jobs")}
    assert counters == {
        "total_jobs": 12,
        "pending_jobs": 5,
        "completed_jobs": 3,
        "failed_jobs": 1,
        "suspended_jobs": 1,
        "cancelled_jobs": 1,
        "in_progress_jobs": 2,
        "scheduled_jobs": 1,
    }
    assert body["created_at"] == "2025-10-25T17:46:04Z" and body["updated_at"] == "2025-10-25T18:01:29Z"
    assert (body["use_case"], body["country"], body["suspension_reason"]) == ("debt_collection", "CL", None)


@pytest.mark.parametrize(
    ("status", "active"),
    [("pending", True), ("processing", True), ("paused", False), ("suspended", False), ("cancelled", False)],
)
def test_is_active_follows_the_status(status: str, active: bool) -> None:
    assert batches.batch_json(voice_batch(status=status))["is_active"] is active


def test_an_empty_batch_still_has_objects_and_numbers() -> None:
    body = batches.batch_json(campaigns_pb2.Batch(batch_id="b", channel="voice"))
    assert body["call_settings"] == {} and body["priority"] == 1
    assert body["total_cost"] == 0.0 and body["estimated_cost"] == 0.0 and body["created_at"] is None


def test_status_is_counters_only() -> None:
    body = batches.status_json(voice_batch())
    assert "call_settings" not in body and "description" not in body
    assert body["batch_id"] == "batch-2025-10-25-144604-615037" and body["is_active"] is True
    # As the missing-endpoints document computes it: completed of 12, to two decimals.
    assert body["progress_percentage"] == 25.0
    assert body["total_cost"] == 1.25 and body["updated_at"] == "2025-10-25T18:01:29Z"
    assert {"pending_jobs", "in_progress_jobs", "cancelled_jobs", "suspended_jobs", "total_minutes"} <= set(body)


def test_summary_has_the_documented_shape_and_hourly_stats() -> None:
    summary = campaigns_pb2.BatchSummary(
        batch=voice_batch(),
        hourly_stats=[
            campaigns_pb2.HourlyStat(
                hour=ts("2025-10-26T10:00:00"), calls=4, completed=3, failed=1, cost="1.25", minutes="4.5"
            )
        ],
    )
    body = batches.summary_json(summary)
    for key in ("batch_id", "name", "status", "total_jobs", "pending_jobs", "completed_jobs", "total_cost"):
        assert key in body
    assert body["completion_rate"] == 25.0
    assert body["hourly_stats"] == [
        {"hour": "2025-10-26T10:00:00Z", "calls": 4, "completed": 3, "failed": 1, "cost": 1.25, "minutes": 4.5}
    ]


def test_preview_json_carries_both_shapes() -> None:
    preview = campaigns_pb2.ContactsPreview(
        file_name="contactos.xlsx",
        total_rows=20,
        valid_rows=11,
        invalid_rows=3,
        duplicates=1,
        estimated_cost="5.64",
        detected_format="chile_debt_collection",
        sample_rows_json=json.dumps([{"contact": {"name": "Juan"}}]),
        invalid=[campaigns_pb2.RowProblem(row=8, reason="no valid phone")],
        warnings=[campaigns_pb2.RowProblem(row=10, reason="RUT check digit")],
        available_credit="100",
    )
    body = batches.preview_json(preview, "ignored.xlsx")
    assert body["success"] is True and body["filename"] == "contactos.xlsx"
    counts = {"total_rows": 20, "valid_rows": 11, "invalid_rows": 3, "duplicates": 1, "estimated_cost": 5.64}
    assert body["preview"] == counts
    assert {k: body[k] for k in counts} == counts
    assert body["sampleRows"] == [{"contact": {"name": "Juan"}}]
    assert body["detectedFormat"] == "chile_debt_collection"
    assert body["invalid_details"] == [{"row": 8, "reason": "no valid phone"}]
    assert body["warnings"] == [{"row": 10, "reason": "RUT check digit"}]
    assert batches.preview_json(campaigns_pb2.ContactsPreview(), "a.csv")["sampleRows"] == []


def test_created_json_carries_both_shapes_and_the_batch() -> None:
    created = campaigns_pb2.VoiceBatchCreated(
        batch=voice_batch(), jobs_created=11, contacts_processed=11, duplicates_skipped=2, estimated_cost="5.17"
    )
    body = batches.created_json(created)
    assert body["success"] is True
    assert body["batch_id"] == "batch-2025-10-25-144604-615037" and body["_id"] == "68fd0cdc8ac7d47a518bc017"
    assert (body["batch_name"], body["total_debtors"], body["total_jobs"]) == ("Cobranza octubre", 11, 11)
    assert (body["jobs_created"], body["contacts_processed"], body["duplicates_skipped"]) == (11, 11, 2)
    assert body["duplicates_found"] == 2 and body["estimated_cost"] == 5.17
    assert body["created_at"] == "2025-10-25T17:46:04Z"
    assert set(BATCH_FIELDS) <= set(body["batch"])


def test_dashboard_stats_and_overview() -> None:
    d = campaigns_pb2.Dashboard(
        account_id="acme",
        total_batches=12,
        active_batches=8,
        paused_batches=2,
        completed_batches=2,
        total_jobs=150,
        pending_jobs=50,
        in_progress_jobs=10,
        completed_jobs=80,
        failed_jobs=10,
        total_cost="47.50",
        total_minutes="316.67",
        calls_today=30,
        jobs_today=40,
        recent_jobs=[voice_job(status="completed")],
    )
    stats = dashboard.stats_json(d)
    for key in ("total_batches", "active_batches", "total_jobs", "pending_jobs", "completed_jobs", "failed_jobs"):
        assert isinstance(stats[key], int)
    assert stats["total_cost"] == 47.5 and stats["total_minutes"] == 316.67
    assert stats["success_rate_percentage"] == 88.9

    account = {"account_id": "acme", "credit_balance": 150.5}
    body = dashboard.overview_json(d, account, datetime(2025, 10, 25, 14, 30, tzinfo=UTC))
    assert body["success"] is True and body["timestamp"] == "2025-10-25T14:30:00Z"
    assert body["account"] == account and body["account_id"] == "acme"
    # Jobs created today, not calls made today.
    metrics = {"jobs_today": 40, "success_rate_percentage": 88.9, "active_batches": 8, "pending_jobs": 50}
    assert body["metrics"] == metrics
    assert body["detailed_stats"]["jobs"]["total_finished"] == 90
    assert body["detailed_stats"]["batches"]["total_cost"] == 47.5
    assert {k: body["batches"][k] for k in ("total", "active", "paused", "completed")} == {
        "total": 12,
        "active": 8,
        "paused": 2,
        "completed": 2,
    }
    assert {k: body["jobs"][k] for k in ("total", "pending", "in_progress", "completed", "failed")} == {
        "total": 150,
        "pending": 50,
        "in_progress": 10,
        "completed": 80,
        "failed": 10,
    }
    assert body["costs"] == {"total_spent": 47.5, "total_minutes": 316.67, "average_per_call": 0.5278}
    assert body["recent_activity"][0]["job_id"] == "job-17"
    json.dumps(body)


def test_overview_account_in_the_plan_unit() -> None:
    account = accounts_pb2.Account(account_id="acme", object_id="a" * 24, account_name="Acme", status="active")
    credits = accounts_pb2.Balance(plan_type="credit_based", credit_balance="150.50", credit_available="145.30")
    body = dashboard.account_summary_json(account, credits)
    assert (body["name"], body["billing_type"], body["balance"], body["credit_balance"]) == (
        "Acme",
        "credits",
        145.3,
        150.5,
    )
    minutes = accounts_pb2.Balance(plan_type="minutes_based", minutes_available="90")
    assert dashboard.account_summary_json(account, minutes)["balance"] == 90.0


def test_call_json() -> None:
    call = campaigns_pb2.CallRecord(
        call_id="call-1",
        job_id="job-17",
        status="ended",
        duration_ms=45000,
        cost="0.47",
        created_at=ts("2025-10-25T10:00:00"),
    )
    body = dashboard.call_json(call)
    assert body["cost"] == 0.47 and body["duration_ms"] == 45000 and body["created_at"] == "2025-10-25T10:00:00Z"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{nope", "not valid JSON"),
        ("[1]", "must be a JSON object"),
        ('{"allowed_hours": {"start": "9", "end": "20:00"}}', "call_settings_json.allowed_hours.start"),
        ('{"days_of_week": [7]}', "call_settings_json.days_of_week.0"),
        ('{"timezone": "Mars/Olympus"}', "unknown time zone"),
        ('{"max_attempts": 0}', "call_settings_json.max_attempts"),
    ],
)
def test_bad_call_settings_json_is_400_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(errors.ApiError) as info:
        batches.call_settings_from_form(text)
    assert info.value.status == 400 and message in info.value.message


def test_call_settings_json_is_normalised_and_keeps_unknown_keys() -> None:
    text = batches.call_settings_from_form(json.dumps({**CALL_SETTINGS, "voice": "es-CL"}))
    assert json.loads(text) == {**CALL_SETTINGS, "voice": "es-CL"}
    assert batches.call_settings_from_form("") == "" and batches.call_settings_from_form(None) == ""


def test_scheduled_at() -> None:
    assert batches.parse_scheduled_at("2025-11-01T09:00:00") == datetime(2025, 11, 1, 9, tzinfo=UTC)
    assert batches.parse_scheduled_at("2025-11-01T09:00:00-03:00") == datetime(2025, 11, 1, 12, tzinfo=UTC)
    assert batches.parse_scheduled_at("2025-11-01T12:00:00Z") == datetime(2025, 11, 1, 12, tzinfo=UTC)
    assert batches.parse_scheduled_at(None) is None
    with pytest.raises(errors.ApiError):
        batches.parse_scheduled_at("mañana")


# --- the routes against a fake campaigns service -------------------------------------------


class FakeCampaigns:
    """Records each RPC and its request; uploads are drained like the real stream."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, dict[str, str]]] = []
        self.uploaded = b""

    def _record(self, name: str, request: Any, metadata: Any) -> None:
        # What the channel sends: the call's own metadata, else the request's caller and id.
        self.calls.append((name, request, dict(metadata or outgoing_metadata())))

    def __getattr__(self, name: str) -> Any:
        replies: dict[str, Any] = {
            "GetBatch": voice_batch(),
            "UpdateBatch": voice_batch(status="paused"),
            "PauseBatch": voice_batch(status="paused"),
            "CancelBatch": voice_batch(status="cancelled"),
            "ListBatches": campaigns_pb2.ListBatchesResponse(batches=[voice_batch()], total=7),
            "ListJobs": campaigns_pb2.ListJobsResponse(jobs=[voice_job()], total=3),
            "CancelJob": voice_job(status="cancelled"),
            "GetDashboard": campaigns_pb2.Dashboard(account_id="acme"),
        }
        if name not in replies:
            raise AttributeError(name)

        async def rpc(request: Any, *, metadata: Any = None, **_: Any) -> Any:
            self._record(name, request, metadata)
            return replies[name]

        return rpc

    async def CreateVoiceBatch(self, parts: Any, *, metadata: Any = None, **_: Any) -> Any:  # noqa: N802 - gRPC name
        header = None
        async for part in parts:
            if part.WhichOneof("part") == "header":
                header = part.header
            else:
                self.uploaded += part.chunk
        self._record("CreateVoiceBatch", header, metadata)
        return campaigns_pb2.VoiceBatchCreated(batch=voice_batch(), jobs_created=2, contacts_processed=2)


@pytest.fixture
def fake() -> FakeCampaigns:
    return FakeCampaigns()


@pytest.fixture
async def client(fake: FakeCampaigns) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    app.state.auth = Authenticator(
        GatewaySettings(
            database_url="postgresql://unused/x", pregonero_static_tokens=f"{ADMIN}=admin,{MEMBER}=account:acme"
        )
    )
    app.state.backends = SimpleNamespace(campaigns=fake, accounts=None)
    errors.install(app)
    for module in (batches, jobs, dashboard):
        app.include_router(module.router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway") as c:
        yield c


async def upload(
    client: httpx.AsyncClient, path: str, name: str = "contactos.xlsx", headers: Any = None, **data: str
) -> Any:
    files = {"file": (name, b"PK\x03\x04 workbook bytes", "application/octet-stream")}
    return await client.post(path, files=files, data=data, headers=headers or AUTH)


async def test_create_streams_the_file_after_a_header_with_every_form_field(
    client: httpx.AsyncClient, fake: FakeCampaigns
) -> None:
    r = await upload(
        client,
        "/api/v1/batches/excel/create",
        account_id="acme",
        batch_name=" Octubre ",
        allow_duplicates="true",
        processing_type="acquisition",
        dias_fecha_limite="5",
        dias_fecha_maxima="",
        call_settings_json=json.dumps(CALL_SETTINGS),
        priority="3",
        scheduled_at="2025-11-01T09:00:00Z",
    )
    assert r.status_code == 200, r.text
    assert r.json()["jobs_created"] == 2 and r.json()["batch"]["_id"] == "68fd0cdc8ac7d47a518bc017"
    name, header, metadata = fake.calls[-1]
    assert name == "CreateVoiceBatch" and fake.uploaded == b"PK\x03\x04 workbook bytes"
    assert (header.account_id, header.batch_name, header.allow_duplicates) == ("acme", "Octubre", True)
    assert (header.processing_type, header.dias_fecha_limite, header.dias_fecha_maxima) == ("acquisition", 5, 0)
    assert json.loads(header.call_settings_json) == CALL_SETTINGS and header.priority == 3
    assert header.scheduled_at.ToDatetime(tzinfo=UTC) == datetime(2025, 11, 1, 9, tzinfo=UTC)
    assert (header.country, header.use_case) == ("", "")
    assert metadata["x-role"] == "admin"


async def test_country_routes_fix_the_country_and_check_the_use_case(
    client: httpx.AsyncClient, fake: FakeCampaigns
) -> None:
    r = await upload(client, "/api/v1/batches/argentina/marketing", name="argentina.csv")
    assert r.status_code == 200, r.text
    header = fake.calls[-1][1]
    assert (header.country, header.use_case) == ("AR", "marketing")
    r = await upload(client, "/api/v1/batches/chile/lottery")
    assert r.status_code == 404 and "debt_collection or marketing" in r.json()["message"]


@pytest.mark.parametrize(
    ("name", "data", "status", "words"),
    [
        ("contactos.pdf", {}, 400, ".xlsx, .xls or .csv"),
        ("c.xlsx", {"call_settings_json": "{"}, 400, "call_settings_json"),
        ("c.xlsx", {"scheduled_at": "pronto"}, 400, "scheduled_at"),
        ("c.xlsx", {"priority": "9"}, 422, "priority"),
        ("c.xlsx", {"processing_type": "deluxe"}, 422, "processing_type"),
    ],
)
async def test_bad_forms_are_refused_before_anything_is_streamed(
    client: httpx.AsyncClient, fake: FakeCampaigns, name: str, data: dict[str, str], status: int, words: str
) -> None:
    r = await upload(client, "/api/v1/batches/excel/create", name=name, **data)
    assert r.status_code == status, r.text
    assert words in r.json()["message"] and r.json()["detail"] == r.json()["message"]
    assert fake.calls == []


async def test_oversized_upload_is_413(
    client: httpx.AsyncClient, fake: FakeCampaigns, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batches, "MAX_UPLOAD_BYTES", 10)
    r = await upload(client, "/api/v1/batches/excel/preview")
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large"
    assert fake.calls == []


async def test_a_member_naming_another_account_gets_404_without_a_backend_call(
    client: httpx.AsyncClient, fake: FakeCampaigns
) -> None:
    r = await upload(client, "/api/v1/batches/excel/create", headers=MEMBER_AUTH, account_id="other")
    assert r.status_code == 404
    assert (await client.get("/api/v1/batches", params={"account_id": "other"}, headers=MEMBER_AUTH)).status_code == 404
    assert (await client.get("/api/v1/jobs", params={"account_id": "other"}, headers=MEMBER_AUTH)).status_code == 404
    r = await client.get("/api/v1/dashboard/stats", params={"account_id": "other"}, headers=MEMBER_AUTH)
    assert r.status_code == 404
    assert fake.calls == []
    assert (await client.get("/api/v1/batches", params={"account_id": "acme"}, headers=MEMBER_AUTH)).status_code == 200


async def test_every_voice_route_needs_a_token(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/v1/batches")).status_code == 401
    assert (await client.get("/api/v1/use-cases")).status_code == 401
    assert (await client.get("/api/v1/use-cases", headers=MEMBER_AUTH)).status_code == 200


async def test_lists_are_arrays_with_x_total_count(client: httpx.AsyncClient, fake: FakeCampaigns) -> None:
    r = await client.get("/api/v1/batches", params={"status": "paused"}, headers=AUTH)
    assert r.status_code == 200 and isinstance(r.json(), list) and r.headers["X-Total-Count"] == "7"
    request = fake.calls[-1][1]
    assert (request.channel, request.status, request.limit, request.skip) == ("voice", "paused", 50, 0)
    r = await client.get("/api/v1/jobs", params={"status": "done"}, headers=AUTH)
    assert r.status_code == 200 and r.json()[0]["job_id"] == "job-17" and r.headers["X-Total-Count"] == "3"
    assert (fake.calls[-1][1].status, fake.calls[-1][1].limit) == ("completed", 100)
    assert (await client.get("/api/v1/jobs", params={"status": "lost"}, headers=AUTH)).status_code == 400


async def test_batch_jobs_resolve_the_batch_first_and_list_by_its_canonical_id(
    client: httpx.AsyncClient, fake: FakeCampaigns
) -> None:
    r = await client.get(f"/api/v1/batches/{BATCH}/jobs", headers=AUTH)
    assert r.status_code == 200 and r.headers["X-Total-Count"] == "3"
    assert [c[0] for c in fake.calls] == ["GetBatch", "ListJobs"]
    assert fake.calls[-1][1].batch_id == "batch-2025-10-25-144604-615037"


async def test_patch_messages_and_the_patch_sent(client: httpx.AsyncClient, fake: FakeCampaigns) -> None:
    r = await client.patch(f"/api/v1/batches/{BATCH}", json={"is_active": False}, headers=AUTH)
    assert r.status_code == 200
    assert r.json()["message"] == "Batch paused" and r.json()["updated_fields"] == ["is_active", "updated_at"]
    assert json.loads(fake.calls[-1][1].patch_json) == {"is_active": False}
    r = await client.patch(f"/api/v1/batches/{BATCH}", json={"is_active": True}, headers=AUTH)
    assert r.json()["message"] == "Batch resumed"
    change = {"priority": 4, "call_settings": {"ring_timeout": 20}}
    r = await client.patch(f"/api/v1/batches/{BATCH}", json=change, headers=AUTH)
    assert r.json()["message"] == "Batch updated"
    assert json.loads(fake.calls[-1][1].patch_json) == change
    assert (await client.patch(f"/api/v1/batches/{BATCH}", json={"priority": 5}, headers=AUTH)).status_code == 422
    # An empty patch changes nothing and still answers with the batch.
    r = await client.patch(f"/api/v1/batches/{BATCH}", json={}, headers=AUTH)
    assert r.status_code == 200 and fake.calls[-1][0] == "GetBatch" and r.json()["updated_fields"] == []


async def test_cancel_routes_carry_the_reason(client: httpx.AsyncClient, fake: FakeCampaigns) -> None:
    r = await client.post(f"/api/v1/batches/{BATCH}/cancel", params={"reason": "cliente pidió"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["reason"] == "cliente pidió" and r.json()["batch"]["status"] == "cancelled"
    assert fake.calls[-1][1].reason == "cliente pidió"
    r = await client.put("/api/v1/jobs/job-17/cancel", headers=AUTH)
    assert r.status_code == 200 and r.json()["job"]["status"] == "cancelled" and fake.calls[-1][1].reason == ""
    await client.put("/api/v1/jobs/job-17/cancel", json={"reason": "pagó"}, headers=AUTH)
    assert fake.calls[-1][1].reason == "pagó"


async def test_backend_errors_map_like_everywhere(client: httpx.AsyncClient, fake: FakeCampaigns) -> None:
    async def missing(request: Any, **_: Any) -> Any:
        raise grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "no such batch")

    fake.GetBatch = missing  # type: ignore[method-assign]
    r = await client.get("/api/v1/batches/5f0c6a3e-0000-4000-8000-000000000001/status", headers=MEMBER_AUTH)
    assert r.status_code == 404
    assert r.json() == {"detail": "no such batch", "message": "no such batch", "code": "not_found"}


@pytest.mark.parametrize(
    "path",
    ["/api/v1/jobs/68fd0cdc42cc4632daeb164f", "/api/v1/jobs/-1/cancel", "/api/v1/batches/batch-2025/status"]
    + [f"/api/v1/jobs/{'9' * 30}", f"/api/v1/batches/{'x' * 300}"],
)
async def test_an_id_that_names_nothing_is_404_before_any_backend(
    client: httpx.AsyncClient, fake: FakeCampaigns, path: str
) -> None:
    method = "PUT" if path.endswith("/cancel") else "GET"
    r = await client.request(method, path, headers=AUTH)
    assert r.status_code == 404 and r.json()["code"] == "not_found" and r.json()["message"], r.text
    assert fake.calls == []


async def test_use_cases(client: httpx.AsyncClient) -> None:
    body = (await client.get("/api/v1/use-cases", headers=AUTH)).json()
    assert [u["id"] for u in body["use_cases"]] == ["debt_collection", "marketing"]
    for use_case in body["use_cases"]:
        assert use_case["name"] and use_case["description"]
        assert use_case["processing_types"] == ["basic", "acquisition"] and use_case["countries"] == ["CL", "AR"]


def test_the_summary_says_the_references_batch_states() -> None:
    words = {
        status: batches.summary_json(campaigns_pb2.BatchSummary(batch=voice_batch(status=status)))["status"]
        for status in ("pending", "processing", "paused", "suspended", "completed", "cancelled", "failed")
    }
    assert set(words.values()) == {"active", "paused", "completed", "cancelled"}
    assert (words["processing"], words["suspended"]) == ("active", "paused")


@pytest.mark.parametrize(
    ("given", "sent"),
    [("RUNNING", "active"), ("running", "active"), ("PENDING", "pending"), ("Paused", "paused"), ("ERROR", "failed")]
    + [(word, word) for word in ("active", "pending", "processing", "suspended", "completed")]
    + [(None, ""), ("", "")],
)
def test_the_batch_filter_takes_the_dashboards_words(given: str | None, sent: str) -> None:
    assert batches.batch_status_filter(given) == sent


@pytest.mark.parametrize(
    ("text", "key"),
    [("job-17", 17), ("17", 17), ("000000000000000000000011", 17), ("JOB-17", 17), ("7fffffffffffffffffffffff", None)]
    + [("68fd0cdc42cc4632daeb164f", None), ("9223372036854775808", None), ("0", None), ("-1", None)]
    + [("job-", None), ("abc", None), ("x" * 300, None), ("1" * 20, None), ("9223372036854775807", 2**63 - 1)],
)
def test_a_voice_job_id_names_a_key_or_nothing(text: str, key: int | None) -> None:
    assert ids.voice_job_key(text) == key


def test_a_batch_id_is_a_uuid_or_24_hex() -> None:
    assert ids.is_batch_id("68fd0cdc8ac7d47a518bc017") and ids.is_batch_id(str(uuid.uuid4()))
    for text in ("batch-2025-10-25-144604-615037", "abc", "-1", "68fd0cdc8ac7d47a518bc01", "x" * 300):
        assert not ids.is_batch_id(text), text
