"""The dashboard's reads over a million-job voice batch: the 5-second status poll and the
overview, through Envoy, as the SpeechAI dashboard makes them.

The million jobs are written straight into the campaigns schema (a realistic mix of called,
failed and waiting jobs with their call results, and the batch counters that match), which
takes seconds instead of the hours a million simulated calls would; the reads under test are
the product's own."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from services.runtime.devstack import Stack

ACCOUNT = "bench-voice"

FILL = """
INSERT INTO campaigns.voice_jobs (batch_id, account_id, status, debtor_key, name, dni, phones, payload,
                                  attempts, call_result, call_started_at, call_ended_at, call_duration_seconds,
                                  cost, estimated_cost, finished_at, next_attempt_at)
SELECT $1, $2,
       CASE WHEN g % 20 < 12 THEN 'completed' WHEN g % 20 < 17 THEN 'failed' ELSE 'pending' END,
       'rut-' || g, 'Deudor ' || g, g || '-K', ARRAY['+5697' || lpad(g::text, 7, '0')],
       jsonb_build_object('debt_amount', 1000 + g % 5000, 'company_name', 'ACME'),
       CASE WHEN g % 20 < 17 THEN 1 ELSE 0 END,
       CASE WHEN g % 20 < 17 THEN jsonb_build_object('success', g % 20 < 12, 'status', 'ended',
            'summary', jsonb_build_object('duration_ms', 45000, 'call_status', 'ended')) END,
       CASE WHEN g % 20 < 17 THEN now() - (g || ' seconds')::interval END,
       CASE WHEN g % 20 < 17 THEN now() - (g || ' seconds')::interval + interval '45 seconds' END,
       CASE WHEN g % 20 < 17 THEN 45 END,
       CASE WHEN g % 20 < 17 THEN 0.1325 ELSE 0 END, 0.47,
       CASE WHEN g % 20 < 17 THEN now() - (g || ' seconds')::interval + interval '45 seconds' END,
       -- Of the waiting jobs a third is due, two thirds wait for tomorrow's round (both sides of
       -- the due-jobs index are large: the status poll's scheduled count at its dearest).
       CASE WHEN g % 20 = 17 THEN now() - interval '1 hour' ELSE now() + interval '1 day' END
FROM generate_series(1, $3) g"""

COUNTERS = """
UPDATE campaigns.batches b SET total_jobs = c.total, sent_jobs = c.completed, failed_jobs = c.failed,
       total_cost = c.cost, total_seconds = c.seconds, called_jobs = c.called, status = 'paused',
       started_at = now(), updated_at = now()
FROM (SELECT count(*) AS total, count(*) FILTER (WHERE status = 'completed') AS completed,
             count(*) FILTER (WHERE status = 'failed') AS failed, sum(cost) AS cost,
             coalesce(sum(call_duration_seconds), 0) AS seconds,
             count(*) FILTER (WHERE call_ended_at IS NOT NULL) AS called
      FROM campaigns.voice_jobs WHERE batch_id = $1) c
WHERE b.batch_id = $1"""


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    cut = statistics.quantiles(ordered, n=100)
    return {
        "requests": len(ordered),
        "p50_ms": round(cut[49] * 1000, 2),
        "p95_ms": round(cut[94] * 1000, 2),
        "p99_ms": round(cut[98] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def _timed(client: httpx.Client, path: str, n: int, **params: Any) -> dict[str, float]:
    for _ in range(20):  # warm the connection pools and plans
        client.get(path, params=params).raise_for_status()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        client.get(path, params=params).raise_for_status()
        samples.append(time.perf_counter() - started)
    return _percentiles(samples)


async def _fill(database_url: str, batch_id: str, jobs: int) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        import uuid

        await conn.execute(FILL, uuid.UUID(batch_id), ACCOUNT, jobs)
        await conn.execute(COUNTERS, uuid.UUID(batch_id))
        await conn.execute("ANALYZE campaigns.voice_jobs")
    finally:
        await conn.close()


def measure(start: Callable[[bool, Path], Stack], headers: dict[str, str], jobs: int = 1_000_000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        stack = start(False, Path(tmp))
        try:
            base = f"http://127.0.0.1:{stack.http_port}"
            with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
                body = {"account_id": ACCOUNT, "account_name": "Bench voice", "plan_type": "unlimited", "country": "CL"}
                client.post("/api/v1/accounts", json=body).raise_for_status()
                r = client.post("/api/v1/batches", json={"account_id": ACCOUNT, "name": "million", "priority": 1})
                r.raise_for_status()
                batch_id = r.json()["batch_id"]
                filled = time.perf_counter()
                asyncio.run(_fill(stack.database_url, batch_id, jobs))
                filled = time.perf_counter() - filled
                status = client.get(f"/api/v1/batches/{batch_id}/status").json()
                assert status["total_jobs"] == jobs, status
                waiting = jobs - status["completed_jobs"] - status["failed_jobs"]
                assert status["scheduled_jobs"] + status["pending_jobs"] == waiting, status
                return {
                    "jobs": jobs,
                    "due_jobs": status["pending_jobs"],
                    "scheduled_jobs": status["scheduled_jobs"],
                    "fill_s": round(filled, 1),
                    "status_poll": _timed(client, f"/api/v1/batches/{batch_id}/status", 1000),
                    "dashboard_overview": _timed(client, "/api/v1/dashboard/overview", 300, account_id=ACCOUNT),
                    "dashboard_overview_all_accounts": _timed(client, "/api/v1/dashboard/overview", 300),
                    "dashboard_stats": _timed(client, "/api/v1/dashboard/stats", 300, account_id=ACCOUNT),
                    "jobs_newest_100": _timed(client, "/api/v1/jobs", 100, account_id=ACCOUNT, limit=100),
                    "batch_jobs_page": _timed(client, f"/api/v1/batches/{batch_id}/jobs", 100, limit=50, skip=0),
                    "calls_history": _timed(client, "/api/v1/calls/history", 100, account_id=ACCOUNT, limit=50),
                }
        finally:
            stack.stop()
