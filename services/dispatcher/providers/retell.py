"""Voice calls through a Retell-style API: `POST /v2/create-phone-call` places the call with
the agent's dynamic variables, `GET /v2/get-call/{call_id}` follows it until it has ended
(and its post-call analysis is in, for a short while).

The call id is handed to the caller as soon as the provider accepts the call
(`CallRequest.on_placed`), so a dispatcher that dies mid-call can find the call again after
the restart instead of calling the debtor a second time. Nothing here retries a call the
provider refused: that is a failed attempt, and the calling rules decide what comes next."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from .voice import CallRequest, CallResult, CallStatus, Sentiment

log = logging.getLogger("pregonero.dispatcher.retell")

NAME = "retell"

# How a call that ended is read from its `disconnection_reason`; anything else that ended
# with connected time is a conversation (user or agent hung up, transfer, silence, the
# agent's maximum duration) and without connected time a failure.
NOT_CONNECTED: dict[str, CallStatus] = {
    "dial_no_answer": "no_answer",
    "dial_busy": "busy",
    "voicemail_reached": "voicemail",
    "dial_failed": "failed",
    "invalid_destination": "failed",
    "telephony_provider_permission_denied": "failed",
    "telephony_provider_unavailable": "failed",
    "sip_routing_error": "failed",
    "marked_as_spam": "failed",
    "user_declined": "busy",
    "concurrency_limit_reached": "failed",
    "no_valid_payment": "failed",
    "scam_detected": "failed",
}
SENTIMENTS: dict[str, Sentiment] = {"positive": "Positive", "neutral": "Neutral", "negative": "Negative"}
# After the end, `call_analysis` (summary, sentiment, custom data) arrives a little later.
ANALYSIS_WAIT_S = 30.0
# A provider that never reports the end of a call: stop following it this long after the
# longest call could have lasted (the record keeps its id for whoever reconciles it).
OVERDUE_MARGIN_S = 600.0


class RetellVoiceProvider:
    name = NAME

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        agent_id: str,
        from_number: str,
        poll_seconds: float = 2.0,
        timeout_s: float = 10.0,
    ) -> None:
        self.agent_id, self.from_number, self.poll_seconds = agent_id, from_number, poll_seconds
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=timeout_s,
        )

    async def call(self, request: CallRequest) -> CallResult:
        started_at = datetime.now(UTC)
        body = {
            "from_number": str(
                request.agent_config.get("from_number") or request.sender.config.get("from_number") or self.from_number
            ),
            "to_number": request.to,
            "override_agent_id": str(request.agent_config.get("agent_id") or self.agent_id),
            # The agent's prompt reads these as {{name}}; the API takes strings only.
            "retell_llm_dynamic_variables": {k: str(v) for k, v in request.variables.items()},
            "metadata": {"attempt_id": request.attempt_id},
        }
        try:
            reply = await self.http.post("/v2/create-phone-call", json=body)
        except httpx.HTTPError as exc:
            # A request that may have reached the provider: the attempt is not retried
            # here, and its record tells the rest (no call id, so nothing to look up).
            return CallResult(status="failed", started_at=started_at, error=f"create-phone-call: {exc!r}")
        if reply.status_code >= 300:
            return CallResult(
                status="failed",
                started_at=started_at,
                error=f"create-phone-call {reply.status_code}: {_message(reply)}",
            )
        call_id = str(reply.json().get("call_id") or "")
        if not call_id:
            return CallResult(status="failed", started_at=started_at, error="create-phone-call: no call_id in reply")
        if request.on_placed is not None:
            try:
                await request.on_placed(call_id)
            except Exception:  # noqa: BLE001 - the call is up all the same: follow it
                log.exception("call %s of attempt %s could not be put on record", call_id, request.attempt_id)
        deadline = time.monotonic() + request.ring_timeout_s + request.max_call_duration_s + OVERDUE_MARGIN_S
        return await self._follow(call_id, deadline=deadline)

    async def lookup(self, attempt_id: str, call_id: str = "") -> CallResult | None:
        """The call an attempt placed, followed to its end; None when it has no call id (it
        never got past create-phone-call as far as we know) or the provider has no such call."""
        if not call_id:
            return None
        with contextlib.suppress(httpx.HTTPError):  # unreachable now: follow() keeps asking
            if (await self.http.get(f"/v2/get-call/{call_id}")).status_code == 404:
                return None
        return await self._follow(call_id, deadline=time.monotonic() + OVERDUE_MARGIN_S)

    async def _follow(self, call_id: str, *, deadline: float) -> CallResult:
        ended_at: float | None = None
        last: dict[str, Any] = {}
        while True:
            try:
                reply = await self.http.get(f"/v2/get-call/{call_id}")
                if reply.status_code < 300:
                    last = reply.json()
                else:
                    log.warning("get-call %s: %s %s", call_id, reply.status_code, _message(reply))
            except httpx.HTTPError as exc:  # a blip: the call goes on, ask again
                log.warning("get-call %s: %r", call_id, exc)
            status = last.get("call_status")
            if status == "error":
                return _result(call_id, last, forced="failed")
            if status == "ended":
                ended_at = ended_at or time.monotonic()
                if last.get("call_analysis") or time.monotonic() - ended_at >= ANALYSIS_WAIT_S:
                    return _result(call_id, last)
            elif time.monotonic() > deadline:
                return CallResult(status="failed", call_id=call_id, error="the provider never reported the call's end")
            await asyncio.sleep(self.poll_seconds)

    async def close(self) -> None:
        await self.http.aclose()


def _message(reply: httpx.Response) -> str:
    try:
        data = reply.json()
    except ValueError:
        return reply.text[:200]
    return str(data.get("message") or data.get("error_message") or data)[:200] if isinstance(data, dict) else str(data)


def _stamp(ms: Any) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, UTC) if isinstance(ms, int | float) and ms > 0 else None


def _result(call_id: str, call: dict[str, Any], *, forced: CallStatus | None = None) -> CallResult:
    analysis = call.get("call_analysis") or {}
    reason = str(call.get("disconnection_reason") or "")
    start, end = call.get("start_timestamp"), call.get("end_timestamp")
    duration = call.get("duration_ms")
    if not isinstance(duration, int):
        duration = end - start if isinstance(start, int) and isinstance(end, int) and end > start else 0
    if forced is not None:
        status: CallStatus = forced
    elif reason in NOT_CONNECTED:
        status = NOT_CONNECTED[reason]
    elif analysis.get("in_voicemail"):
        status = "voicemail"
    elif reason.startswith("error") or duration <= 0:
        status = "failed"
    else:
        status = "completed"
    # Connected time is what the provider bills (a voicemail greeting included); a phone that
    # only rang has none, whatever the provider's clock says.
    billed = 0 if status in ("no_answer", "busy") else duration
    collected = {str(k): str(v) for k, v in (call.get("collected_dynamic_variables") or {}).items()}
    collected.update({str(k): str(v) for k, v in (analysis.get("custom_analysis_data") or {}).items()})
    return CallResult(
        status=status,
        call_id=call_id,
        duration_ms=max(0, int(billed)),
        started_at=_stamp(start),
        ended_at=_stamp(end),
        transcript=str(call.get("transcript") or ""),
        summary=str(analysis.get("call_summary") or ""),
        sentiment=SENTIMENTS.get(str(analysis.get("user_sentiment") or "").lower()),
        recording_url=str(call.get("recording_url") or ""),
        public_log_url=str(call.get("public_log_url") or ""),
        collected=collected,
        error="" if status != "failed" else (reason or "call error"),
    )
