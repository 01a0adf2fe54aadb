"""The `simulated` provider: configurable latency, failure mix and rate-limit replies, for
development, tests and benchmarks.

In process (`SimulatedProvider`) it keeps its record in memory; over HTTP
(`HttpSimulatedProvider`) the same behaviour runs in `sim_server`, a separate process whose
record outlives a dispatcher that is killed, so crash recovery can be checked against it."""

from __future__ import annotations

import asyncio
import math
import random
import secrets
import time
from typing import Annotated, Any, NamedTuple
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.dispatcher.providers.base import Provider, SenderConfig, SendRequest, SendResult, transport_failure
from services.runtime.validation import checked

NAME = "simulated"
RETRY_AFTER_SECONDS = 1.0
FAILURE_ERRORS = ("ConnectTimeout", "InvalidNumber")

# Results that carry no per-send data are built once: the benchmark path allocates only the
# record entry and the accepted result.
_RATE_LIMITED = SendResult(status="rate_limited", error="rate_limited", retry_after=RETRY_AFTER_SECONDS)
_FAILED = tuple(SendResult(status="failed", error=e) for e in FAILURE_ERRORS)


# A ratio is a share of all sends; an amount a non-negative finite number (ms, s, a factor).
Ratio = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Amount = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class SimulatedBehaviour(BaseModel):
    """How a simulated device behaves: its `provider_config`, checked as it is read."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    latency_ms: Amount = 0.0
    latency_jitter_ms: Amount = 0.0  # uniform in [-jitter, +jitter] around the mean, floored at 0
    failure_ratio: Ratio = 0.0
    rate_limit_ratio: Ratio = 0.0
    seed: int | None = None

    @model_validator(mode="after")
    def _one_draw(self) -> SimulatedBehaviour:
        # One draw decides the outcome, so the two shares must fit in one whole.
        if self.failure_ratio + self.rate_limit_ratio > 1.0:
            raise ValueError(
                f"failure_ratio + rate_limit_ratio must be <= 1, got {self.failure_ratio + self.rate_limit_ratio:g}"
            )
        return self

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> SimulatedBehaviour:
        """Parse and validate a sender's `config`; ValueError says which key is wrong."""
        return cls() if config is None else checked(cls, config, name="provider_config")

    def to_config(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class RecordEntry(NamedTuple):
    attempt_id: str
    sender_id: int
    to: str
    text: str
    accepted_at: float  # time.time()


class AcceptedSend(NamedTuple):
    message_id: str
    entry: RecordEntry


class SimulationRecord:
    """Every send the provider accepted, once per attempt id (providers dedup on
    idempotency keys); refused sends are only counted."""

    def __init__(self, capacity: int | None = None) -> None:
        # capacity: keep only about the newest `capacity` sends (older halves are dropped),
        # so a long-running in-process simulator does not grow without end; positions and
        # message ids stay stable, and duplicates are caught within what is kept.
        self._capacity = capacity
        self._base = 0  # position of _entries[0]
        self._entries: list[RecordEntry] = []
        self._index: dict[str, int] = {}  # attempt_id -> position
        self._prefix = secrets.token_hex(4)
        self.duplicate_attempts = 0
        self.rejected = 0

    def _message_id(self, position: int) -> str:
        # Derived from the position, so the index holds a plain int per attempt.
        return f"sim-{self._prefix}{position:08x}"

    def accept(self, attempt_id: str, sender_id: int, to: str, text: str) -> str:
        """Record an accepted send and return its message id; a repeat of an accepted
        attempt returns the original id and is only counted."""
        position = self._index.get(attempt_id)
        if position is not None:
            self.duplicate_attempts += 1
            return self._message_id(position)
        if self._capacity is not None and len(self._entries) >= self._capacity:
            drop = len(self._entries) // 2
            for old in self._entries[:drop]:
                del self._index[old.attempt_id]
            self._entries = self._entries[drop:]
            self._base += drop
        position = self._base + len(self._entries)
        self._entries.append(RecordEntry(attempt_id, sender_id, to, text, time.time()))
        self._index[attempt_id] = position
        return self._message_id(position)

    def __contains__(self, attempt_id: object) -> bool:
        return attempt_id in self._index

    def reject(self) -> None:
        self.rejected += 1

    def lookup(self, attempt_id: str) -> AcceptedSend | None:
        position = self._index.get(attempt_id)
        if position is None:
            return None
        return AcceptedSend(self._message_id(position), self._entries[position - self._base])

    def entries(self, since: int = 0, limit: int | None = None) -> list[RecordEntry]:
        """From position `since` on (positions before what is kept are skipped)."""
        start = max(since - self._base, 0)
        end = None if limit is None else start + limit
        return self._entries[start:end]

    def count(self) -> int:
        """Accepted sends since the start (or the last reset), kept or not."""
        return self._base + len(self._entries)

    def reset(self) -> None:
        self._entries = []
        self._index = {}
        self._base = 0
        # New ids after a reset, so an old message id never names a new send.
        self._prefix = secrets.token_hex(4)
        self.duplicate_attempts = 0
        self.rejected = 0


# In process the record only backs duplicate checks and look-ups: bounded, for long runs.
DEFAULT_RECORD = SimulationRecord(capacity=200_000)


class _SenderState:
    __slots__ = ("config", "behaviour", "rng", "sleeps")

    def __init__(self, config: dict[str, Any], behaviour: SimulatedBehaviour, rng: random.Random) -> None:
        self.config = config
        self.behaviour = behaviour
        self.rng = rng
        self.sleeps = behaviour.latency_ms > 0 or behaviour.latency_jitter_ms > 0


class SimulatedProvider:
    """In-process simulated provider; cheap enough for 10,000+ sends/s at zero latency."""

    name = NAME

    def __init__(self, record: SimulationRecord | None = None) -> None:
        self.record = record if record is not None else SimulationRecord()
        self._senders: dict[int, _SenderState] = {}
        self._rng = random.Random()  # unseeded senders share one stream

    def _state(self, sender: SenderConfig) -> _SenderState:
        config = sender.config
        state = self._senders.get(sender.id)
        if state is not None:
            if state.config is config:
                return state
            # Callers that rebuild SenderConfig per send pass equal but new dicts; keep the
            # seeded stream going instead of restarting it on every send.
            if state.config == config:
                state.config = config
                return state
        behaviour = SimulatedBehaviour.from_config(config)
        rng = random.Random(behaviour.seed) if behaviour.seed is not None else self._rng
        state = _SenderState(config, behaviour, rng)
        self._senders[sender.id] = state
        return state

    def behaviour_for(self, sender: SenderConfig) -> SimulatedBehaviour:
        return self._state(sender).behaviour

    async def send(self, request: SendRequest) -> SendResult:
        try:
            state = self._state(request.sender)
        except ValueError as exc:
            self.record.reject()
            return SendResult(status="failed", error=f"InvalidConfig: {exc}")
        behaviour = state.behaviour
        rng = state.rng
        if state.sleeps:
            delay = behaviour.latency_ms
            if behaviour.latency_jitter_ms:
                delay += rng.uniform(-behaviour.latency_jitter_ms, behaviour.latency_jitter_ms)
            if delay > 0:
                await asyncio.sleep(delay / 1000.0)
        record = self.record
        # Dedup before the dice: a repeat of an accepted attempt is answered like the
        # original, as a provider honouring an idempotency key does.
        if (behaviour.failure_ratio or behaviour.rate_limit_ratio) and request.attempt_id not in record:
            draw = rng.random()
            if draw < behaviour.failure_ratio:
                record.reject()
                # The same draw, rescaled, picks the error: no second draw per send.
                return _FAILED[int(draw / behaviour.failure_ratio * len(_FAILED))]
            if draw < behaviour.failure_ratio + behaviour.rate_limit_ratio:
                record.reject()
                return _RATE_LIMITED
        message_id = record.accept(request.attempt_id, request.sender.id, request.to, request.text)
        return SendResult(status="sent", provider_message_id=message_id)

    async def lookup(self, attempt_id: str, sender: SenderConfig) -> SendResult | None:
        found = self.record.lookup(attempt_id)
        if found is None:
            return None
        return SendResult(status="sent", provider_message_id=found.message_id)

    async def close(self) -> None:
        return None


def _retry_after(value: str | None) -> float:
    if not value:
        return RETRY_AFTER_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        return RETRY_AFTER_SECONDS  # an HTTP-date; the simulator never sends one
    return seconds if math.isfinite(seconds) and seconds >= 0 else RETRY_AFTER_SECONDS


def _error_of(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return f"HTTP {response.status_code}"


class HttpSimulatedProvider:
    """The simulated behaviour performed by a `sim_server` process over HTTP."""

    name = NAME

    def __init__(self, base_url: str, client: httpx.AsyncClient | None = None, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            # Generous read timeout: configured latencies of a few seconds are legitimate.
            timeout=httpx.Timeout(timeout, connect=min(timeout, 3.0)),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=200),
        )

    async def send(self, request: SendRequest) -> SendResult:
        body = {
            "attempt_id": request.attempt_id,
            "sender_id": request.sender.id,
            "to": request.to,
            "text": request.text,
            "behaviour": request.sender.config,
        }
        try:
            response = await self._client.post(f"{self.base_url}/v1/messages", json=body)
        except httpx.HTTPError as exc:
            # After a read timeout the server may have accepted it: unknown, never failed.
            return transport_failure(exc)
        if response.status_code == 200:
            try:
                message_id = response.json()["message_id"]
            except (ValueError, KeyError, TypeError):
                return SendResult(status="failed", error="MalformedReply")
            return SendResult(status="sent", provider_message_id=str(message_id))
        if response.status_code == 429:
            return SendResult(
                status="rate_limited",
                error="rate_limited",
                retry_after=_retry_after(response.headers.get("retry-after")),
            )
        return SendResult(status="failed", error=_error_of(response))

    async def lookup(self, attempt_id: str, sender: SenderConfig) -> SendResult | None:
        """None only when the server answers 404; an unreachable server raises, because
        "never accepted" would license a second send."""
        response = await self._client.get(f"{self.base_url}/v1/messages/{quote(attempt_id, safe='')}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return SendResult(status="sent", provider_message_id=str(response.json()["message_id"]))

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def make_simulated(url: str | None) -> Provider:
    """In process over DEFAULT_RECORD when url is None, else through the sim server at url."""
    if url is None:
        return SimulatedProvider(DEFAULT_RECORD)
    return HttpSimulatedProvider(url)


class RefusedSimulatedProvider:
    """Stands in for `simulated` where it is refused (outside development, not a demo), for the
    devices created before it was: each send is refused as by a device that cannot send now, so
    nothing is invented and the recipient is not failed. The engine moves the work to the job's
    other devices, or hands it back and campaigns suspends the batch until a real device can
    take it. Not recorded as the device's connection: that state would outlive the device's
    switch to a real provider, or PREGONERO_DEMO."""

    name = NAME

    def __init__(self, reason: str, *, rest_seconds: float = 300.0) -> None:
        self._refused = SendResult(
            status="rate_limited", error=reason, retry_after=rest_seconds, device_unavailable=True
        )

    async def send(self, request: SendRequest) -> SendResult:
        return self._refused

    async def lookup(self, attempt_id: str, sender: SenderConfig) -> SendResult | None:
        return None  # it never sent anything

    async def close(self) -> None:
        return None
