"""Analytics over a date range, chart-ready: a series of buckets (hour, day or week, cut in the
caller's zone) with every bucket present, zeros included, then totals and breakdowns.

- `voice`: calls placed, answered, no answer, busy, voicemail, failed, minutes, cost, promises to
  pay and their amount per bucket; the outcome mix; the answer rate by local hour of the day.
- `messages`: WhatsApp messages (bulk files and scheduled messages alike) sent, failed,
  delivered, read, undelivered per bucket, by channel (`bulk` | `scheduled`) and by message.
- `groups`: per contact group, its contacts and what the messages naming it did.
- `dashboard`: the headline figures of both, with one series to chart them.

Everything is read from the aggregates kept as results arrive (migration 011, analytics_repo),
so a reply over a million results costs what one over ten does. The aggregates are hourly in
UTC: a range's bounds are widened to whole hours, and a zone whose offset is not a whole hour
(India, Nepal) gets buckets that start at its hour nearest the true one.

Scoped like every read: a member sees its own account; an admin every account, or the one it
names. The reply is JSON (AnalyticsReply.report_json), the shape the gateway returns."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from services.runtime.errors import InvalidArgument
from services.runtime.identity import Caller
from services.runtime.validation import known_zone

from .analytics_repo import AnalyticsRepo
from .batches import scope_of
from .calling_rules import DEFAULT_TIMEZONE

REPORTS = ("voice", "messages", "groups", "dashboard")
BUCKETS = ("hour", "day", "week")
DEFAULT_DAYS = 30
# A reply's size is bounded before any row is read: at most this many buckets, and ranges of
# at most this many days (a week series over three years is 157 points).
MAX_BUCKETS = 2_000
MAX_DAYS = 3 * 366
# The breakdowns list the busiest first, up to these many.
TOP_MESSAGES = 50
TOP_GROUPS = 500
# The best hours to call are the hours with at least this many calls (fewer say little).
BEST_HOUR_MIN_CALLS = 5

_HOUR = timedelta(hours=1)
_MESSAGE_FIELDS = ("sent", "failed", "cancelled", "unknown", "delivered", "read", "undelivered")
_CALL_COUNTS = ("calls", "answered", "no_answer", "busy", "voicemail", "failed", "promises")
_OUTCOMES = ("answered", "no_answer", "busy", "voicemail", "failed")
# What a bucket of the messages series says per channel (a stacked chart's parts).
_CHANNEL_SPLIT = ("sent", "failed", "delivered", "read")


@dataclass(frozen=True, slots=True)
class Range:
    """[start, end) in UTC, whole hours; buckets cut in `zone`."""

    start: datetime
    end: datetime
    bucket: str
    zone: ZoneInfo

    def json(self) -> dict[str, Any]:
        return {
            "from": self.start.astimezone(self.zone).isoformat(),
            "to": self.end.astimezone(self.zone).isoformat(),
            "timezone": self.zone.key,
            "bucket": self.bucket,
        }

    def buckets(self) -> list[datetime]:
        """The start of every bucket in range, as local wall-clock times without a zone (as
        PostgreSQL's `date_trunc(bucket, hour AT TIME ZONE zone)` names them), in order."""
        first = self.start.astimezone(self.zone).replace(tzinfo=None)
        last = (self.end - _HOUR).astimezone(self.zone).replace(tzinfo=None)
        if self.bucket == "hour":
            seen: dict[datetime, None] = {}
            at = self.start
            while at < self.end:  # through UTC, so a repeated or skipped local hour counts right
                seen[at.astimezone(self.zone).replace(tzinfo=None, minute=0, second=0, microsecond=0)] = None
                at += _HOUR
            return list(seen)
        day, step = first.date(), timedelta(days=1)
        if self.bucket == "week":
            day, step = day - timedelta(days=day.weekday()), timedelta(days=7)  # weeks start on Monday
        out = []
        while day <= last.date():
            out.append(datetime(day.year, day.month, day.day))
            day += step
        return out

    def label(self, bucket: datetime) -> str:
        return bucket.replace(tzinfo=self.zone).isoformat()


def _instant(text: str, zone: ZoneInfo, *, field: str, end: bool) -> datetime:
    """A bound as given: a date (local midnight; `to` includes the whole day) or an ISO 8601
    time (without an offset, in the zone)."""
    if len(text) > 40:
        raise InvalidArgument(f"{field} must be a date (YYYY-MM-DD) or an ISO 8601 time")
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            local = datetime(day.year, day.month, day.day, tzinfo=zone)
            return (local + timedelta(days=1) if end else local).astimezone(UTC)
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidArgument(f"{field} must be a date (YYYY-MM-DD) or an ISO 8601 time, got {text!r}") from exc
    return (at if at.tzinfo else at.replace(tzinfo=zone)).astimezone(UTC)


def _floor_hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def _ceil_hour(at: datetime) -> datetime:
    floor = _floor_hour(at)
    return floor if floor == at else floor + _HOUR


def date_range(*, start: str, end: str, timezone: str, bucket: str, now: datetime | None = None) -> Range:
    """The range asked for, checked and widened to whole hours. By default the last 30 days
    (today included) by day, in the caller's zone."""
    bucket = bucket or "day"
    if bucket not in BUCKETS:
        raise InvalidArgument(f"bucket must be one of {', '.join(BUCKETS)}")
    zone = known_zone(timezone or DEFAULT_TIMEZONE)
    now = now or datetime.now(UTC)
    to = _ceil_hour(_instant(end, zone, field="to", end=True) if end else now)
    if start:
        since = _floor_hour(_instant(start, zone, field="from", end=False))
    else:
        today = now.astimezone(zone).date()
        first = today - timedelta(days=DEFAULT_DAYS - 1)
        since = datetime(first.year, first.month, first.day, tzinfo=zone).astimezone(UTC)
    if since >= to:
        raise InvalidArgument("from must be before to")
    if to - since > timedelta(days=MAX_DAYS):
        raise InvalidArgument(f"the range may span at most {MAX_DAYS} days")
    hours = (to - since) / _HOUR
    buckets = {"hour": hours, "day": hours / 24, "week": hours / (24 * 7)}[bucket]
    if buckets > MAX_BUCKETS:
        raise InvalidArgument(f"at most {MAX_BUCKETS} buckets a reply: choose a shorter range or a longer bucket")
    return Range(since, to, bucket, zone)


def _rate(part: int, whole: int) -> float:
    """A percentage with one decimal; 0 when there is nothing to divide."""
    return round(100 * part / whole, 1) if whole else 0.0


def _money(value: Decimal | None, places: int = 2) -> float:
    return round(float(value or 0), places)


def _message_figures(row: asyncpg.Record | dict[str, int] | None) -> dict[str, Any]:
    figures: dict[str, Any] = {f: int(row[f]) if row else 0 for f in _MESSAGE_FIELDS}
    figures["delivery_rate"] = _rate(figures["delivered"], figures["sent"])
    figures["read_rate"] = _rate(figures["read"], figures["sent"])
    return figures


def _summed(rows: Iterable[asyncpg.Record | dict[str, int]]) -> dict[str, int]:
    total = dict.fromkeys(_MESSAGE_FIELDS, 0)
    for row in rows:
        for f in _MESSAGE_FIELDS:
            total[f] += int(row[f])
    return total


def _call_figures(row: asyncpg.Record | dict[str, Any] | None) -> dict[str, Any]:
    figures: dict[str, Any] = {f: int(row[f] or 0) if row else 0 for f in _CALL_COUNTS}
    seconds = Decimal(row["seconds"] or 0) if row else Decimal(0)
    figures["minutes"] = round(float(seconds) / 60, 2)
    figures["cost"] = _money(row["cost"] if row else None, 4)
    figures["promised_amount"] = _money(row["promised_amount"] if row else None)
    figures["answer_rate"] = _rate(figures["answered"], figures["calls"])
    return figures


def _call_total(rows: list[asyncpg.Record]) -> dict[str, Any]:
    total: dict[str, Any] = dict.fromkeys(_CALL_COUNTS, 0)
    total.update(seconds=Decimal(0), cost=Decimal(0), promised_amount=Decimal(0))
    for row in rows:
        for f in (*_CALL_COUNTS, "seconds", "cost", "promised_amount"):
            total[f] += row[f] or 0
    return total


class Analytics:
    def __init__(self, repo: AnalyticsRepo) -> None:
        self.repo = repo

    async def report(self, caller: Caller, report: str, *, account_id: str = "", **asked: str) -> dict[str, Any]:
        """`report` for the caller's scope over the range `asked` (date_range's start, end,
        timezone and bucket as given; the caller's zone when none is)."""
        if report not in REPORTS:
            raise InvalidArgument(f"report must be one of {', '.join(REPORTS)}")
        scope = caller.account_scope(account_id) if account_id else scope_of(caller)
        zone = asked.get("timezone") or caller.timezone
        span = date_range(
            start=asked.get("start", ""), end=asked.get("end", ""), timezone=zone, bucket=asked.get("bucket", "")
        )
        head = {"account_id": scope or None, **span.json()}
        if report == "voice":
            return {**head, **await self._voice(scope, span)}
        if report == "messages":
            return {**head, **await self._messages(scope, span)}
        if report == "groups":
            return {**head, **await self._groups(scope, span)}
        return {**head, **await self._dashboard(scope, span)}

    async def _voice(self, scope: str, span: Range) -> dict[str, Any]:
        # Each query on its own connection, at once: the reply waits for the slower only.
        rows, hours = await asyncio.gather(
            self.repo.call_series(
                account=scope, start=span.start, end=span.end, bucket=span.bucket, zone=span.zone.key
            ),
            self.repo.call_hours(account=scope, start=span.start, end=span.end, zone=span.zone.key),
        )
        by_bucket = {r["bucket"]: r for r in rows}
        totals = _call_figures(_call_total(rows))
        by_hour = [
            {"hour": r["local_hour"], "calls": r["calls"], "answered": r["answered"]}
            | {"answer_rate": _rate(r["answered"], r["calls"])}
            for r in hours
        ]
        counted = [h for h in by_hour if h["calls"] >= BEST_HOUR_MIN_CALLS]
        best = sorted(counted, key=lambda h: (-h["answer_rate"], -h["calls"], h["hour"]))[:3]
        return {
            "series": [{"bucket": span.label(b), **_call_figures(by_bucket.get(b))} for b in span.buckets()],
            "totals": totals,
            "outcomes": [
                {"outcome": o, "calls": totals[o], "percentage": _rate(totals[o], totals["calls"])} for o in _OUTCOMES
            ],
            "answer_rate_by_hour": by_hour,
            "best_hours": [h["hour"] for h in best],
        }

    async def _messages(self, scope: str, span: Range) -> dict[str, Any]:
        rows, top = await asyncio.gather(
            self.repo.message_series(
                account=scope, start=span.start, end=span.end, bucket=span.bucket, zone=span.zone.key
            ),
            self.repo.message_top(account=scope, start=span.start, end=span.end, limit=TOP_MESSAGES),
        )
        channels: dict[str, dict[datetime, asyncpg.Record]] = {"bulk": {}, "scheduled": {}}
        for r in rows:
            channels["scheduled" if r["scheduled"] else "bulk"][r["bucket"]] = r
        series = []
        for b in span.buckets():
            parts = {name: _message_figures(by_bucket.get(b)) for name, by_bucket in channels.items()}
            split = {name: {f: part[f] for f in _CHANNEL_SPLIT} for name, part in parts.items()}
            series.append({"bucket": span.label(b), **_message_figures(_summed(parts.values())), "by_channel": split})
        by_channel = {name: _message_figures(_summed(by_bucket.values())) for name, by_bucket in channels.items()}
        return {
            "series": series,
            "totals": _message_figures(_summed(by_channel.values())),
            "by_channel": by_channel,
            "by_message": [_message_entry(r) for r in top],
        }

    async def _groups(self, scope: str, span: Range) -> dict[str, Any]:
        rows = await self.repo.groups(account=scope, start=span.start, end=span.end, limit=TOP_GROUPS)
        return {
            "groups": [
                {
                    "id": str(r["group_id"]),
                    "name": r["name"],
                    "contacts": r["contact_count"],
                    "messages": r["messages"],
                    "sent": r["sent"],
                    "failed": r["failed"],
                    "delivered": r["delivered"],
                    "read": r["read"],
                    "undelivered": r["undelivered"],
                    "delivery_rate": _rate(r["delivered"], r["sent"]),
                    "read_rate": _rate(r["read"], r["sent"]),
                }
                for r in rows
            ]
        }

    async def _dashboard(self, scope: str, span: Range) -> dict[str, Any]:
        messages, calls, states, groups = await asyncio.gather(
            self.repo.message_series(
                account=scope, start=span.start, end=span.end, bucket=span.bucket, zone=span.zone.key
            ),
            self.repo.call_series(
                account=scope, start=span.start, end=span.end, bucket=span.bucket, zone=span.zone.key
            ),
            self.repo.message_states(account=scope),
            self.repo.group_count(account=scope),
        )
        sent_by: dict[datetime, list[asyncpg.Record]] = {}
        for r in messages:
            sent_by.setdefault(r["bucket"], []).append(r)
        calls_by = {r["bucket"]: r for r in calls}
        series = []
        for b in span.buckets():
            whatsapp, voice = _summed(sent_by.get(b, ())), calls_by.get(b)
            series.append(
                {
                    "bucket": span.label(b),
                    "sent": whatsapp["sent"],
                    "delivered": whatsapp["delivered"],
                    "read": whatsapp["read"],
                    "failed": whatsapp["failed"],
                    "calls": int(voice["calls"]) if voice else 0,
                    "answered": int(voice["answered"]) if voice else 0,
                }
            )
        return {
            "whatsapp": _message_figures(_summed(messages)),
            "voice": _call_figures(_call_total(calls)),
            "scheduled_messages": states,
            "groups": groups,
            "series": series,
        }

    async def fold(self) -> int:
        """One fold round (see AnalyticsRepo.fold): says it did something only when a full
        batch of keys was folded, so the loop goes on at once only while behind."""
        keys = 5_000
        folded = await self.repo.fold(keys=keys)
        return folded if folded >= keys else 0


def _message_entry(r: asyncpg.Record) -> dict[str, Any]:
    scheduled = r["message_id"] is not None
    return {
        "channel": "scheduled" if scheduled else "bulk",
        # The id each product shows: a scheduled message's, or the bulk job's.
        "message_id": str(r["message_id"]) if scheduled else None,
        "job_id": None if scheduled else str(r["batch_id"]),
        "name": (r["content"] or "")[:80] if scheduled else r["name"],
        "status": r["status"],
        "created_at": r["created_at"].isoformat(),
        **_message_figures(r),
    }


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, separators=(",", ":"), ensure_ascii=False)
