"""Senders (WhatsApp devices; voice caller ids later): validation, account scoping and secret
handling over the repository. Raises domain errors only."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from services.runtime.errors import InvalidArgument, NotFound
from services.runtime.identity import Caller
from services.runtime.protos import json_object

from .crypto import InvalidToken, SecretBox, hint_of
from .providers import whatsapp_cloud
from .providers.base import SenderConfig
from .providers.simulated import SimulatedBehaviour
from .repo import SendersRepo

log = logging.getLogger("pregonero.dispatcher.senders")

CHANNELS = ("whatsapp", "voice")
STATUSES = ("active", "inactive")
DEFAULT_RATE_PER_MINUTE = 60
DEFAULT_CONCURRENCY = 4
RATE_PER_MINUTE_RANGE = (0, 100_000)  # 0 = no limit
JITTER_MS_RANGE = (0, 60_000)
CONCURRENCY_RANGE = (1, 256)
MAX_TOKEN = 1024
MAX_SECRET = 4096
MAX_DEVICE_NAME = 100
MAX_CONFIG_BYTES = 16_384
_PHONE_SEPARATORS = re.compile(r"[\s().-]")
_PHONE = re.compile(r"^\+?\d{6,15}$")

UPDATABLE = frozenset(
    {
        "token",
        "secret",
        "device_name",
        "status",
        "is_receiver",
        "phone",
        "rate_per_minute",
        "jitter_ms",
        "concurrency",
        "provider",
        "provider_config",
    }
)


# Each provider checks its own provider_config (ValueError says what is wrong); a provider is
# accepted only once it is here.
PROVIDERS: dict[str, Callable[[dict[str, Any]], object]] = {
    "simulated": SimulatedBehaviour.from_config,
    whatsapp_cloud.NAME: whatsapp_cloud.check_config,
}


def _text(value: object, field: str, *, max_len: int, required: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{field} must be a string")
    value = value.strip()
    if required and not value:
        raise InvalidArgument(f"{field} is required and cannot be empty")
    if len(value) > max_len:
        raise InvalidArgument(f"{field} is longer than {max_len} characters")
    # PostgreSQL text cannot hold NUL; refusing it here keeps it a 400, not a 500.
    if "\x00" in value:
        raise InvalidArgument(f"{field} must not contain NUL characters")
    return value


def _int(value: object, field: str, bounds: tuple[int, int]) -> int:
    low, high = bounds
    # bool is an int subclass; `true` for a rate is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{field} must be an integer")
    if not low <= value <= high:
        raise InvalidArgument(f"{field} must be between {low} and {high}")
    return value


def _bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{field} must be true or false")
    return value


def _choice(value: object, field: str, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise InvalidArgument(f"{field} must be one of: {', '.join(allowed)}")
    return value


def _phone(value: object) -> str:
    text = _text(value, "phone", max_len=32)
    if not text:
        return ""
    digits = _PHONE_SEPARATORS.sub("", text)
    if not _PHONE.match(digits):
        raise InvalidArgument("phone must be 6 to 15 digits, optionally starting with +")
    return digits


def _config_object(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument("provider_config must be a JSON object")
    try:
        # NaN/Infinity are not JSON and jsonb refuses them; so does it NUL characters.
        encoded = json.dumps(value, allow_nan=False)
    except ValueError as exc:
        raise InvalidArgument("provider_config must hold only finite numbers") from exc
    if "\\u0000" in encoded:
        raise InvalidArgument("provider_config must not contain NUL characters")
    if len(encoded) > MAX_CONFIG_BYTES:
        raise InvalidArgument(f"provider_config is larger than {MAX_CONFIG_BYTES} bytes")
    return value


def _check_provider_config(provider: str, config: dict[str, Any]) -> None:
    try:
        PROVIDERS[provider](config)
    except ValueError as exc:
        raise InvalidArgument(f"provider_config: {exc}") from exc


def provider_config_of(row: asyncpg.Record) -> dict[str, Any]:
    value = row["provider_config"]
    # asyncpg hands jsonb back as text unless a codec is set on the pool.
    return json.loads(value) if isinstance(value, str) else dict(value)


class Senders:
    def __init__(self, repo: SendersRepo, box: SecretBox) -> None:
        self.repo = repo
        self.box = box

    async def create(
        self,
        caller: Caller,
        *,
        token: object,
        secret: object,
        account_id: str = "",
        channel: str = "",
        provider: str = "",
        device_name: object = "",
        is_receiver: object = False,
        phone: object = "",
        rate_per_minute: int | None = None,
        jitter_ms: object = 0,
        concurrency: int | None = None,
        provider_config_json: str = "",
        status: str = "",
    ) -> asyncpg.Record:
        """Empty strings and None take the defaults; an empty device_name becomes "Device <n>"."""
        account = caller.account_scope(account_id)
        if not account:
            raise InvalidArgument("account_id is required")
        channel = _choice(channel or "whatsapp", "channel", CHANNELS)
        provider = _choice(provider or "simulated", "provider", tuple(PROVIDERS))
        token = _text(token, "token", max_len=MAX_TOKEN, required=True)
        secret = _text(secret, "secret", max_len=MAX_SECRET, required=True)
        config = _config_object(json_object(provider_config_json, "provider_config"))
        _check_provider_config(provider, config)
        name = _text(device_name, "device_name", max_len=MAX_DEVICE_NAME)
        receiver = _bool(is_receiver, "is_receiver")
        phone = _phone(phone)
        rate = _int(
            DEFAULT_RATE_PER_MINUTE if rate_per_minute is None else rate_per_minute,
            "rate_per_minute",
            RATE_PER_MINUTE_RANGE,
        )
        jitter = _int(jitter_ms, "jitter_ms", JITTER_MS_RANGE)
        lanes = _int(DEFAULT_CONCURRENCY if concurrency is None else concurrency, "concurrency", CONCURRENCY_RANGE)
        status = _choice(status or "active", "status", STATUSES)
        async with self.repo.transaction() as tx:
            if receiver:
                # One receiver per account (the client's device form): the new one replaces it.
                await tx.lock_receiver(account_id=account)
                await tx.unmark_receivers(account_id=account, channel=channel)
            return await tx.insert(
                account_id=account,
                channel=channel,
                provider=provider,
                device_name=name,
                token=token,
                secret_enc=self.box.encrypt(secret),
                secret_hint=hint_of(secret),
                is_receiver=receiver,
                phone=phone,
                rate_per_minute=rate,
                jitter_ms=jitter,
                concurrency=lanes,
                provider_config_json=json.dumps(config),
                status=status,
            )

    async def get(self, caller: Caller, sender_id: int) -> asyncpg.Record:
        row = await self.repo.get(sender_id=sender_id, account_id=caller.account_scope())
        if row is None:
            raise NotFound(f"sender {sender_id} not found")
        return row

    async def list_senders(
        self, caller: Caller, *, channel: str = "", active_only: bool = False
    ) -> list[asyncpg.Record]:
        """The caller's live senders in id order; an empty channel means every channel."""
        if channel:
            _choice(channel, "channel", CHANNELS)
        if active_only:
            return await self.list_active(caller.account_scope(), channel)
        return await self.repo.list_all(account_id=caller.account_scope(), channel=channel)

    async def list_active(self, account_id: str, channel: str = "whatsapp") -> list[asyncpg.Record]:
        """Active, not deleted senders of one account (not scoped to a caller: internal use)."""
        return await self.repo.list_active(account_id=account_id, channel=channel)

    async def update(self, caller: Caller, sender_id: int, patch_json: str) -> asyncpg.Record:
        """Apply a JSON object of fields to change; provider_config is replaced, not merged."""
        account = caller.account_scope()
        patch = json_object(patch_json, "patch_json")
        unknown = sorted(set(patch) - UPDATABLE)
        if unknown:
            raise InvalidArgument(f"unknown fields: {', '.join(unknown)}; allowed: {', '.join(sorted(UPDATABLE))}")
        changes = self._validate_patch(patch)
        marks_receiver = changes.get("is_receiver") is True
        async with self.repo.transaction() as tx:
            if marks_receiver:
                await tx.lock_receiver(account_id=account)  # before the row lock: see LOCK_RECEIVER
            row = await tx.get(sender_id=sender_id, account_id=account, for_update=True)
            if row is None:
                raise NotFound(f"sender {sender_id} not found")
            if not changes:
                return row
            if marks_receiver:
                # One receiver per account (the client's device form): this one replaces it.
                await tx.unmark_receivers(account_id=account, channel=row["channel"], keep_id=sender_id)
            provider = changes.get("provider", row["provider"])
            config = changes.get("provider_config", provider_config_of(row))
            if "provider" in changes or "provider_config" in changes:
                _check_provider_config(provider, config)
            secret = changes.get("secret")
            updated = await tx.update(
                sender_id=sender_id,
                account_id=account,
                provider=provider,
                device_name=changes.get("device_name", row["device_name"]),
                token=changes.get("token", row["token"]),
                secret_enc=None if secret is None else self.box.encrypt(secret),
                secret_hint=None if secret is None else hint_of(secret),
                status=changes.get("status", row["status"]),
                is_receiver=changes.get("is_receiver", row["is_receiver"]),
                phone=changes.get("phone", row["phone"]),
                rate_per_minute=changes.get("rate_per_minute", row["rate_per_minute"]),
                jitter_ms=changes.get("jitter_ms", row["jitter_ms"]),
                concurrency=changes.get("concurrency", row["concurrency"]),
                provider_config_json=json.dumps(config),
            )
            assert updated is not None  # the row is locked and live
            return updated

    @staticmethod
    def _validate_patch(patch: dict[str, Any]) -> dict[str, Any]:
        checks: dict[str, Callable[[object], Any]] = {
            "token": lambda v: _text(v, "token", max_len=MAX_TOKEN, required=True),
            "secret": lambda v: _text(v, "secret", max_len=MAX_SECRET, required=True),
            "device_name": lambda v: _text(v, "device_name", max_len=MAX_DEVICE_NAME, required=True),
            "status": lambda v: _choice(v, "status", STATUSES),
            "is_receiver": lambda v: _bool(v, "is_receiver"),
            "phone": _phone,
            "rate_per_minute": lambda v: _int(v, "rate_per_minute", RATE_PER_MINUTE_RANGE),
            "jitter_ms": lambda v: _int(v, "jitter_ms", JITTER_MS_RANGE),
            "concurrency": lambda v: _int(v, "concurrency", CONCURRENCY_RANGE),
            "provider": lambda v: _choice(v, "provider", tuple(PROVIDERS)),
            "provider_config": _config_object,
        }
        return {field: checks[field](value) for field, value in patch.items()}

    async def delete(self, caller: Caller, sender_id: int) -> None:
        """Soft delete: the row stays for the attempts that name it, but is gone for every query."""
        if not await self.repo.soft_delete(sender_id=sender_id, account_id=caller.account_scope()):
            raise NotFound(f"sender {sender_id} not found")

    async def load_for_dispatch(self, ids: Sequence[int]) -> dict[int, SenderConfig]:
        """Decrypted configs of the given senders for the dispatch engine (internal, not
        account-scoped). Only usable senders come back: an id that is missing from the result
        is deleted, inactive or unknown, and the engine must not send through it."""
        if not ids:
            return {}
        out: dict[int, SenderConfig] = {}
        for row in await self.repo.load_for_dispatch(ids=sorted(set(ids))):
            try:
                secret = "" if row["secret_enc"] is None else self.box.decrypt(row["secret_enc"])
            except InvalidToken:
                # Sealed under another PREGONERO_SECRET_KEY: unusable until re-entered.
                log.error("secret of sender %s does not decrypt with the configured key", row["id"])
                continue
            out[row["id"]] = SenderConfig(
                id=row["id"],
                account_id=row["account_id"],
                provider=row["provider"],
                rate_per_minute=row["rate_per_minute"],
                jitter_ms=row["jitter_ms"],
                concurrency=row["concurrency"],
                token=row["token"],
                secret=secret,
                phone=row["phone"],
                config=provider_config_of(row),
                version=row["version"],
            )
        return out
