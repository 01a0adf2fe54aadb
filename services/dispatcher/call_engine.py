"""The call engine: places the voice calls campaigns releases on `dispatch.voice.>`.

Campaigns decides how many calls an account has up (its lines); here every released call is
placed at once and held until it ends, and its result goes back as soon as it has one. The
chunk is acked when its last call has ended; meanwhile it is kept alive with in-progress
pings, so a long call is never taken for a dead dispatcher.

As for messages, the attempt is recorded before the call is placed: a redelivered chunk
(our process died) reports calls that ended from the record, asks the provider about calls
that were up, and never calls a debtor twice for one attempt."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from decimal import Decimal
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from pregonero.events.v1 import events_pb2

from services.runtime import bus, tracing
from services.runtime.bus import DISPATCH_STREAM

from .providers.base import SenderConfig
from .providers.voice import CallRequest, CallResult, VoiceProvider, call_cost
from .repo import AttemptsRepo
from .send_metrics import CALLS_IN_PROGRESS, CALLS_PLACED

log = logging.getLogger("pregonero.dispatcher.call_engine")

DURABLE = "dispatch-voice"
FETCH = 16


def call_result_json(result: CallResult, *, to: str, cost: Decimal | None) -> dict[str, Any]:
    """The call as the dashboard reads it (API_COMPAT: call_result{success, status, summary{...}})."""
    seconds = result.duration_ms / 1000
    return {
        "success": result.status == "completed",
        "status": result.status,
        "summary": {
            "call_id": result.call_id,
            "call_status": "error" if result.status == "failed" else "ended",
            "disconnection_reason": result.status,
            "to_number": to,
            "duration_ms": result.duration_ms,
            "start_timestamp": result.started_at.isoformat() if result.started_at else None,
            "end_timestamp": result.ended_at.isoformat() if result.ended_at else None,
            "call_cost": {
                "combined_cost": float(cost) if cost is not None else 0.0,
                "total_duration_seconds": seconds,
            },
            "call_analysis": {"call_summary": result.summary, "user_sentiment": result.sentiment},
            "recording_url": result.recording_url or None,
            "public_log_url": result.public_log_url or None,
            "transcript": result.transcript,
            "collected_dynamic_variables": dict(result.collected),
            "error": result.error or None,
        },
    }


class CallEngine:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        attempts: AttemptsRepo,
        provider: VoiceProvider,
        line_config: dict[str, Any],
        ack_wait: float = 15.0,
        max_calls: int = 2000,
    ) -> None:
        self.js, self.attempts, self.provider = js, attempts, provider
        self.line_config = line_config
        self.ack_wait = ack_wait
        self.lines = asyncio.Semaphore(max_calls)
        self.tasks: set[asyncio.Task[None]] = set()
        self.accepting = True
        self.fetching_stopped = asyncio.Event()

    async def run(self) -> None:
        try:
            sub = await self.js.pull_subscribe(
                "dispatch.voice.>",
                durable=DURABLE,
                stream=DISPATCH_STREAM,
                config=js_api.ConsumerConfig(
                    ack_policy=js_api.AckPolicy.EXPLICIT,
                    ack_wait=self.ack_wait,
                    max_ack_pending=10_000,
                ),
            )
        except BaseException:
            self.fetching_stopped.set()  # nothing was fetched: a drain has nothing to wait for
            raise
        try:
            while self.accepting:
                msgs = await bus.pull(sub, FETCH, name=DURABLE)
                if not msgs:
                    continue
                if not self.accepting:
                    # Fetched as the stop came: another dispatcher takes them now.
                    await asyncio.gather(*(m.nak() for m in msgs), return_exceptions=True)
                    break
                for msg in msgs:
                    # The task takes the chunk's request id and trace with it.
                    with tracing.incoming(DURABLE, [msg.headers]):
                        task = asyncio.create_task(self._chunk(msg))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
        except asyncio.CancelledError:
            # Stopped for good (the drain is over or was not asked for): cut what is left.
            for task in list(self.tasks):
                task.cancel()
            raise
        finally:
            self.fetching_stopped.set()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def drain(self) -> None:
        """On shutdown: take no new calls and let the ones in progress end and report (a call
        cut short is a debtor hung up on, and its outcome would be lost)."""
        self.accepting = False
        await self.fetching_stopped.wait()  # no chunk starts after this
        if self.tasks:
            log.info("waiting for %d voice chunks with calls in progress", len(self.tasks))
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    async def _chunk(self, msg: Msg) -> None:
        data = events_pb2.DispatchChunk.FromString(msg.data)
        pinger = asyncio.create_task(self._keep_alive(msg))
        try:
            # What an earlier delivery of this chunk left on record: those calls are never
            # placed again.
            known = await self.attempts.existing(attempt_ids=[i.attempt_id for i in data.items])
            await asyncio.gather(
                *(
                    self._recover(data, item, known[item.attempt_id])
                    if item.attempt_id in known
                    else self._call(data, item)
                    for item in data.items
                )
            )
        except Exception:  # noqa: BLE001 - not acked: the chunk comes back and the record sorts it out
            log.exception("voice chunk %s failed; it will be redelivered", data.chunk_seq)
            return
        finally:
            pinger.cancel()
        await msg.ack()

    async def _keep_alive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.ack_wait / 3)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _call(self, data: events_pb2.DispatchChunk, item: events_pb2.WorkItem) -> None:
        spec = json.loads(item.variables_json or "{}")
        request = CallRequest(
            attempt_id=item.attempt_id,
            sender=SenderConfig(id=0, account_id=data.account_id, provider=self.provider.name, config=self.line_config),
            to=item.to,
            variables={str(k): str(v) for k, v in (spec.get("variables") or {}).items()},
            max_call_duration_s=int(spec.get("max_call_duration") or 300),
            ring_timeout_s=int(spec.get("ring_timeout") or 30),
            # The account's own agent and calling number, when it has them.
            agent_config={k: str(spec[k]) for k in ("agent_id", "from_number") if spec.get(k)},
            on_placed=functools.partial(self.attempts.placed, item.attempt_id),
        )
        async with self.lines:
            # Claimed when its line is free, just before it is placed: a call still waiting for
            # a line when this process dies was never placed, and the redelivery places it.
            claimed = await self.attempts.claim(
                batch_id=data.batch_id, items=[(item.attempt_id, item.job_id)], sender_id=0
            )
            if not claimed:  # another delivery of this chunk placed it meanwhile
                known = await self.attempts.existing(attempt_ids=[item.attempt_id])
                await self._recover(data, item, known.get(item.attempt_id))
                return
            up = CALLS_IN_PROGRESS.labels(self.provider.name)
            CALLS_PLACED.labels(self.provider.name).inc()
            up.inc()
            try:
                result = await self.provider.call(request)
            except Exception as exc:  # noqa: BLE001 - a broken call is a failed call, retried by the rules
                log.warning("call %s failed: %s", item.attempt_id, exc)
                result = CallResult(status="failed", error=type(exc).__name__)
            finally:
                up.dec()
        await self._report(data, item, result)

    async def _recover(self, data: events_pb2.DispatchChunk, item: events_pb2.WorkItem, row: Any) -> None:
        """An attempt already on record: report its end, or ask the provider; never call again."""
        if row is not None and row["status"] != "sending" and row["result"]:
            stored = row["result"] if isinstance(row["result"], dict) else json.loads(row["result"])
            await self._publish(data, item, row["status"], stored, cost=stored.get("_cost", ""))
            return
        found = None
        with contextlib.suppress(Exception):
            found = await self.provider.lookup(item.attempt_id, (row["provider_message_id"] or "") if row else "")
        if found is not None:
            await self._report(data, item, found)
            return
        # The call may have reached the debtor: `unknown`, never placed again (the contract's
        # "never blindly re-sent"); campaigns ends the job there.
        await self._report(data, item, CallResult(status="failed", error="outcome unknown after a restart"), "unknown")

    async def _report(
        self, data: events_pb2.DispatchChunk, item: events_pb2.WorkItem, result: CallResult, status: str = ""
    ) -> None:
        status = status or result.status
        cost = None
        if data.price_per_minute or data.price_per_call:
            cost = call_cost(
                result.duration_ms,
                cost_per_minute=Decimal(data.price_per_minute or "0"),
                cost_per_call_setup=Decimal(data.price_per_call or "0"),
            )
            if result.status == "failed" and result.duration_ms == 0:
                cost = Decimal(0)  # a call that never went out is not charged
        shown = call_result_json(result, to=item.to, cost=cost)
        stored = {**shown, "_cost": str(cost) if cost is not None else ""}
        await self.attempts.finish_call(
            attempt_id=item.attempt_id,
            status=status,
            call_id=result.call_id,
            error=result.error,
            result_json=json.dumps(stored),
        )
        await self._publish(data, item, status, shown, cost=str(cost) if cost is not None else "")

    async def _publish(
        self,
        data: events_pb2.DispatchChunk,
        item: events_pb2.WorkItem,
        status: str,
        shown: dict[str, Any],
        *,
        cost: str,
    ) -> None:
        shown = {k: v for k, v in shown.items() if k != "_cost"}
        outcome = events_pb2.JobOutcome(
            job_id=item.job_id,
            attempt_id=item.attempt_id,
            status=status,
            to=item.to,
            error=(shown.get("summary") or {}).get("error") or "",
            provider_message_id=(shown.get("summary") or {}).get("call_id") or "",
            cost=cost if cost and Decimal(cost) > 0 else "",
            result_json=json.dumps(shown),
        )
        chunk = events_pb2.ResultChunk(
            batch_id=data.batch_id,
            account_id=data.account_id,
            chunk_key=item.attempt_id,
            outcomes=[outcome],
            hold_id=data.hold_id,
        )
        await bus.publish(self.js, f"events.job.{data.batch_id}", chunk, msg_id=f"{data.batch_id}:r:{item.attempt_id}")
