"""Account rules: ids, plans, countries. Pure logic over the repository; raises domain errors."""

from __future__ import annotations

import json
import re
import secrets

import asyncpg

from services.runtime.errors import AlreadyExists, InvalidArgument, NotFound
from services.runtime.identity import Caller

from .repo import AccountsRepo

PLANS = ("credit_based", "minutes_based", "unlimited")
COUNTRIES = {"CL": "America/Santiago", "AR": "America/Argentina/Buenos_Aires"}
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def new_account_id() -> str:
    return f"acc-{secrets.token_hex(6)}"


def _json_object(text: str, field: str) -> str:
    if not text:
        return "{}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{field} is not valid JSON") from exc
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field} must be an object")
    return json.dumps(value)


class Accounts:
    def __init__(self, repo: AccountsRepo) -> None:
        self.repo = repo

    async def get(self, caller: Caller, account_id: str) -> asyncpg.Record:
        scoped = caller.account_scope(account_id)
        row = await self.repo.get(account_id=scoped)
        if row is None:
            raise NotFound(f"account {account_id} not found")
        return row

    async def create(
        self,
        *,
        account_id: str,
        account_name: str,
        plan_type: str = "",
        country: str = "",
        timezone: str = "",
        contact_name: str = "",
        contact_email: str = "",
        contact_phone: str = "",
        features_json: str = "",
        settings_json: str = "",
        exist_ok: bool = False,
    ) -> asyncpg.Record:
        account_id = account_id or new_account_id()
        if not _ID_RE.match(account_id):
            raise InvalidArgument("account_id may hold letters, digits, '_', '.', '-' (max 64)")
        plan_type = plan_type or "credit_based"
        if plan_type not in PLANS:
            raise InvalidArgument(f"plan_type must be one of {', '.join(PLANS)}")
        country = (country or "CL").upper()
        if country not in COUNTRIES:
            raise InvalidArgument("country must be CL or AR")
        row = await self.repo.insert(
            account_id=account_id,
            account_name=account_name or account_id,
            plan_type=plan_type,
            country=country,
            timezone=timezone or COUNTRIES[country],
            contact_name=contact_name,
            contact_email=contact_email,
            contact_phone=contact_phone,
            features_json=_json_object(features_json, "features"),
            settings_json=_json_object(settings_json, "settings"),
        )
        if row is None:
            if not exist_ok:
                raise AlreadyExists(f"account {account_id} already exists")
            row = await self.repo.get(account_id=account_id)
            assert row is not None
        return row
