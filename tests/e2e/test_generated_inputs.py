"""Generated inputs on the deployed clients' routes never meet a server error (issue 10).

Schemathesis turns each operation of the gateway's OpenAPI document under `/api/v1/`,
`/devices`, `/messages/` and `/jobs` into a hypothesis strategy: path ids, query parameters,
headers and JSON or multipart bodies, valid by the schema (positive) and not (negative). Each
example goes through Envoy to the running suite; whatever the input, the answer is never a 5xx.

Half the examples (hypothesis decides which) put real ids in the path: a voice campaign and its
job, a WhatsApp device and bulk job, all in an account of this module's own, so the handlers
run past "not found" on the generated bodies and queries. Anything that changes state is kept
to that account (see `Target`): the rest of the suite works in "default" and "acme".

Deterministic: a fixed seed (derandomize), no example database, no shrinking (a failure is
reported as generated, with its request), and a bounded number of examples per operation.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings
from services.gateway.ids import voice_job_key
from services.runtime.devstack import Stack
from tests.conftest import ADMIN_TOKEN, wait_for

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PREFIXES = ("/api/v1/", "/devices", "/messages/", "/jobs")
EXAMPLES = 25  # per operation and generation mode: ~50 operations x 50 requests in about a minute
SUFFIX = uuid.uuid4().hex[:8]
ACCOUNT = f"fuzz-{SUFFIX}"

# The document as the gateway serves it at /openapi.json (built here so each operation is a
# test case of its own; no backend is contacted).
SCHEMA = schemathesis.openapi.from_dict(create_app(GatewaySettings(database_url="postgresql://unused/x")).openapi())

# Not generated, with the reason.
SKIPPED: dict[tuple[str, str], str] = {
    # Replays another test's dead letters onto the live bus (their poison events run again);
    # its malformed and unknown ids are covered by test_dashboard_compat's id walk.
    ("POST", "/api/v1/admin/dead-letters/{dead_letter_id}/replay"): "would replay other tests' dead letters",
}

pytestmark = pytest.mark.timeout(300)


def operations() -> list[tuple[str, str]]:
    ops = []
    for result in SCHEMA.get_all_operations():
        op = result.ok()
        if op.path.startswith(PREFIXES):
            ops.append((op.method.upper(), op.path))
    return sorted(ops)


@dataclass
class Target:
    """This module's own objects: the ids real-id examples use, and who calls."""

    account_id: str
    member: dict[str, str]  # an API key of the account: the WhatsApp sender's routes create in the caller's account
    ids: dict[str, str]  # path parameter -> a real id


def _ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code in (200, 201), f"{r.request.method} {r.request.url}: {r.status_code} {r.text[:300]}"
    return dict(r.json())


@pytest.fixture(scope="module")
def target(base_url: str, suite: Stack) -> Iterator[Target]:
    with httpx.Client(base_url=base_url, headers=ADMIN, timeout=30) as admin:
        _ok(admin.post("/api/v1/accounts", json={"account_id": ACCOUNT, "account_name": "Generated inputs"}))
        _ok(admin.post(f"/api/v1/accounts/{ACCOUNT}/topup", json={"credits": 1000}))
        key = _ok(admin.post("/api/auth/api-keys", json={"name": "fuzz", "account_id": ACCOUNT}))
        member = {"Authorization": f"Bearer {key['key']}"}
        # A campaign that starts tomorrow: its jobs are real, no call is placed.
        with (FIXTURES / "chile_cobranza_basica.xlsx").open("rb") as f:
            batch = _ok(
                admin.post(
                    "/api/v1/batches/excel/create",
                    files={"file": ("fuzz.xlsx", f, "application/octet-stream")},
                    data={"account_id": ACCOUNT, "batch_name": "fuzz", "allow_duplicates": "true"},
                )
            )["batch"]
        jobs = admin.get(f"/api/v1/batches/{batch['batch_id']}/jobs", params={"limit": 1}).json()
        assert jobs, "the campaign has no jobs"
        device = _ok(
            admin.post(
                "/devices",
                headers=member,
                json={"token": f"fuzz-{SUFFIX}", "secret": "fuzz-secret", "rate_per_minute": 0},
            )
        )["device"]
        bulk = _ok(
            admin.post(
                "/messages/send-bulk-file",
                headers=member,
                files={"file": ("fuzz.csv", b"phone|@valor1\n+56990000009|x\n", "text/csv")},
                data={"message": "Hola @valor1", "devices_limit": "1"},
            )
        )["job"]
        wait_for(
            "the bulk job ends",
            lambda: (
                admin.get(f"/jobs/{bulk['id']}", headers=member).json().get("status")
                in ("completed", "failed", "cancelled")
            ),
            timeout=30,
        )
        yield Target(
            account_id=ACCOUNT,
            member=member,
            ids={
                "account_id": ACCOUNT,
                "batch_id": batch["batch_id"],
                "voice_job_id": jobs[0]["job_id"],
                "device_id": str(device["id"]),
                "job_id": str(bulk["id"]),
                "use_case": "debt_collection",
            },
        )
        # Nothing of it may keep working for later tests: its campaigns are cancelled, its devices off.
        for b in admin.get("/api/v1/batches", params={"account_id": ACCOUNT, "limit": 1000}).json():
            admin.post(f"/api/v1/batches/{b['batch_id']}/cancel")
        for d in admin.get("/devices", headers=member).json().get("devices", []):
            admin.put(f"/devices/{d['id']}", headers=member, json={"status": "inactive"})


def id_kind(path: str, name: str) -> str:
    return "voice_job_id" if name == "job_id" and path.startswith("/api/v1/") else name


def aim(case: schemathesis.Case, target: Target, real_ids: bool) -> dict[str, str]:
    """Points the case at this module's objects where it could change shared ones; the
    headers to call with."""
    method, path = case.method.upper(), case.path
    for name, value in (case.path_parameters or {}).items():
        # Voice job ids are small numbers (`job-1`, `1`): a generated one could name another
        # test's job, which an admin may cancel or delete.
        guessed = method != "GET" and id_kind(path, name) == "voice_job_id" and voice_job_key(str(value)) is not None
        if real_ids or guessed:
            case.path_parameters[name] = target.ids[id_kind(path, name)]
    if method != "GET":
        # An admin naming no account works in "default", the one the rest of the suite uses.
        # (A new account is the one exception: its id names no existing one, or it is a 409.)
        if path != "/api/v1/accounts" and isinstance(case.body, dict) and "account_id" in _body_properties(case):
            if real_ids or not case.body.get("account_id"):
                case.body["account_id"] = target.account_id
        if isinstance(case.query, dict) and "account_id" in case.query:
            case.query["account_id"] = target.account_id
        # The sender's devices and jobs are the caller's own: a member of this account.
        if path.startswith(("/devices", "/messages/", "/jobs")):
            return target.member
    return ADMIN


def _body_properties(case: schemathesis.Case) -> set[str]:
    doc = SCHEMA.raw_schema
    content = doc["paths"][case.path][case.method.lower()].get("requestBody", {}).get("content", {})
    schema = content.get(case.media_type or "", {}).get("schema", {})
    if "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return set(schema.get("properties", {}))


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def errors_logged(suite: Stack, request_id: str) -> list[str]:
    """The end of what the services logged about that request (a traceback's last lines), or
    failing that their latest errors."""
    lines = [(name, line) for name, proc in suite.service_procs.items() for line in list(proc.lines)[-20:]]
    about = [(n, line) for n, line in lines if request_id and request_id in line]
    about = about or [(n, line) for n, line in lines if '"level": "error"' in line or "Traceback" in line]
    return [f"{name}: ...{line[-900:]}" for name, line in about[-6:]]


def _case(route: tuple[str, str]) -> Any:
    marks = [pytest.mark.skip(reason=SKIPPED[route])] if route in SKIPPED else []
    return pytest.param(route, id=f"{route[0]} {route[1]}", marks=marks)


@pytest.mark.parametrize("route", [_case(r) for r in operations()])
def test_generated_requests_meet_no_server_error(
    base_url: str, suite: Stack, target: Target, session: requests.Session, route: tuple[str, str]
) -> None:
    method, path = route
    operation = SCHEMA[path][method]
    cases = st.one_of(
        operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
        operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
    )

    @settings(
        max_examples=2 * EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases, real_ids=st.booleans())
    def check(case: schemathesis.Case, real_ids: bool) -> None:
        headers = aim(case, target, real_ids)
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
        if response.status_code >= 500:
            logs = "\n".join(errors_logged(suite, response.headers.get("X-Request-Id", "")))
            raise AssertionError(
                f"{response.status_code} {response.text[:300]}\n{case.as_curl_command(headers=headers)[:2000]}\n{logs}"
            )

    check()
