"""Account rules: ids, plans, countries, prices, changes. Pure logic over the repository;
raises domain errors."""

from __future__ import annotations

import json
import re
import secrets
from decimal import Decimal
from typing import Any

import asyncpg

from services.runtime.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from services.runtime.identity import Caller, is_account_id
from services.runtime.protos import json_object
from services.runtime.validation import known_zone

from .ledger import CREDITS, MINUTES, parse_amount
from .repo import AccountsRepo, NewEntry

PLANS = ("credit_based", "minutes_based", "unlimited")
STATUSES = ("active", "suspended", "inactive")
COUNTRIES = {"CL": "America/Santiago", "AR": "America/Argentina/Buenos_Aires"}
PRICES = ("cost_per_minute", "cost_per_call_setup", "cost_per_whatsapp_message")
_TEXT_FIELDS = ("account_name", "suspension_reason", "contact_name", "contact_email", "contact_phone")
# What a member may change on its own account; the rest (state, plan, limits, prices) is
# the operator's.
MEMBER_FIELDS = frozenset({"account_name", "contact_name", "contact_email", "contact_phone", "settings", "timezone"})
PATCH_FIELDS = frozenset(
    {*_TEXT_FIELDS, "status", "is_active", "plan_type", "country", "timezone", "features", "settings", *PRICES}
)
INITIAL_CAUSE = "initial"
SUSPENDED_BY_OPERATOR = "suspended by an operator"

E164 = re.compile(r"\+[1-9]\d{7,14}")


def new_account_id() -> str:
    return f"acc-{secrets.token_hex(6)}"


def _check_features(features: dict[str, Any]) -> None:
    limit = features.get("max_concurrent_calls")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InvalidArgument("features.max_concurrent_calls must be a whole number, zero or more")
    # The account's own voice agent and the number its calls come from (else the platform's).
    agent = features.get("voice_agent_id")
    if agent is not None and (not isinstance(agent, str) or not 0 < len(agent) <= 200):
        raise InvalidArgument("features.voice_agent_id must be the voice agent's id, a string")
    caller = features.get("voice_caller_id")
    if caller is not None and (not isinstance(caller, str) or not E164.fullmatch(caller)):
        raise InvalidArgument("features.voice_caller_id must be a phone number in E.164 form, e.g. +56229998877")


def _check_timezone(name: str) -> str:
    return known_zone(name).key


def _price(value: object, field: str) -> Decimal | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidArgument(f"{field} must be a number")
    return parse_amount(str(value), field=field, allow_zero=True)


class Accounts:
    def __init__(self, repo: AccountsRepo) -> None:
        self.repo = repo

    async def get(self, caller: Caller, account_id: str) -> asyncpg.Record:
        scoped = caller.account_scope(account_id)
        row = await self.repo.get(account_id=scoped)
        if row is None:
            raise NotFound(f"account {account_id} not found")
        return row

    async def list(
        self, caller: Caller, *, status: str = "", limit: int = 50, skip: int = 0
    ) -> tuple[list[asyncpg.Record], int]:
        if not 1 <= limit <= 500:
            raise InvalidArgument("limit must be between 1 and 500")
        if skip < 0:
            raise InvalidArgument("skip must not be negative")
        if status and status not in STATUSES:
            raise InvalidArgument(f"status must be one of {', '.join(STATUSES)}")
        scope = "" if caller.is_admin else caller.account_id
        return await self.repo.list(scope=scope, status=status, limit=limit, skip=skip)

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
        initial_credits: str = "",
        initial_minutes: str = "",
        prices: dict[str, str] | None = None,
        exist_ok: bool = False,
    ) -> asyncpg.Record:
        account_id = account_id or new_account_id()
        if not is_account_id(account_id):
            raise InvalidArgument("account_id may hold letters, digits, '_', '.', '-' (max 64)")
        plan_type = plan_type or "credit_based"
        if plan_type not in PLANS:
            raise InvalidArgument(f"plan_type must be one of {', '.join(PLANS)}")
        country = (country or "CL").upper()
        if country not in COUNTRIES:
            raise InvalidArgument("country must be CL or AR")
        features = json_object(features_json, "features")
        _check_features(features)
        settings = json_object(settings_json, "settings")
        timezone = _check_timezone(timezone or str(settings.get("timezone") or "") or COUNTRIES[country])
        initial = [
            NewEntry(
                kind="topup",
                unit=unit,
                amount=amount,
                cause=INITIAL_CAUSE,
                note="initial balance",
                balance_after=amount,
            )
            for unit, text in ((CREDITS, initial_credits), (MINUTES, initial_minutes))
            if text and (amount := parse_amount(text, field=f"initial_{unit}", allow_zero=True)) > 0
        ]
        # Two initial entries would share one cause; one unit at a time is what clients send.
        if len(initial) > 1:
            raise InvalidArgument("give either initial_credits or initial_minutes")
        row = await self.repo.insert(
            account_id=account_id,
            account_name=account_name or account_id,
            plan_type=plan_type,
            country=country,
            timezone=timezone,
            contact_name=contact_name,
            contact_email=contact_email,
            contact_phone=contact_phone,
            features_json=json.dumps(features),
            settings_json=json.dumps(settings),
            prices=[_price((prices or {}).get(name), name) for name in PRICES],
            initial=initial,
        )
        if row is None:
            if not exist_ok:
                raise AlreadyExists(f"account {account_id} already exists")
            row = await self.repo.get(account_id=account_id)
            assert row is not None
        return row

    async def update(self, caller: Caller, account_id: str, patch_json: str) -> asyncpg.Record:
        """PATCH: only the fields given change; features and settings merge key by key."""
        scoped = caller.account_scope(account_id)
        patch = json_object(patch_json, "patch")
        unknown = sorted(set(patch) - PATCH_FIELDS)
        if unknown:
            raise InvalidArgument(f"cannot change {', '.join(unknown)}")
        if not caller.is_admin and set(patch) - MEMBER_FIELDS:
            raise PermissionDenied(f"only an admin changes {', '.join(sorted(set(patch) - MEMBER_FIELDS))}")
        changes: dict[str, Any] = {}
        for name in _TEXT_FIELDS:
            if patch.get(name) is not None:
                if not isinstance(patch[name], str):
                    raise InvalidArgument(f"{name} must be a string")
                changes[name] = patch[name]
        status = patch.get("status")
        if status is None and patch.get("is_active") is not None:
            if not isinstance(patch["is_active"], bool):
                raise InvalidArgument("is_active must be true or false")
            # The dashboards toggle with is_active and offer reactivation only to `suspended`
            # accounts: switching one off is a suspension, undone by switching it on.
            status = "active" if patch["is_active"] else "suspended"
        if status is not None:
            if status not in STATUSES:
                raise InvalidArgument(f"status must be one of {', '.join(STATUSES)}")
            changes["status"] = status
            if status == "active":
                changes.setdefault("suspension_reason", "")
            elif status == "suspended":
                changes.setdefault("suspension_reason", SUSPENDED_BY_OPERATOR)
        if patch.get("plan_type") is not None:
            if patch["plan_type"] not in PLANS:
                raise InvalidArgument(f"plan_type must be one of {', '.join(PLANS)}")
            changes["plan_type"] = patch["plan_type"]
        if patch.get("country") is not None:
            country = str(patch["country"]).upper()
            if country not in COUNTRIES:
                raise InvalidArgument("country must be CL or AR")
            changes["country"] = country
        for name in ("features", "settings"):
            if patch.get(name) is not None:
                if not isinstance(patch[name], dict):
                    raise InvalidArgument(f"{name} must be an object")
                changes[f"{name}_json"] = json.dumps(patch[name])
        if "features" in patch and patch["features"] is not None:
            _check_features(patch["features"])
        timezone = patch.get("timezone") or (patch.get("settings") or {}).get("timezone")
        if timezone:
            changes["timezone"] = _check_timezone(str(timezone))
        for name in PRICES:
            value = _price(patch.get(name), name)
            if value is not None:
                changes[name] = value
        row = await self.repo.update(account_id=scoped, **changes)
        if row is None:
            raise NotFound(f"account {account_id} not found")
        return row
