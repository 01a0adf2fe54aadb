"""Settings objects sent by users (a batch's call settings, a simulated provider's behaviour)
checked by pydantic models, with one way of saying what is wrong everywhere: the field's path
and the rule it broke, e.g. `call_settings.max_attempts: must be at most 10 (got 11)`, as an
InvalidArgument (a 400 at the gateway).

The models are strict (`"3"` is no number, `true` no count) and forbid unknown keys: a
misspelt key would otherwise silently mean its default."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ValidationError

from .errors import InvalidArgument

M = TypeVar("M", bound=BaseModel)

# pydantic's error types, said as the API says them (the bound comes from the error's context).
_RULES = {
    "greater_than_equal": "must be at least {ge}",
    "less_than_equal": "must be at most {le}",
    "greater_than": "must be more than {gt}",
    "less_than": "must be less than {lt}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
    "string_too_long": "must be at most {max_length} characters",
    "string_pattern_mismatch": "must match {pattern}",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "dict_type": "must be an object",
}


def validated(model: type[M], raw: Mapping[str, Any], *, name: str) -> M:
    """`raw` as a `model`, or InvalidArgument naming the first wrong field of `name` and its rule."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise InvalidArgument(describe(exc, name)) from None


def checked(model: type[M], config: object, *, name: str) -> M:
    """A provider's `config` as its model, or ValueError naming the wrong key and its rule (the
    providers' own error, which the dispatcher turns into a 400 or a failed send)."""
    if not isinstance(config, dict):
        raise ValueError(f"{name} must be an object, got {type(config).__name__}")
    try:
        return model.model_validate(config)
    except ValidationError as exc:
        raise ValueError(describe(exc, name)) from None


def describe(exc: ValidationError, name: str) -> str:
    error = exc.errors(include_url=False)[0]
    path = ".".join([name, *(str(part) for part in error["loc"])])
    kind = error["type"]
    if kind == "extra_forbidden":
        parent, _, key = path.rpartition(".")
        return f"{parent}: unknown key {key}"
    if kind == "missing":
        return f"{path} is required"
    if kind == "value_error":
        # A validator's own message (ValueError), already in the API's words.
        return f"{path}: {error['ctx']['error']}"
    rule = _RULES.get(kind)
    said = rule.format(**error.get("ctx", {})) if rule else error["msg"]
    return f"{path}: {said} (got {error['input']!r})"


def known_zone(name: str, *, field: str = "timezone") -> ZoneInfo:
    """The IANA zone `name`, or InvalidArgument naming the field (zoneinfo keeps the instances,
    so asking again costs a dict lookup)."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidArgument(
            f"{field}: unknown timezone {name[:64]!r}, use an IANA name such as America/Santiago"
        ) from exc
