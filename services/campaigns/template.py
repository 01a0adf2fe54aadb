"""WhatsApp message templates: `@valor1` … `@valorN` replaced by a recipient's values (bulk
files), or `{{name}}` / `{{phone}}` by a contact's (scheduled messages)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

MISSING = "---"

# Greedy on digits, so `@valor10` is variable 10 and never variable 1 followed by "0".
_VARIABLE = re.compile(r"@valor(\d+)")


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template: literal parts around zero-based value indexes, ready for fast rendering."""

    text: str
    literals: tuple[str, ...]
    indexes: tuple[int, ...]
    max_index: int  # the highest N of the `@valorN` used; 0 when there are none

    def render(self, values: Sequence[str]) -> str:
        """Value i (1-based) replaces `@valor{i}`; a missing, empty or blank value renders as `---`."""
        literals = self.literals
        count = len(values)
        out = [literals[0]]
        for position, index in enumerate(self.indexes, start=1):
            value = values[index] if index < count else ""
            # The browser sends empty strings for empty cells: those count as missing too.
            out.append(value if value and not value.isspace() else MISSING)
            out.append(literals[position])
        return "".join(out)


def compile_template(text: str) -> Template:
    literals: list[str] = []
    indexes: list[int] = []
    start = 0
    for match in _VARIABLE.finditer(text):
        digits = match.group(1)
        # `@valor0` and `@valor01` name no value: left as written rather than guessed at.
        if digits[0] == "0":
            continue
        literals.append(text[start : match.start()])
        indexes.append(int(digits) - 1)
        start = match.end()
    literals.append(text[start:])
    return Template(text=text, literals=tuple(literals), indexes=tuple(indexes), max_index=max(indexes, default=-1) + 1)


# The variables a scheduled message may use, in the order of its jobs' values.
NAMED_VARIABLES = ("name", "phone")
# Spaces inside the braces are forgiven (`{{ name }}`); anything else between them is a variable.
_NAMED = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


class UnknownVariable(ValueError):
    """A `{{x}}` that names no variable of a scheduled message."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown variable {{{{{name}}}}}: use {{{{name}}}} or {{{{phone}}}}")
        self.name = name


def compile_named(text: str) -> Template:
    """`{{name}}` is value 1 and `{{phone}}` value 2 of a job (see NAMED_VARIABLES); any other
    `{{x}}` raises UnknownVariable."""
    literals: list[str] = []
    indexes: list[int] = []
    start = 0
    for match in _NAMED.finditer(text):
        name = match.group(1)
        if name not in NAMED_VARIABLES:
            raise UnknownVariable(name)
        literals.append(text[start : match.start()])
        indexes.append(NAMED_VARIABLES.index(name))
        start = match.end()
    literals.append(text[start:])
    return Template(text=text, literals=tuple(literals), indexes=tuple(indexes), max_index=max(indexes, default=-1) + 1)


def compile_for(syntax: str, text: str) -> Template:
    """The compiler a batch's `template_syntax` names: `named` or the bulk file's `valor`."""
    return compile_named(text) if syntax == "named" else compile_template(text)
