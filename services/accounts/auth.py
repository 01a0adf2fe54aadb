"""Authentication rules: users and passwords, signed access tokens, sessions whose refresh
tokens rotate, per-account API keys, and the login limit. Pure logic over AuthRepo; raises
domain errors."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from zoneinfo import available_timezones

import asyncpg
import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from services.runtime.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from services.runtime.identity import ADMIN, MEMBER, Caller
from services.runtime.settings import reject_placeholders

from .auth_repo import AuthRepo
from .config import AccountsSettings

log = logging.getLogger("pregonero.accounts.auth")

API_KEY_PREFIX = "pk_"
REFRESH_TOKEN_PREFIX = "rt_"
DEV_KEY_FILE = "jwt_signing_key.pem"
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
PASSWORD_LENGTH = (8, 1024)
KEY_NAME_LENGTH = 100
API_KEY_LIST_LIMIT = 1000

Row = Mapping[str, Any]


class TooManyAttempts(ResourceExhausted):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many login attempts; try again in {retry_after} s")
        self.retry_after = retry_after


class RefreshReused(Unauthenticated):
    """A spent refresh token came back: it leaked, so its whole session is revoked."""

    def __init__(self, session_id: str) -> None:
        super().__init__("refresh token already used; the session has been revoked")
        self.session_id = session_id


# Files of the system's zone folder that name no zone a user means (`localtime` is the
# machine's own, whatever it is).
_NOT_ZONES = frozenset({"localtime", "posixrules", "Factory"})


@cache
def _iana_zones() -> frozenset[str]:
    return frozenset(available_timezones()) - _NOT_ZONES


def check_timezone(name: str) -> str:
    """An IANA zone name, or empty (the account's zone). Looked up in the list, not opened
    with ZoneInfo(name), which takes any file of the zone folder."""
    if name and name not in _iana_zones():
        raise InvalidArgument(f"unknown timezone {name[:64]!r}: give an IANA name such as America/Santiago")
    return name


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> bytes:
    # Secrets here are 256 random bits, so a fast hash is enough: there is nothing to guess.
    return hashlib.sha256(secret.encode()).digest()


# --- signing key ------------------------------------------------------------------------

SigningPrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# RFC 7638: the members a key's thumbprint (its kid) is computed over.
_THUMBPRINT_MEMBERS = {"OKP": ("crv", "kty", "x"), "RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}


@dataclass(frozen=True)
class SigningKey:
    private_key: SigningPrivateKey
    algorithm: str
    kid: str
    public_jwk: dict[str, str]


def _thumbprint(jwk: Mapping[str, str]) -> str:
    members = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _published(public_key: object) -> tuple[str, dict[str, str]]:
    """Ed25519 → EdDSA, RSA → RS256, P-256 → ES256 (what Envoy's jwt_authn verifies), and
    the key as the JWKS publishes it, its kid the RFC 7638 thumbprint."""
    jwk: dict[str, Any]
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        algorithm, jwk = "EdDSA", OKPAlgorithm.to_jwk(public_key, as_dict=True)
    elif isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size >= 2048:
        algorithm, jwk = "RS256", RSAAlgorithm.to_jwk(public_key, as_dict=True)
    elif isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1):
        algorithm, jwk = "ES256", ECAlgorithm.to_jwk(public_key, as_dict=True)
    else:
        raise ValueError("the JWT signing key must be Ed25519, RSA of 2048 bits or more, or EC P-256")
    public = {name: str(value) for name, value in jwk.items() if name != "key_ops"}
    kid = _thumbprint(public)
    return algorithm, {**public, "kid": kid, "alg": algorithm, "use": "sig"}


def _pem_bytes(pem: str) -> bytes:
    return pem.replace("\\n", "\n").strip().encode()


def signing_key_from_pem(pem: str) -> SigningKey:
    """The key that signs, with its algorithm and published form (see _published)."""
    try:
        key = serialization.load_pem_private_key(_pem_bytes(pem), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError("PREGONERO_JWT_PRIVATE_KEY is not an unencrypted PEM private key") from exc
    if not isinstance(key, SigningPrivateKey):
        raise ValueError("the JWT signing key must be Ed25519, RSA of 2048 bits or more, or EC P-256")
    algorithm, public_jwk = _published(key.public_key())
    return SigningKey(key, algorithm, public_jwk["kid"], public_jwk)


def verifying_jwk_from_pem(pem: str) -> dict[str, str]:
    """The published form of a verification-only key, given its private or its public PEM."""
    data = _pem_bytes(pem)
    try:
        if b"PRIVATE KEY" in data:
            public: object = serialization.load_pem_private_key(data, password=None).public_key()
        else:
            public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ValueError("PREGONERO_JWT_PREVIOUS_KEY is not an unencrypted PEM private or public key") from exc
    return _published(public)[1]


def development_key_pem(data_dir: Path) -> str:
    """Made once and kept in the data folder, so development tokens survive restarts."""
    path = data_dir / DEV_KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        tmp = data_dir / f".{DEV_KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
        finally:
            os.close(fd)
        try:
            # A link never replaces: replicas starting together all end up with the first key.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text()


def load_signing_key(settings: AccountsSettings) -> SigningKey:
    reject_placeholders(settings, PREGONERO_JWT_PRIVATE_KEY=settings.pregonero_jwt_private_key)
    pem = settings.pregonero_jwt_private_key or development_key_pem(Path(settings.pregonero_data_dir))
    return signing_key_from_pem(pem)


def load_previous_keys(settings: AccountsSettings) -> list[dict[str, str]]:
    """The verification-only key of PREGONERO_JWT_PREVIOUS_KEY, if one is set."""
    pem = settings.pregonero_jwt_previous_key
    return [verifying_jwk_from_pem(pem)] if pem.strip() else []


class AccessTokens:
    """Short-lived JWTs that the gateway (and Envoy) verify with the public keys alone. Signed
    with `key`; the key set also publishes `previous` (verification only), so tokens signed
    before a rotation stay valid until they expire."""

    def __init__(
        self,
        key: SigningKey,
        *,
        issuer: str,
        audience: str,
        ttl_seconds: int,
        previous: Sequence[Mapping[str, str]] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.issuer = issuer
        self.audience = audience
        self.ttl_seconds = ttl_seconds
        self.previous = [dict(jwk) for jwk in previous if jwk["kid"] != key.kid]
        self.clock = clock

    def issue(self, *, user_id: str, role: str, account_id: str, session_id: str) -> str:
        now = int(self.clock())
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": user_id,
            "role": role,
            "account_id": account_id,
            "sid": session_id,
            "iat": now,
            "exp": now + self.ttl_seconds,
        }
        return jwt.encode(claims, self.key.private_key, algorithm=self.key.algorithm, headers={"kid": self.key.kid})

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(self.key.public_jwk), *(dict(jwk) for jwk in self.previous)]}


# --- passwords --------------------------------------------------------------------------


class Passwords:
    """argon2id, off the event loop (each hash takes tens of milliseconds on purpose)."""

    def __init__(self, *, memory_kib: int, time_cost: int, parallelism: int) -> None:
        self.hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism)
        # Checked when the e-mail is unknown, so a miss costs what a wrong password costs and
        # the timing does not tell which addresses have users.
        self._decoy = self.hasher.hash(secrets.token_urlsafe(16))

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self.hasher.hash, password)

    async def verify(self, stored: str | None, password: str) -> bool:
        matches = await asyncio.to_thread(self._verify, stored or self._decoy, password)
        return matches and stored is not None

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return self.hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored: str) -> bool:
        return self.hasher.check_needs_rehash(stored)


# --- the rules --------------------------------------------------------------------------


@dataclass(frozen=True)
class LoginLimit:
    """Failed logins allowed per client address, and per e-mail (from any address), in a
    sliding window. Counted in this service's database, so every replica of it and of the
    gateway sees one count; a count in each gateway process would multiply the limit by the
    replicas. The e-mail's limit is the higher: past it anyone, the user included, is
    refused until the window moves (a lever to lock a user out for its length), so one
    address is meant to meet its own limit first."""

    max_failures: int = 5
    window_seconds: int = 900
    max_email_failures: int = 10


@dataclass(frozen=True)
class Issued:
    access_token: str
    refresh_token: str
    expires_in: int
    session_id: str
    user: Row


class Auth:
    def __init__(
        self,
        repo: AuthRepo,
        *,
        tokens: AccessTokens,
        passwords: Passwords,
        refresh_ttl_seconds: int,
        login_limit: LoginLimit,
        default_account: str = "default",
    ) -> None:
        self.repo = repo
        self.tokens = tokens
        self.passwords = passwords
        self.refresh_ttl_seconds = refresh_ttl_seconds
        self.login_limit = login_limit
        # Admins belong to no account; their dates are read in this one's zone.
        self.default_account = default_account

    # users

    async def create_user(self, caller: Caller, *, email: str, password: str, role: str, account_id: str) -> Row:
        if not caller.is_admin:
            raise PermissionDenied("only an admin creates users")
        return await self._insert_user(email=email, password=password, role=role or MEMBER, account_id=account_id)

    async def ensure_admin(self, *, email: str, password: str) -> Row:
        """The operator's first admin; an existing user of that e-mail is left as it is."""
        existing = await self.repo.user_by_email(email=email.strip())
        if existing is not None:
            if existing["role"] != ADMIN:
                # Never promoted by configuration: that would hand a member every account.
                log.warning("PREGONERO_ADMIN_EMAIL belongs to a member; no admin was made")
            return existing
        return await self._insert_user(email=email, password=password, role=ADMIN, account_id="", exist_ok=True)

    async def _insert_user(
        self, *, email: str, password: str, role: str, account_id: str, exist_ok: bool = False
    ) -> Row:
        email = email.strip()
        if len(email) > 254 or not EMAIL_RE.match(email):
            raise InvalidArgument("email is not a valid address")
        low, high = PASSWORD_LENGTH
        if not low <= len(password) <= high:
            raise InvalidArgument(f"password must have {low} to {high} characters")
        if role not in (ADMIN, MEMBER):
            raise InvalidArgument("role must be admin or member")
        if role == MEMBER:
            if not account_id:
                raise InvalidArgument("a member needs an account_id")
            if not await self.repo.account_exists(account_id=account_id):
                raise NotFound(f"account {account_id} not found")
        elif account_id:
            raise InvalidArgument("an admin belongs to no account; leave account_id empty")
        row = await self.repo.insert_user(
            user_id=f"usr-{secrets.token_hex(8)}",
            email=email,
            password_hash=await self.passwords.hash(password),
            role=role,
            account_id=account_id or None,
        )
        if row is None:
            found = await self.repo.user_by_email(email=email) if exist_ok else None
            if found is None:
                raise AlreadyExists(f"a user with e-mail {email} already exists")
            return found
        return row

    async def get_user(self, caller: Caller, user_id: str) -> Row:
        wanted = user_id or caller.user_id
        # Another user is 'not found' to a member, so ids cannot be probed.
        row = (
            await self.repo.user_profile(user_id=wanted, default_account=self.default_account)
            if caller.is_admin or wanted == caller.user_id
            else None
        )
        if row is None:
            raise NotFound(f"user {wanted} not found")
        return row

    async def update_user(self, caller: Caller, user_id: str, *, timezone: str | None) -> Row:
        """The caller's own profile (admins: anyone's); None leaves a field as it is."""
        row = await self.get_user(caller, user_id)
        if timezone is not None:
            await self.repo.set_timezone(user_id=row["user_id"], timezone=check_timezone(timezone.strip()))
            row = await self.get_user(caller, row["user_id"])
        return row

    # sessions

    async def login(self, *, email: str, password: str, client_ip: str) -> Issued:
        address = client_ip or "unknown"
        email = email.strip()
        limit = self.login_limit
        async with self.repo.transaction() as tx:
            await tx.lock_login_address(client_ip=address)
            await tx.lock_login_email(email=email[:254])
            failures, retry_after = await tx.recent_failures(
                client_ip=address, window_seconds=limit.window_seconds, limit=limit.max_failures
            )
            # Keyed by the e-mail as typed, never by a user looked up first: an unknown e-mail
            # is limited, and answered, exactly like a user's.
            email_failures, email_retry_after = await tx.recent_email_failures(
                email=email[:254], window_seconds=limit.window_seconds, limit=limit.max_email_failures
            )
            waits = [retry_after] if failures >= limit.max_failures else []
            waits += [email_retry_after] if email_failures >= limit.max_email_failures else []
            if waits:
                by = "address" if failures >= limit.max_failures else "email"
                fields = {"client_ip": address, "by": by, "retry_after": max(waits)}
                log.warning("login limited", extra={"fields": fields})
                raise TooManyAttempts(max(1, *waits))
            # Counted as failed until the password checks out, so concurrent guesses see it.
            attempt_id = await tx.insert_login_attempt(client_ip=address, email=email[:254])
        user = await self.repo.user_by_email(email=email)
        matches = await self.passwords.verify(user["password_hash"] if user else None, password)
        if user is None or not matches or not user["is_active"]:
            raise Unauthenticated("invalid email or password")
        await self.repo.login_succeeded(attempt_id=attempt_id)
        if self.passwords.needs_rehash(user["password_hash"]):
            rehashed = await self.passwords.hash(password)
            await self.repo.set_password_hash(user_id=user["user_id"], password_hash=rehashed)
        session_id = uuid.uuid4().hex
        refresh = new_secret(REFRESH_TOKEN_PREFIX)
        async with self.repo.transaction() as tx:
            await tx.insert_session(
                session_id=session_id,
                user_id=user["user_id"],
                client_ip=address,
                ttl_seconds=self.refresh_ttl_seconds,
            )
            await tx.insert_refresh_token(
                token_hash=secret_hash(refresh), session_id=session_id, ttl_seconds=self.refresh_ttl_seconds
            )
        log.info("login", extra={"fields": {"user_id": user["user_id"], "session_id": session_id}})
        return self._issue(user, session_id=session_id, refresh_token=refresh)

    async def refresh(self, *, refresh_token: str) -> Issued:
        digest = secret_hash(refresh_token)
        async with self.repo.transaction() as tx:
            session_id = await tx.use_refresh_token(token_hash=digest)
            if session_id is not None:
                session = await tx.session(session_id=session_id)
                if session is None or session["revoked_at"] is not None or not session["is_active"]:
                    raise Unauthenticated("the session has ended; log in again")
                rotated = new_secret(REFRESH_TOKEN_PREFIX)
                await tx.insert_refresh_token(
                    token_hash=secret_hash(rotated), session_id=session_id, ttl_seconds=self.refresh_ttl_seconds
                )
                await tx.extend_session(session_id=session_id, ttl_seconds=self.refresh_ttl_seconds)
                return self._issue(session, session_id=session_id, refresh_token=rotated)
        # Outside the transaction: the revocation below must stick although the call fails.
        known = await self.repo.refresh_token(token_hash=digest)
        if known is not None and known["used_at"] is not None:
            await self.repo.revoke_session(session_id=known["session_id"], reason="refresh token reused")
            log.warning("refresh token reused", extra={"fields": {"session_id": known["session_id"]}})
            raise RefreshReused(known["session_id"])
        raise Unauthenticated("invalid or expired refresh token")

    def _issue(self, user: Row, *, session_id: str, refresh_token: str) -> Issued:
        access = self.tokens.issue(
            user_id=user["user_id"], role=user["role"], account_id=user["account_id"] or "", session_id=session_id
        )
        return Issued(access, refresh_token, self.tokens.ttl_seconds, session_id, user)

    async def logout(self, caller: Caller | None, *, refresh_token: str = "", session_id: str = "") -> tuple[str, bool]:
        """(session id, whether this call revoked it). Holding a refresh token of the session
        is proof enough; naming a session needs its user or an admin."""
        if refresh_token:
            known = await self.repo.refresh_token(token_hash=secret_hash(refresh_token))
            if known is None:
                raise Unauthenticated("invalid refresh token")
            session_id = known["session_id"]
        elif session_id:
            if caller is None:
                raise Unauthenticated("call carries no caller identity")
            session = await self.repo.session(session_id=session_id)
            if session is None or not (caller.is_admin or session["user_id"] == caller.user_id):
                raise NotFound(f"session {session_id} not found")
        else:
            raise InvalidArgument("give a refresh_token or a session_id")
        revoked = await self.repo.revoke_session(session_id=session_id, reason="logout")
        return session_id, revoked

    async def session_active(self, session_id: str) -> bool:
        return await self.repo.session_active(session_id=session_id)

    async def session_timezone(self, session_id: str) -> str | None:
        """The effective zone of the live session's user; None when the session has ended."""
        return await self.repo.session_timezone(session_id=session_id, default_account=self.default_account)

    async def account_timezone(self, account_id: str) -> str:
        return await self.repo.account_timezone(account_id=account_id) or ""

    # API keys

    async def create_api_key(self, caller: Caller, *, name: str, account_id: str) -> tuple[Row, str]:
        """The key and its secret, which is not kept and cannot be read again."""
        account = caller.account_scope(account_id)
        name = name.strip()
        if not 1 <= len(name) <= KEY_NAME_LENGTH:
            raise InvalidArgument(f"name must have 1 to {KEY_NAME_LENGTH} characters")
        if not await self.repo.account_exists(account_id=account):
            raise NotFound(f"account {account} not found")
        secret = new_secret(API_KEY_PREFIX)
        row = await self.repo.insert_api_key(
            key_id=f"key-{secrets.token_hex(8)}",
            account_id=account,
            name=name,
            key_hash=secret_hash(secret),
            prefix=secret[: len(API_KEY_PREFIX) + 4],
            last4=secret[-4:],
            created_by=caller.user_id,
        )
        return row, secret

    async def list_api_keys(self, caller: Caller, *, account_id: str, include_revoked: bool) -> list[Row]:
        # An admin naming no account sees every account's keys.
        account = account_id if caller.is_admin else caller.account_scope(account_id)
        return list(
            await self.repo.list_api_keys(account_id=account, include_revoked=include_revoked, limit=API_KEY_LIST_LIMIT)
        )

    async def revoke_api_key(self, caller: Caller, *, key_id: str) -> Row:
        row = await self.repo.api_key(key_id=key_id)
        if row is None or not (caller.is_admin or row["account_id"] == caller.account_id):
            raise NotFound(f"API key {key_id} not found")
        revoked = await self.repo.revoke_api_key(key_id=key_id)
        assert revoked is not None
        return revoked

    async def resolve_api_key(self, *, secret: str) -> Row:
        row = await self.repo.use_api_key(key_hash=secret_hash(secret)) if secret.startswith(API_KEY_PREFIX) else None
        if row is None:
            raise Unauthenticated("invalid or revoked API key")
        return row

    async def purge_forever(self, *, every_seconds: float = 600.0) -> None:
        """Drops login attempts past their window and sessions long expired."""
        while True:
            try:
                await self.repo.purge(login_window_seconds=self.login_limit.window_seconds)
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("auth purge failed: %s", exc)  # the next round tries again
            await asyncio.sleep(every_seconds)


def build_auth(pool: asyncpg.Pool, settings: AccountsSettings) -> Auth:
    if settings.pregonero_admin_email:
        reject_placeholders(settings, PREGONERO_ADMIN_PASSWORD=settings.pregonero_admin_password)
    return Auth(
        AuthRepo(pool),
        tokens=AccessTokens(
            load_signing_key(settings),
            issuer=settings.pregonero_jwt_issuer,
            audience=settings.pregonero_jwt_audience,
            ttl_seconds=settings.pregonero_access_token_ttl_seconds,
            previous=load_previous_keys(settings),
        ),
        passwords=Passwords(
            memory_kib=settings.pregonero_argon2_memory_kib,
            time_cost=settings.pregonero_argon2_time_cost,
            parallelism=settings.pregonero_argon2_parallelism,
        ),
        refresh_ttl_seconds=settings.pregonero_refresh_token_ttl_seconds,
        login_limit=LoginLimit(
            settings.pregonero_login_max_failures,
            settings.pregonero_login_window_seconds,
            settings.pregonero_login_max_email_failures,
        ),
        default_account=settings.pregonero_default_account,
    )
