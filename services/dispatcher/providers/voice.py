"""Voice calls: the interface every voice provider adapter implements, the `simulated` voice
provider, and what a call costs.

Unlike a message, a call holds its slot until it ends, so `call` returns only then; the
dispatcher bounds how many are in progress at once, not the adapter."""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, Literal, Protocol, TypedDict

from pydantic import BaseModel, ConfigDict, model_validator

from services.dispatcher.providers.base import SenderConfig
from services.dispatcher.providers.simulated import NAME, Amount, Ratio
from services.runtime.validation import checked

CallStatus = Literal["completed", "no_answer", "busy", "voicemail", "failed"]
Sentiment = Literal["Positive", "Neutral", "Negative"]


class _Links(TypedDict):
    """A simulated call's links, spread into its CallResult."""

    recording_url: str
    public_log_url: str


@dataclass(frozen=True, slots=True)
class CallRequest:
    attempt_id: str  # idempotency key: one attempt is called at most once
    sender: SenderConfig  # the line the call goes out from: provider, credentials, caller id, provider config
    to: str  # E.164
    variables: dict[str, str] = field(default_factory=dict)  # the agent's per-call variables (all strings)
    max_call_duration_s: int = 300  # the provider hangs up after this much conversation
    ring_timeout_s: int = 30  # and gives up on a phone that rings this long
    agent_config: dict[str, Any] = field(default_factory=dict)  # the voice agent: agent_id, from_number …
    # Told the provider's call id as soon as the call is placed, before it ends: the record
    # that lets a restarted dispatcher find the call instead of calling again.
    on_placed: Callable[[str], Awaitable[None]] | None = None


@dataclass(frozen=True, slots=True)
class CallResult:
    status: CallStatus
    call_id: str = ""  # the provider's id of the call
    duration_ms: int = 0  # connected time, the billable part: 0 when nothing answered
    started_at: datetime | None = None  # dialling began
    ended_at: datetime | None = None
    transcript: str = ""
    summary: str = ""
    sentiment: Sentiment | None = None  # None when no one spoke
    recording_url: str = ""
    public_log_url: str = ""
    # What the agent gathered, e.g. fecha_pago_cliente ("YYYY-MM-DD") and monto_pago_cliente
    # (whole pesos, plain digits) for a promise to pay.
    collected: dict[str, str] = field(default_factory=dict)
    error: str = ""


class VoiceProvider(Protocol):
    name: str

    async def call(self, request: CallRequest) -> CallResult:
        """Place the call and return once it has ended."""
        ...

    async def lookup(self, attempt_id: str, call_id: str = "") -> CallResult | None:
        """The provider's own record of an attempt whose outcome we lost in a crash (by the
        call id `on_placed` reported, when there is one), awaited to its end: None when the
        provider never placed it."""
        ...

    async def close(self) -> None: ...


def call_cost(duration_ms: int, *, cost_per_minute: Decimal, cost_per_call_setup: Decimal) -> Decimal:
    """What a call costs: the setup price plus the per-minute price prorated over every
    started second of connected time (61.001 s bills 62 s, i.e. 62/60 of a minute), rounded
    up to 4 decimal places so rounding never undercharges. A call of 0 ms costs the setup
    price; whether unanswered calls are charged at all is the caller's decision."""
    if duration_ms < 0:
        raise ValueError(f"duration_ms must be >= 0, got {duration_ms}")
    if cost_per_minute < 0 or cost_per_call_setup < 0:
        raise ValueError("prices must be >= 0")
    seconds = -(-duration_ms // 1000)
    # Exact rationals: a Decimal division by 60 would round before the rounding up.
    exact = Fraction(cost_per_call_setup) + Fraction(cost_per_minute) * seconds / 60
    return Decimal(math.ceil(exact * 10_000)).scaleb(-4)


# --- The simulated voice provider --------------------------------------------------------------

RATIO_KEYS = ("answer_ratio", "busy_ratio", "voicemail_ratio", "failure_ratio")
FAILURE_ERRORS = ("NetworkError", "InvalidNumber")
SIM_URL = "https://voice-sim.invalid"  # .invalid: links that look real but never resolve
# Answered calls end in one of these, with these weights: a promise to pay, a "call me later",
# a refusal.
SCENARIOS = (("promise", 0.5), ("callback", 0.3), ("refusal", 0.2))
PROMISE_WITHIN_DAYS = 7


class SimulatedVoiceBehaviour(BaseModel):
    """How the simulated line behaves (its `provider_config`, checked as it is read). Outcome
    shares are of all calls; what the four ratios leave is no_answer (a config that sets some
    ratios has the others at 0). Conversations last duration_s ± duration_spread_s (uniform,
    at least 1 s, cut at the request's max_call_duration_s); a voicemail greeting 5-20 s;
    no_answer rings the request's ring_timeout_s; busy and failed end within seconds.
    time_scale scales every wait: 0.01 makes a 60-s call take 0.6 s; 0 returns at once."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    answer_ratio: Ratio = 0.6
    busy_ratio: Ratio = 0.1
    voicemail_ratio: Ratio = 0.1
    failure_ratio: Ratio = 0.05
    duration_s: Amount = 60.0
    duration_spread_s: Amount = 30.0
    time_scale: Amount = 1.0
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _mix_as_a_whole(cls, data: Any) -> Any:
        # The default mix applies only as a whole: once a config sets any ratio, the ones it
        # leaves out are 0, so {"answer_ratio": 1} means every call is answered.
        if isinstance(data, dict) and data.keys() & set(RATIO_KEYS):
            return {**dict.fromkeys(RATIO_KEYS, 0.0), **data}
        return data

    @model_validator(mode="after")
    def _one_draw(self) -> SimulatedVoiceBehaviour:
        # One draw decides the outcome, so the shares must fit in one whole (give or take the
        # float error of adding 0.1s).
        total = sum(getattr(self, key) for key in RATIO_KEYS)
        if total > 1.0 + 1e-9:
            raise ValueError(f"the outcome ratios must add up to at most 1, got {total:g}")
        return self

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> SimulatedVoiceBehaviour:
        """Parse and validate a line's `config`; ValueError says which key is wrong."""
        return cls() if config is None else checked(cls, config, name="provider_config")


def _rng_and_call_id(seed: int, attempt_id: str) -> tuple[random.Random, str]:
    # hashlib, not hash(): str hashes change from one process to the next.
    digest = hashlib.sha256(f"{seed}:{attempt_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big")), f"simcall-{digest[8:18].hex()}"


def _plan(request: CallRequest, behaviour: SimulatedVoiceBehaviour) -> tuple[float, CallResult]:
    """The call as the dice decide it, from the attempt id alone: how many seconds it takes
    from dialling to hanging up, and its result (without timestamps)."""
    rng, call_id = _rng_and_call_id(behaviour.seed, request.attempt_id)
    draw = rng.random()
    ring = min(rng.uniform(2.0, 10.0), request.ring_timeout_s)  # until someone (or something) picks up
    links = _Links(recording_url=f"{SIM_URL}/recordings/{call_id}.wav", public_log_url=f"{SIM_URL}/calls/{call_id}")

    threshold = behaviour.answer_ratio
    if draw < threshold:
        spread = behaviour.duration_spread_s
        talk = rng.uniform(behaviour.duration_s - spread, behaviour.duration_s + spread)
        talk = min(max(talk, 1.0), request.max_call_duration_s)
        return ring + talk, _conversation(rng, request, call_id, round(talk * 1000), links)
    threshold += behaviour.busy_ratio
    if draw < threshold:
        return rng.uniform(1.0, 3.0), CallResult(status="busy", call_id=call_id)
    threshold += behaviour.voicemail_ratio
    if draw < threshold:
        talk = min(rng.uniform(5.0, 20.0), request.max_call_duration_s)
        return ring + talk, CallResult(
            status="voicemail",
            call_id=call_id,
            duration_ms=round(talk * 1000),
            transcript="Buzón de voz: El número que usted marcó no está disponible. Deje su mensaje después del tono.",
            summary="Contestó el buzón de voz; no se dejó mensaje.",
            **links,
        )
    threshold += behaviour.failure_ratio
    if draw < threshold:
        return rng.uniform(0.5, 2.0), CallResult(status="failed", call_id=call_id, error=rng.choice(FAILURE_ERRORS))
    return float(request.ring_timeout_s), CallResult(status="no_answer", call_id=call_id)


def _pesos(amount: int) -> str:
    return f"${amount:,}".replace(",", ".")


def _today(variables: dict[str, str]) -> date:
    """The debtor's today: the agent's fecha_actual when given (it is in the batch's zone),
    else the UTC date."""
    try:
        return date.fromisoformat(variables.get("fecha_actual", ""))
    except ValueError:
        return datetime.now(UTC).date()


def _promised_amount(rng: random.Random, monto_total: str) -> int:
    """The whole debt or half of it when the agent knows the debt ("$1.234.567"), else some
    round amount."""
    try:
        total = Decimal(monto_total.replace("$", "").replace(".", "").replace(",", ".").strip())
    except InvalidOperation:
        total = Decimal(0)
    if not total.is_finite() or total <= 0:
        return rng.randrange(10_000, 500_001, 1_000)
    share = total if rng.random() < 0.6 else total / 2
    return math.ceil(share)


def _conversation(
    rng: random.Random, request: CallRequest, call_id: str, duration_ms: int, links: _Links
) -> CallResult:
    variables = request.variables
    debt = variables.get("monto_total", "")
    lines = [
        f"Agente: Hola, ¿hablo con {variables.get('nombre') or 'el titular'}?",
        "Cliente: Sí, soy yo.",
        f"Agente: Le llamo de {variables.get('empresa') or 'nuestra empresa'} por su deuda"
        f"{f' de {debt}' if debt else ''}. ¿Cuándo podría pagarla?",
    ]
    scenario = rng.choices([name for name, _ in SCENARIOS], weights=[weight for _, weight in SCENARIOS])[0]
    collected: dict[str, str] = {}
    if scenario == "promise":
        day = _today(variables) + timedelta(days=rng.randint(1, PROMISE_WITHIN_DAYS))
        amount = _promised_amount(rng, debt)
        lines += [
            f"Cliente: Puedo pagar {_pesos(amount)} el {day:%d-%m-%Y}.",
            "Agente: Perfecto, queda registrado su compromiso de pago. Que tenga un buen día.",
        ]
        summary = f"El cliente se compromete a pagar {_pesos(amount)} el {day:%d-%m-%Y}."
        sentiment: Sentiment = "Positive"
        collected = {"fecha_pago_cliente": day.isoformat(), "monto_pago_cliente": str(amount)}
    elif scenario == "callback":
        lines += [
            "Cliente: Ahora no puedo hablar, llámeme la próxima semana.",
            "Agente: Entendido, lo volveremos a contactar. Hasta luego.",
        ]
        summary = "El cliente pidió que lo llamen más adelante; no hubo compromiso de pago."
        sentiment = "Neutral"
    else:
        lines += [
            "Cliente: No reconozco esa deuda y no voy a pagar.",
            "Agente: Entiendo. Le enviaremos el detalle por escrito. Hasta luego.",
        ]
        summary = "El cliente rechaza la deuda; no hubo compromiso de pago."
        sentiment = "Negative"
    return CallResult(
        status="completed",
        call_id=call_id,
        duration_ms=duration_ms,
        transcript="\n".join(lines),
        summary=summary,
        sentiment=sentiment,
        collected=collected,
        **links,
    )


class SimulatedVoiceProvider:
    """In-process simulated voice provider; each line's behaviour is its sender `config`
    (see SimulatedVoiceBehaviour).

    A call's outcome, durations and conversation follow from the seed, the attempt id and the
    request alone, never from the order of calls, so a test can predict them. duration_ms is
    simulated time; started_at and ended_at are the real clock, so with a time_scale below 1
    they lie closer together than duration_ms says. Every call placed stays in `calls`
    (attempt id -> result; call volumes keep that small), and `in_progress` /
    `max_in_progress` show how many calls were up at once."""

    name = NAME

    def __init__(self) -> None:
        self.calls: dict[str, CallResult] = {}
        self.in_progress = 0
        self.max_in_progress = 0
        self.duplicate_attempts = 0
        self._ringing: dict[str, asyncio.Future[CallResult]] = {}  # placed, not ended yet

    async def call(self, request: CallRequest) -> CallResult:
        attempt_id = request.attempt_id
        if attempt_id in self.calls or attempt_id in self._ringing:
            # A repeat of a placed attempt gets the original call, as a provider honouring an
            # idempotency key does: one attempt never rings the debtor twice.
            self.duplicate_attempts += 1
            # Not `get(...) or await shield(...)`: mypy would type the shield from the `| None` on its left.
            if attempt_id in self.calls:
                return self.calls[attempt_id]
            return await asyncio.shield(self._ringing[attempt_id])
        try:
            behaviour = SimulatedVoiceBehaviour.from_config(request.sender.config)
        except ValueError as exc:
            return CallResult(status="failed", error=f"InvalidConfig: {exc}")  # never placed, so not recorded
        seconds, planned = _plan(request, behaviour)
        ended = asyncio.get_running_loop().create_future()
        self._ringing[attempt_id] = ended
        self.in_progress += 1
        self.max_in_progress = max(self.max_in_progress, self.in_progress)
        started_at = datetime.now(UTC)
        try:
            await asyncio.sleep(seconds * behaviour.time_scale)
            result = replace(planned, started_at=started_at, ended_at=datetime.now(UTC))
        except asyncio.CancelledError:
            # Our side hung up early (shutdown): the record keeps a failed call, and whoever
            # awaits the attempt learns so instead of waiting for ever.
            result = CallResult(
                status="failed",
                call_id=planned.call_id,
                started_at=started_at,
                ended_at=datetime.now(UTC),
                error="Cancelled",
            )
            raise
        finally:
            self.in_progress -= 1
            del self._ringing[attempt_id]
            self.calls[attempt_id] = result
            ended.set_result(result)
        return result

    async def lookup(self, attempt_id: str, call_id: str = "") -> CallResult | None:
        """A call still in progress is awaited: "never placed" would license a second call."""
        found = self.calls.get(attempt_id)
        if found is not None:
            return found
        ringing = self._ringing.get(attempt_id)
        if ringing is not None:
            return await asyncio.shield(ringing)
        return None

    async def close(self) -> None:
        return None
