"""WhatsApp Web sessions of `waha` devices at the operator's WAHA: created and started when
the device is created, deleted with it; the QR a user scans, logout and restart.

Device creation does not wait for WAHA: a session that starts takes seconds (a browser at
WAHA), and a WAHA that is down must not make a device impossible to add. The session is
created in the background, tried again with back-off for a while; a device whose session
never came is still there, disconnected, and `restart` creates it. Its state reaches the
account through WAHA's `session.status` webhook (services/gateway/routes/waha_webhook.py →
ReportSenderState → connections.py), checked here first against what WAHA says now
(`confirm`). WAHA's acks name its message id only: `attempts` says which attempt each is,
from the ids kept as the messages were accepted (provider_messages)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

import asyncpg

from services.runtime.errors import Conflict, InvalidArgument, PermissionDenied, Unavailable
from services.runtime.identity import Caller

from .providers import waha
from .providers.base import DeviceState, SenderConfig
from .providers.waha import WahaProvider, WahaUnavailable
from .repo import ProviderMessagesRepo

log = logging.getLogger("pregonero.dispatcher.waha_sessions")

MAX_MESSAGE_IDS = 100
# Background tries of a session call: 1, 2, 4 ... 60 s apart, for about ten minutes.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
RETRIES = 14


class SenderLookup(Protocol):
    """What this module needs of Senders (kept narrow: senders.py calls back into us)."""

    async def get(self, caller: Caller, sender_id: int) -> asyncpg.Record: ...


class WahaSessions:
    def __init__(self, provider: WahaProvider, senders: SenderLookup, messages: ProviderMessagesRepo) -> None:
        self.provider = provider
        self.senders = senders
        self.messages = messages
        self.tasks: set[asyncio.Task[None]] = set()

    # --- told by Senders (after the change is committed) ---

    def created(self, sender_id: int) -> None:
        self._spawn(self._retrying("create", lambda: self.provider.create_session(sender_id)), sender_id)

    def deleted(self, sender_id: int) -> None:
        self._spawn(self._retrying("delete", lambda: self.provider.delete_session(sender_id)), sender_id)

    # --- the gateway's calls ---

    async def qr(self, caller: Caller, sender_id: int) -> tuple[str, bytes]:
        """The session's connection now, and the QR to scan (empty when there is none to
        show: linked, starting, or failed)."""
        await self._device(caller, sender_id)
        try:
            session = await self.provider.session(sender_id)
            connection = waha.connection_of(session.status) if session.status else "disconnected"
            png = await self.provider.qr_png(sender_id) if connection == "qr_needed" else b""
        except WahaUnavailable as exc:
            raise Unavailable(f"WhatsApp Web server unavailable: {exc}") from exc
        return connection, png

    async def confirm(self, caller: Caller, provider: str, session: str, reported: DeviceState) -> DeviceState:
        """What a `session.status` webhook says, checked with WAHA: the session's status now,
        with the QR to scan when it shows one (the webhook carries no image). WAHA may post
        out of order (retries, concurrent posts): asking for the state now means a late
        SCAN_QR_CODE cannot undo a WORKING that came before it. When WAHA cannot be asked,
        the webhook's word stands (and the poller corrects it within its period)."""
        sender_id = waha.sender_of(session) if provider == waha.NAME else None
        if sender_id is None or not (caller.is_admin and not caller.account_id):
            return reported  # not ours to check; the report itself refuses what it must
        now = await self.provider.device_state(SenderConfig(id=sender_id, account_id="", provider=waha.NAME))
        if now.connection == "unknown":
            return reported
        if now.connection != reported.connection:
            log.info("session %s: webhook said %s, WAHA says %s now", session, reported.reason, now.reason)
        return now

    async def attempts(self, caller: Caller, *, provider: str, session: str, message_ids: list[str]) -> dict[str, str]:
        """The attempts behind a session's messages, by WAHA's message id (its acks name no
        attempt). Internal callers only: the gateway's webhook route, after the signature."""
        if not (caller.is_admin and not caller.account_id):
            raise PermissionDenied("message ids are resolved for the suite's webhooks only")
        if provider != waha.NAME:
            raise InvalidArgument(f"provider must be {waha.NAME}")
        if len(message_ids) > MAX_MESSAGE_IDS or any(len(m) > waha.MAX_MESSAGE_ID for m in message_ids):
            raise InvalidArgument(f"at most {MAX_MESSAGE_IDS} message ids of up to {waha.MAX_MESSAGE_ID} characters")
        sender_id = waha.sender_of(session)
        if sender_id is None or not message_ids:
            return {}  # not a session of ours: none of its messages is
        return await self.messages.attempts_of(provider=waha.NAME, sender_id=sender_id, message_ids=message_ids)

    async def logout(self, caller: Caller, sender_id: int) -> asyncpg.Record:
        """Unlink the phone: the session starts again and asks for a new QR."""
        row = await self._device(caller, sender_id)
        await self._act("logout", self.provider.logout(sender_id))
        return row

    async def restart(self, caller: Caller, sender_id: int) -> asyncpg.Record:
        """Stop and start the session (created anew when WAHA lost it)."""
        row = await self._device(caller, sender_id)
        await self._act("restart", self.provider.restart(sender_id))
        return row

    async def _device(self, caller: Caller, sender_id: int) -> asyncpg.Record:
        row = await self.senders.get(caller, sender_id)  # NotFound for another account's
        if row["provider"] != waha.NAME:
            raise Conflict(
                f"device {sender_id} is a {row['provider']} device, not a WhatsApp Web session: "
                "it has no QR, logout or restart"
            )
        return row

    @staticmethod
    async def _act(what: str, call: Coroutine[Any, Any, Any]) -> None:
        try:
            await call
        except WahaUnavailable as exc:
            raise Unavailable(f"WhatsApp Web server unavailable ({what}): {exc}") from exc

    # --- background ---

    def _spawn(self, coro: Coroutine[Any, Any, None], sender_id: int) -> None:
        task = asyncio.create_task(coro, name=f"waha-session-{sender_id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    @staticmethod
    async def _retrying(what: str, call: Any) -> None:
        delay = RETRY_FIRST_S
        for attempt in range(RETRIES):
            try:
                await call()
                return
            except WahaUnavailable as exc:
                if attempt == RETRIES - 1:
                    log.error("waha session %s gave up: %s", what, exc)
                    return
                log.warning("waha session %s failed (%s); again in %.0fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def close(self) -> None:
        """On shutdown: background calls are abandoned (a device's `restart` does them again)."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
