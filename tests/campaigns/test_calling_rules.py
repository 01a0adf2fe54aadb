"""Calling rules: settings parsing and the Chilean legal clamp, the calling window across
daylight-saving changes, retry rounds over the phones, the weekly limit and agent variables.
Every instant is explicit: the tests own the clock."""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.campaigns.calling_rules import (
    CallSettings,
    JobState,
    _offset_changes,
    after_attempt,
    dynamic_variables,
    format_amount,
    in_window,
    legal_window,
    next_window_start,
    parse_call_settings,
    weekly_limit_next_allowed,
)
from services.runtime.errors import InvalidArgument

SANTIAGO = ZoneInfo("America/Santiago")
BUENOS_AIRES = "America/Argentina/Buenos_Aires"


def santiago(*args: int, fold: int = 0) -> datetime:
    """A Santiago wall-clock instant, as the UTC instant the functions take."""
    return datetime(*args, tzinfo=SANTIAGO, fold=fold).astimezone(UTC)


def marketing(raw: dict | None = None, *, country: str = "AR", timezone: str = "America/Santiago") -> CallSettings:
    """Settings without the legal clamp (Argentine marketing), evaluated in `timezone`."""
    return parse_call_settings(raw, account_timezone=timezone, country=country, use_case="marketing")


def collection(raw: dict | None = None) -> CallSettings:
    return parse_call_settings(raw, account_timezone="America/Santiago", country="CL", use_case="debt_collection")


# --- Parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, "", "  ", {}, "{}", {"timezone": None, "allowed_hours": None}])
def test_missing_settings_take_the_defaults(raw: object) -> None:
    parsed = parse_call_settings(raw, account_timezone="America/Argentina/Buenos_Aires", country="AR", use_case="")
    assert parsed == CallSettings(
        max_call_duration_s=180,
        ring_timeout_s=30,
        max_attempts=3,
        retry_delay_hours=24.0,
        window_start=time(9, 0),
        window_end=time(20, 0),
        days_of_week=frozenset({1, 2, 3, 4, 5, 6}),
        timezone="America/Argentina/Buenos_Aires",
    )


def test_empty_account_timezone_means_santiago() -> None:
    assert (
        parse_call_settings({}, account_timezone="", country="AR", use_case="marketing").timezone == "America/Santiago"
    )


def test_given_values_are_kept_and_round_trip_through_to_json() -> None:
    raw = {
        "max_call_duration": 600,
        "ring_timeout": 45,
        "max_attempts": 5,
        "retry_delay_hours": 1.5,
        "allowed_hours": {"start": "10:15", "end": "18:45"},
        "days_of_week": [5, 1, 1, 3],
        "timezone": "America/New_York",
        "skip_holidays": True,
    }
    parsed = marketing(raw)
    assert parsed.max_call_duration_s == 600
    assert parsed.retry_delay_hours == 1.5
    assert (parsed.window_start, parsed.window_end) == (time(10, 15), time(18, 45))
    assert parsed.days_of_week == {1, 3, 5}
    assert parsed.to_json() == {**raw, "days_of_week": [1, 3, 5]}
    # The stored JSON text parses back to the same settings.
    assert marketing(json.dumps(parsed.to_json())) == parsed


def test_whole_floats_are_accepted_for_counts() -> None:
    assert marketing({"max_attempts": 4.0, "max_call_duration": 120.0}).max_attempts == 4


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be an object"),
        ({"max_attemps": 3}, "call_settings: unknown key max_attemps"),
        ({"timezone": "America/Atlantis"}, "unknown timezone"),
        ({"timezone": 5}, "call_settings.timezone: must be a string (got 5)"),
        ({"allowed_hours": {"start": "9:00"}}, "HH:MM"),
        ({"allowed_hours": {"end": "24:00"}}, "HH:MM"),
        ({"allowed_hours": {"start": "10:60"}}, "HH:MM"),
        ({"allowed_hours": {"start": "09:00\n"}}, "HH:MM"),
        ({"allowed_hours": {"start": 900}}, "allowed_hours.start: must be a string"),
        ({"allowed_hours": "09:00-20:00"}, "must be an object"),
        ({"allowed_hours": {"start": "09:00", "stop": "20:00"}}, "allowed_hours: unknown key stop"),
        ({"allowed_hours": {"start": "12:00", "end": "12:00"}}, "must be before end"),
        ({"allowed_hours": {"start": "22:00", "end": "06:00"}}, "crossing midnight"),
        ({"days_of_week": []}, "days_of_week: must have at least 1 item"),
        ({"days_of_week": "1,2"}, "days_of_week: must be a list"),
        ({"days_of_week": [1, 7]}, "days_of_week.1: must be at most 6 (got 7)"),
        ({"days_of_week": [-1]}, "days_of_week.0: must be at least 0"),
        ({"days_of_week": ["1"]}, "days_of_week.0: must be a whole number"),
        ({"days_of_week": [True]}, "days_of_week.0: must be a whole number (got True)"),
        ({"skip_holidays": "yes"}, "call_settings.skip_holidays: must be true or false"),
        ({"timezone": "x" * 65}, "call_settings.timezone: must be at most 64 characters"),
        ({"max_attempts": 0}, "call_settings.max_attempts: must be at least 1 (got 0)"),
        ({"max_attempts": 11}, "max_attempts: must be at most 10"),
        ({"max_attempts": 2.5}, "max_attempts: must be a whole number"),
        ({"max_attempts": True}, "max_attempts: must be a whole number"),
        ({"max_attempts": "3"}, "max_attempts: must be a whole number"),
        ({"max_call_duration": 10}, "max_call_duration: must be at least 30"),
        ({"max_call_duration": 7200}, "max_call_duration: must be at most 3600"),
        ({"ring_timeout": 2}, "ring_timeout: must be at least 5"),
        ({"ring_timeout": 121}, "ring_timeout: must be at most 120"),
        ({"retry_delay_hours": 0}, "retry_delay_hours: must be at least 0.25"),
        ({"retry_delay_hours": 169}, "retry_delay_hours: must be at most 168"),
        ({"retry_delay_hours": float("nan")}, "retry_delay_hours: must be a finite number"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(raw: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        marketing(raw)  # type: ignore[arg-type]


# --- Chile's legal limits on debt collection --------------------------------------------------


def test_chilean_debt_collection_is_clamped_to_the_legal_window() -> None:
    parsed = collection({"allowed_hours": {"start": "07:00", "end": "22:00"}, "days_of_week": [0, 1, 2, 3, 4, 5, 6]})
    assert (parsed.window_start, parsed.window_end) == (time(8, 0), time(20, 0))
    assert parsed.days_of_week == {1, 2, 3, 4, 5, 6}  # Sunday removed
    assert parsed.weekly_contact_limit
    # The echo shows what will really happen.
    assert parsed.to_json()["allowed_hours"] == {"start": "08:00", "end": "20:00"}
    assert parsed.to_json()["days_of_week"] == [1, 2, 3, 4, 5, 6]


def test_a_narrower_window_than_the_law_is_kept() -> None:
    parsed = collection({"allowed_hours": {"start": "10:00", "end": "13:00"}, "days_of_week": [2, 4]})
    assert (parsed.window_start, parsed.window_end) == (time(10, 0), time(13, 0))
    assert parsed.days_of_week == {2, 4}


def test_the_defaults_already_fit_the_law() -> None:
    parsed = collection()
    assert (parsed.window_start, parsed.window_end, parsed.days_of_week) == (time(9), time(20), frozenset(range(1, 7)))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"allowed_hours": {"start": "20:00", "end": "22:00"}}, "no time left inside the legal 08:00-20:00"),
        ({"allowed_hours": {"start": "06:00", "end": "08:00"}}, "no time left"),
        ({"days_of_week": [0]}, "only Monday to Saturday"),
        # In another zone the window must meet the legal one in every season.
        ({"timezone": BUENOS_AIRES, "allowed_hours": {"start": "06:00", "end": "08:00"}}, "never meets it$"),
        ({"timezone": BUENOS_AIRES, "allowed_hours": {"start": "20:00", "end": "21:00"}}, "in part of the year"),
        ({"timezone": BUENOS_AIRES, "days_of_week": [0]}, "Monday to Saturday"),
        ({"timezone": "Asia/Tokyo"}, "never meets it"),
    ],
)
def test_an_empty_legal_intersection_is_refused(raw: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        collection(raw)


@pytest.mark.parametrize("zone", ["America/Punta_Arenas", "Pacific/Easter"])
def test_other_chilean_zones_are_legal(zone: str) -> None:
    assert collection({"timezone": zone}).timezone == zone


@pytest.mark.parametrize(
    ("country", "use_case", "clamped"),
    [("CL", "debt_collection", True), ("cl", "", True), ("CL", "marketing", False), ("AR", "debt_collection", False)],
)
def test_only_chilean_debt_collection_is_clamped(country: str, use_case: str, clamped: bool) -> None:
    raw = {"allowed_hours": {"start": "07:00", "end": "22:00"}, "days_of_week": [0, 6]}
    parsed = parse_call_settings(raw, account_timezone="America/Santiago", country=country, use_case=use_case)
    assert (parsed.window_start == time(8, 0)) is clamped
    assert (parsed.days_of_week == {6}) is clamped
    assert parsed.weekly_contact_limit is clamped


def buenos_aires(*args: int) -> datetime:
    return datetime(*args, tzinfo=ZoneInfo(BUENOS_AIRES)).astimezone(UTC)


def test_the_dashboards_zone_keeps_its_window_and_the_law_applies_in_chilean_time() -> None:
    # The dashboard sends its default zone for a Chilean campaign: accepted, the window kept as
    # asked, and the legal window (Santiago time) applied on top.
    asked = {"allowed_hours": {"start": "07:00", "end": "21:00"}, "days_of_week": [0, 1, 2, 3, 4, 5, 6]}
    parsed = collection({**asked, "timezone": BUENOS_AIRES})
    assert parsed.timezone == BUENOS_AIRES and parsed.weekly_contact_limit
    assert (parsed.window_start, parsed.window_end) == (time(7), time(21))
    assert parsed.legal == legal_window(timezone=BUENOS_AIRES, country="CL", use_case="debt_collection")
    assert parsed.legal is not None and parsed.legal.timezone == "America/Santiago"
    assert parsed.legal.to_json()["allowed_hours"] == {"start": "08:00", "end": "20:00"}
    assert parsed.debtor_timezone == "America/Santiago"
    assert (
        parse_call_settings(parsed.to_json(), account_timezone="America/Santiago", country="CL", use_case="") == parsed
    )  # what the batch stores gives the same rules back
    # July (Santiago UTC-4, Buenos Aires UTC-3): 08:00-20:00 in Chile is 09:00-21:00 there.
    assert not in_window(parsed, buenos_aires(2026, 7, 7, 8, 30))
    assert in_window(parsed, buenos_aires(2026, 7, 7, 9, 0)) and in_window(parsed, buenos_aires(2026, 7, 7, 20, 59))
    assert next_window_start(parsed, buenos_aires(2026, 7, 7, 7, 0)) == buenos_aires(2026, 7, 7, 9, 0)
    # January (both UTC-3): 08:00-20:00 on both clocks.
    assert in_window(parsed, buenos_aires(2026, 1, 13, 8, 0)) and not in_window(
        parsed, buenos_aires(2026, 1, 13, 20, 0)
    )
    assert next_window_start(parsed, buenos_aires(2026, 1, 13, 20, 0)) == buenos_aires(2026, 1, 14, 8, 0)
    # Never on a Sunday or a Chilean holiday, though the batch asked for every day.
    assert not in_window(parsed, buenos_aires(2026, 7, 12, 12, 0))
    assert not in_window(parsed, buenos_aires(2026, 9, 18, 12, 0))
    assert next_window_start(parsed, buenos_aires(2026, 9, 17, 21, 0)) == buenos_aires(2026, 9, 21, 8, 0)


def test_a_narrower_window_in_another_zone_is_kept_as_asked() -> None:
    parsed = collection({"allowed_hours": {"start": "10:00", "end": "13:00"}, "timezone": BUENOS_AIRES})
    assert in_window(parsed, buenos_aires(2026, 7, 7, 10, 0)) and not in_window(parsed, buenos_aires(2026, 7, 7, 13, 0))


@pytest.mark.parametrize(
    ("country", "use_case", "zone", "legal_zone"),
    [
        ("CL", "debt_collection", "America/Santiago", "America/Santiago"),
        ("CL", "", "Pacific/Easter", "Pacific/Easter"),
        ("CL", "debt_collection", BUENOS_AIRES, "America/Santiago"),
        ("CL", "marketing", BUENOS_AIRES, None),
        ("AR", "debt_collection", BUENOS_AIRES, None),
    ],
)
def test_the_legal_window_is_only_chilean_debt_collection(
    country: str, use_case: str, zone: str, legal_zone: str | None
) -> None:
    found = legal_window(timezone=zone, country=country, use_case=use_case)
    assert (found.timezone if found else None) == legal_zone


@given(
    st.integers(0, 23),
    st.integers(1, 24),
    st.lists(st.integers(0, 6), min_size=1, max_size=7, unique=True),
    st.sampled_from([BUENOS_AIRES, "America/Lima", "America/Sao_Paulo", "UTC"]),
    st.datetimes(min_value=datetime(2024, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(UTC)),
)
@settings(max_examples=200, deadline=None)
def test_a_foreign_zone_batch_only_calls_inside_both_windows(
    start: int, hours: int, days: list[int], zone: str, at: datetime
) -> None:
    end = min(start + hours, 23)
    if end <= start:
        return
    raw = {
        "allowed_hours": {"start": f"{start:02d}:00", "end": f"{end:02d}:59"},
        "days_of_week": days,
        "timezone": zone,
    }
    try:
        parsed = collection(raw)
    except InvalidArgument:
        return
    opening = next_window_start(parsed, at)
    assert opening >= at and in_window(parsed, opening)
    chile = opening.astimezone(SANTIAGO)
    assert time(8) <= chile.time() < time(20) and chile.isoweekday() != 7
    local = opening.astimezone(ZoneInfo(zone))
    assert time(start) <= local.time() and local.isoweekday() % 7 in days
    if opening > at:
        assert not in_window(parsed, opening - timedelta(microseconds=1))


def test_chilean_debt_collection_never_calls_on_a_public_holiday() -> None:
    # Friday 18 and Saturday 19 September 2026 are Fiestas Patrias; Sunday is never allowed.
    legal = collection({"skip_holidays": False})  # the batch cannot opt out
    assert legal.holidays_of == "CL" and legal.to_json()["skip_holidays"] is True
    assert in_window(legal, santiago(2026, 9, 17, 10, 0))
    assert not in_window(legal, santiago(2026, 9, 18, 10, 0))
    assert next_window_start(legal, santiago(2026, 9, 17, 20, 0)) == santiago(2026, 9, 21, 9, 0)


def test_other_batches_keep_holidays_free_only_when_asked() -> None:
    may_revolution = datetime(2026, 5, 25, 15, 0, tzinfo=ZoneInfo("America/Argentina/Buenos_Aires"))
    zone = "America/Argentina/Buenos_Aires"
    assert in_window(marketing(timezone=zone), may_revolution)
    off = marketing({"skip_holidays": True}, timezone=zone)
    assert off.holidays_of == "AR" and not in_window(off, may_revolution)
    assert next_window_start(off, may_revolution) == datetime(2026, 5, 26, 9, 0, tzinfo=ZoneInfo(zone))
    # Chile's holidays are not Argentina's: 25 May is a workday in Chile.
    chilean_marketing = marketing({"skip_holidays": True}, country="CL")
    assert in_window(chilean_marketing, santiago(2026, 5, 25, 15, 0))
    with pytest.raises(InvalidArgument, match="skip_holidays: must be true or false"):
        marketing({"skip_holidays": "yes"})


# --- The calling window ----------------------------------------------------------------------

# Monday 2024-06-03 .. Sunday 2024-06-09: Santiago is at -04:00 all week.
WEEKDAYS = marketing()


def test_start_is_inside_and_end_is_outside() -> None:
    assert not in_window(WEEKDAYS, santiago(2024, 6, 3, 8, 59, 59))
    assert in_window(WEEKDAYS, santiago(2024, 6, 3, 9, 0))
    assert in_window(WEEKDAYS, santiago(2024, 6, 3, 19, 59, 59, 999999))
    assert not in_window(WEEKDAYS, santiago(2024, 6, 3, 20, 0))


def test_days_are_counted_from_sunday() -> None:
    assert in_window(WEEKDAYS, santiago(2024, 6, 8, 12))  # Saturday = 6
    assert not in_window(WEEKDAYS, santiago(2024, 6, 9, 12))  # Sunday = 0
    sundays = marketing({"days_of_week": [0]})
    assert in_window(sundays, santiago(2024, 6, 9, 12))
    assert not in_window(sundays, santiago(2024, 6, 10, 12))


def test_the_window_is_read_in_the_batchs_zone() -> None:
    at = datetime(2024, 6, 3, 14, 0, tzinfo=UTC)  # 10:00 in Santiago, 00:00 in Sydney
    assert in_window(WEEKDAYS, at)
    assert not in_window(marketing(timezone="Australia/Sydney"), at)


def test_naive_instants_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        in_window(WEEKDAYS, datetime(2024, 6, 3, 12))
    with pytest.raises(ValueError, match="timezone-aware"):
        next_window_start(WEEKDAYS, datetime(2024, 6, 3, 12))


def test_inside_the_window_the_next_start_is_now() -> None:
    at = santiago(2024, 6, 3, 12, 30, 15, 123)
    assert next_window_start(WEEKDAYS, at) == at


def test_the_result_is_utc_whatever_zone_the_input_is_in() -> None:
    at = datetime(2024, 6, 3, 12, 30, tzinfo=SANTIAGO)
    result = next_window_start(WEEKDAYS, at)
    assert result == at and result.tzinfo is UTC


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        (santiago(2024, 6, 3, 7, 0), santiago(2024, 6, 3, 9, 0)),  # early morning: today
        (santiago(2024, 6, 3, 20, 0), santiago(2024, 6, 4, 9, 0)),  # at the end: tomorrow
        (santiago(2024, 6, 3, 23, 59), santiago(2024, 6, 4, 9, 0)),
        (santiago(2024, 6, 8, 20, 0), santiago(2024, 6, 10, 9, 0)),  # Saturday night: Monday, not Sunday
        (santiago(2024, 6, 9, 10, 0), santiago(2024, 6, 10, 9, 0)),  # Sunday midday: Monday
    ],
)
def test_outside_the_window_the_next_start_is_the_next_opening(at: datetime, expected: datetime) -> None:
    assert next_window_start(WEEKDAYS, at) == expected


def test_a_single_day_batch_waits_a_week() -> None:
    wednesdays = marketing({"days_of_week": [3]})
    assert next_window_start(wednesdays, santiago(2024, 6, 5, 20, 0)) == santiago(2024, 6, 12, 9, 0)


# Santiago: on Sunday 2024-04-07 at 00:00 (-03) clocks went back to Saturday 23:00 (-04); on
# Sunday 2024-09-08 at 00:00 (-04) they jumped forward to 01:00 (-03).


def test_the_same_wall_clock_start_moves_in_utc_across_the_autumn_change() -> None:
    friday = next_window_start(WEEKDAYS, datetime(2024, 4, 5, 6, 0, tzinfo=UTC))
    monday = next_window_start(WEEKDAYS, datetime(2024, 4, 6, 23, 30, tzinfo=UTC))  # Saturday 20:30 -03
    assert friday == datetime(2024, 4, 5, 12, 0, tzinfo=UTC)  # 09:00 -03
    assert monday == datetime(2024, 4, 8, 13, 0, tzinfo=UTC)  # 09:00 -04


def test_the_same_wall_clock_start_moves_in_utc_across_the_spring_change() -> None:
    assert next_window_start(WEEKDAYS, datetime(2024, 9, 7, 0, 0, tzinfo=UTC)) == datetime(2024, 9, 7, 13, tzinfo=UTC)
    # Saturday 20:00 -04 -> Monday 09:00 -03.
    assert next_window_start(WEEKDAYS, datetime(2024, 9, 8, 0, 0, tzinfo=UTC)) == datetime(2024, 9, 9, 12, tzinfo=UTC)


def test_a_start_time_skipped_by_the_spring_change_opens_when_the_clock_jumps() -> None:
    # 00:30 does not exist on Sunday 2024-09-08: the window opens at the jump, 01:00 -03.
    early_sundays = marketing({"allowed_hours": {"start": "00:30", "end": "08:00"}, "days_of_week": [0]})
    opening = next_window_start(early_sundays, santiago(2024, 9, 7, 22, 0))
    assert opening == datetime(2024, 9, 8, 4, 0, tzinfo=UTC)
    assert opening.astimezone(SANTIAGO).strftime("%H:%M%z") == "01:00-0300"
    assert not in_window(early_sundays, opening - timedelta(seconds=1))  # Saturday 23:59:59


def test_a_window_swallowed_by_the_spring_change_waits_a_week() -> None:
    # 00:00-00:45 on Sunday 2024-09-08 never happens on the clock.
    night = marketing({"allowed_hours": {"start": "00:00", "end": "00:45"}, "days_of_week": [0]})
    assert next_window_start(night, santiago(2024, 9, 7, 22, 0)) == santiago(2024, 9, 15, 0, 0)


def test_a_repeated_hour_is_in_the_window_both_times() -> None:
    late_saturdays = marketing({"allowed_hours": {"start": "23:00", "end": "23:30"}, "days_of_week": [6]})
    first = santiago(2024, 4, 6, 23, 10, fold=0)
    second = santiago(2024, 4, 6, 23, 10, fold=1)
    assert second - first == timedelta(hours=1)
    assert in_window(late_saturdays, first) and in_window(late_saturdays, second)
    # After the first pass the window opens again when the clock goes back, not a week later.
    after_first_pass = santiago(2024, 4, 6, 23, 45, fold=0)
    assert next_window_start(late_saturdays, after_first_pass) == santiago(2024, 4, 6, 23, 0, fold=1)


def test_a_window_reopened_mid_way_by_the_autumn_change_opens_at_the_change() -> None:
    # New York repeats 01:00-02:00 on 2024-11-03: after the first pass leaves 00:30-01:30 at
    # 01:30 EDT, the clock falls back to 01:00 EST, inside the window.
    zone = ZoneInfo("America/New_York")
    nights = marketing(
        {"allowed_hours": {"start": "00:30", "end": "01:30"}, "days_of_week": [0], "timezone": "America/New_York"}
    )
    at = datetime(2024, 11, 3, 1, 45, tzinfo=zone, fold=0)
    assert not in_window(nights, at)
    assert next_window_start(nights, at) == datetime(2024, 11, 3, 6, 0, tzinfo=UTC)  # 01:00 EST


ZONES = [
    "America/Santiago",
    "America/Punta_Arenas",
    "Pacific/Easter",
    "America/Argentina/Buenos_Aires",
    "America/New_York",
    "Europe/London",
    "Australia/Lord_Howe",  # a half-hour daylight-saving change
    "UTC",
]


@st.composite
def call_settings(draw: st.DrawFn) -> CallSettings:
    start = draw(st.integers(0, 24 * 60 - 2))
    end = draw(st.integers(start + 1, 24 * 60 - 1))
    days = draw(st.lists(st.integers(0, 6), min_size=1, max_size=7, unique=True))
    return marketing(
        {
            "allowed_hours": {"start": f"{start // 60:02d}:{start % 60:02d}", "end": f"{end // 60:02d}:{end % 60:02d}"},
            "days_of_week": days,
            "timezone": draw(st.sampled_from(ZONES)),
            "skip_holidays": draw(st.booleans()),
        },
        country=draw(st.sampled_from(["CL", "AR"])),
    )


# Any instant over a decade, or one within two days of some zone's clock change, where the
# edge cases live and a uniform draw would rarely land.
CLOCK_CHANGES = sorted(
    {
        c
        for z in ZONES
        for c in _offset_changes(ZoneInfo(z), datetime(2024, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    }
)
INSTANTS = st.one_of(
    st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(UTC)),
    st.builds(
        lambda change, seconds: change + timedelta(seconds=seconds),
        st.sampled_from(CLOCK_CHANGES),
        st.integers(-2 * 86400, 2 * 86400),
    ),
)


@given(call_settings(), INSTANTS)
@settings(max_examples=300, deadline=None)
def test_the_next_start_is_never_earlier_and_always_in_the_window(s: CallSettings, at: datetime) -> None:
    opening = next_window_start(s, at)
    assert opening >= at
    assert in_window(s, opening)
    if opening > at:
        # The window opens exactly there: a microsecond earlier is still outside.
        assert not in_window(s, opening - timedelta(microseconds=1))


@given(call_settings(), INSTANTS)
@settings(max_examples=40, deadline=None)
def test_no_earlier_minute_is_in_the_window(s: CallSettings, at: datetime) -> None:
    # Openings fall on whole minutes of the wall clock, and these zones' offsets are whole
    # minutes, so any opening before the returned one would show at some whole UTC minute.
    opening = next_window_start(s, at)
    minute = at.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while minute < opening:
        assert not in_window(s, minute), minute
        minute += timedelta(minutes=1)


# --- Retry rounds ------------------------------------------------------------------------------

ALWAYS = marketing(
    {"allowed_hours": {"start": "00:00", "end": "23:59"}, "days_of_week": list(range(7)), "max_attempts": 3},
    timezone="UTC",
)


def fresh(phones: int, at: datetime) -> JobState:
    return JobState(status="pending", attempts=0, next_phone_index=0, phones_count=phones, next_attempt_at=at)


def test_a_round_rotates_through_the_phones_then_waits_and_fails_after_max_attempts() -> None:
    t0 = datetime(2024, 6, 3, 10, 0, tzinfo=UTC)
    state = fresh(2, t0)
    seen = []
    now = t0
    for outcome in ["no_answer", "busy", "voicemail", "failed", "no_answer", "no_answer"]:
        state = after_attempt(state, outcome, ALWAYS, now)
        seen.append((state.status, state.attempts, state.next_phone_index, state.next_attempt_at))
        now = state.next_attempt_at or now
    day = timedelta(hours=24)
    assert seen == [
        ("pending", 0, 1, t0),  # second phone, right away
        ("scheduled", 1, 0, t0 + day),  # round 1 over: first phone tomorrow
        ("pending", 1, 1, t0 + day),
        ("scheduled", 2, 0, t0 + 2 * day),
        ("pending", 2, 1, t0 + 2 * day),
        ("failed", 3, 0, None),  # round 3 was the last
    ]


def test_a_single_phone_job_spends_a_round_per_call() -> None:
    now = datetime(2024, 6, 3, 10, 0, tzinfo=UTC)
    state = after_attempt(fresh(1, now), "busy", ALWAYS, now)
    assert (state.status, state.attempts, state.next_phone_index) == ("scheduled", 1, 0)
    assert state.next_attempt_at == now + timedelta(hours=24)


def test_an_answered_call_completes_the_job_and_spends_its_round() -> None:
    now = datetime(2024, 6, 3, 10, 0, tzinfo=UTC)
    state = after_attempt(fresh(3, now), "no_answer", ALWAYS, now)
    state = after_attempt(state, "completed", ALWAYS, now + timedelta(minutes=2))
    assert state == JobState(status="completed", attempts=1, next_phone_index=1, phones_count=3, next_attempt_at=None)


def test_the_last_round_can_still_be_answered() -> None:
    now = datetime(2024, 6, 3, 10, 0, tzinfo=UTC)
    last_round = JobState(status="pending", attempts=2, next_phone_index=1, phones_count=2, next_attempt_at=now)
    assert after_attempt(last_round, "completed", ALWAYS, now).attempts == 3


def test_a_call_due_outside_the_window_waits_for_it_without_spending_a_round() -> None:
    settings_ = marketing({"retry_delay_hours": 2})
    at_1955 = santiago(2024, 6, 3, 19, 55)
    state = after_attempt(fresh(2, at_1955), "no_answer", settings_, at_1955 + timedelta(minutes=6))
    assert (state.status, state.attempts, state.next_phone_index) == ("scheduled", 0, 1)
    assert state.next_attempt_at == santiago(2024, 6, 4, 9, 0)
    # A round ending at 19:00 retries at 21:00, outside: the next morning instead.
    at_1900 = santiago(2024, 6, 4, 19, 0)
    state = after_attempt(state, "busy", settings_, at_1900)
    assert (state.status, state.attempts, state.next_phone_index) == ("scheduled", 1, 0)
    assert state.next_attempt_at == santiago(2024, 6, 5, 9, 0)


def test_max_attempts_one_fails_after_the_first_round() -> None:
    once = marketing({"max_attempts": 1}, timezone="UTC")
    now = datetime(2024, 6, 3, 10, 0, tzinfo=UTC)
    state = after_attempt(fresh(2, now), "failed", once, now)
    assert state.status == "pending"
    assert after_attempt(state, "failed", once, now).status == "failed"


def test_misuse_is_refused() -> None:
    now = datetime(2024, 6, 3, 10, 0, tzinfo=UTC)
    with pytest.raises(ValueError, match="unknown call outcome"):
        after_attempt(fresh(1, now), "answered", ALWAYS, now)
    done = JobState(status="completed", attempts=1, next_phone_index=0, phones_count=1, next_attempt_at=None)
    with pytest.raises(ValueError, match="already completed"):
        after_attempt(done, "no_answer", ALWAYS, now)
    with pytest.raises(ValueError, match="outside the job's 2 phones"):
        after_attempt(JobState("pending", 0, 2, 2, now), "no_answer", ALWAYS, now)
    with pytest.raises(ValueError, match="outside the job's 0 phones"):
        after_attempt(fresh(0, now), "no_answer", ALWAYS, now)


# --- Weekly contact limit ----------------------------------------------------------------------


def test_weekly_limit() -> None:
    now = datetime(2024, 6, 10, 12, 0, tzinfo=UTC)
    assert weekly_limit_next_allowed(None, now) is None
    three_days_ago = now - timedelta(days=3)
    assert weekly_limit_next_allowed(three_days_ago, now) == three_days_ago + timedelta(days=7)
    assert weekly_limit_next_allowed(now - timedelta(days=7), now) is None
    assert weekly_limit_next_allowed(now - timedelta(days=7) + timedelta(seconds=1), now) == now + timedelta(seconds=1)
    assert weekly_limit_next_allowed(now - timedelta(days=30), now) is None


def test_weekly_limit_is_seven_times_24_hours_across_a_clock_change() -> None:
    saturday = santiago(2024, 4, 6, 12, 0)  # -03; a week later Santiago is at -04
    allowed = weekly_limit_next_allowed(saturday, saturday + timedelta(days=1))
    assert allowed == saturday + timedelta(hours=168)
    assert allowed is not None and allowed.astimezone(SANTIAGO).hour == 11


# --- Voice agent variables ---------------------------------------------------------------------


def test_dynamic_variables_are_strings_in_the_batchs_zone() -> None:
    variables = dynamic_variables(
        name=" María Pérez ",
        rut="12.345.678-5",
        company="Banco Ejemplo",
        debt_amount=Decimal("1234567"),
        due_date=date(2024, 5, 31),
        cantidad_cupones=3,
        fecha_maxima=date(2024, 6, 15),
        now=datetime(2024, 6, 4, 2, 30, tzinfo=UTC),  # still June 3 in Santiago
        timezone="America/Santiago",
    )
    assert variables == {
        "nombre": "María Pérez",
        "rut": "12.345.678-5",
        "empresa": "Banco Ejemplo",
        "monto_total": "$1.234.567",
        "fecha_vencimiento": "2024-05-31",
        "cantidad_cupones": "3",
        "fecha_maxima": "2024-06-15",
        "fecha_actual": "2024-06-03",
        "hora_actual": "22:30",
    }


def test_missing_variables_are_empty_strings() -> None:
    variables = dynamic_variables(
        name="Ana",
        rut="",
        company="",
        debt_amount=None,
        due_date=None,
        cantidad_cupones=None,
        fecha_maxima="",
        now=datetime(2024, 6, 4, 15, 0, tzinfo=UTC),
        timezone="America/Argentina/Buenos_Aires",
    )
    assert all(isinstance(v, str) for v in variables.values())
    assert variables["monto_total"] == variables["fecha_vencimiento"] == variables["cantidad_cupones"] == ""
    assert (variables["fecha_actual"], variables["hora_actual"]) == ("2024-06-04", "12:00")


def test_dynamic_variables_refuse_a_bad_zone_or_amount() -> None:
    common = dict(name="a", rut="", company="", due_date=None, cantidad_cupones=None, fecha_maxima=None)
    now = datetime(2024, 6, 4, tzinfo=UTC)
    with pytest.raises(InvalidArgument, match="unknown timezone"):
        dynamic_variables(**common, debt_amount=1, now=now, timezone="Mars/Olympus")
    with pytest.raises(InvalidArgument, match="not a number"):
        dynamic_variables(**common, debt_amount="1.234.567", now=now, timezone="UTC")


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (0, "$0"),
        (999, "$999"),
        (1000, "$1.000"),
        (1234567, "$1.234.567"),
        ("1234567", "$1.234.567"),
        (Decimal("1234567.00"), "$1.234.567"),
        (Decimal("1234.5"), "$1.234,50"),
        (Decimal("0.005"), "$0,01"),  # half up
        (-15000, "-$15.000"),
        ("1e3", "$1.000"),
    ],
)
def test_amounts_are_formatted_chilean_style(amount: object, text: str) -> None:
    assert format_amount(amount) == text  # type: ignore[arg-type]


@pytest.mark.parametrize("amount", ["", "abc", "NaN", "Infinity", "1e40"])
def test_non_numbers_are_not_amounts(amount: str) -> None:
    with pytest.raises(InvalidArgument, match="not a number"):
        format_amount(amount)
