"""Authentication rules against a real PostgreSQL: users, login limit, refresh rotation and
reuse, logout, API keys, and the signing key settings."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from services.accounts import auth_repo
from services.accounts.auth import (
    AccessTokens,
    Auth,
    LoginLimit,
    Passwords,
    RefreshReused,
    TooManyAttempts,
    load_previous_keys,
    load_signing_key,
    signing_key_from_pem,
)
from services.accounts.auth_repo import AuthRepo
from services.accounts.config import AccountsSettings
from services.runtime import db
from services.runtime.devstack import Stack
from services.runtime.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from services.runtime.identity import ADMIN, MEMBER, Caller

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "accounts" / "migrations"
ADMIN_CALLER = Caller(role=ADMIN, account_id="default", user_id="operator")
PASSWORD = "correct horse battery"
ISSUER = "pregonero-test"
AUDIENCE = "pregonero-api"
# The cheapest argon2id there is: these tests are about the rules, not the cost.
CHEAP = {"memory_kib": 8, "time_cost": 1, "parallelism": 1}


def pem_of(key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="module")
async def pool(infra: Stack) -> AsyncIterator[asyncpg.Pool]:
    """One database for the module; tests keep apart by their own e-mails and addresses."""
    name = f"t_auth_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(infra.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    pool = await db.create_pool(infra.database_url.rpartition("/")[0] + f"/{name}", schema="accounts")
    try:
        async with pool.acquire() as conn:
            await db.migrate(conn, schema="accounts", directory=MIGRATIONS)
        await db.check_queries(pool, auth_repo.Q)
        await pool.execute(
            "INSERT INTO accounts (account_id, account_name) VALUES ('acme', 'Acme'), ('globex', 'Globex')"
        )
        yield pool
    finally:
        await pool.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture(scope="module")
def key_pem() -> str:
    return pem_of(ed25519.Ed25519PrivateKey.generate())


def make_auth(pool: asyncpg.Pool, key_pem: str, **passwords: int) -> Auth:
    return Auth(
        AuthRepo(pool),
        tokens=AccessTokens(signing_key_from_pem(key_pem), issuer=ISSUER, audience=AUDIENCE, ttl_seconds=900),
        passwords=Passwords(**{**CHEAP, **passwords}),
        refresh_ttl_seconds=3600,
        login_limit=LoginLimit(max_failures=5, window_seconds=900),
    )


@pytest.fixture
def auth(pool: asyncpg.Pool, key_pem: str) -> Auth:
    return make_auth(pool, key_pem)


def unique(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def address() -> str:
    """A client address of the test's own, so login limits don't leak between tests."""
    n = uuid.uuid4().int
    return f"10.{n % 250}.{(n >> 8) % 250}.{(n >> 16) % 250 + 1}"


async def member(auth: Auth, account: str = "acme") -> tuple[str, str]:
    email = f"{unique()}@example.com"
    row = await auth.create_user(ADMIN_CALLER, email=email, password=PASSWORD, role=MEMBER, account_id=account)
    return email, row["user_id"]


def claims_of(auth: Auth, token: str) -> dict[str, object]:
    key = jwt.PyJWK(auth.tokens.jwks()["keys"][0])
    return jwt.decode(token, key.key, algorithms=[key.algorithm_name], issuer=ISSUER, audience=AUDIENCE)


async def test_users_have_one_case_insensitive_email_and_an_argon2id_hash(auth: Auth, pool: asyncpg.Pool) -> None:
    email = f"{unique('Ana')}@Example.com"
    row = await auth.create_user(ADMIN_CALLER, email=email, password=PASSWORD, role="", account_id="acme")
    assert row["role"] == MEMBER and row["account_id"] == "acme" and row["is_active"]
    assert row["password_hash"].startswith("$argon2id$") and PASSWORD not in row["password_hash"]
    with pytest.raises(AlreadyExists):
        await auth.create_user(ADMIN_CALLER, email=email.upper(), password=PASSWORD, role=MEMBER, account_id="acme")
    issued = await auth.login(email=email.lower(), password=PASSWORD, client_ip=address())
    assert issued.user["user_id"] == row["user_id"]


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"role": MEMBER, "account_id": ""}, InvalidArgument),
        ({"role": MEMBER, "account_id": "no-such-account"}, NotFound),
        ({"role": ADMIN, "account_id": "acme"}, InvalidArgument),
        ({"role": "root", "account_id": ""}, InvalidArgument),
        ({"role": MEMBER, "account_id": "acme", "password": "short"}, InvalidArgument),
        ({"role": MEMBER, "account_id": "acme", "email": "not-an-address"}, InvalidArgument),
    ],
)
async def test_user_rules(auth: Auth, fields: dict[str, str], error: type[Exception]) -> None:
    given = {"email": f"{unique()}@example.com", "password": PASSWORD, **fields}
    with pytest.raises(error):
        await auth.create_user(ADMIN_CALLER, **given)


async def test_only_admins_create_users_and_members_see_only_themselves(auth: Auth) -> None:
    _, user_id = await member(auth)
    me = Caller(role=MEMBER, account_id="acme", user_id=user_id)
    with pytest.raises(PermissionDenied):
        await auth.create_user(me, email=f"{unique()}@example.com", password=PASSWORD, role=MEMBER, account_id="acme")
    assert (await auth.get_user(me, ""))["user_id"] == user_id
    _, other = await member(auth)
    with pytest.raises(NotFound):
        await auth.get_user(me, other)
    assert (await auth.get_user(ADMIN_CALLER, other))["user_id"] == other


async def test_a_user_reads_dates_in_its_own_zone_else_its_accounts(auth: Auth, pool: asyncpg.Pool) -> None:
    account = unique("ar")
    await pool.execute(
        "INSERT INTO accounts (account_id, account_name, country, timezone) "
        "VALUES ($1, 'AR', 'AR', 'America/Argentina/Buenos_Aires')",
        account,
    )
    email, user_id = await member(auth, account)
    me = Caller(role=MEMBER, account_id=account, user_id=user_id)
    row = await auth.get_user(me, "")
    assert (row["timezone"], row["effective_timezone"]) == ("", "America/Argentina/Buenos_Aires")
    row = await auth.update_user(me, "", timezone="America/Santiago")
    assert (row["timezone"], row["effective_timezone"]) == ("America/Santiago", "America/Santiago")
    issued = await auth.login(email=email, password=PASSWORD, client_ip=address())
    assert await auth.session_timezone(issued.session_id) == "America/Santiago"
    # Names IANA does not list are refused, and change nothing (files zoneinfo would open too).
    for bad in ("Mars/Olympus", "localtime", "../../etc/passwd", "America/Santiago "[:-1] + "x"):
        with pytest.raises(InvalidArgument, match="unknown timezone"):
            await auth.update_user(me, "", timezone=bad)
    assert (await auth.get_user(me, ""))["timezone"] == "America/Santiago"
    assert (await auth.update_user(me, "", timezone=""))["effective_timezone"] == "America/Argentina/Buenos_Aires"
    # Another user's profile is not found to a member; an admin's zone is the default account's.
    _, other = await member(auth)
    with pytest.raises(NotFound):
        await auth.update_user(me, other, timezone="UTC")
    await auth.repo.revoke_session(session_id=issued.session_id, reason="test")
    assert await auth.session_timezone(issued.session_id) is None


async def test_the_configured_admin_is_made_once(auth: Auth) -> None:
    email = f"{unique('root')}@example.com"
    first = await auth.ensure_admin(email=email, password=PASSWORD)
    again = await auth.ensure_admin(email=email.upper(), password="another password")
    assert first["user_id"] == again["user_id"] and first["role"] == ADMIN and first["account_id"] is None
    issued = await auth.login(email=email, password=PASSWORD, client_ip=address())
    assert claims_of(auth, issued.access_token)["role"] == ADMIN


async def test_login_issues_a_short_lived_jwt_naming_user_account_and_session(auth: Auth) -> None:
    email, user_id = await member(auth)
    issued = await auth.login(email=email, password=PASSWORD, client_ip=address())
    header = jwt.get_unverified_header(issued.access_token)
    assert header["kid"] == auth.tokens.jwks()["keys"][0]["kid"] and header["alg"] == "EdDSA"
    claims = claims_of(auth, issued.access_token)
    assert claims["sub"] == user_id and claims["role"] == MEMBER and claims["account_id"] == "acme"
    assert claims["sid"] == issued.session_id and claims["iss"] == ISSUER and claims["aud"] == AUDIENCE
    assert claims["exp"] - claims["iat"] == issued.expires_in == 900  # type: ignore[operator]
    assert issued.refresh_token.startswith("rt_") and await auth.session_active(issued.session_id)
    for wrong in (
        {"email": email, "password": "wrong password"},
        {"email": "nobody@example.com", "password": PASSWORD},
    ):
        with pytest.raises(Unauthenticated):
            await auth.login(**wrong, client_ip=address())
    with pytest.raises(Unauthenticated):  # nor is an access token a refresh token
        await auth.refresh(refresh_token=issued.access_token)


async def test_refresh_rotates_and_a_replayed_token_revokes_the_whole_family(auth: Auth, pool: asyncpg.Pool) -> None:
    email, _ = await member(auth)
    first = await auth.login(email=email, password=PASSWORD, client_ip=address())
    second = await auth.refresh(refresh_token=first.refresh_token)
    assert second.session_id == first.session_id and second.refresh_token != first.refresh_token
    assert claims_of(auth, second.access_token)["sid"] == first.session_id
    third = await auth.refresh(refresh_token=second.refresh_token)

    with pytest.raises(RefreshReused) as replay:
        await auth.refresh(refresh_token=first.refresh_token)
    assert replay.value.session_id == first.session_id
    assert not await auth.session_active(first.session_id)
    # Every token of the family is dead, the newest included.
    with pytest.raises(Unauthenticated):
        await auth.refresh(refresh_token=third.refresh_token)
    with pytest.raises(Unauthenticated):
        await auth.refresh(refresh_token="rt_never-issued")
    reason = await pool.fetchval("SELECT revoke_reason FROM sessions WHERE session_id = $1", first.session_id)
    assert reason == "refresh token reused"
    # Other sessions of the same user are untouched.
    other = await auth.login(email=email, password=PASSWORD, client_ip=address())
    assert await auth.session_active(other.session_id)


async def test_two_concurrent_refreshes_of_one_token_let_exactly_one_through(auth: Auth) -> None:
    email, _ = await member(auth)
    issued = await auth.login(email=email, password=PASSWORD, client_ip=address())
    results = await asyncio.gather(
        *(auth.refresh(refresh_token=issued.refresh_token) for _ in range(2)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert sum(isinstance(r, RefreshReused) for r in results) == 1
    assert not await auth.session_active(issued.session_id)  # a race on one token is a replay


async def test_logout_by_refresh_token_or_by_own_session(auth: Auth) -> None:
    email, user_id = await member(auth)
    one = await auth.login(email=email, password=PASSWORD, client_ip=address())
    assert await auth.logout(None, refresh_token=one.refresh_token) == (one.session_id, True)
    assert not await auth.session_active(one.session_id)
    with pytest.raises(Unauthenticated):
        await auth.refresh(refresh_token=one.refresh_token)

    two = await auth.login(email=email, password=PASSWORD, client_ip=address())
    _, stranger = await member(auth)
    with pytest.raises(NotFound):
        await auth.logout(Caller(role=MEMBER, account_id="acme", user_id=stranger), session_id=two.session_id)
    me = Caller(role=MEMBER, account_id="acme", user_id=user_id)
    assert await auth.logout(me, session_id=two.session_id) == (two.session_id, True)
    assert await auth.logout(me, session_id=two.session_id) == (two.session_id, False)
    with pytest.raises(Unauthenticated):
        await auth.logout(None, refresh_token="rt_unknown")


async def test_five_failures_from_one_address_lock_it_out_with_a_retry_after(auth: Auth) -> None:
    email, _ = await member(auth)
    ip = address()
    for _ in range(3):  # successes are not failures
        await auth.login(email=email, password=PASSWORD, client_ip=ip)
    for _ in range(5):
        with pytest.raises(Unauthenticated):
            await auth.login(email=email, password="wrong password", client_ip=ip)
    with pytest.raises(TooManyAttempts) as limited:
        await auth.login(email=email, password=PASSWORD, client_ip=ip)  # even the right password
    assert 0 < limited.value.retry_after <= 900
    # Another address is not affected.
    await auth.login(email=email, password=PASSWORD, client_ip=address())


async def test_the_window_slides_and_the_oldest_failure_sets_retry_after(auth: Auth, pool: asyncpg.Pool) -> None:
    ip, ghost = address(), f"{unique('ghost')}@example.com"
    for _ in range(5):
        with pytest.raises(Unauthenticated):
            await auth.login(email=ghost, password="nope nope", client_ip=ip)
    # Age the attempts: the oldest leaves the window in about 60 s.
    await pool.execute(
        "UPDATE login_attempts SET attempted_at = attempted_at - interval '840 seconds' WHERE client_ip = $1", ip
    )
    with pytest.raises(TooManyAttempts) as limited:
        await auth.login(email=ghost, password="nope nope", client_ip=ip)
    assert 55 <= limited.value.retry_after <= 61
    await pool.execute(
        "UPDATE login_attempts SET attempted_at = attempted_at - interval '61 seconds' WHERE client_ip = $1", ip
    )
    with pytest.raises(Unauthenticated):  # allowed again (and wrong again)
        await auth.login(email=ghost, password="nope nope", client_ip=ip)


async def test_concurrent_guesses_cannot_overrun_the_limit(auth: Auth) -> None:
    ip, ghost = address(), f"{unique('ghost')}@example.com"
    results = await asyncio.gather(
        *(auth.login(email=ghost, password=f"guess {i}", client_ip=ip) for i in range(12)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, TooManyAttempts) for r in results) == 7
    assert sum(type(r) is Unauthenticated for r in results) == 5


async def test_ten_failures_on_one_email_from_many_addresses_lock_it_and_no_other(auth: Auth) -> None:
    email, _ = await member(auth)
    other, _ = await member(auth)
    for _ in range(10):  # a new address each time: no address meets its own limit
        with pytest.raises(Unauthenticated):
            await auth.login(email=email, password="wrong password", client_ip=address())
    ip = address()
    with pytest.raises(TooManyAttempts) as limited:
        await auth.login(email=email.upper(), password=PASSWORD, client_ip=ip)  # even the right password
    assert 0 < limited.value.retry_after <= 900
    await auth.login(email=other, password=PASSWORD, client_ip=ip)  # another user, same address

    # An e-mail no user has is limited the same way, so a 429 tells nothing of who exists.
    ghost = f"{unique('ghost')}@example.com"
    for _ in range(10):
        with pytest.raises(Unauthenticated) as refused:
            await auth.login(email=ghost, password="wrong password", client_ip=address())
        assert refused.value.message == "invalid email or password"
    with pytest.raises(TooManyAttempts) as unknown:
        await auth.login(email=ghost, password="wrong password", client_ip=address())
    assert unknown.value.message.split(";")[0] == limited.value.message.split(";")[0]


async def test_a_success_resets_the_emails_failures_but_not_the_addresses(auth: Auth) -> None:
    email, _ = await member(auth)
    guesser = address()
    for i in range(9):
        with pytest.raises(Unauthenticated):
            await auth.login(email=email, password="wrong password", client_ip=guesser if i < 4 else address())
    await auth.login(email=email, password=PASSWORD, client_ip=address())
    for _ in range(9):  # nine more: the count started again at the success
        with pytest.raises(Unauthenticated):
            await auth.login(email=email, password="wrong password", client_ip=address())
    await auth.login(email=email, password=PASSWORD, client_ip=address())
    # The guesser's address kept its four failures: one more and it is out.
    with pytest.raises(Unauthenticated):
        await auth.login(email=email, password="wrong password", client_ip=guesser)
    with pytest.raises(TooManyAttempts):
        await auth.login(email=email, password=PASSWORD, client_ip=guesser)


async def test_concurrent_guesses_from_many_addresses_cannot_overrun_the_emails_limit(auth: Auth) -> None:
    email, _ = await member(auth)
    results = await asyncio.gather(
        *(auth.login(email=email, password=f"guess {i}", client_ip=address()) for i in range(14)),
        return_exceptions=True,
    )
    assert sum(type(r) is Unauthenticated for r in results) == 10
    assert sum(isinstance(r, TooManyAttempts) for r in results) == 4


async def test_api_keys_are_stored_hashed_shown_once_and_die_when_revoked(auth: Auth, pool: asyncpg.Pool) -> None:
    me = Caller(role=MEMBER, account_id="acme", user_id="usr-x")
    row, secret = await auth.create_api_key(me, name="crm sync", account_id="")
    assert secret.startswith("pk_") and len(secret) > 40 and row["account_id"] == "acme"
    stored = await pool.fetchrow("SELECT * FROM api_keys WHERE key_id = $1", row["key_id"])
    assert bytes(stored["key_hash"]) == hashlib.sha256(secret.encode()).digest()
    assert all(secret not in str(value) for value in stored.values())
    assert stored["prefix"] == secret[:7] and stored["last4"] == secret[-4:]

    resolved = await auth.resolve_api_key(secret=secret)
    assert resolved["key_id"] == row["key_id"] and resolved["last_used_at"] is not None
    listed = await auth.list_api_keys(me, account_id="", include_revoked=False)
    assert row["key_id"] in [k["key_id"] for k in listed]

    await auth.revoke_api_key(me, key_id=row["key_id"])
    with pytest.raises(Unauthenticated):
        await auth.resolve_api_key(secret=secret)
    assert row["key_id"] not in [
        k["key_id"] for k in await auth.list_api_keys(me, account_id="", include_revoked=False)
    ]
    revoked = await auth.list_api_keys(me, account_id="", include_revoked=True)
    assert any(k["key_id"] == row["key_id"] and k["revoked_at"] is not None for k in revoked)
    for bad in ("pk_forged", "not-a-key", secret[:-1]):
        with pytest.raises(Unauthenticated):
            await auth.resolve_api_key(secret=bad)


async def test_api_keys_stay_inside_their_account(auth: Auth) -> None:
    acme = Caller(role=MEMBER, account_id="acme", user_id="usr-a")
    globex = Caller(role=MEMBER, account_id="globex", user_id="usr-g")
    row, _ = await auth.create_api_key(globex, name="theirs", account_id="")
    with pytest.raises(NotFound):
        await auth.create_api_key(acme, name="sneaky", account_id="globex")
    with pytest.raises(NotFound):
        await auth.list_api_keys(acme, account_id="globex", include_revoked=False)
    with pytest.raises(NotFound):
        await auth.revoke_api_key(acme, key_id=row["key_id"])
    assert row["key_id"] not in [
        k["key_id"] for k in await auth.list_api_keys(acme, account_id="", include_revoked=True)
    ]
    # Admins reach every account's keys, and make keys for any account that exists.
    every = await auth.list_api_keys(ADMIN_CALLER, account_id="", include_revoked=True)
    assert row["key_id"] in [k["key_id"] for k in every]
    mine, _ = await auth.create_api_key(ADMIN_CALLER, name="ops", account_id="acme")
    assert mine["account_id"] == "acme"
    with pytest.raises(NotFound):
        await auth.create_api_key(ADMIN_CALLER, name="ops", account_id="no-such-account")
    with pytest.raises(InvalidArgument):
        await auth.create_api_key(acme, name="  ", account_id="")


async def test_a_weaker_hash_is_upgraded_at_login(pool: asyncpg.Pool, key_pem: str) -> None:
    weak = make_auth(pool, key_pem)
    email, user_id = await member(weak)
    strong = make_auth(pool, key_pem, memory_kib=1024, time_cost=2)
    await strong.login(email=email, password=PASSWORD, client_ip=address())
    stored = await pool.fetchval("SELECT password_hash FROM users WHERE user_id = $1", user_id)
    assert "m=1024,t=2" in stored and not strong.passwords.needs_rehash(stored)


def settings(tmp_path: Path, **kw: str) -> AccountsSettings:
    # A real NATS login, as production requires: what fails is the setting under test.
    return AccountsSettings(
        database_url="postgresql://x/y",
        nats_url="nats://accounts:s3cret@nats:4222",
        pregonero_data_dir=str(tmp_path),
        **kw,
    )


def test_outside_development_a_missing_or_placeholder_key_refuses_to_start(tmp_path: Path) -> None:
    for value in ("", "changeme"):
        with pytest.raises(ValueError):
            load_signing_key(settings(tmp_path, environment="production", pregonero_jwt_private_key=value))
    with pytest.raises(ValueError):
        load_signing_key(settings(tmp_path, environment="production", pregonero_jwt_private_key="-----BEGIN nonsense"))
    assert not list(tmp_path.iterdir())  # nothing generated outside development


def test_development_generates_one_key_into_the_data_folder(tmp_path: Path) -> None:
    first = load_signing_key(settings(tmp_path))
    second = load_signing_key(settings(tmp_path))
    assert first.kid == second.kid and first.algorithm == "EdDSA"
    key_file = tmp_path / "jwt_signing_key.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == [key_file.name]


def test_configured_keys_pick_their_algorithm_and_publish_only_public_parts(tmp_path: Path) -> None:
    rsa_pem = pem_of(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    escaped = rsa_pem.replace("\n", "\\n")  # as a one-line environment variable
    key = load_signing_key(settings(tmp_path, environment="production", pregonero_jwt_private_key=escaped))
    assert key.algorithm == "RS256" and set(key.public_jwk) == {"kty", "n", "e", "kid", "alg", "use"}
    ec_key = signing_key_from_pem(pem_of(ec.generate_private_key(ec.SECP256R1())))
    assert ec_key.algorithm == "ES256" and "d" not in ec_key.public_jwk
    for weak in (
        rsa.generate_private_key(public_exponent=65537, key_size=1024),
        ec.generate_private_key(ec.SECP384R1()),
    ):
        with pytest.raises(ValueError):
            signing_key_from_pem(pem_of(weak))


def verifies(tokens: AccessTokens, token: str) -> bool:
    """What the gateway does: the key of the token's kid in the published set, then the claims."""
    keys = {k["kid"]: jwt.PyJWK(k) for k in tokens.jwks()["keys"]}
    key = keys.get(jwt.get_unverified_header(token)["kid"])
    if key is None:
        return False
    jwt.decode(token, key.key, algorithms=[key.algorithm_name], issuer=ISSUER, audience=AUDIENCE)
    return True


def test_a_rotated_key_keeps_its_tokens_valid_until_it_is_removed(tmp_path: Path) -> None:
    old_pem, new_pem = pem_of(ed25519.Ed25519PrivateKey.generate()), pem_of(ed25519.Ed25519PrivateKey.generate())
    before = AccessTokens(signing_key_from_pem(old_pem), issuer=ISSUER, audience=AUDIENCE, ttl_seconds=900)
    old_token = before.issue(user_id="usr-1", role=MEMBER, account_id="acme", session_id="s-1")

    configured = settings(
        tmp_path, environment="production", pregonero_jwt_private_key=new_pem, pregonero_jwt_previous_key=old_pem
    )
    rotated = AccessTokens(
        load_signing_key(configured),
        issuer=ISSUER,
        audience=AUDIENCE,
        ttl_seconds=900,
        previous=load_previous_keys(configured),
    )
    new_token = rotated.issue(user_id="usr-1", role=MEMBER, account_id="acme", session_id="s-1")
    assert [k["kid"] for k in rotated.jwks()["keys"]] == [rotated.key.kid, before.key.kid]
    assert jwt.get_unverified_header(new_token)["kid"] == rotated.key.kid != before.key.kid
    assert verifies(rotated, old_token) and verifies(rotated, new_token)

    removed = AccessTokens(rotated.key, issuer=ISSUER, audience=AUDIENCE, ttl_seconds=900)
    assert [k["kid"] for k in removed.jwks()["keys"]] == [rotated.key.kid]
    assert not verifies(removed, old_token) and verifies(removed, new_token)


def test_the_previous_key_may_be_given_as_its_public_half(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    (from_public,) = load_previous_keys(settings(tmp_path, pregonero_jwt_previous_key=public_pem.replace("\n", "\\n")))
    assert from_public == signing_key_from_pem(pem_of(key)).public_jwk and "d" not in from_public
    assert load_previous_keys(settings(tmp_path)) == []
    with pytest.raises(ValueError, match="PREGONERO_JWT_PREVIOUS_KEY"):
        load_previous_keys(settings(tmp_path, pregonero_jwt_previous_key="changeme"))


def test_access_tokens_name_the_configured_audience(tmp_path: Path) -> None:
    assert settings(tmp_path).pregonero_jwt_audience == AUDIENCE
    tokens = AccessTokens(load_signing_key(settings(tmp_path)), issuer=ISSUER, audience="other-api", ttl_seconds=900)
    token = tokens.issue(user_id="usr-1", role=MEMBER, account_id="acme", session_id="s-1")
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == "other-api"
    with pytest.raises(jwt.InvalidAudienceError):
        verifies(tokens, token)
