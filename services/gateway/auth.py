"""Who is calling: `Authorization: Bearer <token>` resolved to a Caller. Tried in order: the
operator's static tokens, per-account API keys (`pk_...`), and JWT access tokens signed by the
accounts service.

JWTs are verified here with the public key alone; what a signature cannot tell (the session
was logged out, or its refresh token replayed) is asked of the accounts service and the answer
reused for `pregonero_auth_cache_seconds` (≤ 5 s), which is therefore how late a revocation
can take effect on another replica. The replica that handles a logout or a replay forgets the
session at once.

The caller's time zone comes with those answers (a session's user's, an API key's account's),
at no extra call; a static token's is its account's, asked once a minute at most. It travels
on to the services as `Caller.timezone`; empty when accounts could not say.

Once a dependency has authenticated the caller, the request acts for it (`acting_for`): the
backend calls its route makes carry that caller, and routes name none themselves."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import grpc
import jwt
from cachetools import TTLCache
from fastapi import Request
from fastapi.requests import HTTPConnection
from pregonero.accounts.v1 import accounts_pb2, accounts_pb2_grpc, auth_pb2, auth_pb2_grpc

from services.runtime import identity
from services.runtime.identity import ADMIN, MEMBER, Caller

from .config import GatewaySettings
from .errors import ApiError

log = logging.getLogger("pregonero.gateway.auth")

API_KEY_PREFIX = "pk_"
# Tolerated clock difference between the accounts service that signs and this gateway.
LEEWAY_S = 10
# An unknown kid (a rotated key, or a forged token) refetches the key set at most this often.
JWKS_REFETCH_S = 30.0
# How long the published key set is served before it is asked for again.
JWKS_MAX_AGE_S = 300.0
# Revoked sessions are remembered as long as an access token can live (accounts caps it at 1 h).
REVOKED_MEMORY_S = 3600.0
CACHE_MAX_ENTRIES = 50_000
DIRECTORY_TIMEOUT_S = 3.0
# An account's zone changes rarely; a static token's caller reuses it this long, and waits
# at most this long for it (the request goes on without it).
ACCOUNT_ZONE_CACHE_S = 60.0
ACCOUNT_ZONE_TIMEOUT_S = 1.0
INVALID = "invalid or expired token"

STATIC, API_KEY, JWT, ANONYMOUS = "static", "api_key", "jwt", "anonymous"


def parse_static_tokens(spec: str, *, default_account: str) -> dict[str, Caller]:
    """`tok1=admin,tok2=account:acc-1` → {token: Caller}. A malformed entry stops the start."""
    tokens: dict[str, Caller] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        token, sep, who = entry.partition("=")
        token, who = token.strip(), who.strip()
        if not sep or not token:
            raise ValueError(f"static token entry {entry[:4]}… is not token=admin|account:<id>")
        if who == "admin":
            tokens[token] = Caller(role=ADMIN, account_id=default_account, user_id="operator")
        elif who.startswith("account:") and who[len("account:") :]:
            tokens[token] = Caller(role=MEMBER, account_id=who[len("account:") :], user_id="operator")
        else:
            raise ValueError(f"static token entry {token[:4]}… maps to {who!r}; use admin or account:<id>")
    return tokens


@dataclass(frozen=True)
class Principal:
    """A caller and how it proved itself (a logout needs the session, key routes the kind)."""

    caller: Caller
    kind: str
    session_id: str = ""
    key_id: str = ""
    # When the credential stops working by itself (a JWT's `exp`, wall-clock seconds).
    expires_at: float = math.inf


@dataclass(frozen=True)
class KeyOwner:
    key_id: str
    account_id: str
    timezone: str = ""


class Directory(Protocol):
    """What authentication asks the accounts service (tests fake it)."""

    async def jwks(self) -> dict[str, Any]: ...

    async def session_timezone(self, session_id: str) -> str | None:
        """The zone of a live session's user; None when the session has ended."""
        ...

    async def api_key(self, secret: str) -> KeyOwner | None: ...

    async def account_timezone(self, caller: Caller) -> str: ...


class GrpcDirectory:
    def __init__(
        self, stub: auth_pb2_grpc.AuthServiceStub, accounts: accounts_pb2_grpc.AccountsServiceStub | None = None
    ) -> None:
        self.stub = stub
        self.accounts = accounts

    async def jwks(self) -> dict[str, Any]:
        reply = await self.stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=DIRECTORY_TIMEOUT_S)
        return dict(json.loads(reply.jwks_json))

    async def session_timezone(self, session_id: str) -> str | None:
        request = auth_pb2.CheckSessionRequest(session_id=session_id)
        reply = await self.stub.CheckSession(request, timeout=DIRECTORY_TIMEOUT_S)
        return reply.timezone if reply.active else None

    async def account_timezone(self, caller: Caller) -> str:
        if self.accounts is None:
            return ""
        # Asked while the caller is being authenticated, before the request acts for it: named.
        reply = await self.accounts.GetAccount(
            accounts_pb2.GetAccountRequest(account_id=caller.account_id),
            metadata=caller.metadata(),
            timeout=ACCOUNT_ZONE_TIMEOUT_S,
        )
        return str(reply.timezone)

    async def api_key(self, secret: str) -> KeyOwner | None:
        try:
            reply = await self.stub.ResolveApiKey(
                auth_pb2.ResolveApiKeyRequest(secret=secret), timeout=DIRECTORY_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return None
            raise
        return KeyOwner(key_id=reply.key_id, account_id=reply.account_id, timezone=reply.timezone)


_MISSING: Any = object()


class TtlCache:
    """Answers trusted for `ttl` seconds; bounded: when full, the least recently used goes."""

    def __init__(self, ttl: float, clock: Callable[[], float], max_entries: int = CACHE_MAX_ENTRIES) -> None:
        self._data: TTLCache[str, Any] = TTLCache(max_entries, ttl, timer=clock)

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def put(self, key: str, value: Any) -> None:
        self._data[key] = value

    def drop(self, key: str) -> None:
        self._data.pop(key, None)

    def drop_values(self, predicate: Callable[[Any], bool]) -> None:
        for key in [k for k, v in self._data.items() if predicate(v)]:
            self._data.pop(key, None)


def bearer_token(authorization: str) -> str:
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "authorization must be 'Bearer <token>'", "unauthorized")
    return token


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(spec: str) -> list[Network]:
    return [ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip()]


def _within(address: str, networks: list[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_address(peer: str, forwarded_for: str, trusted: list[Network]) -> str:
    """The client a request came from. Behind Envoy (use_remote_address) the address Envoy saw
    is the last X-Forwarded-For hop it appended; hops before it are whatever the client wrote,
    so the walk goes back from the nearest hop and stops at the first one that is not one of
    our own proxies. A request that did not come through a trusted proxy is its peer."""
    if forwarded_for and _within(peer, trusted):
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not _within(hop, trusted):
                return hop
        if hops:
            return hops[0]
    return peer or "unknown"


class Authenticator:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        directory: Directory | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.static = parse_static_tokens(
            settings.pregonero_static_tokens, default_account=settings.pregonero_default_account
        )
        self.anonymous = (
            Caller(role=MEMBER, account_id=settings.pregonero_anonymous_account, user_id="anonymous")
            if settings.pregonero_anonymous_account
            else None
        )
        self.default_account = settings.pregonero_default_account
        self.issuer = settings.pregonero_jwt_issuer
        self.audience = settings.pregonero_jwt_audience
        self.trusted_proxies = parse_networks(settings.pregonero_trusted_proxies)
        self.directory = directory
        self.clock = clock
        self._sessions = TtlCache(settings.pregonero_auth_cache_seconds, clock)
        self._api_keys = TtlCache(settings.pregonero_auth_cache_seconds, clock)
        self._revoked = TtlCache(REVOKED_MEMORY_S, clock)
        # By account, for static tokens only (the operator configures a handful): unbounded is fine.
        self._account_zones: dict[str, tuple[float, str]] = {}
        self._keys: dict[str, jwt.PyJWK] = {}
        self._jwks: dict[str, Any] | None = None
        self._jwks_fetched_at = -math.inf
        self._jwks_lock = asyncio.Lock()
        self._revocation_listeners: list[Callable[[str, str], None]] = []

    def attach(self, directory: Directory) -> None:
        self.directory = directory

    async def resolve(self, authorization: str | None, *, allow_anonymous: bool = False) -> Caller:
        return (await self.authenticate(authorization, allow_anonymous=allow_anonymous)).caller

    async def authenticate(self, authorization: str | None, *, allow_anonymous: bool = False) -> Principal:
        if not authorization:
            if allow_anonymous and self.anonymous is not None:
                return Principal(self.anonymous, ANONYMOUS)
            raise ApiError(401, "missing bearer token", "unauthorized")
        token = bearer_token(authorization)
        static = self._static_caller(token)
        if static is not None:
            return Principal(await self._with_account_zone(static), STATIC)
        if token.startswith(API_KEY_PREFIX):
            return await self._api_key(token)
        if token.count(".") == 2:
            principal = self.principal_of(await self.verify_access_token(token))
            timezone = await self._session_timezone(principal.session_id)
            if timezone is None:
                raise ApiError(401, "the session has ended; log in again", "unauthorized")
            return replace(principal, caller=replace(principal.caller, timezone=timezone))
        raise ApiError(401, INVALID, "unauthorized")

    async def _with_account_zone(self, caller: Caller) -> Caller:
        """A static token's caller with its account's zone. Never fails the request: these
        tokens work while accounts is down (the zone is then the last known, else empty)."""
        asked_at, zone = self._account_zones.get(caller.account_id, (-math.inf, ""))
        if self.clock() - asked_at >= ACCOUNT_ZONE_CACHE_S and self.directory is not None:
            try:
                zone = await self.directory.account_timezone(caller)
            except grpc.aio.AioRpcError as exc:
                # The last zone known stays, and is asked again in a minute: an outage costs
                # one call a minute, not one a request.
                log.info("no zone for account %s: %s", caller.account_id, exc.code().name)
            self._account_zones[caller.account_id] = (self.clock(), zone)
        return replace(caller, timezone=zone) if zone else caller

    async def logout_principal(self, authorization: str | None) -> Principal:
        """As `authenticate`, except that a JWT past its expiry or of an already revoked
        session still names that session: ending a session needs no live token."""
        if authorization:
            token = bearer_token(authorization)
            if token.count(".") == 2 and self._static_caller(token) is None:
                return self.principal_of(await self.verify_access_token(token, verify_exp=False))
        return await self.authenticate(authorization)

    def _static_caller(self, token: str) -> Caller | None:
        found = None
        for known, caller in self.static.items():
            # Constant-time comparison: token checks must not leak prefixes through timing.
            if hmac.compare_digest(known.encode(), token.encode()):
                found = caller
        return found

    # JWT access tokens

    async def verify_access_token(self, token: str, *, verify_exp: bool = True) -> dict[str, Any]:
        """Signature, issuer, audience and (unless told otherwise) expiry; the claims when all hold."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise ApiError(401, INVALID, "unauthorized") from exc
        key = await self._signing_key(str(header.get("kid", "")))
        if key is None:
            raise ApiError(401, INVALID, "unauthorized")
        try:
            # Only the key's own algorithm: `none`, or HS256 keyed with the public key, fail here.
            return jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],
                issuer=self.issuer,
                audience=self.audience,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iat", "iss", "aud", "sub", "sid"], "verify_exp": verify_exp},
            )
        except jwt.ExpiredSignatureError as exc:
            raise ApiError(401, "token expired", "unauthorized") from exc
        except jwt.InvalidTokenError as exc:
            raise ApiError(401, INVALID, "unauthorized") from exc

    def principal_of(self, claims: dict[str, Any]) -> Principal:
        role, account, user, session = (claims.get(k) for k in ("role", "account_id", "sub", "sid"))
        if not all(isinstance(v, str) for v in (role, account or "", user, session)) or not user or not session:
            raise ApiError(401, INVALID, "unauthorized")
        if role == ADMIN:
            # Like the operator's admin tokens: work that names no account lands in the default one.
            caller = Caller(role=ADMIN, account_id=account or self.default_account, user_id=user)
        elif role == MEMBER and account:
            caller = Caller(role=MEMBER, account_id=account, user_id=user)
        else:
            raise ApiError(401, INVALID, "unauthorized")
        exp = claims.get("exp")
        expires_at = float(exp) if isinstance(exp, int | float) else 0.0  # unchecked only for a logout
        return Principal(caller, JWT, session_id=session, expires_at=expires_at)

    async def _signing_key(self, kid: str) -> jwt.PyJWK | None:
        key = self._keys.get(kid)
        age = self.clock() - self._jwks_fetched_at
        # Known keys are trusted for JWKS_MAX_AGE_S only: a key rotated out of the set
        # (PREGONERO_JWT_PREVIOUS_KEY unset) stops verifying within that time.
        if (key is None and age >= JWKS_REFETCH_S) or age >= JWKS_MAX_AGE_S:
            await self._load_jwks()
            key = self._keys.get(kid)
        return key

    async def _load_jwks(self) -> dict[str, Any]:
        async with self._jwks_lock:
            if self._jwks is not None and self.clock() - self._jwks_fetched_at < 1.0:
                return self._jwks  # another request has just fetched it
            jwks = await self._ask(lambda d: d.jwks())
            keys: dict[str, jwt.PyJWK] = {}
            for entry in jwks.get("keys", []):
                try:
                    keys[str(entry.get("kid", ""))] = jwt.PyJWK(entry)
                except jwt.PyJWKError:
                    log.warning("skipping an unusable key %s of the key set", entry.get("kid"))
            self._keys, self._jwks, self._jwks_fetched_at = keys, jwks, self.clock()
            return jwks

    async def jwks(self) -> dict[str, Any]:
        """The public key set, as published for Envoy."""
        if self._jwks is None or self.clock() - self._jwks_fetched_at >= JWKS_MAX_AGE_S:
            return await self._load_jwks()
        return self._jwks

    # revocation

    async def _session_timezone(self, session_id: str) -> str | None:
        """The zone of the session's user while the session is live; None once it has ended."""
        if self._revoked.get(session_id):
            return None
        cached = self._sessions.get(session_id)
        if cached is not None:
            return str(cached)
        timezone = await self._ask(lambda d: d.session_timezone(session_id))
        if timezone is None:
            self.forget_session(session_id)
            return None
        self._sessions.put(session_id, str(timezone))
        return str(timezone)

    def profile_changed(self, session_id: str) -> None:
        """The session's user changed its profile: ask again (other replicas within the cache bound)."""
        self._sessions.drop(session_id)

    def forget_session(self, session_id: str) -> None:
        """This replica refuses the session from now on (the others within the cache bound)."""
        self._sessions.drop(session_id)
        self._revoked.put(session_id, True)
        self._tell_revoked(JWT, session_id)

    # API keys

    async def _api_key(self, secret: str) -> Principal:
        # Cached by digest, so no secret sits in memory longer than the request.
        digest = hashlib.sha256(secret.encode()).hexdigest()
        owner = self._api_keys.get(digest, _MISSING)
        if owner is _MISSING:
            owner = await self._ask(lambda d: d.api_key(secret))
            self._api_keys.put(digest, owner)
        if owner is None:
            raise ApiError(401, "invalid or revoked API key", "unauthorized")
        caller = Caller(
            role=MEMBER, account_id=owner.account_id, user_id=f"key:{owner.key_id}", timezone=owner.timezone
        )
        return Principal(caller, API_KEY, key_id=owner.key_id)

    def forget_api_key(self, key_id: str) -> None:
        self._api_keys.drop_values(lambda owner: owner is not None and owner.key_id == key_id)
        self._tell_revoked(API_KEY, key_id)

    def on_revoke(self, listener: Callable[[str, str], None]) -> None:
        """`listener(JWT, session_id)` or `listener(API_KEY, key_id)` as soon as this replica
        learns that one has ended (what is open on it, sockets, can end at once)."""
        self._revocation_listeners.append(listener)

    def _tell_revoked(self, kind: str, ident: str) -> None:
        for listener in self._revocation_listeners:
            listener(kind, ident)

    async def recheck(self, principal: Principal, authorization: str | None) -> None:
        """Raises 401 once the session or API key `principal` proved itself with has ended; a
        long-lived socket asks from time to time. Answered from the same caches as
        `authenticate`; signature and expiry are not verified again (see `expires_at`)."""
        if principal.kind == JWT and await self._session_timezone(principal.session_id) is None:
            raise ApiError(401, "the session has ended; log in again", "unauthorized")
        if principal.kind == API_KEY:
            await self._api_key(bearer_token(authorization or ""))

    async def _ask(self, call: Callable[[Directory], Any]) -> Any:
        if self.directory is None:
            raise ApiError(503, "authentication service unavailable", "unavailable")
        try:
            return await call(self.directory)
        except grpc.aio.AioRpcError as exc:
            log.warning("accounts did not answer an authentication check: %s", exc.code().name)
            raise ApiError(503, "authentication service unavailable", "unavailable") from exc

    def client_address(self, connection: HTTPConnection) -> str:
        """The client of a request or WebSocket: every limit per client reads it here. The
        peer is the TCP peer (uvicorn is told not to rewrite it, see main.py)."""
        return client_address(
            connection.client.host if connection.client else "",
            connection.headers.get("x-forwarded-for", ""),
            self.trusted_proxies,
        )


def acting_for(request: HTTPConnection, principal: Principal) -> Principal:
    """From here on the request (or socket) acts for `principal`'s caller: every backend call
    it makes carries that caller (the channels read identity.caller_var, runtime/rpc.py). Set
    in the request's own task (the dependencies are async, so FastAPI awaits them there, not in
    a thread), it holds for the route's body and ends with the request."""
    request.state.principal = principal
    identity.caller_var.set(principal.caller)
    return principal


async def require_principal(request: Request) -> Principal:
    auth: Authenticator = request.app.state.auth
    return acting_for(request, await auth.authenticate(request.headers.get("authorization")))


async def require_caller(request: Request) -> Caller:
    """FastAPI dependency for every protected route."""
    return (await require_principal(request)).caller


async def caller_or_anonymous(request: Request) -> Caller:
    """For the account-less WhatsApp bulk sender routes, which the operator may open up."""
    auth: Authenticator = request.app.state.auth
    principal = await auth.authenticate(request.headers.get("authorization"), allow_anonymous=True)
    return acting_for(request, principal).caller
