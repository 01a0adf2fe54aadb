"""How fast a bulk job's results export streams, and in how little memory (issue 15: 1,000,000
rows as CSV at 100,000 rows/s or more and as XLSX at 30,000 rows/s or more, every process's peak
RSS at 150 MB or less), downloaded through Envoy as a client would.

The million results are written straight into the campaigns schema (a finished job: nine in ten
sent, one in ten failed with an error, two values a row), as bench/voice_reads.py does for
calls: seconds instead of the minutes a million sends take. The export under test is the
product's own: campaigns reads the pages and writes the file (services/runtime/exports.py), the
gateway forwards it. The workbook is checked for every row, counted in its sheets' XML.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil

from bench.stack import H, start
from services.runtime.devstack import Stack

TEMPLATE = "Hola @valor1, su código es @valor2"
BATCH = """
INSERT INTO campaigns.batches (account_id, channel, name, status, message_template, file_name, total_jobs,
                               sent_jobs, failed_jobs, started_at, finished_at)
VALUES ('bench-export', 'whatsapp', 'export', 'completed', $1, 'bench.csv', $2, $2 - $2 / 10, $2 / 10, now(), now())
RETURNING batch_id"""
FILL = """
INSERT INTO campaigns.jobs (batch_id, job_id, phone, vals, status, attempts, sender_id, error, finished_at)
SELECT $1, g, '+569' || lpad(g::text, 8, '0'), ARRAY['Cliente ' || g, (g * 7 % 100000)::text],
       CASE WHEN g % 10 = 0 THEN 'failed' ELSE 'sent' END, 1, 1 + g % 5,
       CASE WHEN g % 10 = 0 THEN 'simulated: recipient not on WhatsApp' END,
       now() - make_interval(secs => ($2 - g) / 1000.0)
FROM generate_series(1, $2) g"""


async def _fill(database_url: str, rows: int) -> uuid.UUID:
    conn = await asyncpg.connect(database_url)
    try:
        batch_id: uuid.UUID = await conn.fetchval(BATCH, TEMPLATE, rows)
        await conn.execute(FILL, batch_id, rows)
        await conn.execute("ANALYZE campaigns.jobs")
        return batch_id
    finally:
        await conn.close()


def _download(client: httpx.Client, url: str, into: Path, **params: str) -> dict[str, Any]:
    """Streams the file to disk, as a browser would: seconds to the headers, to the first body
    byte and to the end, and its size."""
    started = time.perf_counter()
    first: float | None = None
    size = lines = 0
    with client.stream("GET", url, params=params) as r, into.open("wb") as out:
        r.raise_for_status()
        headers = time.perf_counter() - started
        for chunk in r.iter_raw():
            if first is None and chunk:
                first = time.perf_counter() - started
            size += len(chunk)
            lines += chunk.count(b"\n")
            out.write(chunk)
    return {
        "seconds": time.perf_counter() - started,
        "headers_ms": round(headers * 1000, 1),
        "first_byte_ms": round((first or 0) * 1000, 1),
        "mb": round(size / 2**20, 1),
        "lines": lines,
    }


def _sheet_rows(path: Path) -> int:
    """Rows in the workbook's sheets, counted as their XML inflates (a million rows' XML is
    hundreds of MB: never held whole)."""
    count = 0
    with zipfile.ZipFile(path) as book:
        for name in book.namelist():
            if name.startswith("xl/worksheets/sheet"):
                with book.open(name) as part:
                    tail = b""
                    while block := part.read(1 << 20):
                        count += (tail + block).count(b"<row ")
                        tail = block[-4:]
    return count


def _cpu_seconds(stack: Stack, names: tuple[str, ...]) -> dict[str, float]:
    """CPU time each service has used so far: what an export costs, whatever else the machine runs."""
    times = {name: psutil.Process(stack.service_procs[name].popen.pid).cpu_times() for name in names}
    return {name: t.user + t.system for name, t in times.items()}


def measure(rows: int, sampler: Callable[[Stack], Any]) -> dict[str, Any]:
    """`sampler`: bench's RssSampler (peak RSS of every process of the stack while it runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        stack = start(False, Path(tmp))
        try:
            base = f"http://127.0.0.1:{stack.http_port}"
            filled = time.perf_counter()
            batch_id = asyncio.run(_fill(stack.database_url, rows))
            filled = time.perf_counter() - filled
            url = f"/jobs/{batch_id}/results/export"
            results: dict[str, Any] = {"rows": rows, "fill_s": round(filled, 1)}
            with httpx.Client(base_url=base, headers=H, timeout=httpx.Timeout(60, read=900)) as client:
                for fmt in ("csv", "xlsx"):
                    before = _cpu_seconds(stack, ("campaigns", "gateway"))
                    with sampler(stack) as rss:
                        got = _download(client, url, Path(tmp) / f"export.{fmt}", format=fmt)
                    after = _cpu_seconds(stack, ("campaigns", "gateway"))
                    cpu = {name: round(after[name] - before[name], 2) for name in after}
                    if fmt == "csv":
                        assert got["lines"] == rows + 1, got  # the header and each row, once
                    else:
                        assert _sheet_rows(Path(tmp) / "export.xlsx") == rows + 1  # the header and each row
                    results[fmt] = {
                        "seconds": round(got["seconds"], 2),
                        "rows_per_s": round(rows / got["seconds"]),
                        "headers_ms": got["headers_ms"],
                        "first_byte_ms": got["first_byte_ms"],
                        "mb": got["mb"],
                        "peak_rss_mb": rss.report(),
                        "peak_uss_mb": rss.report_unique(),
                        # The rate campaigns would reach with a core of its own (it makes the file).
                        "cpu_seconds": cpu,
                        "rows_per_campaigns_cpu_s": round(rows / cpu["campaigns"]) if cpu["campaigns"] else None,
                    }
            targets = {"csv_rows_per_s": 100_000, "xlsx_rows_per_s": 30_000, "peak_rss_mb": 150}
            results["targets"] = targets
            # RSS of every process, and USS beside it: postgres backends' RSS holds the shared
            # buffers they touched (shared_buffers is 256 MB), not memory of their own.
            results["met"] = {
                fmt: {
                    "rows_per_s": results[fmt]["rows_per_s"] >= targets[f"{fmt}_rows_per_s"],
                    "peak_rss_mb": max(results[fmt]["peak_rss_mb"].values()) <= targets["peak_rss_mb"],
                    "peak_uss_mb": max(results[fmt]["peak_uss_mb"].values()) <= targets["peak_rss_mb"],
                }
                for fmt in ("csv", "xlsx")
            }
            return results
        finally:
            stack.stop()
