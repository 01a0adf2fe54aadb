"""`make bench`: the figures issues name, measured on this machine against the real stack.

Writes bench/results/latest.json and appends a line to bench/results/history.jsonl.
`python -m bench [scenario ...]` (or `make bench scenario ...`) runs some; default: fanout
(upload and fan-out), ledger, excel (workbook ingest), voice (status poll and dashboard over a
million calls). Extra: `analytics` (the analytics over a month of a million results, see
bench/analytics.py), `contact_import` (an address-book CSV through the API), `exports` (a
million-row bulk job's results downloaded as CSV and XLSX, see bench/exports.py). Extra (slow):
`faults` (every fault case of the send path at 100,000 recipients, see bench/faults.py),
`crash` (its dispatcher case alone) and `scale_out` (two processes of each kind, one of each
stopped mid-job, see bench/scale_out.py)."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
from pregonero.accounts.v1 import accounts_pb2, accounts_pb2_grpc

from bench import analytics, contact_import, excel_ingest, exports, faults, scale_out, voice_reads
from bench.stack import (
    LEDGER_DRIFT,
    H,
    add_devices,
    bulk_file,
    credit_account,
    ledger_drift,
    settled_balance,
    start,
    wait_done,
)
from services.runtime.devstack import Stack
from services.runtime.identity import ADMIN, MEMBER, Caller
from services.runtime.rpc import channel
from services.runtime.service_auth import Keyring

RESULTS = Path(__file__).resolve().parent / "results"


class RssSampler:
    """Peak RSS per process of the stack (a postgres backend counts as its own process), and
    peak USS (the memory a process alone holds): a postgres backend's RSS counts the pages of
    shared_buffers it has touched, which all backends share."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.peaks: dict[str, float] = {}
        self.unique: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in list(self.stack.procs):
                try:
                    root = psutil.Process(proc.popen.pid)
                    members = [(proc.name, root)] + [(f"{proc.name}-child", c) for c in root.children(recursive=True)]
                    for name, p in members:
                        mb = p.memory_info().rss / 2**20
                        self.peaks[name] = max(self.peaks.get(name, 0.0), mb)
                        uss = p.memory_full_info().uss / 2**20
                        self.unique[name] = max(self.unique.get(name, 0.0), uss)
                    times = [p.cpu_times() for _, p in members]
                    self.cpu[proc.name] = sum(t.user + t.system for t in times)
                except psutil.Error:
                    continue
            self._stop.wait(0.2)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in sorted(self.peaks.items())}

    def report_unique(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in sorted(self.unique.items())}


def upload_and_fanout(rows: int) -> dict[str, Any]:
    """Upload a bulk file through Envoy, then let it go out on zero-latency devices."""
    with tempfile.TemporaryDirectory() as tmp:
        stack = start(simulator=False, data_dir=Path(tmp))
        try:
            base = f"http://127.0.0.1:{stack.http_port}"
            account_id, key = credit_account(base, f"{rows * 0.011:.2f}")
            add_devices(base, 5, key, rate_per_minute=0)
            data = bulk_file(rows)
            with RssSampler(stack) as rss:
                started = time.perf_counter()
                r = httpx.post(
                    f"{base}/messages/send-bulk-file",
                    headers=key,
                    timeout=600,
                    files={"file": ("bench.csv", data, "text/csv")},
                    data={"message": "Hola @valor1, su código es @valor2", "devices_limit": "5"},
                )
                answered = time.perf_counter() - started
                r.raise_for_status()
                job = r.json()["job"]
                upload_rss = dict(rss.peaks)
                done = wait_done(base, job["id"], timeout=1800)
            first = datetime.fromisoformat(done["started_at"].replace("Z", "+00:00"))
            last = datetime.fromisoformat(done["finished_at"].replace("Z", "+00:00"))
            seconds = (last - first).total_seconds()
            p = done["progress"]
            balance = settled_balance(base, account_id)
            with asyncio.Runner() as runner:
                drift = runner.run(ledger_drift(stack.database_url))
            return {
                "rows": rows,
                "file_mb": round(len(data) / 2**20, 1),
                "upload_answered_s": round(answered, 2),
                "ingest_rows_per_s": round(rows / answered),
                "upload_peak_rss_mb": {k: round(v, 1) for k, v in sorted(upload_rss.items())},
                "fanout_messages": p["sent"] + p["failed"],
                "fanout_sent": p["sent"],
                "fanout_seconds": round(seconds, 2),
                "fanout_messages_per_s": round((p["sent"] + p["failed"]) / seconds) if seconds else None,
                "peak_rss_mb": rss.report(),
                "cpu_seconds": {k: round(v, 1) for k, v in sorted(rss.cpu.items())},
                # The credit path: one hold per 2,000 messages, captures booked from the results.
                "credit_used": balance["credit_used"],
                "credit_expected": round(p["sent"] * 0.01, 2),
                "credit_reserved_after": balance["credit_reserved"],
                "batch_total_cost": done["total_cost"],
                "accounts_with_drift": drift,
            }
        finally:
            stack.stop()


async def ledger_load(
    addr: str, keyring: Keyring, *, accounts: int, workers: int, seconds: float, batch: int, batches: int
) -> dict[str, Any]:
    """Each worker, over and over: hold a window of `batch * batches` attempts on a random
    account, capture them `batch` at a time (as result batches arrive), release the rest;
    as campaigns does, signed with its key, for the one account it works on."""
    ch = channel(addr, audience="accounts", keyring=keyring)
    stub = accounts_pb2_grpc.AccountsServiceStub(ch)
    counts = Counter[str]()
    try:
        deadline = time.perf_counter() + seconds

        async def worker(n: int) -> None:
            i = 0
            while time.perf_counter() < deadline:
                account = f"bench-{(n * 7919 + i) % accounts}"
                md = Caller(role=MEMBER, account_id=account, user_id="bench").metadata()
                hold_id = f"w{n}:{i}:{batch}"
                window = batch * batches
                await stub.Hold(
                    accounts_pb2.HoldRequest(account_id=account, hold_id=hold_id, amount=f"{window * 0.5:.4f}"),
                    metadata=md,
                )
                for b in range(batches):
                    items = [
                        accounts_pb2.CaptureItem(attempt_id=f"{hold_id}:{b}:{k}", hold_id=hold_id, amount="0.4700")
                        for k in range(batch)
                    ]
                    await stub.Capture(accounts_pb2.CaptureRequest(account_id=account, items=items), metadata=md)
                await stub.Release(accounts_pb2.ReleaseRequest(account_id=account, hold_id=hold_id), metadata=md)
                counts.update(holds=1, captures=window, releases=1, rpcs=2 + batches)
                i += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(workers)))
        elapsed = time.perf_counter() - started
    finally:
        await ch.close()
    return {
        "capture_batch": batch,
        "seconds": round(elapsed, 1),
        "holds": counts["holds"],
        "captures": counts["captures"],
        "releases": counts["releases"],
        "ops_per_s": round((counts["holds"] + counts["captures"]) / elapsed),
        "rpcs_per_s": round(counts["rpcs"] / elapsed),
    }


def ledger() -> dict[str, Any]:
    """Holds + captures per second through gRPC against the accounts service alone (durable
    PostgreSQL, fsync on), then the drift between entries and cached balances."""
    accounts, workers, seconds = 100, 32, float(os.environ.get("BENCH_LEDGER_SECONDS", "10"))
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(data_dir=Path(tmp), simulator=False)
        stack.extra_env["LOG_LEVEL"] = "WARNING"
        for key in ("DATABASE_URL", "NATS_URL"):
            os.environ.pop(key, None)
        stack.start_infra()
        try:
            stack.procs.append(stack.start_service("accounts"))
            addr = stack.addrs["accounts"]

            async def run() -> dict[str, Any]:
                md = Caller(role=ADMIN, account_id="default", user_id="bench").metadata()
                ch = channel(addr, audience="accounts", keyring=stack.keyring("gateway"))
                stub = accounts_pb2_grpc.AccountsServiceStub(ch)
                for a in range(accounts):
                    await stub.CreateAccount(
                        accounts_pb2.CreateAccountRequest(account_id=f"bench-{a}", initial_credits="1000000000"),
                        metadata=md,
                    )
                await ch.close()
                with RssSampler(stack) as rss:
                    # Result batches as the results consumer captures them, and the worst
                    # case: one attempt per Capture call.
                    batched = await ledger_load(
                        addr,
                        stack.keyring("campaigns"),
                        accounts=accounts,
                        workers=workers,
                        seconds=seconds,
                        batch=20,
                        batches=2,
                    )
                    single = await ledger_load(
                        addr,
                        stack.keyring("campaigns"),
                        accounts=accounts,
                        workers=workers,
                        seconds=seconds / 2,
                        batch=1,
                        batches=2,
                    )
                conn = await asyncpg.connect(stack.database_url)
                try:
                    drift = await conn.fetchval(LEDGER_DRIFT)
                    entries = await conn.fetchval("SELECT count(*) FROM accounts.ledger_entries")
                finally:
                    await conn.close()
                return {
                    "accounts": accounts,
                    "clients": workers,
                    "ops_per_s": batched["ops_per_s"],
                    "floor_ops_per_s": 2000,
                    "batched": batched,
                    "one_capture_per_call": single,
                    "ledger_entries": entries,
                    "accounts_with_drift": drift,
                    "cpu_seconds": {k: round(v, 1) for k, v in sorted(rss.cpu.items())},
                }

            return asyncio.run(run())
        finally:
            stack.stop()


SCENARIOS = {
    "fanout": lambda: upload_and_fanout(int(os.environ.get("BENCH_ROWS", "1000000"))),
    # The dispatcher killed mid-job, judged by the provider's own record (one of the faults).
    "crash": lambda: faults.bench(int(os.environ.get("BENCH_CRASH_ROWS", "50000")), ("dispatcher_killed",)),
    # Every fault case of the send path (tests/faults at 20,000).
    "faults": lambda: faults.bench(int(os.environ.get("BENCH_FAULTS_RECIPIENTS", "100000"))),
    # Two processes of each kind, one of each stopped mid-job (tests/faults at 50,000).
    "scale_out": lambda: scale_out.bench(int(os.environ.get("BENCH_SCALE_RECIPIENTS", "100000"))),
    "ledger": ledger,
    "excel": lambda: excel_ingest.measure(int(os.environ.get("BENCH_EXCEL_ROWS", "100000"))),
    "voice": lambda: voice_reads.measure(start, H, int(os.environ.get("BENCH_VOICE_JOBS", "1000000"))),
    # Analytics over a month of a million recipients and a million calls (issue 15: p99 <= 50 ms).
    "analytics": lambda: analytics.measure(start, H, int(os.environ.get("BENCH_ANALYTICS_RECIPIENTS", "1000000"))),
    # The address book's import of a 100,000-row CSV through the API (issue 11: at most 10 s).
    "contact_import": lambda: contact_import.measure(int(os.environ.get("BENCH_CONTACT_ROWS", "100000"))),
    # A million-row bulk job's results as CSV and XLSX through Envoy (issue 15).
    "exports": lambda: exports.measure(int(os.environ.get("BENCH_EXPORT_ROWS", "1000000")), RssSampler),
}


def main(argv: list[str]) -> int:
    names = argv or ["fanout", "ledger", "excel", "voice"]
    if unknown := [n for n in names if n not in SCENARIOS]:
        print(f"bench: no scenario {', '.join(unknown)}; there are {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30),
            "python": platform.python_version(),
        },
    }
    for name in names:
        print(f"bench: {name} ...", flush=True)
        started = time.perf_counter()
        results[name] = SCENARIOS[name]()
        results[name]["wall_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps({name: results[name]}, indent=2), flush=True)
    RESULTS.mkdir(exist_ok=True)
    latest = RESULTS / "latest.json"
    merged = json.loads(latest.read_text()) if latest.exists() else {}
    merged.update(results)
    latest.write_text(json.dumps(merged, indent=2) + "\n")
    with (RESULTS / "history.jsonl").open("a") as f:
        f.write(json.dumps(results) + "\n")
    print(f"bench: results in {latest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
