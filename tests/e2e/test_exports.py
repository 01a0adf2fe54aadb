"""Exports end to end, through Envoy: a 10,000-recipient bulk job sent through a simulated
device and a small voice campaign called on the simulated line, each downloaded as CSV (read
with the `csv` module) and as XLSX (opened with openpyxl), checked against what the API says
of the same job, row by row; text a recipient supplied that a spreadsheet would run as a
formula comes out neutralised. Another account's job is 404, a bad format or type 400."""

from __future__ import annotations

import asyncio
import csv
import glob
import io
import os
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from openpyxl import load_workbook

from services.campaigns.exports import neutral
from services.runtime.devstack import Stack
from tests.conftest import ADMIN_TOKEN, MEMBER_TOKEN, wait_for
from tests.e2e.test_bulk import phones
from tests.e2e.test_calls import ALL_DAY, completed, new_account, upload_campaign

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}  # a member of "acme": none of the jobs below
RECIPIENTS = 10_000
DEBTORS = 40
BOM = b"\xef\xbb\xbf"
XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
# Recipients' own text (the template's @valor1) that a spreadsheet would read as a formula.
INJECTED = {3: "=HYPERLINK(evil.example)", 4: "+SUM(A1:A2)", 5: "@SUM(A1)", 6: "-2+3"}
BULK_HEADER = [
    "row",
    "phone",
    "status",
    "device_id",
    "error",
    "attempts",
    "finished_at (UTC)",
    "delivery",
    "delivered_at (UTC)",
    "read_at (UTC)",
    "delivery_error",
    "valor1",
    "valor2",
]

pytestmark = pytest.mark.timeout(180)


@dataclass
class Campaigns:
    key: dict[str, str]  # an API key of the account they belong to
    job_id: str  # the bulk job
    numbers: list[str]
    batch_id: str  # the voice campaign
    batch_object_id: str


def bulk_file(numbers: list[str]) -> bytes:
    lines = ["phone|@valor1|@valor2"]
    lines += [f"{p}|{INJECTED.get(i, f'Cliente {i}')}|{i}" for i, p in enumerate(numbers)]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def campaigns(base_url: str) -> Iterator[Campaigns]:
    """A finished 10,000-recipient bulk job (a tenth failing at the device) and a finished
    voice campaign, both of an account of their own; both run at once."""
    account_id, key = new_account(base_url)
    created = upload_campaign(base_url, key, account_id, DEBTORS, ALL_DAY, batch_name="Export")
    r = httpx.post(
        f"{base_url}/devices",
        headers=key,
        json={
            "token": f"exports-{uuid.uuid4().hex[:8]}",
            "secret": "exports-secret",
            "rate_per_minute": 0,
            "provider_config": {"failure_ratio": 0.1, "seed": 11},
        },
        timeout=30,
    )
    assert r.status_code == 200, r.text
    numbers = phones(77, RECIPIENTS)
    r = httpx.post(
        f"{base_url}/messages/send-bulk-file",
        headers=key,
        files={"file": ("export.csv", bulk_file(numbers), "text/csv")},
        data={"message": "Hola @valor1, pedido @valor2", "devices_limit": "1"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    job_id = r.json()["job"]["id"]
    wait_for(
        "the bulk job completes",
        lambda: httpx.get(f"{base_url}/jobs/{job_id}", headers=key).json()["status"] == "completed",
        timeout=120,
    )
    batch = completed(base_url, key, created["batch_id"], timeout=120)
    yield Campaigns(key, job_id, numbers, batch["batch_id"], batch["_id"])


def download(base_url: str, path: str, headers: dict[str, str], **params: str) -> httpx.Response:
    r = httpx.get(f"{base_url}{path}", headers=headers, params=params, timeout=120)
    assert r.status_code == 200, r.text[:300]
    return r


def csv_rows(r: httpx.Response) -> list[dict[str, str]]:
    assert r.headers["content-type"].startswith("text/csv")
    assert r.content.startswith(BOM), r.content[:20]
    return list(csv.DictReader(io.StringIO(r.content.decode("utf-8-sig"), newline="")))


def sheet_rows(r: httpx.Response) -> tuple[Any, list[tuple[Any, ...]]]:
    assert r.headers["content-type"] == XLSX
    book = load_workbook(io.BytesIO(r.content))
    sheet = book.worksheets[0]
    return sheet, [tuple(row) for row in sheet.iter_rows(values_only=True)]


def utc(text: str) -> datetime:
    """An API time as openpyxl reads a spreadsheet's: UTC, without a zone."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).replace(tzinfo=None)


def api_results(base_url: str, c: Campaigns) -> dict[str, dict[str, Any]]:
    page = httpx.get(f"{base_url}/jobs/{c.job_id}/results", headers=c.key, params={"limit": RECIPIENTS}).json()
    assert len(page["results"]) == RECIPIENTS
    return {row["phone"]: row for row in page["results"]}


def test_bulk_results_as_csv_list_every_recipient_once_as_the_api_does(base_url: str, campaigns: Campaigns) -> None:
    c = campaigns
    r = download(base_url, f"/jobs/{c.job_id}/results/export", c.key)
    assert r.headers["content-disposition"] == f'attachment; filename="job-{c.job_id}-results.csv"'
    header = next(csv.reader(io.StringIO(r.content.decode("utf-8-sig"))))
    assert header == BULK_HEADER
    rows = csv_rows(r)
    assert [row["phone"] for row in rows] == c.numbers  # in file order, each once
    assert [row["row"] for row in rows] == [str(n) for n in range(1, RECIPIENTS + 1)]

    job = httpx.get(f"{base_url}/jobs/{c.job_id}", headers=c.key).json()
    statuses = Counter(row["status"] for row in rows)
    assert statuses == Counter({"sent": job["progress"]["sent"], "failed": job["progress"]["failed"]})
    assert statuses["failed"] > 0
    api = api_results(base_url, c)
    for row in rows:
        one = api[row["phone"]]
        assert (row["status"], row["error"] or None, row["attempts"]) == (
            one["status"],
            one["error"],
            str(one["attempts"]),
        )
        assert row["device_id"] == str(one["device_id"] or "")
        # UTC, to the second, as a spreadsheet reads a time.
        assert row["finished_at (UTC)"] == one["finished_at"].replace("T", " ")[:19]

    # The recipients' own text: neutralised where a spreadsheet would run it, else as written.
    by_phone = {row["phone"]: row for row in rows}
    for i, text in INJECTED.items():
        assert by_phone[c.numbers[i]]["valor1"] == "'" + text
    assert by_phone[c.numbers[7]]["valor1"] == "Cliente 7" and by_phone[c.numbers[7]]["valor2"] == "7"

    # The same file by the reports route.
    again = download(base_url, "/api/reports/export", c.key, type="bulk_job_results", job_id=c.job_id)
    assert again.content == r.content


def test_bulk_results_as_xlsx_have_typed_cells_a_frozen_header_and_every_row(
    base_url: str, campaigns: Campaigns
) -> None:
    c = campaigns
    r = download(base_url, f"/jobs/{c.job_id}/results/export", c.key, format="xlsx")
    assert r.headers["content-disposition"] == f'attachment; filename="job-{c.job_id}-results.xlsx"'
    sheet, rows = sheet_rows(r)
    assert list(rows[0]) == BULK_HEADER
    assert len(rows) == RECIPIENTS + 1
    assert sheet.freeze_panes == "A2"
    assert sheet.column_dimensions["B"].width > 10  # phones fit

    api = api_results(base_url, c)
    for n, row in enumerate(rows[1:], start=1):
        cells = dict(zip(BULK_HEADER, row, strict=True))
        one = api[cells["phone"]]
        assert cells["row"] == n and isinstance(cells["row"], int)
        assert (cells["status"], cells["error"], cells["attempts"]) == (one["status"], one["error"], one["attempts"])
        assert cells["device_id"] == one["device_id"]
        finished = cells["finished_at (UTC)"]
        assert isinstance(finished, datetime)
        assert abs((finished - utc(one["finished_at"])).total_seconds()) < 0.01
    by_phone = {row[1]: row for row in rows[1:]}
    for i, text in INJECTED.items():
        assert by_phone[c.numbers[i]][11] == "'" + text


def test_a_voice_campaign_exports_each_job_with_its_outcome(base_url: str, campaigns: Campaigns) -> None:
    c = campaigns
    jobs = httpx.get(f"{base_url}/api/v1/batches/{c.batch_id}/jobs", headers=c.key, params={"limit": 1000}).json()
    assert len(jobs) == DEBTORS
    by_id = {j["job_id"]: j for j in jobs}

    r = download(base_url, f"/api/v1/batches/{c.batch_object_id}/export", c.key)
    assert r.headers["content-disposition"] == f'attachment; filename="batch-{c.batch_id}-jobs.csv"'
    rows = csv_rows(r)
    assert sorted(row["job_id"] for row in rows) == sorted(by_id)
    for row in rows:
        job = by_id[row["job_id"]]
        assert (row["status"], row["attempts"], row["name"]) == (
            job["status"],
            str(job["attempts"]),
            job["contact"]["name"],
        )
        first, *others = job["contact"]["phones"]
        assert (row["phone"], row["other_phones"]) == (first, neutral(" ".join(others)))
        summary = job["call_result"]["summary"]
        assert row["outcome"] == (summary["call_status"] or "")
        assert row["summary"] == neutral(summary["call_analysis"]["call_summary"])
        assert float(row["call_duration_seconds"] or 0) == float(job["call_duration_seconds"] or 0)
        assert row["fecha_pago_cliente"] == (job["fecha_pago_cliente"] or "")

    r = download(base_url, "/api/reports/export", c.key, type="voice_batch_jobs", batch_id=c.batch_id, format="xlsx")
    sheet, rows_x = sheet_rows(r)
    header = list(rows_x[0])
    assert header[:7] == ["job_id", "name", "dni", "phone", "other_phones", "status", "outcome"]
    assert len(rows_x) == DEBTORS + 1 and sheet.freeze_panes == "A2"
    for row in rows_x[1:]:
        cells = dict(zip(header, row, strict=True))
        job = by_id[cells["job_id"]]
        assert isinstance(cells["call_started_at (UTC)"], datetime)
        assert isinstance(cells["cost"], float | int) and abs(cells["cost"] - job["cost"]) < 1e-6
        assert isinstance(cells["attempts"], int)
        if job["fecha_pago_cliente"]:  # a promise to pay: its date a date, its amount a number
            assert isinstance(cells["fecha_pago_cliente"], datetime | date)
            assert abs(cells["monto_pago_cliente"] - job["monto_pago_cliente"]) < 0.01


def test_the_address_book_exports_with_names_neutralised(base_url: str, campaigns: Campaigns) -> None:
    c = campaigns
    for name, phone in (("=2+5", "+56987650001"), ("Ana", "+56987650002")):
        r = httpx.post(f"{base_url}/api/contacts", headers=c.key, json={"name": name, "phone": phone})
        assert r.status_code == 201, r.text
    rows = csv_rows(download(base_url, "/api/reports/export", c.key, type="contacts"))
    assert [(row["name"], row["phone"], row["is_active"]) for row in rows] == [
        ("'=2+5", "+56987650001", "TRUE"),
        ("Ana", "+56987650002", "TRUE"),
    ]


def test_another_accounts_exports_are_not_found(base_url: str, campaigns: Campaigns) -> None:
    c = campaigns
    for path, params in (
        (f"/jobs/{c.job_id}/results/export", {}),
        (f"/jobs/{c.job_id}/results/export", {"format": "xlsx"}),
        (f"/api/v1/batches/{c.batch_id}/export", {}),
        (f"/api/v1/batches/{c.batch_object_id}/export", {"format": "xlsx"}),
        ("/api/reports/export", {"type": "bulk_job_results", "job_id": c.job_id}),
        ("/api/reports/export", {"type": "voice_batch_jobs", "batch_id": c.batch_id}),
        ("/api/reports/export", {"type": "contacts", "account_id": "default"}),
    ):
        r = httpx.get(f"{base_url}{path}", headers=MEMBER, params=params, timeout=30)
        assert r.status_code == 404, (path, params, r.status_code, r.text[:300])
        assert r.json()["message"], r.text


def test_a_bad_format_or_type_is_refused_with_the_allowed_values(base_url: str, campaigns: Campaigns) -> None:
    c = campaigns
    for path, params, allowed in (
        (f"/jobs/{c.job_id}/results/export", {"format": "pdf"}, "csv, xlsx"),
        (f"/api/v1/batches/{c.batch_id}/export", {"format": "xls"}, "csv, xlsx"),
        ("/api/reports/export", {"type": "bulk_job_results", "job_id": c.job_id, "format": "ods"}, "csv, xlsx"),
        ("/api/reports/export", {"type": "invoices"}, "contacts, bulk_job_results, voice_batch_jobs"),
        ("/api/reports/export", {"type": "bulk_job_results"}, "job_id is required"),
    ):
        r = httpx.get(f"{base_url}{path}", headers=c.key, params=params, timeout=30)
        assert r.status_code == 400, (path, params, r.status_code, r.text[:300])
        assert allowed in r.json()["message"], r.text
    # A batch of the other channel names the right type.
    r = httpx.get(f"{base_url}/jobs/{c.batch_id}/results/export", headers=c.key, timeout=30)
    assert r.status_code == 400 and "voice_batch_jobs" in r.json()["message"], r.text


# A finished job of `$2` results written straight into the campaigns schema: sending that many
# would take the test minutes, and only their export is under test here.
FILL = """
WITH b AS (
    INSERT INTO campaigns.batches (account_id, channel, name, status, message_template, total_jobs, sent_jobs)
    VALUES ('exports-fill', 'whatsapp', 'fill', 'completed', 'Hola @valor1', $1, $1) RETURNING batch_id),
j AS (
    INSERT INTO campaigns.jobs (batch_id, job_id, phone, vals, status, attempts, sender_id, finished_at)
    SELECT b.batch_id, g, '+569' || lpad(g::text, 8, '0'), ARRAY['Cliente ' || g], 'sent', 1, 1, now()
    FROM b, generate_series(1, $1) g)
SELECT batch_id FROM b"""


async def filled_job(database_url: str, rows: int) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        return str(await conn.fetchval(FILL, rows))
    finally:
        await conn.close()


def export_dirs() -> set[str]:
    """The workbooks being made on this machine (the services share its temporary directory)."""
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "pregonero-export-*")))


def test_a_client_that_goes_away_stops_the_export(base_url: str, suite: Stack) -> None:
    job_id = asyncio.run(filled_job(suite.database_url, 200_000))  # a workbook of seconds of work
    before = export_dirs()
    with httpx.Client(base_url=base_url, headers=ADMIN, timeout=60) as client:
        with client.stream("GET", f"/jobs/{job_id}/results/export", params={"format": "xlsx"}) as r:
            assert r.status_code == 200
            wait_for("the workbook is being made", lambda: export_dirs() - before, timeout=20, every=0.05)
        gone = time.monotonic()
        # Stopped where it was (the page being written ends), its directory removed.
        wait_for("the export stops", lambda: not export_dirs() - before, timeout=20, every=0.05)
        assert time.monotonic() - gone < 5
        with client.stream("GET", f"/jobs/{job_id}/results/export") as r:
            assert next(r.iter_raw()).startswith(BOM)  # the CSV's first byte, at once
        assert client.get(f"/jobs/{job_id}").status_code == 200
