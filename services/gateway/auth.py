"""Who is calling: `Authorization: Bearer <token>` resolved to a Caller. For now from the
operator's static tokens; JWTs and API keys plug in here later."""

from __future__ import annotations

import hmac

from fastapi import Request

from services.runtime.identity import ADMIN, MEMBER, Caller

from .config import GatewaySettings
from .errors import ApiError


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


class Authenticator:
    def __init__(self, settings: GatewaySettings) -> None:
        self.static = parse_static_tokens(
            settings.pregonero_static_tokens, default_account=settings.pregonero_default_account
        )
        self.anonymous = (
            Caller(role=MEMBER, account_id=settings.pregonero_anonymous_account, user_id="anonymous")
            if settings.pregonero_anonymous_account
            else None
        )

    def resolve(self, authorization: str | None, *, allow_anonymous: bool = False) -> Caller:
        if not authorization:
            if allow_anonymous and self.anonymous is not None:
                return self.anonymous
            raise ApiError(401, "missing bearer token", "unauthorized")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "authorization must be 'Bearer <token>'", "unauthorized")
        for known, caller in self.static.items():
            # Constant-time comparison: token checks must not leak prefixes through timing.
            if hmac.compare_digest(known.encode(), token.encode()):
                return caller
        raise ApiError(401, "invalid or expired token", "unauthorized")


async def require_caller(request: Request) -> Caller:
    """FastAPI dependency for every protected route."""
    auth: Authenticator = request.app.state.auth
    return auth.resolve(request.headers.get("authorization"))


async def caller_or_anonymous(request: Request) -> Caller:
    """For the account-less WhatsApp bulk sender routes, which the operator may open up."""
    auth: Authenticator = request.app.state.auth
    return auth.resolve(request.headers.get("authorization"), allow_anonymous=True)
