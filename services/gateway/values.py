"""Shaping gRPC values into the JSON the dashboards read: decimal strings as numbers,
timestamps as ISO 8601, JSON carried as text as objects with every key they read."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.runtime.protos import from_timestamp, iso


def number(text: str) -> float:
    """Decimal strings from the ledger as JSON numbers, which is what the dashboard reads."""
    return float(Decimal(text)) if text else 0.0


def optional_number(text: str) -> float | None:
    """A decimal string that may be absent (no call yet): null rather than a misleading 0."""
    return number(text) if text else None


def when(ts: Timestamp) -> str | None:
    """ISO 8601, or null for an unset timestamp."""
    return iso(from_timestamp(ts))


def json_object(text: str) -> dict[str, Any]:
    """A JSON object carried as a string by the campaigns service; `{}` when empty. Anything
    else is a campaigns bug, but the dashboard must still get an object to read."""
    value = json.loads(text) if text else {}
    return value if isinstance(value, dict) else {}


def json_array(text: str) -> list[Any]:
    value = json.loads(text) if text else []
    return value if isinstance(value, list) else []


def with_keys(value: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """`value` (a JSON object, or anything else meaning "nothing") with every key of `defaults`
    present; nested defaults that are dicts are filled the same way. The dashboard reads
    these paths without optional chaining, so a missing object breaks its page."""
    given = value if isinstance(value, dict) else {}
    out = dict(given)
    for key, default in defaults.items():
        if isinstance(default, dict):
            out[key] = with_keys(given.get(key), default)
        elif given.get(key) is None:
            out[key] = default
    return out
