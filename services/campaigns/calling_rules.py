"""Calling rules for voice campaigns: a batch's `call_settings`, its calling window, the retry
rounds over a job's phones, Chile's limits on debt collection and the per-call variables of
the voice agent. Pure functions over explicit instants: no clock, no I/O.

Instants go in and come out as aware datetimes (returned in UTC); windows are wall-clock
times in the batch's zone, evaluated with zoneinfo so daylight-saving changes are honoured.
A Chilean debt-collection batch set in another zone (the dashboard's default is Buenos Aires)
keeps its own window there and is also held to the legal window in Chilean time: a call is
placed only when both allow it."""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import holidays
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from services.runtime.errors import InvalidArgument
from services.runtime.validation import known_zone, validated

DEFAULT_TIMEZONE = "America/Santiago"
# Countries whose public holidays a batch can keep free of calls (`skip_holidays`).
HOLIDAY_COUNTRIES = frozenset({"CL", "AR"})
DEBT_COLLECTION = "debt_collection"

# Days as the dashboard numbers them: 0 = Sunday … 6 = Saturday.
MONDAY_TO_SATURDAY = frozenset(range(1, 7))

# Chile's consumer-protection law (Ley 19.496, art. 37) limits extrajudicial debt collection; as
# applied here: calls only Monday to Saturday, 08:00-20:00 local time, never on a public
# holiday, and at most one answered contact per debtor per week. A batch may narrow these
# limits, never widen them.
LEGAL_DAYS = MONDAY_TO_SATURDAY
LEGAL_START = time(8, 0)
LEGAL_END = time(20, 0)
WEEKLY_CONTACT_GAP = timedelta(days=7)
# The legal window is Chilean local time: a batch in one of Chile's zones is clamped to it; a
# batch in any other zone keeps its window and the legal one is applied on top, in Santiago time.
CHILEAN_ZONES = frozenset({"America/Santiago", "America/Punta_Arenas", "Pacific/Easter"})
LEGAL_BASIS = "Ley 19.496 art. 37 (Chile): debt collection only Monday to Saturday, 08:00-20:00 Chilean time"
_WEEK_MINUTES = 7 * 1440

DEFAULT_MAX_CALL_DURATION_S = 180  # the reference dashboard's 0.47 a call: setup 0.02 + 3 min at 0.15
DEFAULT_RING_TIMEOUT_S = 30
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_RETRY_DELAY_HOURS = 24.0
DEFAULT_START = time(9, 0)
DEFAULT_END = time(20, 0)


def _whole(value: object) -> object:
    """JSON writers may send a count as 3.0: a whole float is the whole number."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Count = Annotated[int, BeforeValidator(_whole)]
_HH_MM = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")


def _hh_mm(text: str) -> str:
    if not _HH_MM.fullmatch(text):
        raise ValueError(f"must be a time as HH:MM (00:00-23:59), got {text!r}")
    return text


Clock = Annotated[str, AfterValidator(_hh_mm)]


class AllowedHours(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    start: Clock | None = None
    end: Clock | None = None


class CallSettingsInput(BaseModel):
    """A batch's `call_settings` as sent (null or missing: the default)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_call_duration: Count | None = Field(None, ge=30, le=3600)
    ring_timeout: Count | None = Field(None, ge=5, le=120)
    max_attempts: Count | None = Field(None, ge=1, le=10)
    # Fractions of an hour are fine; below 15 minutes a new round would hammer the same debtor.
    retry_delay_hours: float | None = Field(None, ge=0.25, le=168, allow_inf_nan=False)
    allowed_hours: AllowedHours | None = None
    # 0 = Sunday … 6 = Saturday, as the dashboard numbers them.
    days_of_week: list[Annotated[int, Field(ge=0, le=6)]] | None = Field(None, min_length=1, max_length=7)
    timezone: str | None = Field(None, max_length=64)
    skip_holidays: bool | None = None


# Each scan for the next window covers three weeks and a day: even a batch allowed on a single
# weekday finds its window when that weekday is a holiday twice running (Christmas and New
# Year) or a daylight-saving jump swallows it.
_SCAN_DAYS = 22
# Offset changes are looked for in steps this long; no zone changes offset twice within one.
_OFFSET_STEP_S = 6 * 3600


@dataclass(frozen=True, slots=True)
class LegalWindow:
    """Chile's limits on debt collection, in a Chilean zone, applied on top of a batch's window."""

    timezone: str
    start: time = LEGAL_START
    end: time = LEGAL_END
    days_of_week: frozenset[int] = LEGAL_DAYS
    holidays_of: str = "CL"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def to_json(self) -> dict[str, Any]:
        """What the batch object shows as `legal_window` (not part of `call_settings`, which
        the dashboard sends back as it read it)."""
        return {
            "allowed_hours": {"start": self.start.strftime("%H:%M"), "end": self.end.strftime("%H:%M")},
            "days_of_week": sorted(self.days_of_week),
            "timezone": self.timezone,
            "skip_holidays": True,
            "basis": LEGAL_BASIS,
        }


def legal_window(*, timezone: str, country: str, use_case: str) -> LegalWindow | None:
    """The legal window a batch is held to: Chilean debt collection ("" counts as debt
    collection) only. It is evaluated in the batch's own zone when that is Chilean, else in
    Santiago's (where most debtors live)."""
    if country.strip().upper() != "CL" or (use_case.strip().lower() or DEBT_COLLECTION) != DEBT_COLLECTION:
        return None
    return LegalWindow(timezone=timezone if timezone in CHILEAN_ZONES else DEFAULT_TIMEZONE)


@dataclass(frozen=True, slots=True)
class CallSettings:
    """The effective calling rules of a batch (after defaults and legal limits)."""

    max_call_duration_s: int
    ring_timeout_s: int
    max_attempts: int  # rounds over all of a job's phones, see after_attempt
    retry_delay_hours: float
    window_start: time  # inclusive, wall clock in `timezone`
    window_end: time  # exclusive; always after window_start (no window crosses midnight)
    days_of_week: frozenset[int]  # 0 = Sunday … 6 = Saturday
    timezone: str
    weekly_contact_limit: bool = False  # Chilean debt collection: one answered contact per week
    holidays_of: str = ""  # no calls on this country's public holidays ("" = holidays are workdays)
    legal: LegalWindow | None = None  # Chilean debt collection: a call must also be inside this

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)  # zoneinfo caches instances per key

    @property
    def debtor_timezone(self) -> str:
        """The zone the debtor reads the clock in: the legal one for Chilean debt collection."""
        return self.legal.timezone if self.legal else self.timezone

    def to_json(self) -> dict[str, Any]:
        """The settings in the dashboard's field names, ready for json.dumps; parsing them
        again gives the same settings."""
        return {
            "max_call_duration": self.max_call_duration_s,
            "ring_timeout": self.ring_timeout_s,
            "max_attempts": self.max_attempts,
            "retry_delay_hours": _plain_number(self.retry_delay_hours),
            "allowed_hours": {"start": self.window_start.strftime("%H:%M"), "end": self.window_end.strftime("%H:%M")},
            "days_of_week": sorted(self.days_of_week),
            "timezone": self.timezone,
            "skip_holidays": bool(self.holidays_of),
        }


def parse_call_settings(
    raw: dict[str, Any] | str | None, *, account_timezone: str = DEFAULT_TIMEZONE, country: str, use_case: str
) -> CallSettings:
    """Validate a batch's `call_settings` (a dict, its JSON text, or nothing) and apply the
    defaults and, for Chilean debt collection, the legal limits.

    Missing or null keys take their defaults (the zone is the account's); unknown keys are
    refused, as a misspelt one would otherwise silently mean its default. Windows that cross
    midnight (start >= end) are refused: overnight calling is not a use case, and keeping each
    window inside one day keeps its weekday unambiguous. For country "CL" and use case
    "debt_collection" ("" counts as debt collection, as in the API) the window is the
    intersection of the requested one with Monday-Saturday 08:00-20:00 Chilean time, outside
    Chile's public holidays: in a Chilean zone the requested window is clamped to it; in any
    other zone it is kept as asked and the legal window (`legal`) is applied on top. An
    intersection that is empty in any season is refused. `skip_holidays` keeps
    any other batch of a Chilean or Argentine account off its country's holidays. Any
    problem raises InvalidArgument."""
    settings = validated(CallSettingsInput, _settings_object(raw), name="call_settings")
    zone_name = _timezone(settings.timezone or account_timezone or DEFAULT_TIMEZONE)
    start, end = _allowed_hours(settings.allowed_hours)
    days = set(MONDAY_TO_SATURDAY if settings.days_of_week is None else settings.days_of_week)
    max_duration = settings.max_call_duration or DEFAULT_MAX_CALL_DURATION_S
    ring_timeout = settings.ring_timeout or DEFAULT_RING_TIMEOUT_S
    max_attempts = settings.max_attempts or DEFAULT_MAX_ATTEMPTS
    retry_delay = DEFAULT_RETRY_DELAY_HOURS if settings.retry_delay_hours is None else settings.retry_delay_hours
    skip_holidays = settings.skip_holidays
    country = country.strip().upper()
    holidays_of = country if skip_holidays and country in HOLIDAY_COUNTRIES else ""

    legal = legal_window(timezone=zone_name, country=country, use_case=use_case)
    regulated = legal is not None
    if legal is not None and zone_name not in CHILEAN_ZONES:
        # The dashboard sends its own default zone whatever the campaign's country: the
        # operator means the window, so it is kept, and the law is kept by the legal window.
        _check_meets_legal(legal, zone_name, start, end, days)
        holidays_of = "CL"  # whatever the batch asked, as below
    elif legal is not None:
        start, end = max(start, LEGAL_START), min(end, LEGAL_END)
        if start >= end:
            raise InvalidArgument(
                "call_settings.allowed_hours: no time left inside the legal 08:00-20:00 for debt collection in Chile"
            )
        days &= LEGAL_DAYS
        if not days:
            raise InvalidArgument(
                "call_settings.days_of_week: debt collection in Chile is allowed only Monday to Saturday"
            )
        holidays_of = "CL"  # whatever the batch asked

    return CallSettings(
        max_call_duration_s=max_duration,
        ring_timeout_s=ring_timeout,
        max_attempts=max_attempts,
        retry_delay_hours=retry_delay,
        window_start=start,
        window_end=end,
        days_of_week=frozenset(days),
        timezone=zone_name,
        weekly_contact_limit=regulated,
        holidays_of=holidays_of,
        legal=legal,
    )


def _check_meets_legal(legal: LegalWindow, zone_name: str, start: time, end: time, days: set[int]) -> None:
    """Refuse a window in another zone that, in some season, never meets the legal one in a
    whole week: such a batch would wait for months (and the dialer scans only weeks ahead)."""
    legal_week = [
        (d * 1440 + _minutes(legal.start), d * 1440 + _minutes(legal.end)) for d in sorted(legal.days_of_week)
    ]
    shifts = _offset_differences(zone_name, legal.timezone)
    missed = 0
    for shift in shifts:
        # The requested week in the legal zone's wall clock: local_legal = local_asked - shift.
        asked: list[tuple[int, int]] = []
        for d in sorted(days):
            low = (d * 1440 + _minutes(start) - shift) % _WEEK_MINUTES
            high = low + _minutes(end) - _minutes(start)
            asked.append((low, min(high, _WEEK_MINUTES)))
            if high > _WEEK_MINUTES:
                asked.append((0, high - _WEEK_MINUTES))
        if not any(max(a, c) < min(b, e) for a, b in asked for c, e in legal_week):
            missed += 1
    if missed:
        raise InvalidArgument(
            f"call_settings.allowed_hours: no time left inside the legal 08:00-20:00, Monday to Saturday, "
            f"for debt collection in Chile ({legal.timezone}): {start:%H:%M}-{end:%H:%M} {zone_name} "
            f"on the days asked never meets it" + ("" if missed == len(shifts) else " in part of the year")
        )


def _minutes(clock: time) -> int:
    return clock.hour * 60 + clock.minute


@functools.cache
def _offset_differences(zone_name: str, other_name: str) -> frozenset[int]:
    """Every difference, in minutes, between two zones' UTC offsets from 2024 to 2033 (as
    tzdata now knows them), sampled twice a day: every daylight-saving season of either shows."""
    zone, other = ZoneInfo(zone_name), ZoneInfo(other_name)
    first = int(datetime(2024, 1, 1, tzinfo=UTC).timestamp())
    found = set()
    for step in range(0, 10 * 365 * 2):
        at = datetime.fromtimestamp(first + step * 43_200, UTC)
        offset, other_offset = at.astimezone(zone).utcoffset(), at.astimezone(other).utcoffset()
        assert offset is not None and other_offset is not None
        found.add(int((offset - other_offset).total_seconds()) // 60)
    return frozenset(found)


def _settings_object(raw: dict[str, Any] | str | None) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, str):
        if not raw.strip():
            return {}
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidArgument("call_settings is not valid JSON") from exc
    if not isinstance(raw, dict):
        raise InvalidArgument("call_settings must be an object")
    # A null from the dashboard means "not set", the same as a missing key.
    return {k: v for k, v in raw.items() if v is not None}


def _timezone(name: str) -> str:
    return known_zone(name, field="call_settings.timezone").key


def _clock(text: str | None, default: time) -> time:
    return default if text is None else time(int(text[:2]), int(text[3:]))


def _allowed_hours(hours: AllowedHours | None) -> tuple[time, time]:
    start = _clock(hours.start if hours else None, DEFAULT_START)
    end = _clock(hours.end if hours else None, DEFAULT_END)
    if start >= end:
        raise InvalidArgument(
            f"call_settings.allowed_hours: start {start:%H:%M} must be before end {end:%H:%M} "
            "(windows crossing midnight are not supported)"
        )
    return start, end


def _plain_number(value: float) -> int | float:
    return int(value) if value.is_integer() else value


# --- The calling window ----------------------------------------------------------------------


def _aware(at: datetime) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("instants must be timezone-aware datetimes")
    return at


def _weekday(day: date) -> int:
    """The dashboard's day number: 0 = Sunday … 6 = Saturday."""
    return day.isoweekday() % 7


def in_window(settings: CallSettings, at: datetime) -> bool:
    """Whether the batch's zone reads an allowed day and a wall-clock time in [start, end) at `at`,
    and, for Chilean debt collection, so does the legal window in its Chilean zone.

    Being a wall-clock rule, a window hour that daylight saving skips does not exist that day,
    and one that it repeats is in the window both times."""
    at = _aware(at)
    legal = settings.legal
    return _open(
        settings.zone, settings.window_start, settings.window_end, settings.days_of_week, settings.holidays_of, at
    ) and (legal is None or _open(legal.zone, legal.start, legal.end, legal.days_of_week, legal.holidays_of, at))


def _open(zone: ZoneInfo, start: time, end: time, days: frozenset[int], holidays_of: str, at: datetime) -> bool:
    local = at.astimezone(zone)
    day = local.date()
    return (
        _weekday(day) in days
        and start <= local.time() < end
        and not (holidays_of and day in _public_holidays(holidays_of))
    )


@functools.cache
def _public_holidays(country: str) -> holidays.HolidayBase:
    # One calendar per country, extended a year at a time as dates are asked about.
    return holidays.country_holidays(country)


def next_window_start(settings: CallSettings, at: datetime) -> datetime:
    """The first instant at or after `at` that is in the window: `at` itself when it already
    is, else the next opening, in UTC.

    The window can only open where the zone's clock reaches the start time (either pass of
    a repeated hour) or where the clock jumps (a daylight-saving change, e.g. over a start
    time that the jump skips, when the window begins at the first instant after the jump). With a legal window on top,
    the intersection opens where either of the two opens."""
    at = _aware(at).astimezone(UTC)
    if in_window(settings, at):
        return at
    openings = _openings(settings.zone, settings.window_start, settings.days_of_week, settings.holidays_of, at)
    if settings.legal is not None:
        legal = settings.legal
        openings += _openings(legal.zone, legal.start, legal.days_of_week, legal.holidays_of, at)
    found = [t for t in openings if t > at and in_window(settings, t)]
    if not found:
        # Validated settings always have a non-empty window on some day of every week.
        raise RuntimeError(f"no calling window within {_SCAN_DAYS} days of {at.isoformat()}")
    return min(found)


def _openings(zone: ZoneInfo, start: time, days: frozenset[int], holidays_of: str, at: datetime) -> list[datetime]:
    """The instants within the scan after `at` where one window may open: its start time on
    its days (both passes of a repeated hour) and the zone's clock changes."""
    first_day = at.astimezone(zone).date()
    openings: list[datetime] = []
    for offset in range(_SCAN_DAYS):
        day = first_day + timedelta(days=offset)
        if _weekday(day) in days and not (holidays_of and day in _public_holidays(holidays_of)):
            wall = datetime.combine(day, start)
            openings.extend(wall.replace(tzinfo=zone, fold=fold).astimezone(UTC) for fold in (0, 1))
    openings.extend(_offset_changes(zone, at, at + timedelta(days=_SCAN_DAYS)))
    return openings


def _offset(zone: ZoneInfo, timestamp: int) -> timedelta | None:
    return datetime.fromtimestamp(timestamp, zone).utcoffset()


def _offset_changes(zone: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """The instants after `start`, up to `end` or a step past it, at which the zone's UTC
    offset changes, found by bisection to the second (tzdata's transitions fall on whole
    seconds)."""
    changes = []
    low, stop = math.floor(start.timestamp()), math.ceil(end.timestamp())
    while low < stop:
        high = low + _OFFSET_STEP_S
        before = _offset(zone, low)
        if _offset(zone, high) != before:
            a, b = low, high
            while b - a > 1:
                middle = (a + b) // 2
                if _offset(zone, middle) == before:
                    a = middle
                else:
                    b = middle
            changes.append(datetime.fromtimestamp(b, UTC))
        low = high
    return changes


# --- Retries -----------------------------------------------------------------------------------

JobStatus = Literal["pending", "scheduled", "completed", "failed"]
CallOutcome = Literal["completed", "no_answer", "busy", "voicemail", "failed"]
RETRIED_OUTCOMES = frozenset({"no_answer", "busy", "voicemail", "failed"})


@dataclass(frozen=True, slots=True)
class JobState:
    """Where a job stands between calls.

    status: "pending" (may be called at next_attempt_at, which has come), "scheduled"
    (waiting for a later next_attempt_at: the next round or the next window), "completed",
    "failed". attempts: rounds spent, see after_attempt. next_phone_index: the phone to call
    next (for a completed job, the one that answered)."""

    status: JobStatus
    attempts: int
    next_phone_index: int
    phones_count: int
    next_attempt_at: datetime | None


def after_attempt(state: JobState, outcome: CallOutcome, settings: CallSettings, now: datetime) -> JobState:
    """The job after one call ended with `outcome` at `now`.

    `attempts` counts rounds, not calls. A round calls the job's phones in order and ends at
    the first answered call or when the last phone has failed; either way it is spent, so
    attempts + 1. Within a round a failed call ("no_answer", "busy", "voicemail", "failed")
    moves on to the next phone at once; after the last phone the next round starts from the
    first phone `retry_delay_hours` later, unless that was round `max_attempts`, which fails
    the job. An answered call ("completed") completes it: a job answered on its first round
    shows attempts 1.

    The next call time is moved into the calling window when it falls outside: waiting for
    the window spends no attempt. Chile's weekly contact limit is for the scheduler to apply
    (weekly_limit_next_allowed), as it concerns the debtor, not this job."""
    now = _aware(now)
    if state.status in ("completed", "failed"):
        raise ValueError(f"job is already {state.status}")
    if not 0 <= state.next_phone_index < state.phones_count:
        raise ValueError(f"next_phone_index {state.next_phone_index} is outside the job's {state.phones_count} phones")
    if outcome == "completed":
        return replace(state, status="completed", attempts=state.attempts + 1, next_attempt_at=None)
    if outcome not in RETRIED_OUTCOMES:
        raise ValueError(f"unknown call outcome {outcome!r}")

    if state.next_phone_index + 1 < state.phones_count:
        return _wait_until(replace(state, next_phone_index=state.next_phone_index + 1), now, now, settings)
    attempts = state.attempts + 1
    if attempts >= settings.max_attempts:
        return replace(state, status="failed", attempts=attempts, next_phone_index=0, next_attempt_at=None)
    round_again = now + timedelta(hours=settings.retry_delay_hours)
    return _wait_until(replace(state, attempts=attempts, next_phone_index=0), round_again, now, settings)


def _wait_until(state: JobState, ready: datetime, now: datetime, settings: CallSettings) -> JobState:
    at = next_window_start(settings, ready)
    return replace(state, status="pending" if at <= now else "scheduled", next_attempt_at=at)


def weekly_limit_next_allowed(last_answered_at: datetime | None, now: datetime) -> datetime | None:
    """When a debtor last reached at `last_answered_at` may be called again under the limit
    of one answered contact per 7 days (7 x 24 hours, whatever the clocks do meanwhile):
    None when `now` is already fine. The result still has to be moved into a window."""
    now = _aware(now)
    if last_answered_at is None:
        return None
    allowed = _aware(last_answered_at) + WEEKLY_CONTACT_GAP
    return allowed.astimezone(UTC) if allowed > now else None


# --- Voice agent variables -------------------------------------------------------------------


def format_amount(amount: Decimal | int | str) -> str:
    """Chilean style: "$1.234.567"; cents, when there are any, after a comma ("$1.234,50")."""
    try:
        # quantize also refuses infinities and amounts too long for the context's 28 digits.
        value = Decimal(str(amount).strip()).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    except InvalidOperation as exc:
        raise InvalidArgument(f"debt amount {amount!r} is not a number") from exc
    if value.is_nan():
        raise InvalidArgument(f"debt amount {amount!r} is not a number")
    whole, cents = divmod(abs(value), 1)
    text = f"{int(whole):,}".replace(",", ".")
    if cents:
        text += f",{int(cents * 100):02d}"
    return f"{'-' if value < 0 else ''}${text}"


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, date):  # datetimes too: their own date
        # ISO dates: unambiguous (no 03/04 doubt) and what the agent returns fecha_pago_cliente in.
        return value.strftime("%Y-%m-%d")
    return str(value).strip()


def dynamic_variables(
    *,
    name: str,
    rut: str,
    company: str,
    debt_amount: Decimal | int | str | None,
    due_date: date | str | None,
    cantidad_cupones: int | str | None,
    fecha_maxima: date | str | None,
    now: datetime,
    timezone: str,
) -> dict[str, str]:
    """The variables a voice agent's prompt uses for one call, all strings (agents reject
    other types); a missing value is an empty string, so the prompt still renders.

    Dates are ISO (YYYY-MM-DD); monto_total is Chilean style ("$1.234.567"); fecha_actual and
    hora_actual ("HH:MM", 24 h) are `now` in the batch's zone, so the agent can reason about
    "today" and payment deadlines as the debtor sees them."""
    local = _aware(now).astimezone(ZoneInfo(_timezone(timezone)))
    return {
        "nombre": _text(name),
        "rut": _text(rut),
        "empresa": _text(company),
        "monto_total": "" if debt_amount is None or debt_amount == "" else format_amount(debt_amount),
        "fecha_vencimiento": _text(due_date),
        "cantidad_cupones": _text(cantidad_cupones),
        "fecha_maxima": _text(fecha_maxima),
        "fecha_actual": local.strftime("%Y-%m-%d"),
        "hora_actual": local.strftime("%H:%M"),
    }
