"""gRPC servicer: proto in, domain call, proto out."""

from __future__ import annotations

import json

import asyncpg
import grpc
from pregonero.accounts.v1 import accounts_pb2, accounts_pb2_grpc

from services.runtime.errors import PermissionDenied
from services.runtime.identity import current_caller
from services.runtime.protos import to_timestamp

from .domain import Accounts


def account_pb(row: asyncpg.Record) -> accounts_pb2.Account:
    features = json.loads(row["features"]) if isinstance(row["features"], str) else row["features"]
    return accounts_pb2.Account(
        account_id=row["account_id"],
        account_name=row["account_name"],
        status=row["status"],
        plan_type=row["plan_type"],
        country=row["country"],
        timezone=row["timezone"],
        max_concurrent_calls=int(features.get("max_concurrent_calls", 0) or 0),
        contact_name=row["contact_name"],
        contact_email=row["contact_email"],
        contact_phone=row["contact_phone"],
        features_json=json.dumps(features),
        settings_json=row["settings"] if isinstance(row["settings"], str) else json.dumps(row["settings"]),
        is_active=row["status"] == "active",
        suspension_reason=row["suspension_reason"],
        created_at=to_timestamp(row["created_at"]),
        updated_at=to_timestamp(row["updated_at"]),
    )


class AccountsServicer(accounts_pb2_grpc.AccountsServiceServicer):
    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts

    async def GetAccount(
        self, request: accounts_pb2.GetAccountRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.Account:
        return account_pb(await self.accounts.get(current_caller(), request.account_id))

    async def _create(self, request: accounts_pb2.CreateAccountRequest, *, exist_ok: bool) -> accounts_pb2.Account:
        if not current_caller().is_admin:
            raise PermissionDenied("only an admin creates accounts")
        row = await self.accounts.create(
            account_id=request.account_id,
            account_name=request.account_name,
            plan_type=request.plan_type,
            country=request.country,
            timezone=request.timezone,
            contact_name=request.contact_name,
            contact_email=request.contact_email,
            contact_phone=request.contact_phone,
            features_json=request.features_json,
            settings_json=request.settings_json,
            exist_ok=exist_ok,
        )
        return account_pb(row)

    async def CreateAccount(
        self, request: accounts_pb2.CreateAccountRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.Account:
        return await self._create(request, exist_ok=False)

    async def EnsureAccount(
        self, request: accounts_pb2.CreateAccountRequest, context: grpc.aio.ServicerContext
    ) -> accounts_pb2.Account:
        return await self._create(request, exist_ok=True)
