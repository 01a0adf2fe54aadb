"""Exports end to end, through Envoy: a 10,000-recipient bulk job sent through a simulated
device and a small voice campaign called on the simulated line, each downloaded as CSV (read
with the `csv` module) and as XLSX (opened with openpyxl), checked against what the API says
of the same job, row by row; text a recipient supplied that a spreadsheet would run as a
formula comes out neutralised. A scheduled message sent to a group exports as messages, groups
and message results, the ledger as transactions (made by accounts), each scoped to its
account. Another account's job, message or ledger is 404, a bad format, type or a missing id
400. A download given up stops its export."""

from __future__ import annotations

import asyncio
import csv
import io
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg
import httpx
import psutil
import pytest
from openpyxl import load_workbook

from services.runtime.devstack import Stack
from services.runtime.exports import neutral
from tests.conftest import ADMIN_TOKEN, MEMBER_TOKEN, wait_for
from tests.e2e.test_bulk import phones
from tests.e2e.test_calls import ALL_DAY, completed, new_account, upload_campaign
from tests.e2e.test_scheduled_messages import account, create, group, in_state, local_in

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
    assert all(cell.font.b for cell in sheet[1])  # a bold header

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
    assert sheet["G2"].number_format == "yyyy-mm-dd hh:mm:ss"


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
        (
            "/api/reports/export",
            {"type": "invoices"},
            "messages, contacts, groups, message_results, bulk_job_results, voice_batch_jobs, transactions",
        ),
        ("/api/reports/export", {"type": "bulk_job_results"}, "job_id is required for type=bulk_job_results"),
        ("/api/reports/export", {"type": "message_results"}, "message_id is required for type=message_results"),
        ("/api/reports/export", {"type": "voice_batch_jobs", "batch_id": " "}, "batch_id is required"),
        ("/api/reports/export", {"type": "transactions", "format": "pdf"}, "csv, xlsx"),
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


def cpu_seconds(suite: Stack, name: str) -> float:
    times = psutil.Process(suite.service_procs[name].popen.pid).cpu_times()
    return float(times.user + times.system)


def test_a_workbook_starts_at_once_and_a_client_that_goes_away_stops_it(base_url: str, suite: Stack) -> None:
    job_id = asyncio.run(filled_job(suite.database_url, 400_000))  # a workbook of seconds of work
    with httpx.Client(base_url=base_url, headers=ADMIN, timeout=60) as client:
        started = time.monotonic()
        with client.stream("GET", f"/jobs/{job_id}/results/export", params={"format": "xlsx"}) as r:
            assert r.status_code == 200
            first = next(r.iter_raw())
            # The zip's first header and the sheet's start, long before 400,000 rows are made.
            assert first.startswith(b"PK\x03\x04"), first[:20]
            assert time.monotonic() - started < 2
        # Given up: campaigns stops making it (the page being written ends) and goes idle.
        time.sleep(1.5)
        before = cpu_seconds(suite, "campaigns")
        time.sleep(2)
        assert cpu_seconds(suite, "campaigns") - before < 1.0
        with client.stream("GET", f"/jobs/{job_id}/results/export") as r:
            assert next(r.iter_raw()).startswith(BOM)  # the CSV's first byte, at once
        assert client.get(f"/jobs/{job_id}").status_code == 200


@dataclass
class Scheduled:
    account_id: str
    key: dict[str, str]
    message_id: str
    group_id: str
    numbers: list[str]


@pytest.fixture(scope="module")
def scheduled(base_url: str) -> Scheduled:
    """A message to a group of three, sent; the account's ledger has its credit and charges."""
    account_id, key = account(base_url)
    numbers = phones(93, 3)
    group_id = group(base_url, key, "=clientes", numbers)
    r = create(base_url, key, content="Hola {{name}}", scheduled_for=local_in(3), group_ids=[group_id])
    assert r.status_code == 201, r.text
    message_id = str(r.json()["id"])
    r = httpx.post(f"{base_url}/api/messages/{message_id}/schedule", headers=key)
    assert r.status_code == 200, r.text
    in_state(base_url, key, message_id, "sent", timeout=60)
    return Scheduled(account_id, key, message_id, group_id, numbers)


def test_scheduled_messages_groups_and_a_messages_results_export_the_accounts_own(
    base_url: str, scheduled: Scheduled
) -> None:
    s = scheduled
    rows = csv_rows(download(base_url, "/api/reports/export", s.key, type="messages"))
    assert [(r["id"], r["account_id"], r["state"], r["groups"]) for r in rows] == [
        (s.message_id, s.account_id, "sent", "'=clientes")  # a group's name is the user's text
    ]
    assert (rows[0]["content"], rows[0]["recipients"], rows[0]["sent"], rows[0]["failed"]) == (
        "Hola {{name}}",
        "3",
        "3",
        "0",
    )
    sheet, table = sheet_rows(download(base_url, "/api/reports/export", s.key, type="messages", format="xlsx"))
    cells = dict(zip(table[0], table[1], strict=True))
    assert cells["id"] == int(s.message_id) and cells["sent"] == 3 and sheet.freeze_panes == "A2"
    assert isinstance(cells["started_at (UTC)"], datetime) and isinstance(cells["scheduled_for (UTC)"], datetime)

    rows = csv_rows(download(base_url, "/api/reports/export", s.key, type="groups"))
    assert [(r["id"], r["name"], r["contact_count"]) for r in rows] == [(s.group_id, "'=clientes", "3")]
    _, table = sheet_rows(download(base_url, "/api/reports/export", s.key, type="groups", format="xlsx"))
    assert table[0][:5] == ("id", "account_id", "name", "description", "contact_count")
    assert table[1][4] == 3 and isinstance(table[1][5], datetime)

    r = download(base_url, "/api/reports/export", s.key, type="message_results", message_id=s.message_id)
    assert r.headers["content-disposition"] == f'attachment; filename="message-{s.message_id}-results.csv"'
    rows = csv_rows(r)
    assert sorted(r["phone"] for r in rows) == sorted(s.numbers)
    assert {r["status"] for r in rows} == {"sent"}
    assert {r["name"] for r in rows} == {f"Ana {p[-3:]}" for p in s.numbers}
    _, table = sheet_rows(
        download(base_url, "/api/reports/export", s.key, type="message_results", message_id=s.message_id, format="xlsx")
    )
    assert table[0] == (*BULK_HEADER[:11], "name")
    assert [row[0] for row in table[1:]] == [1, 2, 3] and isinstance(table[1][6], datetime)

    # An admin sees every account's, or the one it names.
    rows = csv_rows(download(base_url, "/api/reports/export", ADMIN, type="groups", account_id=s.account_id))
    assert [r["id"] for r in rows] == [s.group_id]
    rows = csv_rows(download(base_url, "/api/reports/export", ADMIN, type="messages"))
    assert s.message_id in {r["id"] for r in rows} and len({r["account_id"] for r in rows}) >= 1


def test_the_ledger_exports_as_transactions_of_the_callers_account(base_url: str, scheduled: Scheduled) -> None:
    s = scheduled
    api = httpx.get(f"{base_url}/api/v1/accounts/{s.account_id}/transactions", headers=s.key, params={"limit": 500})
    r = download(base_url, "/api/reports/export", s.key, type="transactions")
    assert r.headers["content-disposition"] == 'attachment; filename="transactions.csv"'
    rows = csv_rows(r)
    assert rows and {r["account_id"] for r in rows} == {s.account_id}
    assert [int(r["entry_id"]) for r in rows] == sorted(int(r["entry_id"]) for r in rows)  # by entry id
    kinds = Counter(r["kind"] for r in rows)
    assert kinds["topup"] >= 1 and kinds["capture"] >= 1, kinds  # its credit, and the three messages charged
    assert api.status_code == 200, api.text
    assert len(rows) == int(api.headers["X-Total-Count"])  # every entry once
    assert {t["kind"] for t in api.json()} == set(kinds)

    sheet, table = sheet_rows(download(base_url, "/api/reports/export", s.key, type="transactions", format="xlsx"))
    header = list(table[0])
    assert header[:6] == ["entry_id", "account_id", "created_at (UTC)", "kind", "unit", "amount"]
    assert len(table) == len(rows) + 1 and sheet.freeze_panes == "A2"
    for row, line in zip(table[1:], rows, strict=True):
        cells = dict(zip(header, row, strict=True))
        assert cells["entry_id"] == int(line["entry_id"]) and isinstance(cells["created_at (UTC)"], datetime)
        assert isinstance(cells["balance_after"], float | int)
        assert abs(cells["balance_after"] - float(line["balance_after"])) < 1e-6

    # An admin: the named account's alone, or every account's.
    again = csv_rows(download(base_url, "/api/reports/export", ADMIN, type="transactions", account_id=s.account_id))
    assert again == rows
    other, _ = new_account(base_url)  # an account with its initial credit
    every = csv_rows(download(base_url, "/api/reports/export", ADMIN, type="transactions"))
    assert {s.account_id, other} <= {r["account_id"] for r in every}
    assert [r for r in every if r["account_id"] == s.account_id] == rows
    # A member: its own account's alone.
    mine = csv_rows(download(base_url, "/api/reports/export", MEMBER, type="transactions"))
    assert s.account_id not in {r["account_id"] for r in mine}
    assert len({r["account_id"] for r in mine}) <= 1


def test_another_accounts_message_results_and_ledger_are_not_found(base_url: str, scheduled: Scheduled) -> None:
    s = scheduled
    for params in (
        {"type": "message_results", "message_id": s.message_id},
        {"type": "message_results", "message_id": s.message_id, "format": "xlsx"},
        {"type": "message_results", "message_id": "not-a-number"},
        {"type": "transactions", "account_id": s.account_id},
        {"type": "transactions", "account_id": s.account_id, "format": "xlsx"},
        {"type": "messages", "account_id": s.account_id},
        {"type": "groups", "account_id": s.account_id},
    ):
        r = httpx.get(f"{base_url}/api/reports/export", headers=MEMBER, params=params, timeout=30)
        assert r.status_code == 404, (params, r.status_code, r.text[:300])
        assert r.json()["message"], r.text
    # Nor does a member's own listing hold any of them.
    rows = csv_rows(download(base_url, "/api/reports/export", MEMBER, type="messages"))
    assert s.message_id not in {r["id"] for r in rows if r["account_id"] == s.account_id}
    assert s.account_id not in {r["account_id"] for r in rows}
