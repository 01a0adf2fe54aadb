"""Authentication as a client meets it, through Envoy: users, login, refresh rotation and
replay, logout, the published key set, API keys and the login limit."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
from pregonero.accounts.v1 import accounts_pb2, accounts_pb2_grpc

from services.runtime.devstack import Stack, envoy_binary, free_port, http_ok, spawn, wait_until
from services.runtime.identity import ADMIN as ADMIN_ROLE
from services.runtime.identity import Caller
from tests.conftest import ADMIN_TOKEN, MEMBER_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PASSWORD = "a long enough password"
# The gateway's documented bound on how late a revocation reaches every replica, plus slack.
REVOCATION_BOUND_S = 6.0
ENVOY_API = "type.googleapis.com/envoy.extensions"


@pytest.fixture(scope="module")
def account(suite: Stack) -> str:
    """An account of this module's own (created over gRPC, as the operator would)."""
    account_id = f"e2e-auth-{uuid.uuid4().hex[:8]}"
    caller = Caller(role=ADMIN_ROLE, account_id="default", user_id="e2e")
    md = suite.keyring("gateway").sign_metadata("accounts", caller.metadata())
    with grpc.insecure_channel(suite.addrs["accounts"]) as channel:
        accounts_pb2_grpc.AccountsServiceStub(channel).EnsureAccount(
            accounts_pb2.CreateAccountRequest(account_id=account_id, account_name="E2E auth"), metadata=md, timeout=10
        )
    return account_id


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def new_user(base_url: str, account: str | None, role: str = "member") -> str:
    email = f"u-{uuid.uuid4().hex[:10]}@Example.com"
    r = httpx.post(
        f"{base_url}/api/auth/users",
        headers=ADMIN,
        json={"email": email, "password": PASSWORD, "role": role, "account_id": account},
    )
    assert r.status_code == 201, r.text
    assert r.json()["email"] == email and r.json()["role"] == role
    return email


def login(url: str, email: str, password: str = PASSWORD, client: str | None = None) -> httpx.Response:
    headers = {"X-Forwarded-For": client} if client else {}
    return httpx.post(f"{url}/api/auth/login", json={"email": email, "password": password}, headers=headers)


def tokens(base_url: str, email: str) -> dict[str, Any]:
    r = login(base_url, email)
    assert r.status_code == 200, r.text
    return r.json()


def refresh(base_url: str, token: str) -> httpx.Response:
    return httpx.post(f"{base_url}/api/auth/refresh", json={"refresh_token": token})


def me(base_url: str, access: str) -> httpx.Response:
    return httpx.get(f"{base_url}/api/auth/me", headers=bearer(access))


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"detail", "message", "code"} and body["code"] == code and body["message"]


def eventually_401(call: Callable[[], httpx.Response]) -> None:
    deadline = time.monotonic() + REVOCATION_BOUND_S
    while (r := call()).status_code != 401:
        assert r.status_code == 200, r.text
        assert time.monotonic() < deadline, f"still accepted {REVOCATION_BOUND_S}s after the revocation"
        time.sleep(0.2)
    assert_error(r, 401, "unauthorized")


def test_login_me_refresh_and_a_replayed_refresh_token_ends_the_family(base_url: str, account: str) -> None:
    email = new_user(base_url, account)
    first = tokens(base_url, email.lower())  # e-mail matching ignores case
    assert first["token_type"] == "bearer" and first["expires_in"] == 900
    user = first["user"]
    assert user["email"] == email and user["role"] == "member" and user["account_id"] == account and user["id"]

    r = me(base_url, first["access_token"])
    assert r.status_code == 200, r.text
    assert r.json()["id"] == user["id"] and r.json()["user_id"] == user["id"]
    assert r.json()["email"] == email and r.json()["account_id"] == account

    r = refresh(base_url, first["refresh_token"])
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["refresh_token"] != first["refresh_token"] and second["user"]["id"] == user["id"]
    assert me(base_url, second["access_token"]).status_code == 200
    assert me(base_url, first["access_token"]).status_code == 200  # same session, not expired

    assert_error(refresh(base_url, first["refresh_token"]), 401, "unauthorized")  # replayed
    # Everything of that family is dead: both access tokens and the newest refresh token.
    eventually_401(lambda: me(base_url, first["access_token"]))
    eventually_401(lambda: me(base_url, second["access_token"]))
    assert_error(refresh(base_url, second["refresh_token"]), 401, "unauthorized")
    # The user can still log in again: a new family.
    assert me(base_url, tokens(base_url, email)["access_token"]).status_code == 200


def test_logout_ends_the_session_and_its_refresh_token(base_url: str, account: str) -> None:
    email = new_user(base_url, account)
    session = tokens(base_url, email)
    other = tokens(base_url, email)
    r = httpx.post(f"{base_url}/api/auth/logout", headers=bearer(session["access_token"]))
    assert r.status_code == 204, r.text
    eventually_401(lambda: me(base_url, session["access_token"]))
    assert_error(refresh(base_url, session["refresh_token"]), 401, "unauthorized")
    assert me(base_url, other["access_token"]).status_code == 200  # another session of the user lives on

    r = httpx.post(f"{base_url}/api/auth/logout", json={"refresh_token": other["refresh_token"]})
    assert r.status_code == 204, r.text
    eventually_401(lambda: me(base_url, other["access_token"]))
    assert_error(httpx.post(f"{base_url}/api/auth/logout"), 401, "unauthorized")


# Through Envoy every client on this machine has the host's own address (Envoy writes that
# for loopback peers), so failed logins there would lock out every other test. The tests that
# fail logins talk to the gateway directly, from the loopback it trusts as a proxy, and play
# clients of their own with X-Forwarded-For.


@pytest.fixture(scope="module")
def gateway_url(suite: Stack) -> str:
    return f"http://127.0.0.1:{suite.gateway_port}"


def client_address() -> str:
    n = uuid.uuid4().int
    return f"203.0.{n % 250}.{(n >> 8) % 250 + 1}"


def test_wrong_passwords_and_unknown_users_get_the_same_401(gateway_url: str, base_url: str, account: str) -> None:
    email = new_user(base_url, account)
    client = client_address()
    wrong = login(gateway_url, email, "not the password", client=client)
    nobody = login(gateway_url, "nobody@example.com", PASSWORD, client=client)
    for r in (wrong, nobody):
        assert_error(r, 401, "unauthorized")
    assert wrong.json()["message"] == nobody.json()["message"]


def test_login_is_limited_per_client_address(gateway_url: str, base_url: str, account: str) -> None:
    email = new_user(base_url, account)
    client = client_address()
    for _ in range(5):
        assert_error(login(gateway_url, email, "not the password", client=client), 401, "unauthorized")
    limited = login(gateway_url, email, PASSWORD, client=client)  # even the right password
    assert_error(limited, 429, "too_many_requests")
    assert 0 < int(limited.headers["retry-after"]) <= 900
    assert login(gateway_url, email, client=client_address()).status_code == 200  # another address


def test_a_client_cannot_pick_its_address_through_envoy(gateway_url: str, base_url: str, account: str) -> None:
    email = new_user(base_url, account)
    claimed = client_address()
    # One failure through Envoy that claims an address: it is counted against the address
    # Envoy saw, so the claimed one still has all five of its attempts.
    assert_error(login(base_url, email, "not the password", client=claimed), 401, "unauthorized")
    for _ in range(5):
        assert_error(login(gateway_url, email, "not the password", client=claimed), 401, "unauthorized")
    assert_error(login(gateway_url, email, PASSWORD, client=claimed), 429, "too_many_requests")


def test_login_is_limited_per_email_from_any_address(gateway_url: str, base_url: str, account: str) -> None:
    email, other = new_user(base_url, account), new_user(base_url, account)
    for _ in range(10):  # each from an address of its own, as a spread-out guesser would
        assert_error(login(gateway_url, email, "not the password", client=client_address()), 401, "unauthorized")
    client = client_address()
    limited = login(gateway_url, email, PASSWORD, client=client)  # even the right password
    assert_error(limited, 429, "too_many_requests")
    assert 0 < int(limited.headers["retry-after"]) <= 900
    assert login(gateway_url, other, client=client).status_code == 200  # another user, same address


def test_the_key_set_is_public_and_verifies_access_tokens(base_url: str, account: str) -> None:
    r = httpx.get(f"{base_url}/.well-known/jwks.json")
    assert r.status_code == 200 and "max-age" in r.headers["cache-control"]
    keys = r.json()["keys"]
    assert keys and all({"kty", "kid", "alg", "use"} <= set(k) and k["use"] == "sig" for k in keys)
    private_members = {"d", "p", "q", "dp", "dq", "qi"}
    assert not any(private_members & set(k) for k in keys)

    access = tokens(base_url, new_user(base_url, account))["access_token"]
    header = jwt.get_unverified_header(access)
    (published,) = [k for k in keys if k["kid"] == header["kid"]]
    key = jwt.PyJWK(published)
    claims = jwt.decode(access, key.key, algorithms=[key.algorithm_name], issuer="pregonero", audience="pregonero-api")
    assert claims["role"] == "member" and claims["account_id"] == account
    assert {"sub", "sid", "iat", "exp"} <= set(claims) and claims["exp"] - claims["iat"] == 900


def test_a_members_api_key_reaches_its_own_account_and_no_further(base_url: str, account: str) -> None:
    session = tokens(base_url, new_user(base_url, account))
    r = httpx.post(f"{base_url}/api/auth/api-keys", headers=bearer(session["access_token"]), json={"name": "crm"})
    assert r.status_code == 201, r.text
    created = r.json()
    key = created["key"]
    assert key.startswith("pk_") and created["account_id"] == account
    assert created["prefix"] == key[:7] and created["last4"] == key[-4:] and created["last_used_at"] is None

    r = httpx.get(f"{base_url}/api/auth/api-keys", headers=bearer(session["access_token"]))
    assert r.status_code == 200 and int(r.headers["x-total-count"]) == len(r.json())
    (listed,) = [k for k in r.json() if k["id"] == created["id"]]
    assert "key" not in listed and key not in r.text

    as_key = bearer(key)
    assert httpx.get(f"{base_url}/devices", headers=as_key).status_code == 200
    who = httpx.get(f"{base_url}/api/auth/me", headers=as_key).json()
    assert who["role"] == "member" and who["account_id"] == account and who["key_id"] == created["id"]
    # Nothing beyond a member of its account.
    new_user_body = {"email": f"x-{uuid.uuid4().hex[:8]}@example.com", "password": PASSWORD, "account_id": account}
    assert_error(httpx.post(f"{base_url}/api/auth/users", headers=as_key, json=new_user_body), 403, "forbidden")
    assert_error(httpx.post(f"{base_url}/api/auth/api-keys", headers=as_key, json={"name": "more"}), 403, "forbidden")
    other_account = httpx.get(f"{base_url}/api/auth/api-keys", headers=as_key, params={"account_id": "acme"})
    assert_error(other_account, 404, "not_found")
    # Another account's member cannot revoke it; its own member can.
    assert_error(
        httpx.delete(f"{base_url}/api/auth/api-keys/{created['id']}", headers=bearer(MEMBER_TOKEN)), 404, "not_found"
    )
    r = httpx.delete(f"{base_url}/api/auth/api-keys/{created['id']}", headers=bearer(session["access_token"]))
    assert r.status_code == 204, r.text
    eventually_401(lambda: httpx.get(f"{base_url}/devices", headers=as_key))


def test_only_admins_create_users(base_url: str, account: str) -> None:
    member = tokens(base_url, new_user(base_url, account))["access_token"]
    body = {"email": f"x-{uuid.uuid4().hex[:8]}@example.com", "password": PASSWORD, "account_id": account}
    for headers in (bearer(member), bearer(MEMBER_TOKEN)):
        assert_error(httpx.post(f"{base_url}/api/auth/users", headers=headers, json=body), 403, "forbidden")
    assert_error(httpx.post(f"{base_url}/api/auth/users", json=body), 401, "unauthorized")
    email = new_user(base_url, account)
    taken = {**body, "email": email.upper()}
    assert_error(httpx.post(f"{base_url}/api/auth/users", headers=ADMIN, json=taken), 409, "conflict")
    nowhere = {**body, "account_id": "no-such-account"}
    assert_error(httpx.post(f"{base_url}/api/auth/users", headers=ADMIN, json=nowhere), 404, "not_found")


def test_an_admin_user_reaches_every_account(base_url: str, account: str) -> None:
    admin = tokens(base_url, new_user(base_url, None, role="admin"))
    assert admin["user"]["role"] == "admin" and admin["user"]["account_id"] is None
    headers = bearer(admin["access_token"])
    assert httpx.get(f"{base_url}/devices", headers=headers).status_code == 200
    r = httpx.post(f"{base_url}/api/auth/api-keys", headers=headers, json={"name": "ops", "account_id": account})
    assert r.status_code == 201 and r.json()["account_id"] == account
    listed = httpx.get(f"{base_url}/api/auth/api-keys", headers=headers, params={"account_id": account}).json()
    assert r.json()["id"] in [k["id"] for k in listed]


def test_envoy_verifies_access_tokens_with_the_published_key_set(
    suite: Stack, base_url: str, account: str, tmp_path: Path
) -> None:
    """What Envoy Gateway's SecurityPolicy does at the edge: Envoy's jwt_authn filter fetching
    `/.well-known/jwks.json` from the gateway, in front of the gateway."""
    listen, admin = free_port(), free_port()
    gateway = {"socket_address": {"address": "127.0.0.1", "port_value": suite.gateway_port}}
    jwt_authn = {
        "@type": f"{ENVOY_API}.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {
            "pregonero": {
                "issuer": "pregonero",
                "remote_jwks": {
                    "http_uri": {
                        "uri": f"http://127.0.0.1:{suite.gateway_port}/.well-known/jwks.json",
                        "cluster": "gateway",
                        "timeout": "5s",
                    },
                    "cache_duration": "300s",
                },
                "forward": True,
            }
        },
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "pregonero"}}],
    }
    manager = {
        "@type": f"{ENVOY_API}.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "edge",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "gateway"}}],
                }
            ]
        },
        "http_filters": [
            {"name": "envoy.filters.http.jwt_authn", "typed_config": jwt_authn},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": f"{ENVOY_API}.filters.http.router.v3.Router"},
            },
        ],
    }
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "edge",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "gateway",
                    "type": "STATIC",
                    "connect_timeout": "2s",
                    "load_assignment": {
                        "cluster_name": "gateway",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": gateway}}]}],
                    },
                }
            ],
        },
    }
    path = tmp_path / "edge.json"
    path.write_text(json.dumps(config))
    proc = spawn("edge-envoy", [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--log-level", "warn"])
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{admin}/ready"), timeout=30, what="envoy", proc=proc)
        edge = f"http://127.0.0.1:{listen}"
        access = tokens(base_url, new_user(base_url, account))["access_token"]
        r = me(edge, access)
        assert r.status_code == 200, r.text
        assert r.json()["account_id"] == account
        header, payload, signature = access.split(".")
        forged = ".".join([header, payload, signature[::-1]])
        for headers in (bearer(forged), {}):
            r = httpx.get(f"{edge}/api/auth/me", headers=headers)
            assert r.status_code == 401 and "Jwt" in r.text  # refused by Envoy itself
    finally:
        proc.stop()


def test_a_user_sets_its_time_zone_and_bad_zones_change_nothing(base_url: str, account: str) -> None:
    access = tokens(base_url, new_user(base_url, account))["access_token"]
    who = me(base_url, access).json()
    # Unset: the account's zone (created without a country: Chile's).
    assert who["timezone"] == "" and who["effective_timezone"] == "America/Santiago"

    def patch(body: dict[str, Any], token: str = access) -> httpx.Response:
        return httpx.patch(f"{base_url}/api/auth/me", headers=bearer(token), json=body)

    r = patch({"timezone": "America/Argentina/Buenos_Aires"})
    assert r.status_code == 200, r.text
    assert r.json()["timezone"] == r.json()["effective_timezone"] == "America/Argentina/Buenos_Aires"
    assert me(base_url, access).json()["effective_timezone"] == "America/Argentina/Buenos_Aires"

    r = patch({"timezone": "Mars/Olympus"})
    assert_error(r, 400, "bad_request")
    assert "Mars/Olympus" in r.json()["message"]
    assert_error(patch({"timezone": "UTC", "role": "admin"}), 422, "validation_error")
    assert me(base_url, access).json()["timezone"] == "America/Argentina/Buenos_Aires"

    assert patch({"timezone": ""}).json()["effective_timezone"] == "America/Santiago"
    # Operator tokens and API keys have no profile to change.
    assert_error(patch({"timezone": "UTC"}, ADMIN_TOKEN), 400, "bad_request")
