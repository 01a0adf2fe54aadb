"""`pregonero`, the operator's CLI, run as a process against the suite through Envoy, as an
operator would run it: a file sent and followed to its end, the lists, a refusal, an
unreachable address, Ctrl-C (which must leave the job running), a voice workbook, a top-up."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openpyxl
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pregonero_cli.api import Api
from pregonero_cli.config import Target
from pregonero_cli.live import Counts, JobFollower
from services.runtime.devstack import Stack, free_port
from tests.conftest import ADMIN_TOKEN, REPO, wait_for
from tests.e2e.test_bulk import add_device, deactivate_all, get_job, make_file, phones, send_file

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
COMMANDS = (
    "send",
    "analytics",
    "watch",
    "jobs",
    "campaigns",
    "campaign",
    "pause",
    "resume",
    "cancel",
    "devices",
    "accounts",
    "balance",
    "topup",
    "export",
)
Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def cli_env(base_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment an operator's shell would give it; a HOME of its own, so no config
    file of the machine's is read, and a wide terminal so lines are not wrapped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREGONERO_", "XDG_CONFIG"))}
    env.update(
        PREGONERO_URL=base_url,
        PREGONERO_TOKEN=ADMIN_TOKEN,
        PYTHONPATH=str(REPO),
        HOME=str(tmp_path_factory.mktemp("home")),
        COLUMNS="200",
    )
    return env


@pytest.fixture(scope="module")
def cli(cli_env: dict[str, str]) -> Cli:
    def run(
        *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pregonero_cli", *args],
            env={**cli_env, **(env or {})},
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    return run


@pytest.fixture(scope="module")
def fast_device(base_url: str) -> int:
    deactivate_all(base_url)
    return add_device(base_url, rate_per_minute=0)


def contacts(tmp_path: Path, numbers: list[str]) -> Path:
    path = tmp_path / "contacts.csv"
    path.write_bytes(make_file(numbers))
    return path


def job_id_in(stderr: str) -> str:
    match = re.search(r"Job (\S+): ", stderr)
    assert match, stderr
    return match[1]


def test_help_lists_every_command(cli: Cli) -> None:
    r = cli("--help")
    assert r.returncode == 0, r.stderr
    for command in COMMANDS:
        assert re.search(rf"^\W*{command}\b", r.stdout, re.MULTILINE), command
    script = Path(sys.executable).with_name("pregonero")
    if Path(sys.executable).parent == REPO / ".venv" / "bin":  # `make install` wrote it
        installed = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
        assert installed.returncode == 0 and "Usage: pregonero" in installed.stdout, installed.stderr


def test_send_shows_progress_to_the_end_and_the_final_counts(
    cli: Cli, base_url: str, fast_device: int, tmp_path: Path
) -> None:
    r = cli("send", str(contacts(tmp_path, phones(60, 200))), "--message", "Hola @valor1", "--devices", "2")
    assert r.returncode == 0, r.stderr
    assert "completed: 200 sent, 0 failed of 200" in r.stdout
    # The live bar's last state (printed when it stops, without a terminal): all of it done.
    assert re.search(r"completed\s.*100%.*200 sent · 0 failed of 200", r.stderr), r.stderr
    job_id = job_id_in(r.stderr)
    job = get_job(base_url, job_id)
    assert job["status"] == "completed" and job["progress"]["sent"] == 200

    listed = cli("jobs", "--json", "--limit", "5")
    assert listed.returncode == 0, listed.stderr
    assert job_id in [j["id"] for j in json.loads(listed.stdout)]
    table = cli("jobs", "--limit", "5")
    assert table.returncode == 0 and job_id in table.stdout

    # A finished job is reported at once, from its row: no socket to wait on.
    watched = cli("watch", job_id, "--json")
    assert watched.returncode == 0, watched.stderr
    assert json.loads(watched.stdout)["progress"]["sent"] == 200

    # The day's sends, hour by hour: the job's 200 are among them, and the bars draw them.
    today = datetime.now(UTC).date().isoformat()
    charted = cli("analytics", "--from", today, "--bucket", "hour", "--timezone", "UTC", "--json")
    assert charted.returncode == 0, charted.stderr
    body = json.loads(charted.stdout)
    # Every hour of the day so far (an hour may have begun since the call).
    assert body["series"][0]["bucket"] == f"{today}T00:00:00+00:00"
    assert len(body["series"]) in (datetime.now(UTC).hour, datetime.now(UTC).hour + 1)
    assert sum(p["sent"] for p in body["series"]) == body["totals"]["sent"] >= 200
    chart = cli("analytics", "--from", today, "--bucket", "hour", "--timezone", "UTC")
    assert chart.returncode == 0 and "█" in chart.stdout
    assert f"total sent: {body['totals']['sent']:,}" in chart.stdout


def test_an_api_refusal_shows_the_apis_message_and_exits_1(cli: Cli, base_url: str) -> None:
    missing = str(uuid.uuid4())
    said = httpx.post(f"{base_url}/jobs/{missing}/pause", headers=ADMIN).json()["message"]
    r = cli("pause", missing)
    assert r.returncode == 1
    assert said in r.stderr and "404" in r.stderr
    refused = cli("jobs", env={"PREGONERO_TOKEN": "not-a-token"})
    assert refused.returncode == 1 and "401" in refused.stderr


def test_unreachable_is_3_usage_is_2_and_flags_win(cli: Cli, base_url: str, cli_env: dict[str, str]) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    r = cli("jobs", env={"PREGONERO_URL": closed})
    assert r.returncode == 3 and "cannot connect" in r.stderr
    assert cli("--url", base_url, "jobs", "--json", env={"PREGONERO_URL": closed}).returncode == 0
    assert cli("jobs", "--limit", "0").returncode == 2
    assert cli("frobnicate").returncode == 2

    # The config file is read when neither a flag nor the environment says.
    config = Path(cli_env["HOME"]) / ".config" / "pregonero" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f'url = "{base_url}"\ntoken = "{ADMIN_TOKEN}"\n')
    try:
        env = {k: v for k, v in cli_env.items() if not k.startswith("PREGONERO_")}
        r = subprocess.run(
            [sys.executable, "-m", "pregonero_cli", "devices", "--json"], env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        assert "devices" in json.loads(r.stdout)
    finally:
        config.unlink()


def job_sockets(suite: Stack) -> float:
    """WebSockets open on the gateway for jobs, as its own metric counts them."""
    text = httpx.get(suite.metrics_urls["gateway"], timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "pregonero_websocket_connections" and "job" in s.labels.get("route", "")
    )


def test_ctrl_c_detaches_and_leaves_the_job_running(
    cli: Cli, cli_env: dict[str, str], base_url: str, suite: Stack, tmp_path: Path
) -> None:
    deactivate_all(base_url)
    # 2 a second: 100 recipients take 50 s, so a loaded machine's slow steps (the watcher's
    # start, its socket, three CLI runs) still meet the job sending.
    add_device(base_url, rate_per_minute=120)
    try:
        r = cli("send", str(contacts(tmp_path, phones(61, 100))), "-m", "Hola", "--no-wait")
        assert r.returncode == 0, r.stderr
        job_id = job_id_in(r.stderr)
        open_before = job_sockets(suite)
        watcher = subprocess.Popen(
            [sys.executable, "-m", "pregonero_cli", "watch", job_id],
            env=cli_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for("sending starts", lambda: get_job(base_url, job_id)["progress"]["sent"] >= 2, 20, every=0.1)
        wait_for("the watcher on the job's socket", lambda: job_sockets(suite) > open_before, 20, every=0.1)
        watcher.send_signal(signal.SIGINT)
        _, stderr = watcher.communicate(timeout=15)
        assert watcher.returncode == 130, stderr
        assert f"pregonero watch {job_id}" in stderr
        job = get_job(base_url, job_id)
        assert job["status"] == "processing" and job["progress"]["sent"] < 100

        # Cancelling is asked for, never assumed: without a terminal to ask, --yes is needed.
        assert cli("cancel", job_id).returncode == 2
        cancelled = cli("cancel", job_id, "--yes", "--reason", "cli test")
        assert cancelled.returncode == 0, cancelled.stderr
        assert wait_for("cancelled", lambda: get_job(base_url, job_id)["status"] == "cancelled", 20)
    finally:
        deactivate_all(base_url)


def test_without_a_socket_the_job_is_followed_by_asking_it(
    base_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A socket that cannot be opened (a proxy that drops WebSockets, a gateway restarting):
    the follower polls the job's row instead, and still ends with its final counts."""
    deactivate_all(base_url)
    add_device(base_url, rate_per_minute=1200)
    try:
        job_id = send_file(base_url, make_file(phones(63, 40))).json()["job"]["id"]
        monkeypatch.setattr(Api, "ws_url", property(lambda api: f"ws://127.0.0.1:{free_port()}"))
        notes: list[str] = []
        seen: list[Counts] = []
        listener = SimpleNamespace(update=seen.append, note=notes.append)
        job = JobFollower(Api(Target(base_url, ADMIN_TOKEN)), job_id, listener).run()
        assert job["status"] == "completed" and job["progress"]["sent"] == 40
        assert seen[-1] == Counts("completed", 40, 0, 40)
        assert len(notes) == 1 and "live connection failed" in notes[0]  # told once, not at every retry
    finally:
        deactivate_all(base_url)


def test_a_voice_workbook_is_previewed_then_created(cli: Cli, base_url: str) -> None:
    account = f"cli-{uuid.uuid4().hex[:8]}"
    r = httpx.post(
        f"{base_url}/api/v1/accounts",
        headers=ADMIN,
        json={"account_id": account, "account_name": "CLI", "country": "CL", "initial_credits": 1000},
    )
    assert r.status_code == 200, r.text
    workbook = str(REPO / "tests" / "fixtures" / "chile_cobranza_basica.xlsx")
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    args = ("campaign", "create", workbook, "--account", account, "--country", "cl", "--start-at", tomorrow)

    unconfirmed = cli(*args)
    assert unconfirmed.returncode == 2 and "valid_rows" in unconfirmed.stderr
    assert httpx.get(f"{base_url}/api/v1/batches", headers=ADMIN, params={"account_id": account}).json() == []

    created = cli(*args, "--name", "CLI campaign", "--yes", "--json")
    assert created.returncode == 0, created.stderr
    body: dict[str, Any] = json.loads(created.stdout)
    assert body["jobs_created"] > 0 and body["batch_name"] == "CLI campaign"
    listed = cli("campaigns", "--account", account, "--json")
    assert [b["batch_id"] for b in json.loads(listed.stdout)] == [body["batch_id"]]

    topped = cli("topup", account, "5.5", "--json")
    assert topped.returncode == 0, topped.stderr
    assert json.loads(topped.stdout)["amount"] == 5.5
    balance = cli("balance", account, "--json")
    assert json.loads(balance.stdout)["credit_balance"] == 1005.5
    accounts = cli("accounts", "--limit", "5")
    assert accounts.returncode == 0 and "credit" in accounts.stdout


def test_export_downloads_the_results_or_says_why_not(cli: Cli, base_url: str, tmp_path: Path) -> None:
    deactivate_all(base_url)
    add_device(base_url, rate_per_minute=0)
    numbers = phones(62, 20)
    sent = cli("send", str(contacts(tmp_path, numbers)), "-m", "Hola @valor1", "--json")
    assert sent.returncode == 0, sent.stderr
    job_id = json.loads(sent.stdout)["id"]
    dest = tmp_path / "results.csv"
    r = cli("export", job_id, "--format", "csv", "-o", str(dest))
    routes = httpx.get(f"{base_url}/openapi.json").json()["paths"]
    if "/jobs/{job_id}/results/export" not in routes:
        # A server without the export route: the API's own 404 message, and no file.
        assert r.returncode == 1 and "Not Found" in r.stderr and "404" in r.stderr
        assert not dest.exists() and not list(tmp_path.glob(".*.part"))
        return
    assert r.returncode == 0, r.stderr
    with dest.open(encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    # Phones start with "+", which the export neutralises against formula injection.
    assert {row["phone"].lstrip("'") for row in rows} == set(numbers)
    assert {row["status"] for row in rows} == {"sent"}

    # Without -o, the name the server gives, in the current folder.
    r = cli("export", job_id, "--format", "xlsx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    book = openpyxl.load_workbook(tmp_path / f"job-{job_id}-results.xlsx", read_only=True)
    sheet = book.worksheets[0]
    # The header and a row per recipient, counted: a workbook sent as it is made cannot state
    # its size up front (no <dimension>), so read-only openpyxl has no max_row to give.
    assert sum(1 for _ in sheet.iter_rows()) == 21
    book.close()
