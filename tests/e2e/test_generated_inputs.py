"""Generated inputs on every route meet no server error and answer as documented (issue 10;
security issue, "tests that must exist").

Schemathesis turns each operation of the gateway's OpenAPI document (all of them: the deployed
clients' `/api/v1/`, `/devices`, `/messages/`, `/jobs`, the scheduler's `/api/*`, auth, health,
sync, notifications, webhooks) into a hypothesis strategy: path ids, query parameters, headers
and JSON or multipart bodies, valid by the schema (positive) and not (negative). Each example
goes through Envoy to the running suite, and its response meets all of schemathesis's checks
(`CHECKS`): never a 5xx, a documented status, content type, headers and body schema (every
4xx is the error envelope, with its `message`), and input the schema forbids is refused.

Half the examples (hypothesis decides which) put real ids in the path: a voice campaign and its
job, a WhatsApp device and bulk job, the scheduler's contact, group, message and opt-out, an
API key and a notification, all in an account of this module's own, so the handlers run past
"not found" on the generated bodies and queries. Anything that changes state is kept to that
account (see `Target`): the rest of the suite works in "default" and "acme".

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
from schemathesis import checks as sc

from services.gateway.app import create_app
from services.gateway.config import GatewaySettings
from services.gateway.ids import voice_job_key
from services.runtime.devstack import Stack
from tests.conftest import ADMIN_TOKEN, wait_for

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
EXAMPLES = 6  # per operation and generation mode: ~110 operations x 12 requests (all checks), ~15 s in all
SUFFIX = uuid.uuid4().hex[:8]
ACCOUNT = f"fuzz-{SUFFIX}"

# The document as the gateway serves it at /openapi.json (built here so each operation is a
# test case of its own; no backend is contacted).
SCHEMA = schemathesis.openapi.from_dict(create_app(GatewaySettings(database_url="postgresql://unused/x")).openapi())
# Unknown query parameters are ignored, as by most HTTP APIs (FastAPI's default): a request
# is not invalid for carrying one, so negative cases are not made of them.
SCHEMA.config.generation.update(allow_extra_parameters=False)

# Not generated, with the reason.
SKIPPED: dict[tuple[str, str], str] = {
    # Replays another test's dead letters onto the live bus (their poison events run again);
    # its malformed and unknown ids are covered by test_dashboard_compat's id walk.
    ("POST", "/api/v1/admin/dead-letters/{dead_letter_id}/replay"): "would replay other tests' dead letters",
}

# Every check schemathesis has, less those that cannot apply to single generated requests:
# the stateful ones need the links of a stateful run (use_after_free,
# ensure_resource_availability, object_level_authorization), the coverage-phase ones the
# coverage phase (missing_required_header, unsupported_method, allow_header_conformance), and
# ignored_auth a security scheme (the document declares none; test_isolation and
# test_bad_input_corpus send the wrong credentials). positive_data_acceptance is left out: a
# schema-valid body can still be refused for what no schema says (an unknown id is 404, a
# taken name 409, a credit over the balance 400), and that 4xx is the documented answer.
CHECKS = [
    sc.not_a_server_error,
    sc.status_code_conformance,
    sc.content_type_conformance,
    sc.response_headers_conformance,
    sc.response_schema_conformance,
    sc.negative_data_rejection,
]
# Routes that only an admin may call; every other `/api/` route outside `/api/v1/` is the
# scheduler's, its auth's or the caller's own: called with this module's account's API key.
ADMIN_ROUTES = ("/api/v1/", "/api/auth/users")

pytestmark = pytest.mark.timeout(300)


def operations() -> list[tuple[str, str]]:
    return sorted((op.method.upper(), op.path) for op in (r.ok() for r in SCHEMA.get_all_operations()))


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
        # The scheduler's objects, and a second API key (the first is the caller: a generated
        # DELETE of it would end the module's calls).
        contact = _ok(admin.post("/api/contacts", headers=member, json={"name": "fuzz", "phone": "+56950000091"}))
        group = _ok(admin.post("/api/groups", headers=member, json={"name": f"fuzz-{SUFFIX}"}))
        _ok(admin.post(f"/api/groups/{group['id']}/contacts", headers=member, json={"contact_ids": [contact["id"]]}))
        message = _ok(admin.post("/api/messages", headers=member, json={"content": "fuzz", "group_ids": [group["id"]]}))
        _ok(admin.post("/api/opt-outs", headers=member, json={"phone": "+56950000092"}))
        spare_key = _ok(admin.post("/api/auth/api-keys", json={"name": "fuzz-spare", "account_id": ACCOUNT}))
        wait_for(
            "the bulk job ends",
            lambda: (
                admin.get(f"/jobs/{bulk['id']}", headers=member).json().get("status")
                in ("completed", "failed", "cancelled")
            ),
            timeout=30,
        )
        # The ended job notifies the account (when it has not yet, a made-up id stands in).
        notices = admin.get("/api/notifications", headers=member, params={"limit": 1}).json()
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
                "contact_id": str(contact["id"]),
                "group_id": str(group["id"]),
                "message_id": str(message["id"]),
                "phone": "+56950000092",
                "key_id": str(spare_key["id"]),
                "notification_id": str(notices[0]["id"]) if notices else "1",
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
            # Assigned anew, not changed in place, so schemathesis judges the case by the
            # real id: a negative case whose only invalid part was the id is no longer one.
            case.path_parameters = {**case.path_parameters, name: target.ids[id_kind(path, name)]}
    if path.startswith("/api/") and not path.startswith(ADMIN_ROUTES):
        # The scheduler's objects, notifications, keys and profile: the account's own.
        if isinstance(case.query, dict) and "account_id" in case.query:
            case.query["account_id"] = target.account_id
        return target.member
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


def failure_report(exc: BaseException) -> str:
    """What each failed check says (a FailureGroup holds one per check)."""
    failures = getattr(exc, "exceptions", None) or [exc]
    return "\n".join(f"- {getattr(f, 'title', type(f).__name__)}: {str(f)[:600]}" for f in failures)


@pytest.mark.parametrize("route", [_case(r) for r in operations()])
def test_generated_requests_are_answered_as_documented(
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
        headers, url = aim(case, target, real_ids), base_url
        if path == "/api/auth/login":
            # Failed logins count per client address, and through Envoy every test shares one:
            # straight to the gateway, which trusts the loopback's X-Forwarded-For, as a client
            # of its own.
            url = f"http://127.0.0.1:{suite.gateway_port}"
            headers = {"X-Forwarded-For": f"198.18.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"}
        response = case.call(base_url=url, session=session, headers=headers, timeout=30)
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except Exception as exc:  # noqa: BLE001 - a FailureGroup, reported with its request
            logs = "\n".join(errors_logged(suite, response.headers.get("X-Request-Id", "")))
            raise AssertionError(
                f"{failure_report(exc)}\n{response.status_code} {response.text[:300]}\n"
                f"{case.as_curl_command(headers=headers)[:2000]}\n{logs if response.status_code >= 500 else ''}"
            ) from None

    check()
