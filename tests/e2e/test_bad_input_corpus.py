"""The bad-input corpus (tests/corpus/, security issue "tests that must exist"), each case sent
through Envoy to the running suite: oversized and truncated bodies, zip and XML bombs, wrong
encodings, deep JSON, huge numbers, control characters, wrong content types, forged webhooks,
and expired, revoked, wrong-audience, unsigned, foreign and deleted credentials.

For each: its 4xx, the error envelope with a `message`, the gateway's and campaigns' memory
bounded while it is handled (their RSS sampled during the request), and the tables the route
would write unchanged (row counts before and after). Small cases are files of the corpus; the
big ones are made here (the workbook bombs by tests/workbook_bombs.py), a MiB at a time.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import hmac
import json
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import psutil
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from services.runtime.devstack import Stack
from tests.conftest import ADMIN_TOKEN, WABLAS_WEBHOOK_SECRET, new_member
from tests.dispatcher.fake_waha import HMAC_KEY as WAHA_HMAC_KEY
from tests.workbook_bombs import MIB, SHARED_STRINGS, SHEET, huge_shared_strings, plain_workbook, with_part

pytestmark = pytest.mark.timeout(60)

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
REPO = Path(__file__).resolve().parents[2]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ACCOUNT = f"corpus-{uuid.uuid4().hex[:8]}"
# Growth of a service's RSS while one case is handled. The bombs inflate to 80 MiB and more,
# the oversized bodies are 1 to 22 MiB: a reader that took any of them whole would pass this.
RSS_BOUND = 48 * MIB
JSON_CAP = MIB
IMPORT_CAP = 20 * MIB + MIB  # the contacts import's file, and the form around it
# Tables the routes below write, by route group.
CONTACTS = ("campaigns.contacts", "campaigns.group_members")
VOICE = ("campaigns.batches", "campaigns.voice_jobs")
LEDGER = ("accounts.ledger_entries",)
OPT_OUTS = ("campaigns.opt_outs",)


@dataclass
class World:
    """This module's account, its credentials, and what the cases are built from."""

    base_url: str
    key: dict[str, str]  # an API key of the account
    workbooks: dict[str, Path]
    tokens: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Bad:
    method: str
    path: str
    status: int | tuple[int, ...]
    tables: tuple[str, ...]
    request: Callable[[World], dict[str, Any]]  # httpx request arguments
    # "key": the account's API key; "admin": the operator's token; "none": no credential.
    auth: str = "key"


def corpus(name: str) -> bytes:
    return (CORPUS / name).read_bytes()


def raw(body: bytes | Callable[[], Iterator[bytes]], content_type: str = "application/json", **headers: str) -> Any:
    def build(world: World) -> dict[str, Any]:
        content = body() if callable(body) else body
        return {"content": content, "headers": {"Content-Type": content_type, **headers}}

    return build


def upload(workbook: str, *, path_kind: str = "voice") -> Callable[[World], dict[str, Any]]:
    def build(world: World) -> dict[str, Any]:
        data = world.workbooks[workbook].read_bytes()
        form = {"account_id": ACCOUNT, "batch_name": "corpus"} if path_kind == "voice" else {}
        return {"files": {"file": ("deudores.xlsx", data, "application/octet-stream")}, "data": form}

    return build


def endless_json(total: int) -> Callable[[], Iterator[bytes]]:
    """A JSON string that never ends, `total` bytes handed over a MiB at a time (chunked: no
    declared length)."""

    def chunks() -> Iterator[bytes]:
        sent = 0
        block = b'{"name": "' + b"x" * (MIB - 10)
        while sent < total:
            part = block[: total - sent]
            sent += len(part)
            yield part

    return chunks


def declared(total: int, content_type: str) -> Callable[[World], dict[str, Any]]:
    """A body that declares its length: refused on that alone, before it is read."""

    def build(world: World) -> dict[str, Any]:
        return {"content": b"0" * total, "headers": {"Content-Type": content_type, "Content-Length": str(total)}}

    return build


def deep(depth: int, opener: bytes, closer: bytes) -> bytes:
    return b'{"name": "deep", "phone": "+56950000090", "groups": ' + opener * depth + closer * depth + b"}"


def gzip_bomb() -> bytes:
    """64 MiB of zeros in ~64 KiB, declared as the body's Content-Encoding."""
    return gzip.compress(b"0" * (64 * MIB), compresslevel=9)


STOP = {
    "object": "whatsapp_business_account",
    "entry": [
        {
            "id": "1",
            "changes": [
                {
                    "field": "messages",
                    "value": {
                        "metadata": {"phone_number_id": "106540352242922"},
                        "messages": [{"from": "56950000089", "type": "text", "text": {"body": "STOP"}}],
                    },
                }
            ],
        }
    ],
}
WAHA_EVENT = {"event": "session.status", "session": "corpus", "payload": {"status": "WORKING"}}


def signed_whatsapp(secret: str) -> Callable[[World], dict[str, Any]]:
    def build(world: World) -> dict[str, Any]:
        body = json.dumps(STOP).encode()
        digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        return {
            "content": body,
            "headers": {"Content-Type": "application/json", "X-Hub-Signature-256": f"sha256={digest}"},
        }

    return build


def signed_waha(key: str, algorithm: str = "sha512") -> Callable[[World], dict[str, Any]]:
    def build(world: World) -> dict[str, Any]:
        body = json.dumps(WAHA_EVENT).encode()
        digest = hmac.new(key.encode(), body, getattr(hashlib, algorithm)).hexdigest()
        headers = {"Content-Type": "application/json", "X-Webhook-Hmac": digest, "X-Webhook-Hmac-Algorithm": algorithm}
        return {"content": body, "headers": headers}

    return build


def with_token(kind: str) -> Callable[[World], dict[str, Any]]:
    def build(world: World) -> dict[str, Any]:
        return {
            "json": {"name": "corpus", "phone": "+56950000088"},
            "headers": {"Authorization": f"Bearer {world.tokens[kind]}"},
        }

    return build


WEBHOOK_OK = {"status": "sent", "id": "corpus-1", "phone": "56950000089"}

CASES: dict[str, Bad] = {
    # Oversized: declared (refused on the header) and chunked (counted as it is read).
    "oversized json, declared": Bad("POST", "/api/contacts", 413, CONTACTS, declared(JSON_CAP + 1, "application/json")),
    "oversized json, chunked": Bad("POST", "/api/contacts", 413, CONTACTS, raw(endless_json(JSON_CAP + 64 * 1024))),
    "oversized import, declared": Bad(
        "POST", "/api/contacts/import", 413, CONTACTS, declared(IMPORT_CAP + 1, "multipart/form-data; boundary=x")
    ),
    "oversized webhook, chunked": Bad(
        "POST", "/webhooks/waha", 413, OPT_OUTS, raw(endless_json(256 * 1024)), auth="none"
    ),
    # Truncated.
    "truncated json": Bad("POST", "/api/contacts", 422, CONTACTS, raw(corpus("truncated.json"))),
    "truncated multipart": Bad(
        "POST",
        "/api/contacts/import",
        (400, 422),
        CONTACTS,
        raw(corpus("truncated_multipart.txt"), "multipart/form-data; boundary=c0rpus"),
    ),
    "truncated workbook": Bad("POST", "/api/v1/batches/excel/create", 400, VOICE, upload("truncated"), auth="admin"),
    # Bombs: a part that inflates to 80 MiB, entities that expand a billionfold, an external
    # entity, a body that says it is gzip.
    "zip bomb, voice upload": Bad("POST", "/api/v1/batches/excel/create", 400, VOICE, upload("zip"), auth="admin"),
    "zip bomb, contacts import": Bad("POST", "/api/contacts/import", 400, CONTACTS, upload("zip", path_kind="import")),
    "xml bomb, voice upload": Bad("POST", "/api/v1/batches/excel/create", 400, VOICE, upload("laughs"), auth="admin"),
    "xml bomb, contacts import": Bad(
        "POST", "/api/contacts/import", 400, CONTACTS, upload("laughs", path_kind="import")
    ),
    "external entity, voice upload": Bad(
        "POST", "/api/v1/batches/excel/create", 400, VOICE, upload("xxe"), auth="admin"
    ),
    "xml bomb as the body": Bad(
        "POST", "/api/contacts", 422, CONTACTS, raw(corpus("billion_laughs.xml"), "application/xml")
    ),
    "gzip bomb as the body": Bad(
        "POST",
        "/api/contacts",
        (400, 415, 422),
        CONTACTS,
        raw(gzip_bomb, "application/json", **{"Content-Encoding": "gzip"}),
    ),
    # Encodings and characters.
    "latin-1 json": Bad("POST", "/api/contacts", (400, 422), CONTACTS, raw(corpus("latin1.json"))),
    "NUL in a string": Bad("POST", "/api/contacts", (400, 422), CONTACTS, raw(corpus("nul_in_string.json"))),
    "lone surrogate": Bad("POST", "/api/contacts", (400, 422), CONTACTS, raw(corpus("lone_surrogate.json"))),
    "control characters": Bad("POST", "/api/contacts", (400, 422), CONTACTS, raw(corpus("control_chars.json"))),
    # Deep JSON: 100,000 levels in 200 KB.
    "deep json arrays": Bad("POST", "/api/contacts", (400, 422), CONTACTS, raw(deep(100_000, b"[", b"]"))),
    "deep json objects": Bad("POST", "/api/contacts", (400, 422), CONTACTS, raw(deep(60_000, b'{"a":', b"}"))),
    # Numbers.
    "5,000-digit integer": Bad(
        "POST", f"/api/v1/accounts/{ACCOUNT}/topup", (400, 422), LEDGER, raw(corpus("huge_integer.json")), auth="admin"
    ),
    "int64 overflow": Bad(
        "POST",
        f"/api/v1/accounts/{ACCOUNT}/topup",
        (400, 422),
        LEDGER,
        raw(corpus("int64_overflow.json")),
        auth="admin",
    ),
    "float overflow (1e400)": Bad(
        "POST",
        f"/api/v1/accounts/{ACCOUNT}/topup",
        (400, 422),
        LEDGER,
        raw(corpus("float_overflow.json")),
        auth="admin",
    ),
    "NaN": Bad("POST", f"/api/v1/accounts/{ACCOUNT}/topup", (400, 422), LEDGER, raw(corpus("nan.json")), auth="admin"),
    # Content types.
    "form body on a json route": Bad(
        "POST", "/api/contacts", 422, CONTACTS, raw(corpus("form_urlencoded.txt"), "application/x-www-form-urlencoded")
    ),
    "json labelled text/plain": Bad(
        "POST", "/api/contacts", 422, CONTACTS, raw(b'{"name": "corpus", "phone": "+56950000087"}', "text/plain")
    ),
    "json on an upload route": Bad(
        "POST", "/api/contacts/import", 422, CONTACTS, raw(b'{"file": "name,phone\\ncorpus,+56950000086"}')
    ),
    # Forged webhooks.
    "whatsapp, wrong secret": Bad(
        "POST", "/webhooks/whatsapp", 401, OPT_OUTS, signed_whatsapp("not-the-app-secret"), auth="none"
    ),
    "whatsapp, unsigned": Bad("POST", "/webhooks/whatsapp", 401, OPT_OUTS, raw(json.dumps(STOP).encode()), auth="none"),
    "waha, wrong key": Bad("POST", "/webhooks/waha", 401, OPT_OUTS, signed_waha("not-the-key"), auth="none"),
    "waha, right key, weaker algorithm": Bad(
        "POST", "/webhooks/waha", 401, OPT_OUTS, signed_waha(WAHA_HMAC_KEY, "sha256"), auth="none"
    ),
    "waha, unsigned": Bad("POST", "/webhooks/waha", 401, OPT_OUTS, raw(json.dumps(WAHA_EVENT).encode()), auth="none"),
    "wablas, wrong key": Bad(
        "POST",
        "/webhooks/wablas?key=not-the-secret",
        401,
        OPT_OUTS,
        lambda w: {"json": WEBHOOK_OK},
        auth="none",
    ),
    "wablas, another device's key": Bad(
        "POST",
        "/webhooks/wablas?device=2&key="
        + hmac.new(WABLAS_WEBHOOK_SECRET.encode(), b"wablas-device:1", hashlib.sha256).hexdigest(),
        401,
        OPT_OUTS,
        lambda w: {"json": WEBHOOK_OK},
        auth="none",
    ),
    # Credentials.
    "expired jwt": Bad("POST", "/api/contacts", 401, CONTACTS, with_token("expired"), auth="none"),
    "revoked (logged out) jwt": Bad("POST", "/api/contacts", 401, CONTACTS, with_token("revoked"), auth="none"),
    "wrong-audience jwt": Bad("POST", "/api/contacts", 401, CONTACTS, with_token("audience"), auth="none"),
    "alg none jwt": Bad("POST", "/api/contacts", 401, CONTACTS, with_token("none"), auth="none"),
    "jwt signed by another key": Bad("POST", "/api/contacts", 401, CONTACTS, with_token("foreign"), auth="none"),
    "deleted api key": Bad("POST", "/api/contacts", 401, CONTACTS, with_token("deleted_key"), auth="none"),
    "garbage bearer": Bad("POST", "/api/contacts", 401, CONTACTS, with_token("garbage"), auth="none"),
}


# --- the world ---------------------------------------------------------------------------


def _ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code in (200, 201), f"{r.request.method} {r.request.url}: {r.status_code} {r.text[:300]}"
    return dict(r.json())


def with_dtd(sheet: bytes, dtd_of: str) -> bytes:
    """The sheet with the corpus file's DTD in its prolog, and its last entity in a cell."""
    dtd = corpus(dtd_of).split(b"?>", 1)[1].split(b"<sst", 1)[0]
    entity = dtd.rsplit(b"<!ENTITY ", 1)[1].split(b" ", 1)[0]
    head, body = sheet.split(b"<worksheet", 1)
    return head + dtd + b"<worksheet" + body.replace(b"<t>Ana</t>", b"<t>&" + entity + b";</t>")


def workbooks(tmp: Path) -> dict[str, Path]:
    plain = plain_workbook(tmp / "plain.xlsx")
    data = plain.read_bytes()
    (tmp / "truncated.xlsx").write_bytes(data[: len(data) // 2])
    with zipfile.ZipFile(plain) as z:
        sheet = z.read(SHEET)
    return {
        "truncated": tmp / "truncated.xlsx",
        "zip": with_part(plain, tmp / "zip.xlsx", SHARED_STRINGS, huge_shared_strings(80 * MIB)),
        "laughs": with_part(plain, tmp / "laughs.xlsx", SHEET, [with_dtd(sheet, "billion_laughs.xml")]),
        "xxe": with_part(plain, tmp / "xxe.xlsx", SHEET, [with_dtd(sheet, "external_entity.xml")]),
    }


def suite_signing_key(base_url: str) -> tuple[Any, str, str] | None:
    """The key the suite's accounts service signs with (development: kept in its data folder),
    when this machine holds it and it is the published one: (key, algorithm, kid)."""
    from services.accounts.auth import signing_key_from_pem

    published = {k["kid"] for k in httpx.get(f"{base_url}/.well-known/jwks.json").json()["keys"]}
    for path in (REPO / ".data" / "jwt_signing_key.pem",):
        if path.exists():
            key = signing_key_from_pem(path.read_text())
            if key.kid in published:
                return key.private_key, key.algorithm, key.kid
    return None


def forged_tokens(base_url: str, access_token: str) -> dict[str, str]:
    """Tokens with a real session's claims: expired, for another audience (both signed with the
    suite's own key when it is at hand, else with another: 401 either way, for a weaker
    reason), unsigned (`alg: none`), and signed by a key of nobody's under the suite's kid."""
    claims = jwt.decode(access_token, options={"verify_signature": False})
    kid = jwt.get_unverified_header(access_token).get("kid", "")
    foreign = ed25519.Ed25519PrivateKey.generate()
    own = suite_signing_key(base_url)
    key, algorithm = (own[0], own[1]) if own else (foreign, "EdDSA")
    now = int(time.time())
    expired = {**claims, "iat": now - 7200, "exp": now - 3600}
    audience = {**claims, "aud": "https://not-pregonero.example", "iat": now, "exp": now + 600}
    header = {"kid": kid}
    unsigned = (
        base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode()).rstrip(b"=").decode()
        + "."
        + base64.urlsafe_b64encode(json.dumps({**claims, "exp": now + 600}).encode()).rstrip(b"=").decode()
        + "."
    )
    return {
        "expired": jwt.encode(expired, key, algorithm=algorithm, headers=header),
        "audience": jwt.encode(audience, key, algorithm=algorithm, headers=header),
        "none": unsigned,
        "foreign": jwt.encode({**claims, "exp": now + 600}, foreign, algorithm="EdDSA", headers=header),
        "garbage": "eyJhbGciOiJFZERTQSJ9.not-base64!.x",
    }


@pytest.fixture(scope="module")
def world(base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with httpx.Client(base_url=base_url, headers=ADMIN, timeout=30) as admin:
        _ok(admin.post("/api/v1/accounts", json={"account_id": ACCOUNT, "account_name": "Bad-input corpus"}))
        _ok(admin.post(f"/api/v1/accounts/{ACCOUNT}/topup", json={"credits": 100}))
        key = _ok(admin.post("/api/auth/api-keys", json={"name": "corpus", "account_id": ACCOUNT}))
        doomed = _ok(admin.post("/api/auth/api-keys", json={"name": "corpus-deleted", "account_id": ACCOUNT}))
        assert admin.delete(f"/api/auth/api-keys/{doomed['id']}").status_code == 204
        member = new_member(base_url, ACCOUNT)
        revoked = new_member(base_url, ACCOUNT)
        bearer = {"Authorization": f"Bearer {revoked['access_token']}"}
        assert admin.get("/api/auth/me", headers=bearer).status_code == 200
        assert admin.post("/api/auth/logout", headers=bearer).status_code == 204
        tokens = {
            **forged_tokens(base_url, member["access_token"]),
            "revoked": revoked["access_token"],
            "deleted_key": doomed["key"],
        }
        yield World(
            base_url=base_url,
            key={"Authorization": f"Bearer {key['key']}"},
            workbooks=workbooks(tmp_path_factory.mktemp("corpus")),
            tokens=tokens,
        )


# --- the checks --------------------------------------------------------------------------


class PeakRss:
    """The highest RSS of each process while inside, sampled every 5 ms."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.base = {name: p.memory_info().rss for name, p in self.procs.items()}
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            for name, p in self.procs.items():
                self.peak[name] = max(self.peak[name], p.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def growth(self) -> dict[str, int]:
        return {name: self.peak[name] - self.base[name] for name in self.procs}


async def _counts(database_url: str, tables: tuple[str, ...]) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        # Table names from CASES above, never from input.
        return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in tables}
    finally:
        await conn.close()


def counts(suite: Stack, tables: tuple[str, ...]) -> dict[str, int]:
    return asyncio.run(_counts(suite.database_url, tables))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_with_a_message_and_changes_nothing(suite: Stack, world: World, name: str) -> None:
    case = CASES[name]
    kwargs = case.request(world)
    headers = {**{"key": world.key, "admin": ADMIN, "none": {}}[case.auth], **kwargs.pop("headers", {})}
    before = counts(suite, case.tables)
    pids = {n: suite.service_procs[n].popen.pid for n in ("gateway", "campaigns")}
    with httpx.Client(base_url=world.base_url, timeout=30) as client, PeakRss(pids) as rss:
        r = client.request(case.method, case.path, headers=headers, **kwargs)
    expected = case.status if isinstance(case.status, tuple) else (case.status,)
    assert r.status_code in expected, f"{name}: {r.status_code} {r.text[:300]}"
    assert r.headers.get("content-type", "").startswith("application/json"), f"{name}: {r.headers}"
    body = r.json()
    assert isinstance(body.get("message"), str) and body["message"] and body.get("code"), f"{name}: {body}"
    growth = rss.growth()
    print(f"{name}: {r.status_code} {body['message'][:120]!r}; RSS +{ {k: v // 1024 for k, v in growth.items()} } KiB")
    assert all(g < RSS_BOUND for g in growth.values()), f"{name}: RSS grew {growth}"
    # Whatever the answer, nothing was written (a refusal after a write would show here).
    time.sleep(0.05)
    assert counts(suite, case.tables) == before, f"{name}: {case.tables} changed"
