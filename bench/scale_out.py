"""Scale-out on one machine, under a rolling stop: two processes of every kind
(`PREGONERO_SCALE=gateway=2,accounts=2,campaigns=2,dispatcher=2`, as `make run` takes it),
three campaigns at once, and one replica of each kind stopped (SIGTERM, as Kubernetes stops a
pod) in the middle.

- A bulk WhatsApp job of N recipients (50,000 in tests/faults, 100,000 in `make bench faults`)
  through four unthrottled simulated devices, paid from credit, judged as the fault cases
  judge theirs (bench/faults.py): each recipient accepted by the provider once or reported,
  every sent message charged once, nothing left reserved.
- A voice batch scheduled to start a few seconds after the upload, on a line of a few calls
  at once: each job called once in its one round (the dialers of both campaigns replicas
  share the account's lines), every call charged its own cost.
- A WhatsApp message scheduled for a group: the due loops of both campaigns replicas start it
  once, and each member gets it once.
- Both dispatchers send a share of the job (their own metrics say how much), and a socket on
  either gateway follows the job: the one on the gateway that stays sees it to the end, and a
  client whose gateway went away reconnects through Envoy and learns the end too.

Used by tests/faults/test_scale_out.py and `make bench scale_out` (100,000 recipients)."""

from __future__ import annotations

import json
import signal
import tempfile
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from bench.faults import (
    PRICE,
    STRIKE_AT,
    CaseFailed,
    FaultStack,
    Row,
    Run,
    VoiceBatch,
    drift,
    record,
    settled,
    voice_account,
)
from bench.stack import TOKEN, add_devices, credit_account, phone

CASE = "scaled_out"
SCALE = {"gateway": 2, "accounts": 2, "campaigns": 2, "dispatcher": 2}
FIRST = 95_000_000  # the job's recipients: phone(FIRST) ... (the fault cases use 10M-90M)
MEMBERS_FIRST = 98_000_000  # the scheduled message's group
MEMBERS = 300
LINES = 5  # at 1/100 of real time a call lasts about 0.5 s: 1,000 calls on 5 lines, 100 s
LEAD_S = 6.0  # the scheduled message and voice batch start this long after they are set up
STOP_S = 90.0  # a replica stopped (SIGTERM) must have exited within this


class JobSocket:
    """`/ws/job/{id}` at `url`, read on a thread of its own until the job ends or the socket
    closes: the events and whether the end was told."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[dict[str, Any]] = []
        self.closed: str = ""
        self.opened = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.opened.wait(15)

    def _read(self) -> None:
        try:
            with connect(self.url, subprotocols=["bearer", TOKEN], open_timeout=10, close_timeout=5) as ws:  # type: ignore[list-item]
                self.opened.set()
                while True:
                    event = json.loads(ws.recv(timeout=300))
                    self.events.append(event)
                    if event.get("type") in ("job_completed", "job_failed"):
                        return
        except ConnectionClosed as exc:
            self.closed = f"closed {exc.rcvd.code if exc.rcvd else 'without a close frame'}"
        except Exception as exc:  # noqa: BLE001 - what ended the reading is the finding
            self.closed = repr(exc)
        finally:
            self.opened.set()

    def progress(self) -> int:
        return sum(1 for e in self.events if e.get("type") == "progress")

    def end(self, timeout: float) -> dict[str, Any] | None:
        self.thread.join(timeout)
        last = self.events[-1] if self.events else {}
        return last if last.get("type") in ("job_completed", "job_failed") else None


def voice_calls(total: int) -> int:
    """Calls enough to be still under way when a third of the job is sent."""
    return max(600, total // 50)


def sent_by(url: str) -> float:
    """A dispatcher's pregonero_messages_sent_total over all its labels."""
    text = httpx.get(url, timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "pregonero_messages_sent_total"
    )


def scheduled_group(fs: FaultStack) -> tuple[str, dict[str, str], list[str], str]:
    """An account with one device and a group of MEMBERS contacts, and a message to the group
    scheduled LEAD_S ahead: the account, its key, the members' phones and the message id."""
    account_id, key = credit_account(
        fs.base, "1000", account_id=f"scale-group-{uuid.uuid4().hex[:6]}", price=str(PRICE)
    )
    add_devices(fs.base, 1, key, rate_per_minute=0)
    members = [phone(MEMBERS_FIRST + i) for i in range(MEMBERS)]
    group = f"Miembros {uuid.uuid4().hex[:6]}"
    rows = "\n".join(f"Socio {i},{p},{group}" for i, p in enumerate(members))
    r = httpx.post(
        f"{fs.base}/api/contacts/import",
        headers=key,
        files={"file": ("socios.csv", f"Nombre,Teléfono,Grupo\n{rows}\n".encode(), "text/csv")},
        timeout=60,
    )
    r.raise_for_status()
    group_id = next(g["id"] for g in httpx.get(f"{fs.base}/api/groups", headers=key).json() if g["name"] == group)
    due = datetime.now(UTC) + timedelta(seconds=LEAD_S)
    r = httpx.post(
        f"{fs.base}/api/messages",
        headers=key,
        json={"content": "Asamblea el martes", "scheduled_for": due.isoformat(), "group_ids": [group_id]},
        timeout=30,
    )
    r.raise_for_status()
    message_id = r.json()["id"]
    httpx.post(f"{fs.base}/api/messages/{message_id}/schedule", headers=key, timeout=30).raise_for_status()
    return account_id, key, members, message_id


def run(fs: FaultStack, total: int) -> Row:
    """The case on a FaultStack started with SCALE. Raises CaseFailed when a wait runs out."""
    started = time.perf_counter()
    row = Row(CASE, total)
    problems = row.problems
    stack = fs.stack

    job = Run.open(fs, CASE, total, FIRST)
    group_account, group_key, members, message_id = scheduled_group(fs)
    calls = VoiceBatch(fs, *voice_account(fs, LINES), voice_calls(total))
    calls.upload(CASE, FIRST, scheduled_at=(datetime.now(UTC) + timedelta(seconds=LEAD_S)).isoformat())
    job.upload()

    # One socket on each gateway, straight to it (through Envoy they would go round robin).
    sockets = [JobSocket(f"ws://127.0.0.1:{port}/ws/job/{job.job_id}") for port in stack.gateway_ports]

    job.wait_sent(STRIKE_AT)
    calls.wait_ended(1)
    dispatchers = [p.metrics_url for p in stack.replicas["dispatcher"]]
    # A replica of each kind stopped, as a rolling update or a scale-down does: SIGTERM, and
    # the others carry on. The gRPC callers balance over the addresses left, Envoy over the
    # gateway left.
    stopped = [stack.replicas[kind][1] for kind in SCALE]
    second_sent = sent_by(dispatchers[1])
    up_when_stopped, voice_at = calls.calls_up(), calls.get()
    for proc in stopped:
        proc.popen.send_signal(signal.SIGTERM)
    at = job.job()["progress"]
    for proc in stopped:
        try:
            code = proc.popen.wait(STOP_S)
        except Exception:  # noqa: BLE001 - a replica that will not stop is the finding
            job.fail(f"{proc.name} did not exit within {STOP_S:.0f}s of SIGTERM")
        if code != 0:
            problems.append(f"{proc.name} exited {code} on SIGTERM, not 0")
        fs.retire(proc)
    if at["sent"] >= total:
        problems.append("the job had ended before the replicas stopped: the case tested nothing")
    # A client whose gateway went away comes back through Envoy: the gateway left serves it.
    again = JobSocket(f"ws://127.0.0.1:{stack.http_port}/ws/job/{job.job_id}")

    done = job.wait_finished()
    job.judge(done, row)
    first_sent = sent_by(dispatchers[0])
    if not (first_sent and second_sent):
        problems.append(f"a dispatcher sent nothing: {first_sent:.0f} and {second_sent:.0f} before it stopped")

    stayed, went = sockets
    for name, socket in (("the gateway that stayed", stayed), ("through Envoy after the stop", again)):
        end = socket.end(60)
        if end is None or end["results"]["sent"] + end["results"]["failed"] != total:
            problems.append(f"the socket on {name} was not told the end: last {socket.events[-1:]} {socket.closed}")
    if not went.progress():
        problems.append(f"the socket on the stopped gateway saw no progress before it closed ({went.closed})")

    if not up_when_stopped:
        problems.append("no call was up when the replicas stopped: the voice batch tested nothing")
    voice = Row("voice", calls.calls)
    calls.judge(calls.wait_finished(), voice, up_when_stopped, killed=False)
    problems.extend(f"voice: {p}" for p in voice.problems)
    row.doubled += voice.doubled

    deadline = time.monotonic() + 120
    message: dict[str, Any] = {}
    while time.monotonic() < deadline:
        message = httpx.get(f"{fs.base}/api/messages/{message_id}", headers=group_key, timeout=30).json()
        if message["status"] in ("sent", "failed", "cancelled"):
            break
        time.sleep(0.25)
    if message.get("status") != "sent":
        problems.append(f"the scheduled message ended {message.get('status')!r}, not sent: {message}")
    entries, _ = record(fs.simulator)
    to_members = Counter(e[2] for e in entries if e[2] in set(members))
    if to_members != Counter(members):
        twice = [p for p, c in to_members.items() if c > 1]
        problems.append(
            f"the scheduled message reached {len(to_members)} of {MEMBERS} members, {len(twice)} more than once"
        )
        row.doubled += len(twice)
    got = settled(fs.base, group_account)
    if (got["credit_used"], got["credit_reserved"]) != (PRICE * MEMBERS, 0):
        problems.append(f"the group's account paid {got}, not {PRICE * MEMBERS} for {MEMBERS} messages")

    ledger = drift(stack.database_url)
    if ledger:
        problems.append(f"{ledger} accounts whose cached balance differs from their ledger entries")
    row.notes.append(
        f"dispatchers sent {first_sent:.0f} and {second_sent:.0f} (the second before it stopped); "
        f"{len(up_when_stopped)} calls up at the stop; job stood at {at} when the replicas stopped, "
        f"the voice batch at { ({k: v for k, v in voice_at.items() if k.endswith('_jobs')}) }"
    )
    row.seconds = round(time.perf_counter() - started, 1)
    if problems:
        row.evidence = fs.tails()
    return row


def start(data_dir: Path) -> FaultStack:
    fs = FaultStack(data_dir, scale=SCALE)
    fs.start()
    return fs


def bench(recipients: int) -> dict[str, Any]:
    """`make bench scale_out`: the case at `recipients` on a stack of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        fs = start(Path(tmp) / "scaled")
        try:
            try:
                row = run(fs, recipients)
            except CaseFailed as exc:
                what, _, evidence = str(exc).partition("\n")
                row = Row(CASE, recipients, problems=[what], evidence=evidence)
        finally:
            fs.stop()
    print(row.report(), flush=True)
    return {"recipients": recipients, "scale": SCALE, **row.as_dict()}
