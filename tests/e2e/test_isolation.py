"""Isolation between accounts, walked over the whole OpenAPI document (issue 4).

The admin creates one of each resource the API has in other accounts ("default" and
"iso-other"); the member of "acme" then calls every operation of `/openapi.json` with those
ids. Whatever names another account's resource must answer 404 (never the data, never a 403
that tells the resource exists, never a 500); lists must hold only the member's own items.
Each operation is classified in ROUTES below, so the intent is reviewable; a route the
document gains and the table does not classify fails `test_every_route_is_classified`.

The member calls with each kind of credential (CREDENTIALS): the operator's static token for
"acme", a member user signed in with a JWT, and an API key of the account. The same world
serves all three walks. The sockets are walked too: another account's job on `/ws/job/{id}`
and another user's `/ws/{user_id}` are closed before anything of theirs is sent.
"""

from __future__ import annotations

import itertools
import json
import random
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import ADMIN_TOKEN, MEMBER_TOKEN, new_member

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}  # a member of account "acme"
MEMBER_ACCOUNT = "acme"
OTHER_ACCOUNT = "iso-other"
TIMEOUT = httpx.Timeout(15.0)

# Operations anyone may call, and the document itself: nothing of an account's to reach.
PUBLIC = {
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/live"),
    ("GET", "/api/health"),
    ("GET", "/api/health/db"),
    ("GET", "/api/health/queue"),
    ("GET", "/api/health/redis"),
    ("GET", "/docs"),
    ("GET", "/redoc"),
    ("GET", "/openapi.json"),
    ("GET", "/.well-known/jwks.json"),
    ("POST", "/api/auth/login"),
    ("POST", "/api/auth/refresh"),
    # Called by Meta, signed with the app secret: no account's data goes out.
    ("GET", "/webhooks/whatsapp"),
    ("POST", "/webhooks/whatsapp"),
    # Called by Wablas with the operator's key in the URL: it only publishes delivery reports.
    ("POST", "/webhooks/wablas"),
    # Called by WAHA, signed (HMAC-SHA512) with the operator's key: no account's data goes out.
    ("POST", "/webhooks/waha"),
}

RESOURCE = "resource"  # the path names a resource of another account: 404 for a member
LIST = "list"  # a listing: only the member's own items (a foreign ?account_id= is 404)
OWN = "own"  # creates in the caller's own account (a foreign account_id in the body is 404)
ADMIN_ONLY = "admin-only"  # not about one resource of another account: 403 for a member
SELF = "self"  # about the caller itself (its session, identity, counters); a foreign ?account_id= is 404

ROUTES: dict[tuple[str, str], str] = {
    # auth
    ("POST", "/api/auth/logout"): SELF,
    ("GET", "/api/auth/me"): SELF,
    ("PATCH", "/api/auth/me"): SELF,
    # The caller's own account's devices, counted by state.
    ("GET", "/api/health/whatsapp"): SELF,
    # Runs the caller's own queued operations through the routes, each classified here.
    ("POST", "/api/sync"): SELF,
    ("POST", "/api/auth/users"): ADMIN_ONLY,
    ("POST", "/api/auth/api-keys"): OWN,
    ("GET", "/api/auth/api-keys"): LIST,
    ("DELETE", "/api/auth/api-keys/{key_id}"): RESOURCE,
    # WhatsApp devices
    ("GET", "/devices"): LIST,
    ("POST", "/devices"): OWN,
    ("GET", "/devices/{device_id}"): RESOURCE,
    ("PUT", "/devices/{device_id}"): RESOURCE,
    ("DELETE", "/devices/{device_id}"): RESOURCE,
    ("GET", "/devices/{device_id}/qr"): RESOURCE,
    ("POST", "/devices/{device_id}/logout"): RESOURCE,
    ("POST", "/devices/{device_id}/restart"): RESOURCE,
    # WhatsApp bulk jobs
    ("POST", "/messages/send-bulk-file"): OWN,
    ("GET", "/jobs"): LIST,
    ("GET", "/jobs/{job_id}"): RESOURCE,
    ("POST", "/jobs/{job_id}/pause"): RESOURCE,
    ("POST", "/jobs/{job_id}/resume"): RESOURCE,
    ("POST", "/jobs/{job_id}/cancel"): RESOURCE,
    ("POST", "/jobs/{job_id}/retry-failed"): RESOURCE,
    ("GET", "/jobs/{job_id}/results"): RESOURCE,
    ("GET", "/jobs/{job_id}/results/export"): RESOURCE,
    # SpeechAI accounts and their ledger
    ("POST", "/api/v1/accounts"): ADMIN_ONLY,
    ("GET", "/api/v1/accounts"): LIST,
    ("GET", "/api/v1/accounts/{account_id}"): RESOURCE,
    ("PATCH", "/api/v1/accounts/{account_id}"): RESOURCE,
    ("PUT", "/api/v1/accounts/{account_id}/suspend"): RESOURCE,
    ("PUT", "/api/v1/accounts/{account_id}/activate"): RESOURCE,
    ("GET", "/api/v1/accounts/{account_id}/balance"): RESOURCE,
    ("POST", "/api/v1/accounts/{account_id}/topup"): RESOURCE,
    ("POST", "/api/v1/accounts/{account_id}/refund"): RESOURCE,
    ("POST", "/api/v1/accounts/{account_id}/adjust"): RESOURCE,
    ("GET", "/api/v1/accounts/{account_id}/transactions"): RESOURCE,
    ("GET", "/api/v1/accounts/{account_id}/batches"): RESOURCE,
    # notifications (per account) and the audit log
    ("GET", "/api/notifications"): LIST,
    ("GET", "/api/notifications/unread-count"): SELF,
    ("PUT", "/api/notifications/read-all"): SELF,
    ("PUT", "/api/notifications/{notification_id}/read"): RESOURCE,
    ("POST", "/api/notifications/mark-read/{notification_id}"): RESOURCE,
    ("DELETE", "/api/notifications/{notification_id}"): RESOURCE,
    ("GET", "/api/v1/audit"): ADMIN_ONLY,
    # SpeechAI voice campaigns (batches) and their calls (jobs)
    ("POST", "/api/v1/batches/excel/preview"): OWN,
    ("POST", "/api/v1/batches/excel/create"): OWN,
    ("POST", "/api/v1/batches/chile/{use_case}"): OWN,
    ("POST", "/api/v1/batches/argentina/{use_case}"): OWN,
    ("POST", "/api/v1/batches"): OWN,
    ("GET", "/api/v1/batches"): LIST,
    ("GET", "/api/v1/batches/{batch_id}"): RESOURCE,
    ("PATCH", "/api/v1/batches/{batch_id}"): RESOURCE,
    ("DELETE", "/api/v1/batches/{batch_id}"): RESOURCE,
    ("GET", "/api/v1/batches/{batch_id}/status"): RESOURCE,
    ("GET", "/api/v1/batches/{batch_id}/summary"): RESOURCE,
    ("GET", "/api/v1/batches/{batch_id}/jobs"): RESOURCE,
    ("GET", "/api/v1/batches/{batch_id}/export"): RESOURCE,
    ("PUT", "/api/v1/batches/{batch_id}/pause"): RESOURCE,
    ("PUT", "/api/v1/batches/{batch_id}/resume"): RESOURCE,
    ("POST", "/api/v1/batches/{batch_id}/cancel"): RESOURCE,
    ("GET", "/api/v1/jobs"): LIST,
    ("GET", "/api/v1/jobs/{job_id}"): RESOURCE,
    ("PUT", "/api/v1/jobs/{job_id}/retry"): RESOURCE,
    ("PUT", "/api/v1/jobs/{job_id}/cancel"): RESOURCE,
    ("DELETE", "/api/v1/jobs/{job_id}"): RESOURCE,
    # The dashboard's aggregates: the caller's own account (an admin may name one). The call
    # history is a listing, but has no one-item sibling for LIST's check to key on.
    ("GET", "/api/v1/dashboard/stats"): SELF,
    ("GET", "/api/v1/dashboard/overview"): SELF,
    ("GET", "/api/v1/calls/history"): SELF,
    # Analytics: the caller's own account's figures (an admin may name one).
    ("GET", "/api/v1/reports/analytics"): SELF,
    ("GET", "/api/analytics/dashboard"): SELF,
    ("GET", "/api/analytics/messages"): SELF,
    ("GET", "/api/analytics/groups"): SELF,
    # A fixed catalogue, nothing of any account's.
    ("GET", "/api/v1/use-cases"): SELF,
    # The operator's: events no consumer could handle, of no one account.
    ("GET", "/api/v1/admin/dead-letters"): ADMIN_ONLY,
    ("POST", "/api/v1/admin/dead-letters/{dead_letter_id}/replay"): ADMIN_ONLY,
    # The WhatsApp scheduler's address book (issue 11)
    ("GET", "/api/contacts"): LIST,
    ("POST", "/api/contacts"): OWN,
    ("POST", "/api/contacts/import"): OWN,
    ("GET", "/api/contacts/{contact_id}"): RESOURCE,
    ("PUT", "/api/contacts/{contact_id}"): RESOURCE,
    ("DELETE", "/api/contacts/{contact_id}"): RESOURCE,
    ("GET", "/api/groups"): LIST,
    ("POST", "/api/groups"): OWN,
    ("GET", "/api/groups/{group_id}"): RESOURCE,
    ("PUT", "/api/groups/{group_id}"): RESOURCE,
    ("DELETE", "/api/groups/{group_id}"): RESOURCE,
    ("GET", "/api/groups/{group_id}/contacts"): RESOURCE,
    ("POST", "/api/groups/{group_id}/contacts"): RESOURCE,
    ("DELETE", "/api/groups/{group_id}/contacts/{contact_id}"): RESOURCE,
    ("GET", "/api/opt-outs"): LIST,
    ("POST", "/api/opt-outs"): OWN,
    # An opted-out number is named by its phone: the phone is its id.
    ("DELETE", "/api/opt-outs/{phone}"): RESOURCE,
    # The WhatsApp scheduler's messages (issue 11)
    ("GET", "/api/messages"): LIST,
    ("POST", "/api/messages"): OWN,
    # Counts of the caller's own account's messages, and its next 24 hours.
    ("GET", "/api/messages/dashboard"): SELF,
    ("GET", "/api/messages/{message_id}"): RESOURCE,
    ("PUT", "/api/messages/{message_id}"): RESOURCE,
    ("DELETE", "/api/messages/{message_id}"): RESOURCE,
    ("POST", "/api/messages/{message_id}/schedule"): RESOURCE,
    ("POST", "/api/messages/{message_id}/pause"): RESOURCE,
    ("POST", "/api/messages/{message_id}/resume"): RESOURCE,
    ("POST", "/api/messages/{message_id}/cancel"): RESOURCE,
    ("POST", "/api/messages/{message_id}/duplicate"): RESOURCE,
    ("GET", "/api/messages/{message_id}/preview"): RESOURCE,
    ("GET", "/api/messages/{message_id}/stats"): RESOURCE,
    # Exports (issue 15): a file of the caller's own. Its first type is the scheduled messages, whose
    # rows must be the member's alone; the batch types name their batch as /jobs/{job_id} and
    # /api/v1/batches/{batch_id}/export do, which are walked as resources above.
    ("GET", "/api/reports/export"): SELF,
}

# Path parameters of OWN routes that are not ids: the value to call with.
OWN_PATH_VALUES = {"use_case": "debt_collection"}
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# The contacts file each voice upload route is checked with.
VOICE_FILES = {
    "/api/v1/batches/excel/preview": "chile_cobranza_basica.xlsx",
    "/api/v1/batches/excel/create": "chile_cobranza_basica.xlsx",
    "/api/v1/batches/chile/{use_case}": "chile_cobranza_basica.xlsx",
    "/api/v1/batches/argentina/{use_case}": "argentina.csv",
}

# Known isolation bugs: (method, path) -> reason. Such cases run as strict xfails, so the
# fix turns them red until the entry goes.
KNOWN_BUGS: dict[tuple[str, str], str] = {}

# Bodies the schema alone cannot make valid (a validator beyond the schema), by schema name.
BODIES: dict[str, dict[str, Any]] = {
    "Credit": {"credits": 1, "reason": "isolation"},
    "Adjustment": {"credits": 1, "reason": "isolation"},
    "AccountPatch": {"account_name": "taken over"},
    "DeviceUpdate": {"device_name": "taken over"},
    "StatusChange": {"reason": "isolation"},
    # At least one contact; which does not matter, the group named is another account's.
    "GroupContactsAdd": {"contact_ids": ["1"]},
}


@dataclass
class World:
    doc: dict[str, Any]
    ids: dict[str, list[str]]  # path parameter name -> the admin's ids of that kind
    secrets: list[str]  # strings only the admin's resources hold; a member must never read them
    # Per listing path, a query that finds the admin's resources even on a long listing (where
    # they could be past its last page); the member's listing is walked with it as well.
    narrowing: dict[str, dict[str, str]] = field(default_factory=dict)
    # Some of the secrets by what they are, for the checks that use them ("contact_phone"...).
    named: dict[str, str] = field(default_factory=dict)


def id_kind(path: str, name: str) -> str:
    """Which ids a path parameter takes. The WhatsApp sender's `/jobs/{job_id}` are bulk
    batches; the SpeechAI `/api/v1/jobs/{job_id}` are single calls."""
    if name == "device_id" and path.endswith(("/qr", "/logout", "/restart")):
        return "session_device_id"  # a WhatsApp Web (waha) device: the others have no session
    return "voice_job_id" if name == "job_id" and path.startswith("/api/v1/") else name


def voice_world(admin: httpx.Client) -> tuple[dict[str, list[str]], list[str]]:
    """A voice campaign with its jobs in the other account: its ids and its secret name."""
    name = f"iso-voice-{uuid.uuid4().hex[:8]}"
    with (FIXTURES / "chile_cobranza_basica.xlsx").open("rb") as f:
        r = admin.post(
            "/api/v1/batches/excel/create",
            files={"file": ("iso.xlsx", f, "application/octet-stream")},
            data={"account_id": OTHER_ACCOUNT, "batch_name": name, "allow_duplicates": "true"},
        )
    assert r.status_code == 200, r.text
    batch = r.json()["batch"]
    r = admin.get(f"/api/v1/batches/{batch['batch_id']}/jobs", params={"limit": 1})
    assert r.status_code == 200 and r.json(), r.text
    job = r.json()[0]
    ids = {"batch_id": [batch["batch_id"], batch["_id"]], "voice_job_id": [job["job_id"], job["_id"]]}
    return ids, [name]


def mobile() -> str:
    """A random valid Chilean mobile, +5695 and seven digits (other modules mostly use +5698)."""
    return f"+5695{random.randrange(10**7):07d}"


def scheduler_world(
    admin: httpx.Client,
) -> tuple[dict[str, list[str]], dict[str, str], dict[str, dict[str, str]]]:
    """In the admin's own account: a contact in a group, a draft message to that group and an
    opted-out number. Their ids, their secret names, phones and text, and the searches that
    find them in the admin's listings (contacts are listed oldest first, groups by name)."""
    tag = uuid.uuid4().hex[:8]
    name, group_name, content = f"iso-contact-{tag}", f"iso-group-{tag}", f"iso-message-{tag}"
    phone, opted_out = mobile(), mobile()
    r = admin.post("/api/contacts", json={"name": name, "phone": phone})
    assert r.status_code == 201 and r.json()["account_id"] == "default", r.text
    contact_id = r.json()["id"]
    r = admin.post("/api/groups", json={"name": group_name})
    assert r.status_code == 201, r.text
    group_id = r.json()["id"]
    r = admin.post(f"/api/groups/{group_id}/contacts", json={"contact_ids": [contact_id]})
    assert r.status_code == 200 and r.json()["added"] == 1, r.text
    r = admin.post("/api/messages", json={"content": f"{content} {{{{name}}}}", "group_ids": [group_id]})
    assert r.status_code == 201 and [g["id"] for g in r.json()["groups"]] == [group_id], r.text
    message_id = r.json()["id"]
    r = admin.post("/api/opt-outs", json={"phone": opted_out})
    assert r.status_code == 201 and r.json()["created"] is True, r.text
    ids = {"contact_id": [contact_id], "group_id": [group_id], "message_id": [message_id], "phone": [opted_out]}
    narrowing = {"/api/contacts": {"search": name}, "/api/groups": {"search": group_name}}
    named = {"contact_name": name, "contact_phone": phone, "group_name": group_name, "content": content}
    return ids, {**named, "opted_out": opted_out}, narrowing


def scheduler_cleanup(admin: httpx.Client, ids: dict[str, list[str]]) -> None:
    admin.delete(f"/api/messages/{ids['message_id'][0]}")
    admin.delete(f"/api/groups/{ids['group_id'][0]}")
    admin.delete(f"/api/contacts/{ids['contact_id'][0]}")
    admin.delete(f"/api/opt-outs/{ids['phone'][0]}")


def _client(base_url: str, headers: dict[str, str]) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers=headers, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def world(base_url: str) -> Iterator[World]:
    """As admin: a device, a finished bulk job, an account, API keys, a voice campaign, and the
    scheduler's contact, group, message and opt-out, all outside "acme"."""
    with _client(base_url, ADMIN) as admin:
        for account_id, name in ((MEMBER_ACCOUNT, "Acme"), (OTHER_ACCOUNT, "Isolation other")):
            r = admin.post("/api/v1/accounts", json={"account_id": account_id, "account_name": name})
            assert r.status_code in (200, 409), r.text
            # Credit for the voice campaigns created below (their cost is checked against it).
            r = admin.post(f"/api/v1/accounts/{account_id}/topup", json={"credits": 100})
            assert r.status_code in (200, 201), r.text

        token = f"iso-tok-{uuid.uuid4().hex[:8]}"
        r = admin.post("/devices", json={"token": token, "secret": "iso-secret-value", "rate_per_minute": 0})
        assert r.status_code == 200, r.text
        device_id = str(r.json()["device"]["id"])
        # A WhatsApp Web device (the suite's local WAHA): its QR shows once its session starts.
        r = admin.post("/devices", json={"provider": "waha", "status": "inactive"})
        assert r.status_code == 200, r.text
        session_device_id = str(r.json()["device"]["id"])
        deadline = time.monotonic() + 15
        while admin.get(f"/devices/{session_device_id}/qr").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        file_name = f"iso-{uuid.uuid4().hex[:8]}.csv"
        r = admin.post(
            "/messages/send-bulk-file",
            files={"file": (file_name, b"phone|@valor1\n+56990000001|x\n", "text/csv")},
            data={"message": "Hola @valor1", "devices_limit": "1"},
        )
        assert r.status_code == 200, r.text
        job_id = r.json()["job"]["id"]

        keys = []
        for account_id in ("default", OTHER_ACCOUNT):
            r = admin.post("/api/auth/api-keys", json={"name": "iso", "account_id": account_id})
            assert r.status_code == 201, r.text
            keys.append(r.json()["id"])

        # The finished job notifies the admin's account.
        notification_id = ""
        deadline = time.monotonic() + 20
        while not notification_id and time.monotonic() < deadline:
            for n in admin.get("/api/notifications", params={"limit": 500}).json():
                if str(n.get("data", {}).get("job_id")) == job_id:
                    notification_id = str(n["id"])
                    break
            else:
                time.sleep(0.2)
        assert notification_id, f"no notification for job {job_id}"

        voice_ids, voice_secrets = voice_world(admin)
        book_ids, named, narrowing = scheduler_world(admin)

        doc = admin.get("/openapi.json").json()
        try:
            yield World(
                doc=doc,
                ids={
                    "device_id": [device_id],
                    "session_device_id": [session_device_id],
                    "job_id": [job_id],
                    "account_id": ["default", OTHER_ACCOUNT],
                    "key_id": keys,
                    "notification_id": [notification_id],
                    **voice_ids,
                    **book_ids,
                },
                secrets=[token, file_name, *voice_secrets, *named.values()],
                narrowing=narrowing,
                named=named,
            )
        finally:
            scheduler_cleanup(admin, book_ids)
            admin.put(f"/devices/{device_id}", json={"status": "inactive"})
            admin.delete(f"/devices/{session_device_id}")
            for key_id in keys:
                admin.delete(f"/api/auth/api-keys/{key_id}")


@dataclass
class Members:
    """The member's credentials, by kind, and what the socket walk needs."""

    base_url: str
    headers: dict[str, dict[str, str]]
    other_user_id: str  # a user of another account

    def fresh_jwt(self) -> dict[str, str]:
        """A session of its own, for what ends it (logout)."""
        return {"Authorization": f"Bearer {new_member(self.base_url, MEMBER_ACCOUNT)['access_token']}"}


CREDENTIALS = ("static", "jwt", "api_key")
# Refused to an API key whatever account they name (403 for its own as for another's: nothing
# told), with the reason.
NOT_FOR_API_KEYS = {("POST", "/api/auth/api-keys"): "an API key cannot create API keys"}


@pytest.fixture(scope="module")
def members(base_url: str, world: World) -> Iterator[Members]:
    with _client(base_url, ADMIN) as admin:
        r = admin.post("/api/auth/api-keys", json={"name": "iso-member", "account_id": MEMBER_ACCOUNT})
        assert r.status_code == 201, r.text
        key = r.json()
        jwt_member = new_member(base_url, MEMBER_ACCOUNT)
        other = new_member(base_url, OTHER_ACCOUNT)
        try:
            yield Members(
                base_url=base_url,
                headers={
                    "static": MEMBER,
                    "jwt": {"Authorization": f"Bearer {jwt_member['access_token']}"},
                    "api_key": {"Authorization": f"Bearer {key['key']}"},
                },
                other_user_id=str(other["user"]["id"]),
            )
        finally:
            admin.delete(f"/api/auth/api-keys/{key['id']}")


# --- the document ----------------------------------------------------------------------


def operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    methods = {"get", "put", "post", "delete", "patch", "head", "options"}
    return {
        (method.upper(), path): op
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in methods
    }


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [s for s in schema[key] if s.get("type") != "null"]
            return resolve(doc, options[0]) if options else {"type": "null"}
    return schema


def sample(doc: dict[str, Any], schema: dict[str, Any], name: str = "") -> Any:
    """A plausible value: required fields filled, the rest left out."""
    schema = resolve(doc, schema)
    if schema.get("title") in BODIES:
        return dict(BODIES[schema["title"]])
    if "enum" in schema:
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {field: sample(doc, props[field], field) for field in schema.get("required", [])}
    if kind == "array":
        return []
    if kind in ("integer", "number"):
        return max(1, schema.get("minimum", 1))
    if kind == "boolean":
        return False
    if name == "email":
        return f"iso-{uuid.uuid4().hex[:8]}@example.com"
    return "isolation-value-long-enough"


def body_schema(doc: dict[str, Any], op: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    content = op.get("requestBody", {}).get("content", {})
    for media, spec in content.items():
        return media, resolve(doc, spec.get("schema", {}))
    return None


def request_kwargs(doc: dict[str, Any], op: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Required query and header parameters, and a minimal valid body."""
    kwargs: dict[str, Any] = {"params": {}, "headers": {}}
    for p in op.get("parameters", []):
        if p["in"] == "query" and p.get("required"):
            kwargs["params"][p["name"]] = sample(doc, p.get("schema", {}), p["name"])
        if p["in"] == "header" and p["name"].lower() == "idempotency-key":
            kwargs["headers"][p["name"]] = f"iso-{uuid.uuid4().hex}"
    spec = body_schema(doc, op)
    if spec is not None:
        media, schema = spec
        body = sample(doc, schema)
        if isinstance(body, dict):
            body.update(overrides)
        if media == "application/json":
            kwargs["json"] = body
        else:
            props = schema.get("properties", {})
            binary = {k for k in body if is_binary(doc, props.get(k, {}))}
            kwargs["data"] = {k: str(v) for k, v in body.items() if k not in binary}
            if binary:
                kwargs["files"] = {k: (f"{k}.csv", b"phone\n+56990000003\n", "text/csv") for k in binary}
    return kwargs


def is_binary(doc: dict[str, Any], schema: dict[str, Any]) -> bool:
    schema = resolve(doc, schema)
    return schema.get("format") == "binary" or "contentMediaType" in schema


def path_params(op: dict[str, Any]) -> list[str]:
    return [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]


def query_params(op: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p.get("schema", {}) for p in op.get("parameters", []) if p["in"] == "query"}


def items(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, list):
        return body
    lists = [v for v in body.values() if isinstance(v, list)] if isinstance(body, dict) else []
    assert len(lists) == 1, f"cannot find the items of {body!r}"
    return lists[0]


def identifiers(item: dict[str, Any]) -> set[str]:
    keys = ("id", "_id", "job_id", "batch_id", "account_id", "key_id", "phone")  # an opt-out is its phone
    return {str(item[k]) for k in keys if k in item}


def assert_hidden(r: httpx.Response, world: World, what: str) -> None:
    assert r.status_code == 404, f"{what}: {r.status_code} {r.text[:300]}"
    # What the request named itself (an opt-out's phone in its path) may come back in "not found".
    sent = urllib.parse.unquote(str(r.request.url))
    for secret in world.secrets:
        assert secret in sent or secret not in r.text, f"{what} leaks {secret}: {r.text[:300]}"


# --- the walk ---------------------------------------------------------------------------


def test_every_route_is_classified(world: World) -> None:
    walked = set(operations(world.doc)) - PUBLIC
    unclassified = sorted(walked - set(ROUTES))
    assert not unclassified, f"routes missing from ROUTES in {__name__} (classify them): {unclassified}"
    assert len(walked) >= 25, sorted(walked)


def _case(route: tuple[str, str]) -> Any:
    marks = [pytest.mark.xfail(reason=KNOWN_BUGS[route], strict=True)] if route in KNOWN_BUGS else []
    return pytest.param(route, id=f"{route[0]} {route[1]}", marks=marks)


@pytest.mark.parametrize("credential", CREDENTIALS)
@pytest.mark.parametrize("route", [_case(r) for r in ROUTES])
def test_member_reaches_nothing_of_another_account(
    base_url: str, world: World, members: Members, route: tuple[str, str], credential: str
) -> None:
    ops = operations(world.doc)
    assert route in ops, f"{route} is classified but no longer served: remove it from ROUTES"
    op = ops[route]
    method, path = route
    kind = ROUTES[route]
    headers = members.headers[credential]
    if route == ("POST", "/api/auth/logout") and credential == "jwt":
        headers = members.fresh_jwt()  # the walk's own session goes on
    with _client(base_url, headers) as member, _client(base_url, ADMIN) as admin:
        if credential == "api_key" and route in NOT_FOR_API_KEYS:
            for account_id in [MEMBER_ACCOUNT, *world.ids["account_id"]]:
                r = member.request(method, path, **request_kwargs(world.doc, op, account_id=account_id))
                assert r.status_code == 403, f"{method} {path} for {account_id}: {r.status_code} {r.text[:300]}"
                assert r.json()["message"], r.text
            return
        if kind == RESOURCE:
            walk_resource(member, admin, world, method, path, op)
        elif kind == LIST:
            walk_list(member, admin, world, method, path, op)
        elif kind == OWN:
            walk_own(member, admin, world, method, path, op)
        elif kind == ADMIN_ONLY:
            body = {"account_id": OTHER_ACCOUNT}
            r = member.request(method, path, **request_kwargs(world.doc, op, **body))
            assert r.status_code == 403, f"{method} {path}: {r.status_code} {r.text[:300]}"
        elif kind == SELF:
            r = member.request(method, path, **request_kwargs(world.doc, op))
            assert 200 <= r.status_code < 300, f"{method} {path}: {r.status_code} {r.text[:300]}"
            for secret in world.secrets:
                assert secret not in r.text, f"{method} {path} leaks {secret}: {r.text[:300]}"
            # (A file, such as an export, is checked by the secrets above alone.)
            json_body = r.content and r.headers.get("content-type", "").startswith("application/json")
            if json_body and isinstance(r.json(), dict) and "account_id" in r.json():
                assert r.json()["account_id"] == MEMBER_ACCOUNT, r.json()
            if "account_id" in query_params(op):
                for account_id in world.ids["account_id"]:
                    kwargs = request_kwargs(world.doc, op)
                    params = {**kwargs["params"], "account_id": account_id}  # beside any required ones
                    other = member.request(method, path, **{**kwargs, "params": params})
                    assert_hidden(other, world, f"{method} {path}?account_id={account_id}")
            if (method, path) == ("POST", "/api/sync"):
                sync_reaches_nothing(member, world)
        else:  # pragma: no cover - a typo in ROUTES
            raise AssertionError(f"unknown kind {kind!r}")


def socket_answer(url: str, headers: dict[str, str]) -> tuple[list[dict[str, Any]], int | None]:
    """A socket's first frame, and when that is an error, the code of the close frame after it
    (None: left open, or a frame came instead). The close frame itself is awaited, not the end
    of the connection behind Envoy, which takes a second longer."""
    with connect(url, additional_headers=headers, open_timeout=10, close_timeout=0.2) as ws:
        frames = [json.loads(ws.recv(timeout=10))]
        if frames[0].get("type") != "error":
            return frames, None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if ws.protocol.close_rcvd is not None:
                return frames, ws.protocol.close_rcvd.code
            try:
                frames.append(json.loads(ws.recv(timeout=0.02)))  # anything after the error fails the test
                return frames, None
            except TimeoutError:
                continue
            except ConnectionClosed as exc:
                return frames, exc.rcvd.code if exc.rcvd else None
    return frames, None


@pytest.mark.parametrize("credential", CREDENTIALS)
def test_sockets_reach_nothing_of_another_account(
    base_url: str, world: World, members: Members, credential: str
) -> None:
    ws_url = base_url.replace("http", "ws", 1)
    headers = members.headers[credential]
    # Another account's bulk job: "not found" (or refused), never its snapshot.
    for job_id in world.ids["job_id"]:
        frames, code = socket_answer(f"{ws_url}/ws/job/{job_id}", headers)
        assert code in (4404, 4401), f"/ws/job/{job_id} as {credential}: closed {code}, sent {frames}"
        assert [f.get("type") for f in frames] == ["error"], f"/ws/job/{job_id} as {credential}: {frames}"
        for secret in world.secrets:
            assert secret not in json.dumps(frames), f"/ws/job/{job_id} leaks {secret}: {frames}"
    # Another user's notifications: a user is refused; a token that is no user (operator, API
    # key) gets its own account's, whatever user the path names.
    frames, code = socket_answer(f"{ws_url}/ws/{members.other_user_id}", headers)
    if credential == "jwt":
        assert code in (4403, 4404), f"/ws/<another user> as {credential}: closed {code}, sent {frames}"
        assert [f.get("type") for f in frames] == ["error"], frames
    else:
        assert code is None or code in (4401, 4403, 4404), f"/ws/<another user> as {credential}: {code} {frames}"
        for frame in frames:
            assert frame.get("account_id") in (None, MEMBER_ACCOUNT), f"/ws/<another user> as {credential}: {frame}"
    for secret in world.secrets:
        assert secret not in json.dumps(frames), f"/ws/<another user> leaks {secret}: {frames}"


def sync_reaches_nothing(member: httpx.Client, world: World) -> None:
    """Queued operations run as the caller: those naming another account's resources are each
    "not found" there too."""
    ids = {k: v[0] for k, v in world.ids.items()}
    operations = [
        ("PUT", f"/api/contacts/{ids['contact_id']}", {"name": "taken over"}),
        ("POST", f"/api/groups/{ids['group_id']}/contacts", {"contact_ids": ["1"]}),
        ("DELETE", f"/api/groups/{ids['group_id']}/contacts/{ids['contact_id']}", None),
        ("POST", f"/api/messages/{ids['message_id']}/cancel", None),
        ("DELETE", f"/api/opt-outs/{ids['phone']}", None),
        ("POST", "/api/contacts", {"phone": "+56950000000", "account_id": "default"}),
    ]
    queued = [{"client_op_id": f"iso-{uuid.uuid4().hex}", "method": m, "path": p, "body": b} for m, p, b in operations]
    r = member.post("/api/sync", json={"operations": queued})
    assert r.status_code == 200, r.text
    for (method, path, _), result in zip(operations, r.json()["results"], strict=True):
        assert result["status"] == 404, f"sync {method} {path}: {result}"
        for secret in world.secrets:
            assert secret in path or secret not in str(result), f"sync {method} {path} leaks {secret}: {result}"


def walk_resource(
    member: httpx.Client, admin: httpx.Client, world: World, method: str, path: str, op: dict[str, Any]
) -> None:
    names = path_params(op)
    kinds = [id_kind(path, n) for n in names]
    missing = [k for k in kinds if k not in world.ids]
    assert not missing, f"{method} {path}: no foreign ids for {missing}; create such a resource in `world`"
    choices = []
    for name, kind in zip(names, kinds, strict=True):
        ids = world.ids[kind]
        # Never let a changing call on "default" through should isolation fail: the rest of
        # the suite works in that account. "iso-other" stands for it.
        if name == "account_id" and method != "GET":
            ids = [OTHER_ACCOUNT]
        choices.append(ids)
    for values in itertools.product(*choices):
        url = path
        for name, value in zip(names, values, strict=True):
            url = url.replace("{" + name + "}", str(value))
        if method == "GET":  # not vacuous: the resource is there, for its own side
            seen = admin.get(url)
            assert seen.status_code == 200, f"admin {method} {url}: {seen.status_code} {seen.text[:300]}"
        r = member.request(method, url, **request_kwargs(world.doc, op))
        assert_hidden(r, world, f"{method} {url}")
        if "account_id" in query_params(op):
            # The resource's own account named beside it (the id is the admin's: a change that
            # got through would reach only the world's resource).
            for account_id in world.ids["account_id"]:
                kwargs = request_kwargs(world.doc, op)
                kwargs["params"] = {**kwargs["params"], "account_id": account_id}
                r = member.request(method, url, **kwargs)
                assert_hidden(r, world, f"{method} {url}?account_id={account_id}")


def walk_list(
    member: httpx.Client, admin: httpx.Client, world: World, method: str, path: str, op: dict[str, Any]
) -> None:
    # The kind of item listed: the path parameter of the list's one-item sibling route.
    kinds = [n for (_, p), o in operations(world.doc).items() for n in path_params(o) if p == f"{path}/{{{n}}}"]
    kinds = sorted({id_kind(path, n) for n in kinds})
    assert len(kinds) == 1, f"{path}: cannot tell what it lists ({kinds})"
    foreign = set(world.ids[kinds[0]])
    params: dict[str, Any] = {}
    query = query_params(op)
    if "limit" in query:
        params["limit"] = resolve(world.doc, query["limit"]).get("maximum", 100)
    narrowing = world.narrowing.get(path, {})
    # Not vacuous: the admin's listing holds some of the admin's resources.
    seen = admin.request(method, path, params={**params, **narrowing})
    assert seen.status_code == 200, seen.text
    assert {i for item in items(seen.json()) for i in identifiers(item)} & foreign, (
        f"admin's {path} shows none of {foreign}"
    )
    for extra in [{}, narrowing] if narrowing else [{}]:
        r = member.request(method, path, params={**params, **extra})
        assert r.status_code == 200, f"{method} {path} {extra}: {r.status_code} {r.text[:300]}"
        for item in items(r.json()):
            assert not identifiers(item) & foreign, f"{method} {path} {extra} shows another account's {item}"
            if "account_id" in item:
                assert item["account_id"] == MEMBER_ACCOUNT, f"{method} {path} {extra} shows {item}"
        for secret in world.secrets:
            assert secret not in r.text, f"{method} {path} {extra} leaks {secret}"
    # A filter naming another account's resource (contacts of its group) finds it not.
    for name in sorted(set(query) & set(world.ids) - {"account_id"}):
        for value in world.ids[name]:
            other = member.request(method, path, params={**params, name: value})
            assert_hidden(other, world, f"{method} {path}?{name}={value}")
    if "account_id" in query:
        for account_id in world.ids["account_id"]:
            other = member.request(method, path, params={**params, "account_id": account_id})
            assert_hidden(other, world, f"{method} {path}?account_id={account_id}")


def walk_own(
    member: httpx.Client, admin: httpx.Client, world: World, method: str, path: str, op: dict[str, Any]
) -> None:
    url = path
    for name in path_params(op):
        url = url.replace("{" + name + "}", OWN_PATH_VALUES[name])
    spec = body_schema(world.doc, op)
    if spec is not None and "account_id" in spec[1].get("properties", {}):
        for account_id in world.ids["account_id"]:
            r = member.request(method, url, **request_kwargs(world.doc, op, account_id=account_id))
            assert_hidden(r, world, f"{method} {url} for account {account_id}")
    if path in VOICE_FILES:
        own_voice_upload(member, method, path, url)
    elif (method, path) == ("POST", "/api/v1/batches"):
        r = member.post(path, json={"name": "iso-own"})
        assert r.status_code == 200 and r.json()["account_id"] == MEMBER_ACCOUNT, r.text
        assert member.get(f"/api/v1/batches/{r.json()['_id']}").status_code == 200
        assert member.delete(f"/api/v1/batches/{r.json()['batch_id']}").status_code == 200
    elif (method, path) == ("POST", "/api/auth/api-keys"):
        r = member.post(path, json={"name": "iso-own"})
        assert r.status_code == 201 and r.json()["account_id"] == MEMBER_ACCOUNT, r.text
        assert member.delete(f"/api/auth/api-keys/{r.json()['id']}").status_code == 204
    elif (method, path) == ("POST", "/devices"):
        r = member.post(path, json={"token": f"iso-own-{uuid.uuid4().hex[:8]}", "secret": "s", "status": "inactive"})
        assert r.status_code == 200, r.text
        own = r.json()["device"]["id"]
        assert own not in [int(i) for i in world.ids["device_id"]]
        assert member.get(f"/devices/{own}").status_code == 200
        assert member.delete(f"/devices/{own}").status_code == 200
    elif (method, path) == ("POST", "/messages/send-bulk-file"):
        r = member.post(
            path,
            files={"file": ("own.csv", b"phone|@valor1\n+56990000002|x\n", "text/csv")},
            data={"message": "Hola @valor1", "devices_limit": "1"},
        )
        # 400 when "acme" has no active device of its own (other modules may have given it some);
        # when it runs, the job is the member's own.
        assert r.status_code in (200, 400), f"{method} {path}: {r.status_code} {r.text[:300]}"
        if r.status_code == 200:
            own_job = str(r.json()["job"]["id"])
            assert own_job not in world.ids["job_id"]
            assert member.get(f"/jobs/{own_job}").status_code == 200
            member.post(f"/jobs/{own_job}/cancel")
    elif path in OWN_SCHEDULER:
        OWN_SCHEDULER[path](member, admin, world)
    else:
        raise AssertionError(f"{method} {path} is OWN but has no check here; add one")


def own_voice_upload(member: httpx.Client, method: str, path: str, url: str) -> None:
    """The member's own file lands in its own account (a preview creates nothing)."""
    with (FIXTURES / VOICE_FILES[path]).open("rb") as f:
        r = member.request(
            method,
            url,
            files={"file": (VOICE_FILES[path], f, "application/octet-stream")},
            data={"batch_name": "iso-own", "allow_duplicates": "true"},
        )
    assert r.status_code == 200, f"{method} {url}: {r.status_code} {r.text[:300]}"
    if path.endswith("/preview"):
        assert r.json()["total_rows"] > 0, r.text
        return
    batch = r.json()["batch"]
    assert batch["account_id"] == MEMBER_ACCOUNT, batch
    assert member.get(f"/api/v1/batches/{batch['_id']}").status_code == 200
    assert member.delete(f"/api/v1/batches/{batch['batch_id']}", params={"delete_jobs": "true"}).status_code == 200


# --- the scheduler's creates: the member's own, and nothing of another account's joins them ----


def own_contact(member: httpx.Client, admin: httpx.Client, world: World) -> None:
    # The admin's contact's phone is another contact here: no 409 naming theirs.
    r = member.post("/api/contacts", json={"name": "iso-own", "phone": world.named["contact_phone"]})
    assert r.status_code == 201 and r.json()["account_id"] == MEMBER_ACCOUNT, r.text
    own = r.json()["id"]
    try:
        assert own not in world.ids["contact_id"]
        assert member.get(f"/api/contacts/{own}").status_code == 200
    finally:
        assert member.delete(f"/api/contacts/{own}").status_code == 204
    for group_id in world.ids["group_id"]:
        r = member.post("/api/contacts", json={"phone": mobile(), "groups": [group_id]})
        assert_hidden(r, world, f"POST /api/contacts into group {group_id}")
        assert admin.get(f"/api/groups/{group_id}").json()["contact_count"] == 1


def own_import(member: httpx.Client, admin: httpx.Client, world: World) -> None:
    name = f"iso-own-{uuid.uuid4().hex[:8]}"
    csv = f"name,phone\n{name},{mobile()}\n".encode()
    r = member.post("/api/contacts/import", files={"file": ("own.csv", csv, "text/csv")})
    assert r.status_code == 200, r.text
    assert (r.json()["created"], r.json()["invalid"]) == (1, 0), r.text
    (own,) = [c for c in member.get("/api/contacts", params={"search": name}).json() if c["name"] == name]
    assert own["account_id"] == MEMBER_ACCOUNT and own["id"] not in world.ids["contact_id"], own
    assert member.delete(f"/api/contacts/{own['id']}").status_code == 204
    for group_id in world.ids["group_id"]:
        r = member.post(
            "/api/contacts/import", files={"file": ("own.csv", csv, "text/csv")}, data={"group_id": group_id}
        )
        assert_hidden(r, world, f"POST /api/contacts/import into group {group_id}")
        assert admin.get(f"/api/groups/{group_id}").json()["contact_count"] == 1
    assert member.get("/api/contacts", params={"search": name}).json() == []


def own_group(member: httpx.Client, admin: httpx.Client, world: World) -> None:
    # Names are unique per account: the admin's group's name is free here, and no 409 says so.
    r = member.post("/api/groups", json={"name": world.named["group_name"]})
    assert r.status_code == 201 and r.json()["account_id"] == MEMBER_ACCOUNT, r.text
    own = r.json()["id"]
    try:
        assert own not in world.ids["group_id"]
        # Another account's contact neither joins the member's group nor leaves it.
        for contact_id in world.ids["contact_id"]:
            r = member.post(f"/api/groups/{own}/contacts", json={"contact_ids": [contact_id]})
            assert_hidden(r, world, f"POST /api/groups/{own}/contacts with contact {contact_id}")
            r = member.delete(f"/api/groups/{own}/contacts/{contact_id}")
            assert_hidden(r, world, f"DELETE /api/groups/{own}/contacts/{contact_id}")
        assert member.get(f"/api/groups/{own}").json()["contact_count"] == 0
    finally:
        assert member.delete(f"/api/groups/{own}").status_code == 204


def own_opt_out(member: httpx.Client, admin: httpx.Client, world: World) -> None:
    number = mobile()
    r = member.post("/api/opt-outs", json={"phone": number})
    assert r.status_code == 201 and r.json()["account_id"] == MEMBER_ACCOUNT, r.text
    assert number in [o["phone"] for o in member.get("/api/opt-outs", params={"limit": 1000}).json()]
    assert member.delete(f"/api/opt-outs/{number}").status_code == 204
    # A number the admin's account opted out is new here: "created" tells nothing of theirs.
    for phone in world.ids["phone"]:
        r = member.post("/api/opt-outs", json={"phone": phone})
        assert r.status_code == 201 and r.json()["account_id"] == MEMBER_ACCOUNT, r.text
        assert r.json()["created"] is True, f"another account's opt-out of {phone} shows: {r.text}"
        assert member.delete(f"/api/opt-outs/{phone}").status_code == 204


def own_message(member: httpx.Client, admin: httpx.Client, world: World) -> None:
    r = member.post("/api/messages", json={"content": "iso-own"})
    assert r.status_code == 201, r.text
    own = r.json()["id"]
    try:
        assert own not in world.ids["message_id"]
        assert member.get(f"/api/messages/{own}").status_code == 200
        # Another account's group, as a recipient list, is answered as one that does not exist:
        # through a preview it would show that account's contacts.
        absent = "900000000000000000"  # a well-formed id no group has
        for group_id in world.ids["group_id"]:
            for method, url, body in (
                ("POST", "/api/messages", {"content": "iso-own"}),
                ("PUT", f"/api/messages/{own}", {}),
            ):
                r = member.request(method, url, json={**body, "group_ids": [group_id]})
                nothing = member.request(method, url, json={**body, "group_ids": [absent]})
                what = f"{method} {url} with group {group_id}"
                assert r.status_code in (400, 404), f"{what}: {r.status_code} {r.text[:300]}"
                assert r.status_code == nothing.status_code, (r.text, nothing.text)
                assert r.json()["message"].replace(group_id, absent) == nothing.json()["message"], (
                    r.text,
                    nothing.text,
                )
                for secret in world.secrets:
                    assert secret not in r.text, f"{what} leaks {secret}: {r.text[:300]}"
        assert member.get(f"/api/messages/{own}").json()["groups"] == []
        preview = member.get(f"/api/messages/{own}/preview")
        assert preview.status_code == 200 and preview.json()["recipient_count"] == 0, preview.text
    finally:
        assert member.delete(f"/api/messages/{own}").status_code == 204


OWN_SCHEDULER = {
    "/api/contacts": own_contact,
    "/api/contacts/import": own_import,
    "/api/groups": own_group,
    "/api/opt-outs": own_opt_out,
    "/api/messages": own_message,
}
