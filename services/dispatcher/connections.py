"""Device connections: what a provider says of each device (a Wablas device, a WAHA session)
is kept on its sender row, told to the account's sockets and to the send engine.

- `record(sender_id, DeviceState)` writes the state (and the quota) and, when the connection
  changed, publishes the `DeviceEvent` (device_states.py, with the QR when one is needed) and
  tells this process's engine. Written first, published after: the row is the truth; a
  socket that missed the event reads the device on its next request.
- The poller asks `device_state()` of the active devices whose provider implements it, each
  once per `DEVICE_POLL_SECONDS`. Devices are taken a few at a time, least recently checked
  first, and marked checked as they are taken (POLL_DUE), so the asks spread over the period
  and replicas never ask about the same device together. Each ask has a timeout; a provider
  that fails or hangs makes the device `unknown` with the reason (logged), never stops the loop.
- Every replica's engine must know which devices cannot take work: the replica that records a
  change tells its own engine at once, the others hear the DeviceEvent (a plain subscription
  on `events.device.*`), and every round each replica reads the unavailable devices from the
  database (UNAVAILABLE: not linked, or their local day's `daily_limit` used), which corrects
  a missed event within a round and is how a device at its cap is taken out and, after its
  local midnight, let back in.

The database also enforces the cap on its own (CLAIM_SENDS counts each claim in `sender_days`
and refuses claims past the cap), so the engine being told late costs refused claims, never
an extra message."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Protocol, cast
from zoneinfo import ZoneInfo

import asyncpg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pregonero.events.v1 import events_pb2

from services.runtime.errors import InvalidArgument, NotFound, PermissionDenied
from services.runtime.identity import Caller
from services.runtime.lifecycle import Rounds

from .device_states import QR_NEEDED, SUBJECT_PREFIX, DeviceStates
from .providers.base import Connection, DeviceState, SenderConfig
from .providers.base import DeviceStates as ProviderWithDeviceStates
from .repo import SendersRepo
from .senders import UNAVAILABLE, Senders

log = logging.getLogger("pregonero.dispatcher.connections")

DEFAULT_TIMEZONE = "America/Santiago"  # a device without a provider_config `timezone`
DAILY_LIMIT_REASON = "daily limit reached"
# Devices asked about per round, and how many asks are out at once.
POLL_BATCH = 50
POLL_CONCURRENCY = 10
ROUND_SECONDS = 1.0
MAX_REASON = 500
MAX_SESSION = 200
MAX_QR_CODE = 512 * 1024  # base64 PNG; the DeviceEvent must stay well under NATS's payload limit
REPORTED = ("connected", "disconnected", "qr_needed")
CONNECTIONS = (*REPORTED, "unknown")


class FirstPoll(Protocol):
    """Done before a device is asked about (wablas_tracking.py: its Tracking URL, once)."""

    async def polled(self, sender: SenderConfig) -> None: ...


class SenderAvailability(Protocol):
    """The engine's side (engine.py): devices that cannot take work now, and again."""

    def sender_unavailable(self, sender_id: int, reason: str) -> None: ...

    def sender_available(self, sender_id: int) -> None: ...


def device_day(timezone: str, at: datetime) -> date:
    """The device's local date at `at` (SQL: sender_day in migration 007, the one the claim uses)."""
    return at.astimezone(ZoneInfo(timezone or DEFAULT_TIMEZONE)).date()


def day_ends_at(timezone: str, at: datetime) -> datetime:
    """The next local midnight of the device after `at`, when its daily count starts again."""
    zone = ZoneInfo(timezone or DEFAULT_TIMEZONE)
    tomorrow = at.astimezone(zone).date() + timedelta(days=1)
    # A midnight skipped by a DST change (Chile's spring forward is at 24:00) resolves to the
    # first instant of the new day, as PostgreSQL counts it.
    naive = datetime(tomorrow.year, tomorrow.month, tomorrow.day)
    return naive.replace(tzinfo=zone).astimezone(UTC).astimezone(zone)


class Connections:
    def __init__(
        self,
        *,
        repo: SendersRepo,
        senders: Senders,
        states: DeviceStates,
        providers: Mapping[str, object],
        engine: SenderAvailability | None = None,
        poll_seconds: float = 30.0,
        timeout_seconds: float = 10.0,
        tracking: FirstPoll | None = None,
    ) -> None:
        self.repo = repo
        self.senders = senders
        self.states = states
        # Only the providers whose devices have a state to ask about.
        self.pollable: dict[str, ProviderWithDeviceStates] = {
            name: cast(ProviderWithDeviceStates, p)
            for name, p in providers.items()
            if callable(getattr(p, "device_state", None))
        }
        self.engine = engine
        self.tracking = tracking
        self.poll_seconds = poll_seconds
        self.timeout_seconds = timeout_seconds
        # What this process's engine was last told: sender id → why it cannot take work.
        self.told: dict[int, str] = {}
        self.rounds = Rounds(self.round, name="connections", idle_wait=ROUND_SECONDS)

    # --- recording ---

    async def record(self, sender_id: int, state: DeviceState) -> asyncpg.Record | None:
        """Persist what the provider said; on a change of connection publish it and tell the
        engine. None when the sender is gone (deleted meanwhile)."""
        row = await self.repo.record_state(
            sender_id=sender_id,
            connection=state.connection,
            reason=state.reason[:MAX_REASON],
            quota_left=max(-1, state.quota_left),
        )
        if row is None:
            return None
        changed = row["previous"] != state.connection
        if changed:
            log.info("device %s: %s → %s (%s)", sender_id, row["previous"], state.connection, state.reason)
        # A QR expires within a minute and the provider shows a new one: each is news to the
        # person about to scan it, so it is published even while the connection stays qr_needed.
        fresh_qr = state.connection == QR_NEEDED and bool(state.qr_code)
        if row["status"] == "active" and (changed or fresh_qr):
            self._tell_engine(sender_id, state.connection, state.reason)
            # `unknown` is not news for a socket (it has no word for it): nothing is published.
            if state.connection in REPORTED and row["channel"] == "whatsapp":
                await self.states.publish(
                    account_id=row["account_id"],
                    sender_id=sender_id,
                    state=state.connection,
                    qr_code=state.qr_code,
                    reason=state.reason[:MAX_REASON],
                )
        return row

    async def report(
        self, caller: Caller, *, provider: str, session: str, connection: str, reason: str = "", qr_code: str = ""
    ) -> asyncpg.Record:
        """A provider's webhook, relayed by the gateway after checking its signature: internal
        callers only (the gateway's service identity: an admin bound to no account), since
        the device is found by the provider's name of it, across accounts."""
        if not (caller.is_admin and not caller.account_id):
            raise PermissionDenied("device states are reported by the suite's webhooks only")
        if not provider or not session or len(session) > MAX_SESSION:
            raise InvalidArgument(f"provider and session are required (session up to {MAX_SESSION} characters)")
        if connection not in REPORTED:
            raise InvalidArgument(f"connection must be one of: {', '.join(REPORTED)}")
        if len(qr_code) > MAX_QR_CODE:
            raise InvalidArgument(f"qr_code is larger than {MAX_QR_CODE} bytes")
        sender_id = await self.repo.by_session(provider=provider, session=session)
        if sender_id is None:
            raise NotFound(f"no {provider} device has session {session[:MAX_SESSION]}")
        state = DeviceState(connection=cast(Connection, connection), reason=reason, qr_code=qr_code)
        row = await self.record(sender_id, state)
        if row is None:
            raise NotFound(f"no {provider} device has session {session[:MAX_SESSION]}")
        full = await self.repo.get(sender_id=sender_id, account_id=row["account_id"])
        if full is None:
            raise NotFound(f"no {provider} device has session {session[:MAX_SESSION]}")
        return full

    # --- telling the engine ---

    def _tell_engine(self, sender_id: int, connection: str, reason: str) -> None:
        self._tell(sender_id, (reason or connection) if connection in UNAVAILABLE else None)

    def _tell(self, sender_id: int, unavailable: str | None) -> None:
        """`unavailable`: why the device cannot take work, or None when it can."""
        if self.told.get(sender_id) == unavailable:
            return
        if unavailable is None:
            self.told.pop(sender_id, None)
            if self.engine is not None:
                self.engine.sender_available(sender_id)
        else:
            self.told[sender_id] = unavailable
            if self.engine is not None:
                self.engine.sender_unavailable(sender_id, unavailable)

    async def resync(self) -> None:
        """The engine's view of unavailable devices made equal to the database's."""
        now: dict[int, str] = {}
        for r in await self.repo.unavailable():
            if r["connection"] in UNAVAILABLE:
                now[r["id"]] = r["connection_reason"] or r["connection"]
            elif r["capped"]:
                now[r["id"]] = DAILY_LIMIT_REASON
        for sender_id in [s for s in self.told if s not in now]:
            self._tell(sender_id, None)
        for sender_id, reason in now.items():
            if sender_id not in self.told:  # a changed reason is not news to the engine
                self._tell(sender_id, reason)

    async def _heard(self, msg: Msg) -> None:
        """Another replica recorded a change (or a device was edited): this engine hears it."""
        try:
            event = events_pb2.DeviceEvent.FromString(msg.data)
        except Exception:  # noqa: BLE001 - not ours to judge; the next resync corrects anything
            return
        if event.reason in ("created", "deleted", "deactivated", "activated"):
            # Edits reach the engine through the sender's version; the resync settles the rest.
            return
        self._tell_engine(event.sender_id, event.status, event.reason)

    # --- polling ---

    async def round(self) -> int:
        """One round: the engine's view corrected, then the devices due asked about. Returns 0
        so the loop waits a round's time between rounds (the asks are spread over the period)."""
        await self.resync()
        if self.pollable:
            await self.poll_once()
        return 0

    async def poll_once(self) -> int:
        """Ask the devices that are due; returns how many were asked."""
        rows = await self.repo.poll_due(providers=sorted(self.pollable), every_s=self.poll_seconds, limit=POLL_BATCH)
        configs = self.senders.configs(rows)
        gate = asyncio.Semaphore(POLL_CONCURRENCY)

        async def ask(sender: SenderConfig) -> None:
            async with gate:
                await self.ask(sender)

        await asyncio.gather(*(ask(c) for c in configs.values()))
        return len(configs)

    async def ask(self, sender: SenderConfig) -> None:
        """One device's state from its provider, recorded whatever happens."""
        sender_id, provider = sender.id, sender.provider
        if self.tracking is not None:
            await self.tracking.polled(sender)  # bounded, never raises
        try:
            async with asyncio.timeout(self.timeout_seconds):
                state = await self.pollable[provider].device_state(sender)
        except TimeoutError:
            log.warning("device %s: %s did not answer within %.0fs", sender_id, provider, self.timeout_seconds)
            state = DeviceState(connection="unknown", reason=f"{provider} did not answer")
        except Exception as exc:  # noqa: BLE001 - a provider's failure is the device's state, not ours
            log.warning("device %s: asking %s failed: %r", sender_id, provider, exc)
            state = DeviceState(connection="unknown", reason=f"{provider}: {type(exc).__name__}")
        if state.connection not in CONNECTIONS:  # the database would refuse it (CHECK)
            log.warning("device %s: %s said %r", sender_id, provider, state.connection)
            state = DeviceState(connection="unknown", reason=f"{provider}: unexpected state")
        await self.record(sender_id, state)

    # --- lifecycle ---

    async def run(self, nc: NATS | None = None) -> None:
        """The rounds, and (with a NATS connection) the other replicas' changes as they happen."""
        sub: Subscription | None = None
        if nc is not None:
            sub = await nc.subscribe(SUBJECT_PREFIX + "*", cb=self._heard)
        # Replicas started together would otherwise ask in step.
        await asyncio.sleep(random.uniform(0, ROUND_SECONDS))
        try:
            await self.rounds.run()
        finally:
            if sub is not None and nc is not None and nc.is_connected:
                await sub.unsubscribe()
