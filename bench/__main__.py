"""`make bench`: the figures issues name, measured on this machine against the real stack.

Writes bench/results/latest.json and appends a line to bench/results/history.jsonl.
`python -m bench [scenario ...]` runs some; default: fanout (upload and fan-out), ledger,
excel (workbook ingest), voice (status poll and dashboard over a million calls).
`crash` is extra (slow)."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
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

from bench import excel_ingest, voice_reads
from services.runtime.devstack import Stack
from services.runtime.identity import ADMIN, Caller
from services.runtime.rpc import channel

RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = "bench-admin-token"
H = {"Authorization": f"Bearer {TOKEN}"}


class RssSampler:
    """Peak RSS per process of the stack (a postgres backend counts as its own process)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.peaks: dict[str, float] = {}
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


def bulk_file(n: int) -> bytes:
    lines = ["phone|@valor1|@valor2"]
    lines += [f"+569{i:08d}|Cliente {i}|{i * 7 % 100000}" for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


def start(simulator: bool, data_dir: Path) -> Stack:
    stack = Stack(data_dir=data_dir, simulator=simulator)
    stack.extra_env.update({"PREGONERO_STATIC_TOKENS": f"{TOKEN}=admin", "LOG_LEVEL": "WARNING"})
    for key in ("DATABASE_URL", "NATS_URL"):
        os.environ.pop(key, None)
    stack.start_infra()
    stack.start_services()
    return stack


def add_devices(base: str, n: int, headers: dict[str, str] = H, **fields: Any) -> None:
    for i in range(n):
        body = {"token": f"bench-{i}", "secret": "bench-secret", **fields}
        r = httpx.post(f"{base}/devices", headers=headers, json=body)
        r.raise_for_status()


def credit_account(base: str, credits: str) -> tuple[str, dict[str, str]]:
    """A credit-based account (0.01 per message) and an API key of it: the campaign goes
    through the whole credit path (holds, captures, settlement)."""
    body = {"account_id": "bench-credit", "account_name": "Bench", "initial_credits": credits}
    httpx.post(f"{base}/api/v1/accounts", headers=H, json=body).raise_for_status()
    r = httpx.post(f"{base}/api/auth/api-keys", headers=H, json={"name": "bench", "account_id": "bench-credit"})
    r.raise_for_status()
    return "bench-credit", {"Authorization": f"Bearer {r.json()['key']}"}


def settled_balance(base: str, account_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        balance = httpx.get(f"{base}/api/v1/accounts/{account_id}/balance", headers=H, timeout=30).json()
        if balance["credit_reserved"] == 0 or time.monotonic() > deadline:
            return balance
        time.sleep(0.5)


def wait_done(base: str, job_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{base}/jobs/{job_id}", headers=H, timeout=30).json()
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} not done after {timeout}s")


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


def crash(rows: int) -> dict[str, Any]:
    """SIGKILL the dispatcher mid-job; the provider's own record decides lost and doubled."""
    with tempfile.TemporaryDirectory() as tmp:
        stack = start(simulator=True, data_dir=Path(tmp))
        try:
            base = f"http://127.0.0.1:{stack.http_port}"
            add_devices(base, 4, rate_per_minute=0)
            r = httpx.post(
                f"{base}/messages/send-bulk-file",
                headers=H,
                timeout=600,
                files={"file": ("crash.csv", bulk_file(rows))},
                data={"message": "Hola @valor1"},
            )
            job_id = r.json()["job"]["id"]
            while httpx.get(f"{base}/jobs/{job_id}", headers=H).json()["progress"]["sent"] < rows // 3:
                time.sleep(0.2)
            old = stack.service_procs["dispatcher"]
            old.popen.send_signal(signal.SIGKILL)
            old.popen.wait(10)
            killed_at = httpx.get(f"{base}/jobs/{job_id}", headers=H).json()["progress"]
            port = int(stack.addrs["dispatcher"].rsplit(":", 1)[1])
            stack.procs.append(stack.start_service("dispatcher", port=port))
            done = wait_done(base, job_id, timeout=1800)
            entries: list[list[Any]] = []
            since = 0
            while True:
                page = httpx.get(f"{stack.simulator_url}/v1/record", params={"since": since, "limit": 10_000}).json()
                entries.extend(page["entries"])
                if page["next"] >= page["count"]:
                    break
                since = page["next"]
            per_phone = Counter(e[2] for e in entries)
            return {
                "rows": rows,
                "sent_when_killed": killed_at["sent"],
                "final_status": done["status"],
                "sent": done["progress"]["sent"],
                "failed": done["progress"]["failed"],
                "provider_accepted": len(entries),
                "recipients_lost": rows - len(per_phone),
                "recipients_sent_twice": sum(1 for c in per_phone.values() if c > 1),
                "duplicate_attempts_at_provider": page["duplicate_attempts"],
            }
        finally:
            stack.stop()


# Accounts whose cached balance, reservation or usage differs from the sum of their entries.
LEDGER_DRIFT = """
    WITH sums AS (
        SELECT account_id, sum(amount) AS amount, sum(held_change) AS held, sum(used_change) AS used
        FROM accounts.ledger_entries WHERE unit = 'credits' GROUP BY account_id)
    SELECT count(*) FROM accounts.accounts a LEFT JOIN sums s USING (account_id)
    WHERE (a.credit_balance, a.credit_reserved, a.credit_used)
          IS DISTINCT FROM (coalesce(s.amount, 0), coalesce(s.held, 0), coalesce(s.used, 0))"""


async def ledger_drift(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval(LEDGER_DRIFT))
    finally:
        await conn.close()


async def ledger_load(
    addr: str, *, accounts: int, workers: int, seconds: float, batch: int, batches: int
) -> dict[str, Any]:
    """Each worker, over and over: hold a window of `batch * batches` attempts on a random
    account, capture them `batch` at a time (as result batches arrive), release the rest."""
    md = Caller(role=ADMIN, account_id="default", user_id="bench").metadata()
    ch = channel(addr)
    stub = accounts_pb2_grpc.AccountsServiceStub(ch)
    counts = Counter[str]()
    try:
        deadline = time.perf_counter() + seconds

        async def worker(n: int) -> None:
            i = 0
            while time.perf_counter() < deadline:
                account = f"bench-{(n * 7919 + i) % accounts}"
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
                ch = channel(addr)
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
                        addr, accounts=accounts, workers=workers, seconds=seconds, batch=20, batches=2
                    )
                    single = await ledger_load(
                        addr, accounts=accounts, workers=workers, seconds=seconds / 2, batch=1, batches=2
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
    "crash": lambda: crash(int(os.environ.get("BENCH_CRASH_ROWS", "50000"))),
    "ledger": ledger,
    "excel": lambda: excel_ingest.measure(int(os.environ.get("BENCH_EXCEL_ROWS", "100000"))),
    "voice": lambda: voice_reads.measure(start, H, int(os.environ.get("BENCH_VOICE_JOBS", "1000000"))),
}


def main(argv: list[str]) -> int:
    names = argv or ["fanout", "ledger", "excel", "voice"]
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
