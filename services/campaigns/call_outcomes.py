"""How an ended call moves its job: the calling rules decide (calling_rules.after_attempt), this
module books it — the job row, the batch counters, the hourly figures, the debtor's answered
contact — inside the results transaction. A result applies once: the job must still be
waiting for exactly that call (`current_attempt`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, cast

import asyncpg
from pregonero.events.v1 import events_pb2

from .calling_rules import CallOutcome, JobState, after_attempt
from .dialer import settings_of
from .voice_repo import VoiceRepo


@dataclass(frozen=True, slots=True)
class Applied:
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    ended: int = 0  # calls whose line is free again


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text) if text else Decimal(0)
    except InvalidOperation:
        return Decimal(0)


def _promise(collected: dict[str, Any]) -> tuple[date | None, Decimal | None]:
    """The payment the debtor promised, when the agent collected one."""
    when = amount = None
    try:
        if collected.get("fecha_pago_cliente"):
            when = date.fromisoformat(str(collected["fecha_pago_cliente"])[:10])
    except ValueError:
        when = None
    raw = str(collected.get("monto_pago_cliente") or "").replace("$", "").replace(".", "").replace(",", ".").strip()
    if raw:
        amount = _decimal(raw) or None
    return when, amount


class CallResults:
    def __init__(self, repo: VoiceRepo) -> None:
        self.repo = repo

    async def apply(
        self, conn: asyncpg.Connection, batch: asyncpg.Record, outcomes: list[events_pb2.JobOutcome]
    ) -> Applied:
        settings = settings_of(batch, None)
        now = datetime.now(UTC)
        completed = failed = cancelled = ended = first_calls = 0
        cost_total, seconds_total = Decimal(0), Decimal(0)
        for outcome in outcomes:
            job = await self.repo.lock_call(conn, job_id=outcome.job_id, attempt_id=outcome.attempt_id)
            if job is None:
                continue  # replayed, or the job was deleted meanwhile
            result = json.loads(outcome.result_json or "{}")
            summary = result.get("summary") or {}
            duration_s = Decimal(int(summary.get("duration_ms") or 0)) / 1000
            cost = _decimal(outcome.cost)
            ended += 1
            # Deleted while being called (VoiceRepo.delete_job): the call is booked as it ended,
            # and the job ends cancelled, with no next phone or retry.
            cancel_requested = bool(job["cancellation_reason"])
            if outcome.status == "requeue":
                if cancel_requested:
                    # It never rang: nothing to book but the end of the job.
                    await self.repo.cancel_handed_back(conn, job_id=job["id"])
                    cancelled += 1
                    continue
                # Handed back before it rang (the dispatcher stopped): the same call again later.
                await self.repo.book_call(conn, job_id=job["id"], status="pending", state=None, result=None, now=now)
                continue
            before = JobState("pending", job["attempts"], job["next_phone_index"], len(job["phones"]), None)
            if outcome.status == "unknown":
                # Lost with a crashed dispatcher: the call may have reached the debtor, so calling
                # on could contact them twice. The job ends here, failed, with the reason.
                state = JobState("failed", job["attempts"] + 1, job["next_phone_index"], len(job["phones"]), None)
            else:
                # A string off the wire: after_attempt rejects any status that is not a CallOutcome.
                state = after_attempt(before, cast(CallOutcome, outcome.status), settings, now)
            status: str = "pending" if state.status == "scheduled" else state.status
            if cancel_requested or (status == "pending" and batch["status"] == "cancelled"):
                status = "cancelled"
            first_calls += job["call_ended_at"] is None
            completed += status == "completed"
            failed += status == "failed"
            cancelled += status == "cancelled"
            cost_total += cost
            seconds_total += duration_s
            when, amount = _promise(summary.get("collected_dynamic_variables") or {})
            await self.repo.book_call(
                conn,
                job_id=job["id"],
                status=status,
                state=state,
                result=result,
                now=now,
                cost=cost,
                duration_s=duration_s,
                promised_on=when,
                promised_amount=amount,
            )
            # The call in its batch's hour (unknown counts as failed: no conversation on record).
            await self.repo.add_hour(
                conn, job, at=now, outcome=outcome.status, cost=cost, seconds=duration_s, promise=(when, amount)
            )
            if outcome.status == "completed":
                await self.repo.answered(conn, account_id=job["account_id"], debtor_key=job["debtor_key"], at=now)
        await self.repo.add_call_counters(
            conn,
            batch_id=batch["batch_id"],
            completed=completed,
            failed=failed,
            cancelled=cancelled,
            ended=ended,
            cost=cost_total,
            seconds=seconds_total,
            first_calls=first_calls,
        )
        return Applied(completed, failed, cancelled, ended)
