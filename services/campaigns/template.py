"""WhatsApp message templates: `@valor1` … `@valorN` replaced by a recipient's values (bulk
files), or `{{name}}` / `{{phone}}` by a contact's (scheduled messages)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

MISSING = "---"
# WhatsApp's own limit for the body of a text message, in characters: a longer template is
# refused, and so is a recipient whose values would render a longer text.
MAX_MESSAGE_CHARS = 4096
_ANY_LINE = 2**62

# Greedy on digits, so `@valor10` is variable 10 and never variable 1 followed by "0".
_VARIABLE = re.compile(r"@valor(\d+)")


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed template: literal parts around zero-based value indexes, ready for fast rendering."""

    text: str
    literals: tuple[str, ...]
    indexes: tuple[int, ...]
    max_index: int  # the highest N of the `@valorN` used; 0 when there are none
    literal_chars: int  # the characters of the literal parts
    # Longest line (values and separators) whose rendering is surely within MAX_MESSAGE_CHARS:
    # a value used k times adds k times its length, or len(MISSING) when it is blank.
    safe_line_chars: int

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

    def rendered_chars(self, values: Sequence[str]) -> int:
        """len(self.render(values)), without building the text."""
        count = len(values)
        chars = self.literal_chars
        for index in self.indexes:
            value = values[index] if index < count else ""
            chars += len(value) if value and not value.isspace() else len(MISSING)
        return chars


def _built(text: str, literals: list[str], indexes: list[int]) -> Template:
    literal_chars = sum(map(len, literals))
    most_uses = max((indexes.count(i) for i in set(indexes)), default=0)
    room = MAX_MESSAGE_CHARS - literal_chars - len(MISSING) * len(indexes)
    return Template(
        text=text,
        literals=tuple(literals),
        indexes=tuple(indexes),
        max_index=max(indexes, default=-1) + 1,
        literal_chars=literal_chars,
        safe_line_chars=-1 if room < 0 else room // most_uses if most_uses else _ANY_LINE,
    )


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
    return _built(text, literals, indexes)


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
    return _built(text, literals, indexes)


def compile_for(syntax: str, text: str) -> Template:
    """The compiler a batch's `template_syntax` names: `named` or the bulk file's `valor`."""
    return compile_named(text) if syntax == "named" else compile_template(text)
