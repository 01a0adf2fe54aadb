"""The dialer: releases due calls of running voice batches to the dispatchers.

Per account, calls in flight (released and not yet ended) never exceed the account's
`max_concurrent_calls`: the count is the sum of its voice batches' `queued_jobs`, read and
raised under a per-account advisory lock, so two campaigns replicas cannot both take the
last free line. A call holds its place until its result is applied.

A batch outside its calling window releases nothing; its jobs wait, no attempt spent. Chilean
debt collection also keeps one answered contact per debtor per week across the account's
batches: a debtor reached within the week is moved to the first window after it.

Calls are paid like messages (credit.reserve): a hold per block of calls at their longest
possible cost; accounts charges the real cost of each call from its result."""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from nats.js import JetStreamContext
from pregonero.events.v1 import events_pb2

from services.runtime import bus, tracing
from services.runtime.lifecycle import Rounds

from .batch_publisher import Notifier
from .calling_rules import (
    CallSettings,
    dynamic_variables,
    in_window,
    next_window_start,
    parse_call_settings,
    weekly_limit_next_allowed,
)
from .campaign_metrics import MESSAGES_RELEASED
from .credit import AccountInfo, Credit, NoCredit, Price, reserve
from .repo import CampaignsRepo
from .voice_repo import VoiceRepo

log = logging.getLogger("pregonero.campaigns.dialer")

# Calls a hold pays for at once: large enough to spare the ledger, small enough not to
# reserve an account's whole balance for one batch.
VOICE_HOLD_BLOCK = 50
# An account without a configured limit gets this many lines.
DEFAULT_CONCURRENT_CALLS = 5
ACCOUNT_TTL_S = 5.0


def call_attempt_id(batch_id: object, job_id: int, round_no: int, phone_index: int) -> str:
    """One call: the job's round and the phone it tries (the dedup key with providers)."""
    return f"{batch_id}:{job_id}:{round_no}.{phone_index}"


def settings_of(batch: Any, account: AccountInfo | None) -> CallSettings:
    """The batch's stored (effective) calling rules; they carry their own time zone."""
    raw = batch["call_settings"]
    return parse_call_settings(
        json.loads(raw) if isinstance(raw, str) else (raw or None),
        account_timezone=account.timezone if account else "America/Santiago",
        country=batch["country"] or (account.country if account else "CL"),
        use_case=batch["use_case"] or "debt_collection",
    )


def prices_of(account: AccountInfo) -> tuple[Decimal, Decimal]:
    """(per minute, per call) in the account's unit: minutes plans pay a call's minutes."""
    if account.unit == "minutes":
        return Decimal(1), Decimal(0)
    return account.cost_per_minute, account.cost_per_call_setup


class Dialer:
    def __init__(
        self,
        repo: VoiceRepo,
        campaigns: CampaignsRepo,
        js: JetStreamContext,
        credit: Credit,
        notifier: Notifier,
        *,
        idle_wait: float = 0.5,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.repo, self.campaigns, self.js, self.credit, self.notifier = repo, campaigns, js, credit, notifier
        self.clock = clock
        self.rounds = Rounds(self.round, name="dialer", idle_wait=idle_wait)
        self._accounts: dict[str, tuple[float, AccountInfo]] = {}

    def wake(self) -> None:
        """A call ended (a line is free) or a batch became runnable."""
        self.rounds.wake()

    async def run(self) -> None:
        await self.rounds.run()

    async def _account(self, account_id: str) -> AccountInfo:
        cached = self._accounts.get(account_id)
        if cached and time.monotonic() - cached[0] < ACCOUNT_TTL_S:
            return cached[1]
        info = await self.credit.account(account_id)
        self._accounts[account_id] = (time.monotonic(), info)
        return info

    async def round(self) -> int:
        """One pass over the batches with due calls, best priority first."""
        by_account: dict[str, list[UUID]] = defaultdict(list)
        for row in await self.repo.dialable_batches():
            by_account[row["account_id"]].append(row["batch_id"])
        released = 0
        for account_id, batch_ids in by_account.items():
            account = await self._account(account_id)
            if account.status != "active":
                continue  # the account-events consumer suspends its batches
            for batch_id in batch_ids:
                released += await self.release(batch_id, account)
        return released

    async def release(self, batch_id: UUID, account: AccountInfo) -> int:
        now = self.clock()
        suspended = None
        async with self.repo.pool.acquire() as conn, conn.transaction():
            batch = await self.repo.lock_dialable(conn, batch_id=batch_id, account_id=account.account_id)
            if batch is None:
                return 0
            settings = settings_of(batch, account)
            if not in_window(settings, now):
                return 0
            lines = account.max_concurrent_calls or DEFAULT_CONCURRENT_CALLS
            free = lines - await self.repo.calls_in_flight(conn, account_id=account.account_id)
            if free <= 0:
                return 0
            due = await self.repo.due_jobs(conn, batch_id=batch_id, now=now, limit=free)
            if settings.weekly_contact_limit and due:
                due = await self._weekly_limit(conn, due, settings, now)
            if not due:
                return 0
            per_minute, per_call = prices_of(account)
            estimate = account.per_call_estimate(settings.max_call_duration_s)
            cover = await reserve(
                self.credit,
                self.campaigns,
                conn,
                batch,
                want=len(due),
                remaining=batch["total_jobs"],
                quote=lambda: self._quote(account, estimate),
                block=VOICE_HOLD_BLOCK,
            )
            calls = due[: cover.count]
            if calls:
                items = [self._item(batch, job, settings, now, account) for job in calls]
                await self.repo.mark_calling(
                    conn, ids=[j["id"] for j in calls], attempts=[i.attempt_id for i in items], now=now
                )
                chunk = events_pb2.DispatchChunk(
                    batch_id=str(batch_id),
                    account_id=account.account_id,
                    channel="voice",
                    chunk_seq=await self.campaigns.next_chunk_seq(conn),
                    items=items,
                    hold_id=cover.hold_id,
                    unit_price=str(cover.price) if cover.hold_id else "",
                    price_per_minute=str(per_minute) if cover.hold_id else "",
                    price_per_call=str(per_call) if cover.hold_id else "",
                )
                subject = f"dispatch.voice.{account.account_id}"
                # Under the batch's origin, as the feeder's chunks (feeder.py).
                with tracing.incoming("dialer release", [tracing.from_stored(batch["origin"])]):
                    await bus.publish(self.js, subject, chunk, msg_id=f"{batch_id}:{chunk.chunk_seq}")
                MESSAGES_RELEASED.labels("voice").inc(len(items))
                await self.campaigns.mark_released(conn, batch_id=batch_id, upto=0, count=len(calls), left=cover.left)
            if cover.short:
                suspended = await self.repo.suspend(conn, batch_id=batch_id, reason=cover.short)
        if suspended is not None:
            await self.notifier.publish(
                self.notifier.event(suspended, "suspended", error=cover.short, message=cover.short)
            )
        return len(calls)

    async def _quote(self, account: AccountInfo, estimate: Decimal) -> Price:
        fresh = await self.credit.account(account.account_id)
        if fresh.status != "active":
            raise NoCredit(f"account {account.account_id} is {fresh.status}")
        return Price(estimate, reserving=fresh.plan_type != "unlimited" and estimate > 0)

    async def _weekly_limit(self, conn: Any, due: list[Any], settings: CallSettings, now: datetime) -> list[Any]:
        """Debtors reached within the last week wait for the first window after it."""
        last = await self.repo.last_answered(conn, account_id=due[0]["account_id"], keys=[j["debtor_key"] for j in due])
        keep, later = [], []
        for job in due:
            allowed = weekly_limit_next_allowed(last.get(job["debtor_key"]), now)
            if allowed is None:
                keep.append(job)
            else:
                later.append((job["id"], next_window_start(settings, allowed)))
        if later:
            await self.repo.postpone(conn, ids=[i for i, _ in later], until=[t for _, t in later])
        return keep

    def _item(
        self, batch: Any, job: Any, settings: CallSettings, now: datetime, account: AccountInfo
    ) -> events_pb2.WorkItem:
        payload = job["payload"] if isinstance(job["payload"], dict) else json.loads(job["payload"] or "{}")
        info = payload.get("additional_info") or {}
        phones = list(job["phones"])
        index = job["next_phone_index"] if job["next_phone_index"] < len(phones) else 0
        variables = dynamic_variables(
            name=job["name"],
            rut=job["dni"],
            company=payload.get("company_name") or "",
            debt_amount=payload.get("debt_amount"),
            due_date=payload.get("due_date"),
            cantidad_cupones=info.get("cantidad_cupones"),
            fecha_maxima=info.get("fecha_maxima"),
            now=now,
            timezone=settings.debtor_timezone,  # the debtor's clock, not the dashboard's zone
        )
        round_no = job["attempts"] + 1
        return events_pb2.WorkItem(
            job_id=job["id"],
            attempt_id=call_attempt_id(batch["batch_id"], job["id"], round_no, index),
            attempt_no=round_no,
            to=phones[index],
            variables_json=json.dumps(
                {
                    "variables": variables,
                    "max_call_duration": settings.max_call_duration_s,
                    "ring_timeout": settings.ring_timeout_s,
                    "agent_id": account.voice_agent_id,
                    "from_number": account.voice_caller_id,
                }
            ),
        )
