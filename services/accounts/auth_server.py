"""gRPC servicer of authentication: proto in, domain call, proto out."""

from __future__ import annotations

import json
from typing import NoReturn

import grpc
from pregonero.accounts.v1 import auth_pb2, auth_pb2_grpc

from services.runtime.errors import DomainError
from services.runtime.identity import caller_var, current_caller
from services.runtime.protos import to_timestamp

from .auth import Auth, Issued, RefreshReused, Row, TooManyAttempts

# Trailing metadata the gateway reads: when a limited login may be tried again, and which
# session a replayed refresh token has just revoked (so that replica forgets it at once).
RETRY_AFTER_KEY = "retry-after"
REVOKED_SESSION_KEY = "x-revoked-session"


def user_pb(row: Row) -> auth_pb2.User:
    return auth_pb2.User(
        user_id=row["user_id"],
        email=row["email"],
        role=row["role"],
        account_id=row["account_id"] or "",
        is_active=row["is_active"],
        created_at=to_timestamp(row["created_at"]),
        # Not every query that returns a user reads its zone (a login's or refresh's need not).
        timezone=row.get("timezone") or "",
        effective_timezone=row.get("effective_timezone") or "",
    )


def token_pair_pb(issued: Issued) -> auth_pb2.TokenPair:
    return auth_pb2.TokenPair(
        access_token=issued.access_token,
        refresh_token=issued.refresh_token,
        expires_in=issued.expires_in,
        user=user_pb(issued.user),
        session_id=issued.session_id,
    )


def api_key_pb(row: Row) -> auth_pb2.ApiKey:
    return auth_pb2.ApiKey(
        key_id=row["key_id"],
        account_id=row["account_id"],
        name=row["name"],
        prefix=row["prefix"],
        last4=row["last4"],
        created_by=row["created_by"],
        created_at=to_timestamp(row["created_at"]),
        last_used_at=to_timestamp(row["last_used_at"]),
        revoked_at=to_timestamp(row["revoked_at"]),
    )


def _peer_host(peer: str) -> str:
    """`ipv4:10.0.0.5:41234` → `10.0.0.5`: attempts are counted per address, not per connection."""
    _, _, rest = peer.partition(":")
    host = rest.rpartition(":")[0] or rest
    return host.strip("[]")


async def _abort(context: grpc.aio.ServicerContext, exc: DomainError, key: str, value: str) -> NoReturn:
    await context.abort(exc.code, exc.message, trailing_metadata=((key, value),))
    raise exc  # abort() raises; this line only tells type checkers so


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, auth: Auth) -> None:
        self.auth = auth

    async def Login(self, request: auth_pb2.LoginRequest, context: grpc.aio.ServicerContext) -> auth_pb2.TokenPair:
        try:
            issued = await self.auth.login(
                email=request.email,
                password=request.password,
                client_ip=request.client_ip or _peer_host(context.peer()),
            )
        except TooManyAttempts as exc:
            await _abort(context, exc, RETRY_AFTER_KEY, str(exc.retry_after))
        return token_pair_pb(issued)

    async def Refresh(self, request: auth_pb2.RefreshRequest, context: grpc.aio.ServicerContext) -> auth_pb2.TokenPair:
        try:
            issued = await self.auth.refresh(refresh_token=request.refresh_token)
        except RefreshReused as exc:
            await _abort(context, exc, REVOKED_SESSION_KEY, exc.session_id)
        return token_pair_pb(issued)

    async def Logout(
        self, request: auth_pb2.LogoutRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.LogoutResponse:
        session_id, revoked = await self.auth.logout(
            caller_var.get(), refresh_token=request.refresh_token, session_id=request.session_id
        )
        return auth_pb2.LogoutResponse(session_id=session_id, revoked=revoked)

    async def CheckSession(
        self, request: auth_pb2.CheckSessionRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.SessionState:
        timezone = await self.auth.session_timezone(request.session_id)
        return auth_pb2.SessionState(
            session_id=request.session_id, active=timezone is not None, timezone=timezone or ""
        )

    async def GetJwks(self, request: auth_pb2.GetJwksRequest, context: grpc.aio.ServicerContext) -> auth_pb2.Jwks:
        return auth_pb2.Jwks(jwks_json=json.dumps(self.auth.tokens.jwks()), issuer=self.auth.tokens.issuer)

    async def CreateUser(self, request: auth_pb2.CreateUserRequest, context: grpc.aio.ServicerContext) -> auth_pb2.User:
        row = await self.auth.create_user(
            current_caller(),
            email=request.email,
            password=request.password,
            role=request.role,
            account_id=request.account_id,
        )
        return user_pb(row)

    async def GetUser(self, request: auth_pb2.GetUserRequest, context: grpc.aio.ServicerContext) -> auth_pb2.User:
        return user_pb(await self.auth.get_user(current_caller(), request.user_id))

    async def UpdateUser(self, request: auth_pb2.UpdateUserRequest, context: grpc.aio.ServicerContext) -> auth_pb2.User:
        timezone = request.timezone if request.HasField("timezone") else None
        return user_pb(await self.auth.update_user(current_caller(), request.user_id, timezone=timezone))

    async def CreateApiKey(
        self, request: auth_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CreatedApiKey:
        row, secret = await self.auth.create_api_key(current_caller(), name=request.name, account_id=request.account_id)
        return auth_pb2.CreatedApiKey(key=api_key_pb(row), secret=secret)

    async def ListApiKeys(
        self, request: auth_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ListApiKeysResponse:
        rows = await self.auth.list_api_keys(
            current_caller(), account_id=request.account_id, include_revoked=request.include_revoked
        )
        return auth_pb2.ListApiKeysResponse(keys=[api_key_pb(r) for r in rows], total=len(rows))

    async def RevokeApiKey(
        self, request: auth_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ApiKey:
        return api_key_pb(await self.auth.revoke_api_key(current_caller(), key_id=request.key_id))

    async def ResolveApiKey(
        self, request: auth_pb2.ResolveApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ApiKey:
        key = api_key_pb(await self.auth.resolve_api_key(secret=request.secret))
        key.timezone = await self.auth.account_timezone(key.account_id)
        return key
