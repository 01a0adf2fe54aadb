"""Authentication in the gateway: static operator tokens, JWT verification, revocation within
the cache bound, API keys, and the client address the login limit counts."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from fastapi import FastAPI, Request
from pydantic import ValidationError

from services.accounts.auth import AccessTokens, signing_key_from_pem, verifying_jwk_from_pem
from services.gateway.auth import (
    API_KEY,
    JWKS_MAX_AGE_S,
    JWKS_REFETCH_S,
    JWT,
    STATIC,
    Authenticator,
    KeyOwner,
    client_address,
    parse_networks,
    parse_static_tokens,
)
from services.gateway.config import GatewaySettings
from services.gateway.errors import ApiError
from services.runtime.identity import Caller, caller_from_metadata

ISSUER = "pregonero"
AUDIENCE = "pregonero-api"


def settings(**kw: Any) -> GatewaySettings:
    return GatewaySettings(database_url="postgresql://x/y", **kw)


def new_pem() -> str:
    return (
        ed25519.Ed25519PrivateKey.generate()
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )


def new_tokens(
    issuer: str = ISSUER,
    clock: Any = time.time,
    ttl: int = 900,
    *,
    pem: str = "",
    previous: list[dict[str, str]] | None = None,
) -> AccessTokens:
    key = signing_key_from_pem(pem or new_pem())
    return AccessTokens(key, issuer=issuer, audience=AUDIENCE, ttl_seconds=ttl, previous=previous or [], clock=clock)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeDirectory:
    """The accounts service as authentication sees it."""

    tokens: AccessTokens
    revoked: set[str] = field(default_factory=set)
    keys: dict[str, KeyOwner] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=lambda: {"jwks": 0, "session": 0, "key": 0, "zone": 0})
    down: bool = False

    def _check(self, what: str) -> None:
        self.calls[what] += 1
        if self.down:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")

    async def jwks(self) -> dict[str, Any]:
        self._check("jwks")
        return self.tokens.jwks()

    async def session_timezone(self, session_id: str) -> str | None:
        self._check("session")
        return None if session_id in self.revoked else "America/Santiago"

    async def api_key(self, secret: str) -> KeyOwner | None:
        self._check("key")
        return self.keys.get(secret)

    async def account_timezone(self, caller: Caller) -> str:
        self._check("zone")
        return "America/Argentina/Buenos_Aires"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def directory() -> FakeDirectory:
    return FakeDirectory(new_tokens())


@pytest.fixture
def auth(directory: FakeDirectory, clock: Clock) -> Authenticator:
    return Authenticator(
        settings(pregonero_static_tokens="good=admin", pregonero_default_account="house"),
        directory=directory,
        clock=clock,
    )


def bearer(token: str) -> str:
    return f"Bearer {token}"


def member_token(tokens: AccessTokens, session: str = "s-1") -> str:
    return tokens.issue(user_id="usr-1", role="member", account_id="acme", session_id=session)


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# static operator tokens


def test_tokens_map_to_admin_or_one_account() -> None:
    tokens = parse_static_tokens("a1=admin, m1=account:acme", default_account="default")
    assert tokens["a1"].is_admin and tokens["a1"].account_id == "default"
    assert not tokens["m1"].is_admin and tokens["m1"].account_id == "acme"


@pytest.mark.parametrize("spec", ["justatoken", "t=", "t=root", "t=account:", "=admin"])
def test_malformed_token_lists_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_static_tokens(spec, default_account="default")


async def test_unknown_missing_and_malformed_headers_are_401() -> None:
    auth = Authenticator(settings(pregonero_static_tokens="good=admin"))
    assert (await auth.resolve("Bearer good")).is_admin
    for header in (None, "", "Bearer", "Bearer bad", "Basic good", "good", "Bearer a.b.c"):
        with pytest.raises(ApiError) as info:
            await auth.resolve(header)
        assert info.value.status == 401


async def test_anonymous_callers_only_where_the_operator_allows() -> None:
    closed = Authenticator(settings())
    with pytest.raises(ApiError):
        await closed.resolve(None, allow_anonymous=True)
    opened = Authenticator(settings(pregonero_anonymous_account="lan"))
    assert (await opened.resolve(None, allow_anonymous=True)).account_id == "lan"
    with pytest.raises(ApiError):
        await opened.resolve(None)  # the dashboards' routes never accept anonymous callers


async def test_static_tokens_need_no_accounts_service(
    auth: Authenticator, directory: FakeDirectory, clock: Clock
) -> None:
    principal = await auth.authenticate("Bearer good")
    assert principal.kind == STATIC and principal.caller.user_id == "operator"
    # Only their account's zone is asked, once a minute; an outage leaves it empty, no more.
    assert principal.caller.timezone == "America/Argentina/Buenos_Aires"
    await auth.authenticate("Bearer good")
    assert directory.calls == {"jwks": 0, "session": 0, "key": 0, "zone": 1}
    clock.now += 61
    directory.down = True  # the last zone known stays
    assert (await auth.resolve("Bearer good")).timezone == "America/Argentina/Buenos_Aires"
    assert (await auth.resolve("Bearer good")).is_admin and directory.calls["zone"] == 2
    down_from_the_start = Authenticator(settings(pregonero_static_tokens="t=account:acme"), directory=directory)
    assert (await down_from_the_start.resolve("Bearer t")).timezone == ""


async def test_the_callers_zone_comes_with_the_session_and_key_checks(
    auth: Authenticator, directory: FakeDirectory
) -> None:
    caller = await auth.resolve(bearer(member_token(directory.tokens, "s-zone")))
    assert caller.timezone == "America/Santiago"
    directory.keys["pk_zone"] = KeyOwner(key_id="key-z", account_id="acme", timezone="America/Argentina/Salta")
    assert (await auth.resolve(bearer("pk_zone"))).timezone == "America/Argentina/Salta"
    # ... and travels to the services in the metadata, back into the same Caller there.
    assert caller_from_metadata(dict(caller.metadata())) == caller
    assert directory.calls["zone"] == 0


# JWT access tokens


async def test_a_jwt_resolves_to_its_user_account_and_session(auth: Authenticator, directory: FakeDirectory) -> None:
    principal = await auth.authenticate(bearer(member_token(directory.tokens, "s-42")))
    assert principal.kind == JWT and principal.session_id == "s-42"
    assert (principal.caller.role, principal.caller.account_id, principal.caller.user_id) == ("member", "acme", "usr-1")
    admin = directory.tokens.issue(user_id="usr-0", role="admin", account_id="", session_id="s-0")
    caller = await auth.resolve(bearer(admin))
    assert caller.is_admin and caller.account_id == "house"  # like the operator's admin tokens
    assert directory.calls["jwks"] == 1  # the key set is fetched once


def hs256(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    signing_input = f"{b64({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{b64(claims)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def forgeries(good: AccessTokens) -> dict[str, str]:
    now = int(time.time())
    kid = good.key.kid
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "usr-1", "role": "member", "account_id": "acme", "sid": "s-1"}
    claims |= {"iat": now, "exp": now + 900}
    other = ed25519.Ed25519PrivateKey.generate()

    def signed(payload: dict[str, Any], key: Any = good.key.private_key, header_kid: str = kid) -> str:
        return jwt.encode(payload, key, algorithm="EdDSA", headers={"kid": header_kid})

    header, _, signature = signed(claims).split(".")
    public_pem = good.key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return {
        "expired": signed({**claims, "iat": now - 3600, "exp": now - 60}),
        "forged signature": signed(claims, key=other),  # the published kid, another private key
        "tampered claims": ".".join([header, b64({**claims, "account_id": "globex"}), signature]),
        "wrong issuer": signed({**claims, "iss": "someone-else"}),
        "wrong audience": signed({**claims, "aud": "another-api"}),
        "no audience": signed({k: v for k, v in claims.items() if k != "aud"}),
        "audience list without ours": signed({**claims, "aud": ["another-api"]}),
        "alg none": ".".join([b64({"alg": "none", "typ": "JWT", "kid": kid}), b64(claims), ""]),
        # The classic confusion: HMAC keyed with the public key, which anyone can read.
        "hs256 keyed with the public key": hs256(claims, public_pem, kid),
        "unknown kid": signed(claims, key=other, header_kid="not-ours"),
        "no session claim": signed({k: v for k, v in claims.items() if k != "sid"}),
        "no expiry": signed({k: v for k, v in claims.items() if k != "exp"}),
        "unknown role": signed({**claims, "role": "root"}),
        "member without account": signed({**claims, "account_id": ""}),
        "garbage": "a.b.c",
    }


FORGERIES = list(forgeries(new_tokens()))


@pytest.mark.parametrize("case", FORGERIES)
async def test_expired_forged_and_unsigned_tokens_are_401(
    auth: Authenticator, directory: FakeDirectory, case: str
) -> None:
    token = forgeries(directory.tokens)[case]
    with pytest.raises(ApiError) as info:
        await auth.resolve(bearer(token))
    assert info.value.status == 401 and info.value.code == "unauthorized"
    if case == "expired":
        assert "expired" in info.value.message
    elif "audience" in case:
        assert info.value.message == "invalid or expired token"
    assert directory.calls["session"] == 0  # refused before the session is even looked at


async def test_a_refresh_token_is_no_access_token(auth: Authenticator) -> None:
    # Refresh tokens are opaque secrets that only accounts' Refresh takes, never a JWT.
    with pytest.raises(ApiError) as info:
        await auth.resolve(bearer("rt_" + "x" * 43))
    assert (info.value.status, info.value.message) == (401, "invalid or expired token")


async def test_tokens_of_the_previous_key_verify_until_it_leaves_the_key_set(
    auth: Authenticator, directory: FakeDirectory, clock: Clock
) -> None:
    old_pem, current_pem = new_pem(), new_pem()
    directory.tokens = new_tokens(pem=old_pem)
    old_token = bearer(member_token(directory.tokens))
    await auth.resolve(old_token)
    # Rotated: the new key signs; the old one is published for verification only.
    directory.tokens = new_tokens(pem=current_pem, previous=[verifying_jwk_from_pem(old_pem)])
    new_token = member_token(directory.tokens)
    assert jwt.get_unverified_header(new_token)["kid"] == directory.tokens.key.kid
    assert [k["kid"] for k in directory.tokens.jwks()["keys"]][1] == jwt.get_unverified_header(old_token[7:])["kid"]
    clock.now += JWKS_REFETCH_S
    assert (await auth.resolve(bearer(new_token))).account_id == "acme"
    clock.now += JWKS_MAX_AGE_S
    assert (await auth.resolve(old_token)).account_id == "acme"  # the renewed set still holds it
    # The previous key is unset: its tokens stop verifying once the gateway's set renews.
    directory.tokens = new_tokens(pem=current_pem)
    await auth.resolve(old_token)
    clock.now += JWKS_MAX_AGE_S
    with pytest.raises(ApiError) as info:
        await auth.resolve(old_token)
    assert (info.value.status, info.value.message) == (401, "invalid or expired token")
    assert (await auth.resolve(bearer(new_token))).account_id == "acme"


async def test_a_rotated_signing_key_is_fetched_again_but_not_for_every_forgery(
    auth: Authenticator, directory: FakeDirectory, clock: Clock
) -> None:
    await auth.resolve(bearer(member_token(directory.tokens)))
    old = directory.tokens
    directory.tokens = new_tokens()  # accounts restarted with a new key
    with pytest.raises(ApiError):  # within the refetch pause the new kid is still unknown
        await auth.resolve(bearer(member_token(directory.tokens)))
    assert directory.calls["jwks"] == 1
    clock.now += 31
    assert (await auth.resolve(bearer(member_token(directory.tokens)))).account_id == "acme"
    assert directory.calls["jwks"] == 2
    with pytest.raises(ApiError):
        await auth.resolve(bearer(member_token(old)))  # the old key is no longer published


# revocation


async def test_a_revoked_session_is_refused_within_the_cache_bound(
    auth: Authenticator, directory: FakeDirectory, clock: Clock
) -> None:
    token = bearer(member_token(directory.tokens, "s-7"))
    await auth.resolve(token)
    directory.revoked.add("s-7")  # logged out through another gateway replica
    clock.now += 4.9
    await auth.resolve(token)  # still inside the cache bound: the earlier answer holds
    clock.now += 0.1
    with pytest.raises(ApiError) as info:
        await auth.resolve(token)  # 5 s after the check: asked again, and refused
    assert info.value.status == 401 and "session" in info.value.message
    asked = directory.calls["session"]
    for _ in range(3):
        with pytest.raises(ApiError):
            await auth.resolve(token)
    assert directory.calls["session"] == asked  # a revoked session is remembered, not asked again


async def test_the_replica_that_ends_a_session_refuses_it_at_once(
    auth: Authenticator, directory: FakeDirectory
) -> None:
    token = bearer(member_token(directory.tokens, "s-8"))
    await auth.resolve(token)
    auth.forget_session("s-8")
    with pytest.raises(ApiError):
        await auth.resolve(token)


def test_the_cache_bound_cannot_exceed_five_seconds() -> None:
    assert settings().pregonero_auth_cache_seconds == 5.0
    with pytest.raises(ValidationError):
        settings(pregonero_auth_cache_seconds=6)


async def test_logout_still_names_the_session_of_an_expired_token(
    auth: Authenticator, directory: FakeDirectory
) -> None:
    expired = bearer(forgeries(directory.tokens)["expired"])
    with pytest.raises(ApiError):
        await auth.resolve(expired)
    principal = await auth.logout_principal(expired)
    assert principal.kind == JWT and principal.session_id == "s-1"
    with pytest.raises(ApiError):
        await auth.logout_principal(bearer(forgeries(directory.tokens)["forged signature"]))
    assert (await auth.logout_principal("Bearer good")).kind == STATIC


async def test_an_unreachable_accounts_service_is_503_not_a_free_pass(
    auth: Authenticator, directory: FakeDirectory
) -> None:
    directory.down = True
    for token in (member_token(directory.tokens), "pk_whatever"):
        with pytest.raises(ApiError) as info:
            await auth.resolve(bearer(token))
        assert info.value.status == 503
    assert (await auth.resolve("Bearer good")).is_admin  # operator tokens keep working


# API keys


async def test_an_api_key_is_a_member_of_its_account_until_revoked(
    auth: Authenticator, directory: FakeDirectory, clock: Clock
) -> None:
    directory.keys["pk_live"] = KeyOwner(key_id="key-1", account_id="acme")
    principal = await auth.authenticate(bearer("pk_live"))
    assert principal.kind == API_KEY and principal.key_id == "key-1"
    assert (principal.caller.role, principal.caller.account_id, principal.caller.user_id) == (
        "member",
        "acme",
        "key:key-1",
    )
    await auth.resolve(bearer("pk_live"))
    assert directory.calls["key"] == 1  # cached

    del directory.keys["pk_live"]  # revoked through another replica
    clock.now += 5
    with pytest.raises(ApiError) as info:
        await auth.resolve(bearer("pk_live"))
    assert info.value.status == 401

    directory.keys["pk_other"] = KeyOwner(key_id="key-2", account_id="globex")
    await auth.resolve(bearer("pk_other"))
    auth.forget_api_key("key-2")  # revoked through this replica: refused at once
    del directory.keys["pk_other"]
    with pytest.raises(ApiError):
        await auth.resolve(bearer("pk_other"))


# the client address the login limit counts


TRUSTED = parse_networks("127.0.0.1,::1,10.0.0.0/8")


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("127.0.0.1", "203.0.113.9", "203.0.113.9"),  # Envoy appended the client it saw
        ("127.0.0.1", "1.1.1.1, 203.0.113.9", "203.0.113.9"),  # the client's own header is not believed
        ("127.0.0.1", "203.0.113.9, 10.1.2.3", "203.0.113.9"),  # past our own proxies
        ("10.1.2.3", "10.9.9.9", "10.9.9.9"),  # only proxies in the chain: the first hop
        ("198.51.100.7", "1.1.1.1", "198.51.100.7"),  # not through a trusted proxy: its peer
        ("198.51.100.7", "", "198.51.100.7"),
        ("127.0.0.1", "", "127.0.0.1"),
        ("", "", "unknown"),
    ],
)
def test_client_address(peer: str, forwarded: str, expected: str) -> None:
    assert client_address(peer, forwarded, TRUSTED) == expected


def request_from(peer: str, forwarded_for: str = "") -> Request:
    headers = [(b"x-forwarded-for", forwarded_for.encode())] if forwarded_for else []
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "client": (peer, 40000)})


def test_no_proxy_is_trusted_until_the_deployment_names_it() -> None:
    forged = request_from("127.0.0.1", "203.0.113.9")
    assert Authenticator(settings()).client_address(forged) == "127.0.0.1"
    behind_envoy = Authenticator(settings(pregonero_trusted_proxies="127.0.0.1"))
    assert behind_envoy.client_address(forged) == "203.0.113.9"
    assert behind_envoy.client_address(request_from("198.51.100.7", "203.0.113.9")) == "198.51.100.7"


def test_the_gateways_server_hands_over_the_real_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn as the gateway's main() sets it up: a loopback caller's forged X-Forwarded-For
    reaches client_address as a header, not as the peer (uvicorn's proxy_headers would)."""
    from services.gateway import main as gateway_main
    from tests.http_server import serving_in_thread

    configs: list[uvicorn.Config] = []

    class Captured:
        def __init__(self, config: uvicorn.Config) -> None:
            configs.append(config)

        def run(self) -> None:
            pass

    monkeypatch.setenv("DATABASE_URL", "postgresql://x/y")
    monkeypatch.delenv("PREGONERO_TRUSTED_PROXIES", raising=False)
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    monkeypatch.setattr(gateway_main, "setup_logging", lambda *args: None)
    monkeypatch.setattr(gateway_main, "create_app", lambda settings: FastAPI())
    monkeypatch.setattr(gateway_main.uvicorn, "Server", Captured)
    gateway_main.main()
    (config,) = configs

    auth = Authenticator(settings())
    app = FastAPI()

    @app.get("/who")
    async def who(request: Request) -> dict[str, str]:
        return {"client": auth.client_address(request)}

    with serving_in_thread(app, config) as address:
        r = httpx.get(f"http://{address}/who", headers={"X-Forwarded-For": "203.0.113.9"})
    assert r.json() == {"client": "127.0.0.1"}
