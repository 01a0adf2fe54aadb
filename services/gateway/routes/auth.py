"""Authentication: `/api/auth/*` as the WhatsApp scheduler guide names it (login, refresh,
logout, me), users, per-account API keys, and the public key set Envoy verifies JWTs with."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import grpc
from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import JSONResponse
from pregonero.accounts.v1 import auth_pb2, auth_pb2_grpc
from pydantic import BaseModel, ConfigDict, Field

from services.runtime.identity import Caller
from services.runtime.protos import from_timestamp, iso

from ..auth import API_KEY, JWKS_MAX_AGE_S, JWT, Authenticator, Principal, require_caller, require_principal
from ..errors import ApiError, error_response

router = APIRouter(tags=["auth"])

# Trailing metadata keys the accounts service's AuthService sets (see auth.proto).
RETRY_AFTER_KEY = "retry-after"
REVOKED_SESSION_KEY = "x-revoked-session"

CallerDep = Annotated[Caller, Depends(require_caller)]
PrincipalDep = Annotated[Principal, Depends(require_principal)]


class LoginBody(BaseModel):
    email: str = Field(max_length=254)
    password: str = Field(max_length=1024)


class RefreshBody(BaseModel):
    refresh_token: str = Field(max_length=512)


class LogoutBody(BaseModel):
    refresh_token: str | None = Field(None, max_length=512)


class User(BaseModel):
    id: str
    email: str
    role: str
    account_id: str | None = Field(description="The member's account; null for admins, who reach every account")
    is_active: bool
    created_at: str | None
    timezone: str = Field(description="The user's IANA zone; empty: the account's")
    effective_timezone: str | None = Field(description="The zone dates without an offset are read in")


class Me(BaseModel):
    role: str
    account_id: str | None
    user_id: str
    id: str | None = None
    email: str | None = None
    is_active: bool | None = None
    created_at: str | None = None
    timezone: str | None = None
    effective_timezone: str | None = None
    key_id: str | None = None


class MePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timezone: str | None = Field(
        None,
        max_length=64,
        description="An IANA zone (America/Santiago); empty: back to the account's zone",
        examples=["America/Santiago"],
    )


class Tokens(BaseModel):
    access_token: str
    refresh_token: str = Field(description="Works once: each refresh returns a new one")
    token_type: str = "bearer"
    expires_in: int = Field(description="Seconds the access token is valid")
    user: User


class UserCreate(BaseModel):
    email: str = Field(max_length=254)
    password: str = Field(min_length=8, max_length=1024)
    role: Literal["admin", "member"] = "member"
    account_id: str | None = Field(None, description="Required for members")


class ApiKeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    account_id: str | None = Field(None, description="Members: their own account; admins: any (default account)")


class ApiKey(BaseModel):
    id: str
    name: str
    account_id: str
    prefix: str
    last4: str
    created_by: str
    created_at: str | None
    last_used_at: str | None
    revoked_at: str | None


class ApiKeyCreated(ApiKey):
    key: str = Field(description="The secret, shown this once: use it as `Authorization: Bearer <key>`")


def _rpc(request: Request) -> auth_pb2_grpc.AuthServiceStub:
    return request.app.state.auth_rpc  # type: ignore[no-any-return]


def _auth(request: Request) -> Authenticator:
    return request.app.state.auth  # type: ignore[no-any-return]


def _trailing(exc: grpc.aio.AioRpcError, key: str) -> str:
    for k, v in exc.trailing_metadata() or ():
        if k == key and isinstance(v, str):
            return v
    return ""


def user_json(user: auth_pb2.User) -> dict[str, Any]:
    return {
        "id": user.user_id,
        "email": user.email,
        "role": user.role,
        "account_id": user.account_id or None,
        "is_active": user.is_active,
        "created_at": iso(from_timestamp(user.created_at, present=user.HasField("created_at"))),
        "timezone": user.timezone,
        # Replies that do not read the zone (login, refresh) leave it empty: unknown, not UTC.
        "effective_timezone": user.effective_timezone or None,
    }


def tokens_json(pair: auth_pb2.TokenPair) -> dict[str, Any]:
    return {
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "token_type": "bearer",
        "expires_in": pair.expires_in,
        "user": user_json(pair.user),
    }


def api_key_json(key: auth_pb2.ApiKey) -> dict[str, Any]:
    def when(field: str) -> str | None:
        return iso(from_timestamp(getattr(key, field), present=key.HasField(field)))

    return {
        "id": key.key_id,
        "name": key.name,
        "account_id": key.account_id,
        "prefix": key.prefix,
        "last4": key.last4,
        "created_by": key.created_by,
        "created_at": when("created_at"),
        "last_used_at": when("last_used_at"),
        "revoked_at": when("revoked_at"),
    }


@router.post(
    "/api/auth/login",
    response_model=Tokens,
    summary="Access and refresh tokens for an e-mail and password",
    description="Five failed attempts per client address, or ten per e-mail from any address, within 15 "
    "minutes, then 429 with Retry-After (even for the right password; an e-mail no user has alike). "
    "A successful login starts its e-mail's count again.",
)
async def login(request: Request, body: LoginBody) -> Any:
    try:
        pair = await _rpc(request).Login(
            auth_pb2.LoginRequest(
                email=body.email, password=body.password, client_ip=_auth(request).client_address(request)
            ),
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            message = exc.details() or "too many login attempts"
            retry_after = _trailing(exc, RETRY_AFTER_KEY) or "60"
            return error_response(429, message, "too_many_requests", headers={"Retry-After": retry_after})
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise ApiError(401, exc.details() or "invalid email or password", "unauthorized") from exc
        raise
    return tokens_json(pair)


@router.post("/api/auth/refresh", response_model=Tokens, summary="A new token pair for a refresh token (once)")
async def refresh(request: Request, body: RefreshBody) -> Any:
    try:
        pair = await _rpc(request).Refresh(
            auth_pb2.RefreshRequest(refresh_token=body.refresh_token),
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise
        revoked = _trailing(exc, REVOKED_SESSION_KEY)
        if revoked:
            _auth(request).forget_session(revoked)
        raise ApiError(401, exc.details() or "invalid or expired refresh token", "unauthorized") from exc
    return tokens_json(pair)


@router.post(
    "/api/auth/logout",
    status_code=204,
    response_class=Response,
    summary="End the session of the bearer JWT, or of the refresh token in the body",
    description="Every token of the session stops working (on every gateway replica within 5 s). "
    "Static tokens and API keys have no session: nothing to end.",
)
async def logout(request: Request, body: LogoutBody | None = None) -> Response:
    auth = _auth(request)
    if body is not None and body.refresh_token:
        try:
            reply = await _rpc(request).Logout(
                auth_pb2.LogoutRequest(refresh_token=body.refresh_token),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise ApiError(401, exc.details() or "invalid refresh token", "unauthorized") from exc
            raise
        auth.forget_session(reply.session_id)
        return Response(status_code=204)
    principal = await auth.logout_principal(request.headers.get("authorization"))
    if principal.kind == JWT:
        await _rpc(request).Logout(
            auth_pb2.LogoutRequest(session_id=principal.session_id),
            # Named: no dependency authenticated this caller (its token may be past expiry, and
            # may still end its session), so the request does not act for it by itself.
            metadata=principal.caller.metadata(),
        )
        auth.forget_session(principal.session_id)
    return Response(status_code=204)


@router.get("/api/auth/me", response_model=Me, summary="The caller")
async def me(request: Request, principal: PrincipalDep) -> JSONResponse:
    caller = principal.caller
    body: dict[str, Any] = {"role": caller.role, "account_id": caller.account_id, "user_id": caller.user_id}
    if principal.kind == JWT:
        user = await _rpc(request).GetUser(auth_pb2.GetUserRequest())
        body.update(user_json(user))
    elif principal.kind == API_KEY:
        body["key_id"] = principal.key_id
    # Only the keys that apply: a static token's body stays {role, account_id, user_id}.
    return JSONResponse(body)


@router.patch(
    "/api/auth/me",
    response_model=Me,
    summary="Change the caller's profile (its time zone)",
    description="Only a signed-in user has a profile: static tokens and API keys get 400.",
)
async def update_me(request: Request, principal: PrincipalDep, body: MePatch) -> JSONResponse:
    caller = principal.caller
    changes = body.model_dump(exclude_unset=True)
    if principal.kind != JWT:
        if changes:
            raise ApiError(400, "only a signed-in user has a profile to change; this token has none", "bad_request")
        return await me(request, principal)
    timezone = changes.get("timezone")
    user = await _rpc(request).UpdateUser(
        auth_pb2.UpdateUserRequest(timezone=timezone) if timezone is not None else auth_pb2.UpdateUserRequest(),
    )
    # This replica reads the new zone at once; the others within the auth cache bound.
    _auth(request).profile_changed(principal.session_id)
    return JSONResponse(
        {"role": caller.role, "account_id": caller.account_id, "user_id": caller.user_id, **user_json(user)}
    )


@router.post("/api/auth/users", status_code=201, response_model=User, summary="Create a user (admins)")
async def create_user(request: Request, body: UserCreate, caller: CallerDep) -> Any:
    user = await _rpc(request).CreateUser(
        auth_pb2.CreateUserRequest(
            email=body.email, password=body.password, role=body.role, account_id=body.account_id or ""
        ),
    )
    return user_json(user)


@router.post(
    "/api/auth/api-keys", status_code=201, response_model=ApiKeyCreated, summary="Create an API key (shown once)"
)
async def create_api_key(request: Request, body: ApiKeyCreate, principal: PrincipalDep) -> Any:
    if principal.kind == API_KEY:
        # A leaked key must not be able to mint the keys that would outlive its revocation.
        raise ApiError(403, "an API key cannot create API keys", "forbidden")
    created = await _rpc(request).CreateApiKey(
        auth_pb2.CreateApiKeyRequest(name=body.name, account_id=body.account_id or ""),
    )
    return {**api_key_json(created.key), "key": created.secret}


@router.get(
    "/api/auth/api-keys",
    response_model=list[ApiKey],
    summary="API keys of the caller's account (admins: of any, or all)",
)
async def list_api_keys(
    request: Request, caller: CallerDep, account_id: str | None = None, include_revoked: bool = False
) -> Any:
    reply = await _rpc(request).ListApiKeys(
        auth_pb2.ListApiKeysRequest(account_id=account_id or "", include_revoked=include_revoked),
    )
    return JSONResponse([api_key_json(k) for k in reply.keys], headers={"X-Total-Count": str(reply.total)})


@router.delete(
    "/api/auth/api-keys/{key_id}",
    status_code=204,
    response_class=Response,
    summary="Revoke an API key (every gateway replica refuses it within 5 s)",
)
async def revoke_api_key(request: Request, caller: CallerDep, key_id: Annotated[str, Path(max_length=64)]) -> Response:
    await _rpc(request).RevokeApiKey(auth_pb2.RevokeApiKeyRequest(key_id=key_id))
    _auth(request).forget_api_key(key_id)
    return Response(status_code=204)


@router.get("/.well-known/jwks.json", summary="Public keys that verify access tokens (for Envoy Gateway)")
async def jwks(request: Request) -> JSONResponse:
    keys = await _auth(request).jwks()
    return JSONResponse(keys, headers={"Cache-Control": f"public, max-age={int(JWKS_MAX_AGE_S)}"})
