"""The bulk sender's own React app and its job socket, through Envoy: what it does with what
the suite sends it (issue 10). The app connects `/ws/job/{id}` right after the upload, pings,
reconnects whenever its job history changes (learning a job's end changes it) and on
1001/1006, logs every `progress` as "Enviado a <phone>" and drops one without `phone`, learns
failures from `error` only, and shows a job as pending until it has seen `job_started`.

Each test speaks as a client address of its own (X-Forwarded-For, which Envoy passes on from
a trusted hop), so what the gateway remembers per client does not leak between tests."""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from services.runtime.devstack import Stack
from tests.conftest import ADMIN_TOKEN, wait_for
from tests.e2e.test_bulk import ADMIN, add_device, deactivate_all, get_job, make_file, phones, send_file, wait_job

pytestmark = pytest.mark.timeout(180)

END_TYPES = ("job_completed", "job_failed")


def client_address() -> str:
    return f"198.51.100.{uuid.uuid4().int % 250 + 1}"


def open_socket(base_url: str, job_id: str, client: str) -> ClientConnection:
    """As the app opens it: `/ws/job/{id}`, no header (a browser cannot set one). The app sends
    no token, which works where the operator maps anonymous callers to an account; the suite
    does not, so the token comes as a browser can offer it, a subprotocol."""
    url = base_url.replace("http", "ws", 1) + f"/ws/job/{job_id}"
    bearer: Any = ["bearer", ADMIN_TOKEN]
    return connect(
        url, subprotocols=bearer, open_timeout=10, close_timeout=5, additional_headers={"X-Forwarded-For": client}
    )


def read_until(ws: ClientConnection, stop: tuple[str, ...], timeout: float = 60) -> list[dict[str, Any]]:
    """Events up to and including the first whose type is in `stop`."""
    events: list[dict[str, Any]] = []
    while True:
        event = json.loads(ws.recv(timeout=timeout))
        events.append(event)
        if event["type"] in stop:
            return events


def quiet_after(ws: ClientConnection, seconds: float) -> list[dict[str, Any]]:
    """What a socket says until it has been silent for `seconds` (or closed)."""
    events: list[dict[str, Any]] = []
    try:
        while True:
            events.append(json.loads(ws.recv(timeout=seconds)))
    except (TimeoutError, ConnectionClosed):
        return events


def start_job(base_url: str, numbers: list[str]) -> str:
    r = send_file(base_url, make_file(numbers))
    assert r.status_code == 200, r.text
    return str(r.json()["job"]["id"])


@pytest.fixture(autouse=True)
def only_test_devices(base_url: str) -> None:
    deactivate_all(base_url)


def test_a_finished_job_does_not_drive_the_app_into_a_reconnect_loop(base_url: str, suite: Stack) -> None:
    add_device(base_url, rate_per_minute=600)
    job_id = start_job(base_url, phones(40, 20))
    client = client_address()
    # The app: a socket per effect; learning the end changes its history, which reconnects.
    sockets_after_end = 0
    last: list[dict[str, Any]] = []
    ended = False
    for _ in range(10):
        with open_socket(base_url, job_id, client) as ws:
            sockets_after_end += ended
            events = quiet_after(ws, 4.0) if ended else read_until(ws, END_TYPES, timeout=60)
            if not any(e["type"] in END_TYPES for e in events):
                last = events
                ws.send(json.dumps({"type": "ping", "timestamp": 1}))
                assert json.loads(ws.recv(timeout=10)) == {"type": "pong", "timestamp": 1}
                break
            ended = True
    assert ended and last, "the app never settled: every new socket was told the end again"
    assert sockets_after_end <= 2
    assert [e["type"] for e in last] == ["connected", "subscribed", "job_status"]
    assert last[-1]["status"] == "completed" and last[-1]["progress"]["sent"] == 20


def test_a_client_whose_socket_dropped_before_the_end_still_learns_it(base_url: str, suite: Stack) -> None:
    add_device(base_url, rate_per_minute=600)
    numbers = phones(41, 40)
    job_id = start_job(base_url, numbers)
    client = client_address()
    with open_socket(base_url, job_id, client) as ws:
        read_until(ws, ("progress",))
    wait_job(base_url, job_id, timeout=120)
    with open_socket(base_url, job_id, client) as ws:
        events = read_until(ws, END_TYPES, timeout=30)
        assert events[-1]["type"] == "job_completed" and events[-1]["results"]["sent"] == 40
    with open_socket(base_url, job_id, client) as ws:  # the app reconnects once more: told already
        assert [e["type"] for e in quiet_after(ws, 3.0)] == ["connected", "subscribed", "job_status"]


def test_one_client_opening_sockets_in_a_loop_is_refused(base_url: str) -> None:
    client = client_address()
    firsts: list[dict[str, Any]] = []
    refused: list[ClientConnection] = []
    # A reconnect loop: each socket opened as soon as the previous one has answered.
    with contextlib.ExitStack() as opened:
        for _ in range(60):
            ws = opened.enter_context(open_socket(base_url, str(uuid.uuid4()), client))
            firsts.append(json.loads(ws.recv(timeout=10)))
            if firsts[-1].get("error") == "too_many_connections":
                refused.append(ws)
        for ws in refused:
            quiet_after(ws, 10.0)
    answered = [f for f in firsts if f.get("error") != "too_many_connections"]
    assert all(f["error"] == "not_found" for f in answered)  # unknown jobs: those sockets were admitted
    assert len(answered) >= 10 and len(refused) >= 10, (len(answered), len(refused))
    message, code = next(f for f in firsts if f not in answered), refused[0].close_code
    assert code == 4429 and message["type"] == "error" and message["message"]
    # Another client is not held back by this one.
    with open_socket(base_url, str(uuid.uuid4()), client_address()) as ws:
        assert json.loads(ws.recv(timeout=10))["error"] == "not_found"


def test_a_socket_opened_while_the_job_runs_is_told_it_started(base_url: str, suite: Stack) -> None:
    add_device(base_url, rate_per_minute=300)
    job_id = start_job(base_url, phones(42, 40))
    wait_for("sending under way", lambda: get_job(base_url, job_id)["progress"]["sent"] >= 2, 60, every=0.1)
    with open_socket(base_url, job_id, client_address()) as ws:
        events = read_until(ws, ("progress", "error", *END_TYPES))
    assert events[-1]["type"] in ("progress", "error"), events
    assert "job_started" in [e["type"] for e in events], events
    httpx.post(f"{base_url}/jobs/{job_id}/cancel", headers=ADMIN)


def test_the_state_after_a_reconnect_names_the_last_recipient(base_url: str, suite: Stack) -> None:
    device = add_device(base_url, rate_per_minute=600)
    numbers = phones(43, 60)
    job_id = start_job(base_url, numbers)
    wait_for("sending under way", lambda: get_job(base_url, job_id)["progress"]["sent"] >= 5, 60, every=0.1)
    assert httpx.post(f"{base_url}/jobs/{job_id}/pause", headers=ADMIN).status_code == 200

    def settled() -> dict[str, Any] | None:
        job = get_job(base_url, job_id)
        return job if job["status"] == "paused" and job["progress"]["in_flight"] == 0 else None

    job = wait_for("paused with nothing in flight", settled, 60)
    with open_socket(base_url, job_id, client_address()) as ws:
        events = read_until(ws, ("progress", "error"))
    first = events[-1]
    # A paused job: the app shows these numbers until the job goes on.
    assert first["type"] == "progress" and first["phone"] in numbers, first
    assert first["status"] == "sent" and first["device_id"] == device
    assert first["progress"]["sent"] == job["progress"]["sent"]
    httpx.post(f"{base_url}/jobs/{job_id}/cancel", headers=ADMIN)


def test_failed_recipients_come_as_errors_not_as_sent(base_url: str, suite: Stack) -> None:
    add_device(base_url, rate_per_minute=600, provider_config={"failure_ratio": 0.5, "seed": 11})
    numbers = phones(44, 40)
    job_id = start_job(base_url, numbers)
    with open_socket(base_url, job_id, client_address()) as ws:
        events = read_until(ws, END_TYPES, timeout=120)
    results = httpx.get(f"{base_url}/jobs/{job_id}/results", headers=ADMIN, params={"limit": 100}).json()["results"]
    failed = {r["phone"] for r in results if r["status"] == "failed"}
    sent = {r["phone"] for r in results if r["status"] == "sent"}
    assert failed and sent
    logged_as_sent = {e["phone"] for e in events if e["type"] == "progress" and "phone" in e}
    errors = {e["phone"] for e in events if e["type"] == "error"}
    assert logged_as_sent and errors
    assert not logged_as_sent & failed, "failed recipients logged as 'Enviado a'"
    assert logged_as_sent <= sent and errors <= failed
    assert all(e.get("status") == "sent" for e in events if e["type"] == "progress" and "phone" in e)


def test_a_job_whose_every_recipient_failed_ends_failed(base_url: str, suite: Stack) -> None:
    add_device(base_url, rate_per_minute=600, provider_config={"failure_ratio": 1.0})
    job_id = start_job(base_url, phones(45, 10))
    with open_socket(base_url, job_id, client_address()) as ws:
        events = read_until(ws, END_TYPES, timeout=120)
    end = events[-1]
    assert end["type"] == "job_failed" and end["error"] and end["message"], end
    job = wait_job(base_url, job_id, statuses=("failed", "completed"))
    assert job["status"] == "failed" and job["progress"]["failed"] == 10


def test_a_job_whose_devices_are_all_gone_ends_failed(base_url: str, suite: Stack) -> None:
    device = add_device(base_url, rate_per_minute=300)
    job_id = start_job(base_url, phones(46, 200))
    with open_socket(base_url, job_id, client_address()) as ws:
        while "phone" not in read_until(ws, ("progress",))[-1]:  # a recipient sent, not the counters
            pass
        assert httpx.delete(f"{base_url}/devices/{device}", headers=ADMIN).status_code == 200
        events = read_until(ws, END_TYPES, timeout=120)
    end = events[-1]
    assert end["type"] == "job_failed" and end["error"] == "No hay devices disponibles", end
    job = wait_job(base_url, job_id, statuses=("failed", "completed"))
    p = job["progress"]
    assert job["status"] == "failed" and 0 < p["sent"] < 200 and p["sent"] + p["failed"] + p["cancelled"] == 200
