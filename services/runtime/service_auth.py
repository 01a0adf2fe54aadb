"""Who is calling, proven: every gRPC call inside the suite carries a short-lived token signed
by the calling service, and every service verifies it before serving.

Plain metadata (`x-role: admin`) proves nothing: any pod that reaches a service could write
it. So each service holds its own Ed25519 signing key (`SERVICE_SIGNING_KEY`), and all of them
know every service's public key (`SERVICE_PUBLIC_KEYS`). A call's token says:

- `iss`: the service that signed it, which is the service that made the call;
- `aud`: the one service it is for, so a token a service receives cannot be replayed to
  another (campaigns cannot pass the gateway's admin token on to accounts);
- the caller it acts for, when it acts for one (`role`, `acct`, `sub`, `tz`);
- `exp`: one minute after it was signed.

What a verified caller may do is then two checks. The server's policy (`Callers`) says which
services may call each RPC: the gateway every user-facing one, campaigns only the ledger's
hold flow and the few reads it needs. And only the gateway, which authenticates people, may
speak for an admin: a service acting on its own behalf acts for one account at a time.

Keys rotate without downtime: `SERVICE_PUBLIC_KEYS` may list two keys for one service (the
kid is the service and a fingerprint of the key), so a new signing key is trusted everywhere
before it is used."""

from __future__ import annotations

import base64
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cachetools import TTLCache
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import PermissionDenied, Unauthenticated
from .identity import ACCOUNT_KEY, ADMIN, ROLE_KEY, TIMEZONE_KEY, USER_KEY, Caller, caller_from_metadata

TOKEN_KEY = "x-service-token"
ALGORITHM = "EdDSA"
TOKEN_TTL_S = 60.0
# A token is reused for calls made within this long of its signing (then a new one is signed),
# so a busy caller signs about once every half minute instead of once a call.
REUSE_S = 30.0
LEEWAY_S = 5
# Only the gateway authenticates people, so only its word makes a caller an admin.
ADMIN_ISSUERS = frozenset({"gateway"})
# Verified tokens remembered (with their expiry), so a reused token costs a dict lookup.
VERIFIED_MAX = 4096
# The plain metadata keys a caller was described with before it was signed; never trusted.
CALLER_KEYS = frozenset({ROLE_KEY, ACCOUNT_KEY, USER_KEY, TIMEZONE_KEY})

# Calls any client may make without a token: health (probes, load balancers) and, outside
# production, reflection (grpcurl while developing).
HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
REFLECTION_METHODS = frozenset(
    {
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)

GATEWAY = frozenset({"gateway"})
# The processes that call others over gRPC, each with a signing key of its own.
SIGNING_SERVICES = ("gateway", "accounts", "campaigns", "dispatcher")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_signing_key() -> tuple[str, str]:
    """(private, public) as base64url of the raw 32-byte keys: the setting values."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return _b64(private), _b64(_public_bytes(key.public_key()))


def _public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(service: str, public: Ed25519PublicKey) -> str:
    return f"{service}.{hashlib.sha256(_public_bytes(public)).hexdigest()[:12]}"


def parse_public_keys(spec: str) -> dict[str, tuple[str, Ed25519PublicKey]]:
    """`gateway:<b64>,accounts:<b64>,...` → {kid: (service, key)}. A service may appear twice
    (old and new key while rotating). A malformed entry stops the start."""
    keys: dict[str, tuple[str, Ed25519PublicKey]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        service, sep, encoded = entry.partition(":")
        try:
            if not sep or not service:
                raise ValueError("not service:key")
            public = Ed25519PublicKey.from_public_bytes(_unb64(encoded.strip()))
        except ValueError as exc:
            raise ValueError(f"SERVICE_PUBLIC_KEYS entry {entry[:16]}…: {exc}") from exc
        keys[key_id(service.strip(), public)] = (service.strip(), public)
    return keys


@dataclass(frozen=True, slots=True)
class Verified:
    """A call whose token checked out: the service that made it and the caller it acts for."""

    service: str
    caller: Caller | None


class Keyring:
    """This process's signing key and every service's public key."""

    def __init__(
        self,
        service: str,
        *,
        signing_key: str,
        public_keys: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.clock = clock
        self.trusted = parse_public_keys(public_keys)
        self._key: Ed25519PrivateKey | None = None
        self.kid = ""
        if signing_key:
            try:
                self._key = Ed25519PrivateKey.from_private_bytes(_unb64(signing_key))
            except ValueError as exc:
                raise ValueError(f"SERVICE_SIGNING_KEY is not a base64url Ed25519 key: {exc}") from exc
            self.kid = key_id(service, self._key.public_key())
            if self.kid not in self.trusted:
                # A key nobody trusts would make every call of this service fail at its peers.
                raise ValueError(f"{service}'s signing key is not among SERVICE_PUBLIC_KEYS")
        # A token per (target, caller), reused for REUSE_S; a flood of callers evicts the oldest.
        self._signed: TTLCache[tuple[str, Caller | None], str] = TTLCache(VERIFIED_MAX, REUSE_S, timer=self.clock)
        self._verified: OrderedDict[str, tuple[float, Verified]] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Any) -> Keyring:
        if not settings.service_public_keys:
            raise ValueError("set SERVICE_PUBLIC_KEYS and SERVICE_SIGNING_KEY (make run and the tests generate them)")
        return cls(
            settings.service_name,
            signing_key=settings.service_signing_key.get_secret_value(),
            public_keys=settings.service_public_keys,
        )

    # Signing (client side)

    def token(self, audience: str, caller: Caller | None) -> str:
        """A token for a call to `audience`, acting for `caller` (None: on the service's own
        behalf). Reused for REUSE_S, so signing is not paid per call."""
        if self._key is None:
            raise Unauthenticated(f"{self.service} has no signing key")
        now = self.clock()
        cache_key = (audience, caller)
        hit = self._signed.get(cache_key)
        if hit is not None:
            return hit
        claims: dict[str, Any] = {"iss": self.service, "aud": audience, "iat": int(now), "exp": int(now + TOKEN_TTL_S)}
        if caller is not None:
            claims.update(role=caller.role, acct=caller.account_id, sub=caller.user_id)
            if caller.timezone:
                claims["tz"] = caller.timezone
        token = jwt.encode(claims, self._key, algorithm=ALGORITHM, headers={"kid": self.kid})
        self._signed[cache_key] = token
        return token

    def sign_metadata(self, audience: str, metadata: Any) -> list[tuple[str, str]]:
        """Outgoing metadata with the plain caller keys replaced by a token for `audience`."""
        pairs = [(k, v) for k, v in (metadata or ()) if k != TOKEN_KEY]
        plain = {k: v for k, v in pairs if k in CALLER_KEYS and isinstance(v, str)}
        caller = caller_from_metadata(plain)
        kept = [(k, v) for k, v in pairs if k not in CALLER_KEYS]
        return [*kept, (TOKEN_KEY, self.token(audience, caller))]

    # Verifying (server side)

    def verify(self, token: str) -> Verified:
        """The call's service and caller, or Unauthenticated: unknown key, bad signature,
        another audience, expired, or an admin vouched for by a service that may not."""
        now = self.clock()
        hit = self._verified.get(token)
        if hit is not None:
            if now < hit[0]:
                self._verified.move_to_end(token)
                return hit[1]
            del self._verified[token]
        try:
            kid = str(jwt.get_unverified_header(token).get("kid", ""))
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated("malformed service token") from exc
        trusted = self.trusted.get(kid)
        if trusted is None:
            raise Unauthenticated("service token signed by an unknown key")
        issuer, public = trusted
        try:
            claims = jwt.decode(
                token,
                public,
                algorithms=[ALGORITHM],
                audience=self.service,
                issuer=issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"service token rejected: {exc}") from exc
        caller = None
        if claims.get("role"):
            caller = caller_from_metadata(
                {
                    ROLE_KEY: str(claims["role"]),
                    ACCOUNT_KEY: str(claims.get("acct", "")),
                    USER_KEY: str(claims.get("sub", "")),
                    TIMEZONE_KEY: str(claims.get("tz", "")),
                }
            )
            if caller is None:
                raise Unauthenticated("service token names no valid caller")
            if caller.role == ADMIN and issuer not in ADMIN_ISSUERS:
                raise PermissionDenied(f"{issuer} may not act for an admin")
        verified = Verified(service=issuer, caller=caller)
        self._verified[token] = (float(claims["exp"]) + LEEWAY_S, verified)
        if len(self._verified) > VERIFIED_MAX:
            self._verified.popitem(last=False)
        return verified


class Callers:
    """Which services may call which RPC of a server. Unlisted RPCs are the gateway's alone;
    listed ones name every service allowed (the gateway included only if named)."""

    def __init__(self, methods: Mapping[str, frozenset[str]] | None = None, *, reflection: bool = False) -> None:
        self.methods = dict(methods or {})
        self.public = HEALTH_METHODS | (REFLECTION_METHODS if reflection else frozenset())

    def needs_token(self, method: str) -> bool:
        return method not in self.public

    def check(self, method: str, service: str) -> None:
        allowed = self.methods.get(method, GATEWAY)
        if service not in allowed:
            raise PermissionDenied(f"{service} may not call {method}")


def new_key_set() -> dict[str, tuple[str, str]]:
    """A fresh (private, public) key per service that calls others."""
    return {name: new_signing_key() for name in SIGNING_SERVICES}


def main() -> None:
    """`python -m services.runtime.service_auth`: a fresh key per service, printed as the
    settings that carry them (each service's SERVICE_SIGNING_KEY, everyone's public keys)."""
    keys = new_key_set()
    for name, (private, _) in keys.items():
        print(f"{name.upper()}_SIGNING_KEY={private}")
    print("SERVICE_PUBLIC_KEYS=" + ",".join(f"{name}:{public}" for name, (_, public) in keys.items()))


if __name__ == "__main__":
    main()
