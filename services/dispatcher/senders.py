"""Senders (WhatsApp devices; voice caller ids later): validation, account scoping and secret
handling over the repository. Raises domain errors only."""

from __future__ import annotations

import json
import logging
import re
import zoneinfo
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import Any, Protocol

import asyncpg

from services.runtime import phones
from services.runtime.errors import InvalidArgument, NotFound
from services.runtime.identity import Caller
from services.runtime.protos import json_object

from .crypto import InvalidToken, SecretBox, hint_of
from .device_states import CHANNEL as DEVICE_CHANNEL
from .device_states import DISCONNECTED, QR_NEEDED, DeviceStates, state_of
from .providers import wablas, waha, whatsapp_cloud
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
DAILY_LIMIT_RANGE = (0, 100_000)  # 0 = no cap
# provider_config keys the suite reads itself, whatever the provider: the device's zone (its
# local day for the daily cap). Providers never see them.
SUITE_CONFIG_KEYS = ("timezone",)
# Connections in which a device takes no work (see migration 007).
UNAVAILABLE = (DISCONNECTED, QR_NEEDED)
CONCURRENCY_RANGE = (1, 256)
MAX_TOKEN = 1024
MAX_SECRET = 4096
MAX_DEVICE_NAME = 100
MAX_CONFIG_BYTES = 16_384
_PHONE_NUMBER_ID = re.compile(r"[0-9]{1,32}")

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
        "daily_limit",
    }
)


# Each provider checks its own provider_config (ValueError says what is wrong); a provider is
# accepted only once it is here.
PROVIDERS: dict[str, Callable[[dict[str, Any]], object]] = {
    "simulated": SimulatedBehaviour.from_config,
    whatsapp_cloud.NAME: whatsapp_cloud.check_config,
    wablas.NAME: wablas.check_config,
    waha.NAME: waha.check_config,
}
# Providers whose device is a session the suite itself runs at the provider (a WhatsApp Web
# session at WAHA): created without credentials, the session named after the device.
SESSION_PROVIDERS = (waha.NAME,)


class DeviceSessions(Protocol):
    """Told when a device of a SESSION_PROVIDERS provider comes and goes (waha_sessions.py)."""

    def created(self, sender_id: int) -> None: ...

    def deleted(self, sender_id: int) -> None: ...


class DeviceTracking(Protocol):
    """Told when a wablas device is created, to set its Tracking URL (wablas_tracking.py)."""

    def created(self, sender: SenderConfig) -> None: ...


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
    """The device's own number as E.164. The dispatcher does not know the account's country, so a
    national number is read in Chile's (the operator's): other countries' devices give the +."""
    text = _text(value, "phone", max_len=32)
    if not text:
        return ""
    try:
        return phones.e164(text)
    except ValueError as exc:
        raise InvalidArgument(f"phone {exc}") from None


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


@cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _check_provider_config(provider: str, config: dict[str, Any]) -> None:
    if "base_url" in config:
        # Where a provider is reached is the operator's setting: a tenant's device must not
        # point the suite's requests (and its credentials) at a host of its choosing.
        raise InvalidArgument("provider_config: base_url is set by the operator, not per device")
    zone = config.get("timezone")
    if zone is not None and (not isinstance(zone, str) or zone not in _zones()):
        raise InvalidArgument("provider_config: timezone must be an IANA zone such as America/Santiago")
    try:
        PROVIDERS[provider](provider_only(config))
    except ValueError as exc:
        raise InvalidArgument(f"provider_config: {exc}") from exc


def provider_only(config: dict[str, Any]) -> dict[str, Any]:
    """A provider_config without the keys the suite reads itself (SUITE_CONFIG_KEYS)."""
    return {k: v for k, v in config.items() if k not in SUITE_CONFIG_KEYS}


def provider_config_of(row: asyncpg.Record) -> dict[str, Any]:
    value = row["provider_config"]
    # asyncpg hands jsonb back as text unless a codec is set on the pool.
    return json.loads(value) if isinstance(value, str) else dict(value)


class Senders:
    def __init__(
        self,
        repo: SendersRepo,
        box: SecretBox,
        states: DeviceStates | None = None,
        *,
        unconfigured: Mapping[str, str] | None = None,
        default_provider: str = "simulated",
    ) -> None:
        self.repo = repo
        self.box = box
        self.states = states or DeviceStates(None)
        # Providers this deployment has no endpoint for, and what a new device of theirs is told.
        self.unconfigured = dict(unconfigured or {})
        # The provider of a device created without one (the bulk sender's form names none).
        self.default_provider = default_provider
        # Runs the sessions of SESSION_PROVIDERS devices; set by main when WAHA is configured.
        self.sessions: DeviceSessions | None = None
        # Sets the Tracking URL of wablas devices; set by main when WABLAS_WEBHOOK_URL is.
        self.tracking: DeviceTracking | None = None

    def _configured(self, provider: str) -> str:
        if provider in self.unconfigured:
            raise InvalidArgument(self.unconfigured[provider])
        return provider

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
        daily_limit: object = 0,
    ) -> asyncpg.Record:
        """Empty strings and None take the defaults; an empty device_name becomes "Device <n>"."""
        account = caller.account_scope(account_id)
        if not account:
            raise InvalidArgument("account_id is required")
        channel = _choice(channel or "whatsapp", "channel", CHANNELS)
        provider = self._configured(_choice(provider or self.default_provider, "provider", tuple(PROVIDERS)))
        # A session device has no credentials of its own: the operator's WAHA key is the suite's.
        own_session = provider in SESSION_PROVIDERS
        token = _text(token, "token", max_len=MAX_TOKEN, required=not own_session)
        secret = _text(secret, "secret", max_len=MAX_SECRET, required=not own_session)
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
        cap = _int(daily_limit, "daily_limit", DAILY_LIMIT_RANGE)
        async with self.repo.transaction() as tx:
            if receiver:
                # One receiver per account (the client's device form): the new one replaces it.
                await tx.lock_receiver(account_id=account)
                await tx.unmark_receivers(account_id=account, channel=channel)
            row = await tx.insert(
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
                daily_limit=cap,
            )
            if own_session:
                # Named after the device, so a webhook naming the session finds it; it takes
                # no work until the session says it is linked (WORKING).
                await tx.set_session(sender_id=row["id"], account_id=account, session=waha.session_name(row["id"]))
                await tx.record_state(sender_id=row["id"], connection=DISCONNECTED, reason="STARTING", quota_left=-1)
                found = await tx.get(sender_id=row["id"], account_id=account)
                assert found is not None  # inserted in this transaction
                row = found
        await self._tell_state(row, reason="created")
        if own_session and self.sessions is not None:
            self.sessions.created(row["id"])
        if provider == wablas.NAME and self.tracking is not None:
            self.tracking.created(
                SenderConfig(id=row["id"], account_id=account, provider=provider, token=token, secret=secret)
            )
        return row

    async def _tell_state(self, row: asyncpg.Record, *, reason: str, state: str = "") -> None:
        if row["channel"] == DEVICE_CHANNEL:
            await self.states.publish(
                account_id=row["account_id"],
                sender_id=row["id"],
                # An active device that the provider says is not linked is not connected.
                state=state or (row["connection"] if row["connection"] in UNAVAILABLE else state_of(row["status"])),
                reason=reason,
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

    async def find_by_number(self, caller: Caller, *, provider: str, phone_number_id: str) -> list[asyncpg.Record]:
        """The caller's live senders of `provider` behind that business number (see BY_NUMBER)."""
        _choice(provider, "provider", (whatsapp_cloud.NAME,))
        if not _PHONE_NUMBER_ID.fullmatch(phone_number_id):
            raise InvalidArgument("phone_number_id must be the digits of the business number's id")
        return await self.repo.by_number(
            provider=provider, phone_number_id=phone_number_id, scope=caller.account_scope()
        )

    async def update(self, caller: Caller, sender_id: int, patch_json: str) -> asyncpg.Record:
        """Apply a JSON object of fields to change; provider_config is replaced, not merged."""
        account = caller.account_scope()
        patch = json_object(patch_json, "patch_json")
        unknown = sorted(set(patch) - UPDATABLE)
        if unknown:
            raise InvalidArgument(f"unknown fields: {', '.join(unknown)}; allowed: {', '.join(sorted(UPDATABLE))}")
        changes = self._validate_patch(patch)
        if "provider" in changes:
            self._configured(changes["provider"])
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
            if "provider" in changes:
                if (provider in SESSION_PROVIDERS) != (row["provider"] in SESSION_PROVIDERS):
                    # A session device and a credentials device are not the same thing edited.
                    raise InvalidArgument(f"a {row['provider']} device cannot become {provider}: add a new device")
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
                daily_limit=changes.get("daily_limit", row["daily_limit"]),
            )
            assert updated is not None  # the row is locked and live
        if updated["status"] != row["status"]:
            await self._tell_state(updated, reason="activated" if updated["status"] == "active" else "deactivated")
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
            "daily_limit": lambda v: _int(v, "daily_limit", DAILY_LIMIT_RANGE),
        }
        return {field: checks[field](value) for field, value in patch.items()}

    async def delete(self, caller: Caller, sender_id: int) -> None:
        """Soft delete: the row stays for the attempts that name it, but is gone for every query."""
        row = await self.repo.soft_delete(sender_id=sender_id, account_id=caller.account_scope())
        if row is None:
            raise NotFound(f"sender {sender_id} not found")
        await self._tell_state(row, reason="deleted", state=DISCONNECTED)
        if row["provider"] in SESSION_PROVIDERS and self.sessions is not None:
            self.sessions.deleted(row["id"])

    async def load_for_dispatch(self, ids: Sequence[int]) -> dict[int, SenderConfig]:
        """Decrypted configs of the given senders for the dispatch engine (internal, not
        account-scoped). Only usable senders come back: an id that is missing from the result
        is deleted, inactive or unknown, and the engine must not send through it."""
        if not ids:
            return {}
        return self.configs(await self.repo.load_for_dispatch(ids=sorted(set(ids))))

    def configs(self, rows: Sequence[asyncpg.Record]) -> dict[int, SenderConfig]:
        """Decrypted configs of rows that carry the LOAD_FOR_DISPATCH columns; a sender whose
        secret does not decrypt is left out."""
        out: dict[int, SenderConfig] = {}
        for row in rows:
            try:
                secret = "" if row["secret_enc"] is None else self.box.decrypt(row["secret_enc"])
            except InvalidToken as exc:
                # Sealed under a key the settings do not hold: unusable until the key is
                # configured again or the secret re-entered.
                log.error("secret of sender %s does not decrypt: %s", row["id"], exc)
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
                config=provider_only(provider_config_of(row)),
                version=row["version"],
            )
        return out
