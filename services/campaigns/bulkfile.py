"""The pipe-separated WhatsApp bulk file (FORMATS.md), parsed incrementally as it is uploaded.

`feed()` returns the rows complete so far and raises as soon as the file is known to be bad or
too large, so the caller can stop reading; `finish()` flushes the last line and then judges the
file as a whole. Rows returned before an error from `finish()` belong to a rejected file.
"""

from __future__ import annotations

import codecs
import gc
import re
import unicodedata
from typing import NamedTuple

from services.campaigns.template import MAX_MESSAGE_CHARS, Template
from services.runtime.errors import InvalidArgument, PayloadTooLarge
from services.runtime.phones import DEFAULT_REGION, PhoneReader, argentine_mobile
from services.runtime.phones import reader as phone_reader

MAX_RECIPIENTS = 1_000_000
SNIFF_BYTES = 8192
# The upload's reply lists this many invalid rows, each value cut to MAX_SAMPLE_VALUE characters.
MAX_INVALID_SAMPLES = 100
MAX_SAMPLE_VALUE = 100
# A line with no end in sight is not a recipient list; this also keeps the carried tail bounded.
MAX_LINE_CHARS = 1 << 20

PHONE_HEADERS = frozenset(
    {"phone", "telefono", "celular", "numero", "movil", "whatsapp", "number", "tel"}
    # Spellings common in Chilean and English exports of the same column.
    | {"fono", "mobile", "cell", "cellphone", "msisdn"}
)

_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_DIGIT = re.compile(r"\d")
_WORD = re.compile(r"[a-z]+")
_PHONE_PUNCTUATION = re.compile(r"[\s\-.()]+")
# Spreadsheets turn a phone stored as a number into "51987654321.0"; dropping the dots would
# add a digit and message a stranger.
_SPREADSHEET_FLOAT = re.compile(r"\+?\d{8,}\.0")
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class Row(NamedTuple):
    line_no: int
    phone: str
    values: list[str]


class InvalidRow(NamedTuple):
    line: int
    value: str  # the first column as written ("" when missing)
    reason: str


# NamedTuple's own __new__ is a Python function; skipping it is a tenth of the parse time.
_new_row = tuple.__new__


def normalize_phone(raw: str, reader: PhoneReader | None = None) -> str | None:
    """E.164 of a written phone (national numbers read in the reader's country, CL by default),
    or None when `phonenumbers` does not take it as a valid number."""
    return _read_phone(raw.strip(), reader or phone_reader())


def _read_phone(raw: str, reader: PhoneReader) -> str | None:
    text = raw[:-2] if raw.endswith(".0") and _SPREADSHEET_FLOAT.fullmatch(raw) else raw
    # The punctuation `parse` would drop, dropped first ("9 8123-4567"): the digits left take the
    # reader's fast path instead of a parse each. Chained replaces cost a third of the regex.
    digits = text.replace(" ", "").replace("-", "").replace(".", "").replace("(", "").replace(")", "")
    if not (digits.lstrip("+").isdigit() and digits.isascii()):
        digits = _PHONE_PUNCTUATION.sub("", text)
    rule = reader.plain_national.get(len(digits))
    if rule is not None and rule.fullmatch(digits) and not reader.national_guard.match(digits):
        return "+" + reader.code + digits  # national digits of the reader's country, as `e164` reads them
    phone = reader.valid(digits if digits.lstrip("+").isdigit() and digits.isascii() else text)
    if phone is None:
        # Exports often drop the "+" of an international number ("5491136530246"): digits that
        # are no number of the country are read with their own country code, if that is valid.
        if text[:1] == "+" or digits[:1] in ("", "0") or not (digits.isascii() and digits.isdigit()):
            return None
        phone = reader.valid("+" + digits)
        if phone is None:
            return None
    # WhatsApp reaches Argentine numbers in their mobile form (FORMATS.md's generic column).
    return argentine_mobile(phone)


def _why(raw: str, reader: PhoneReader) -> str:
    """The library's reason for a first column that is no valid phone ("invalid for CL: too short")."""
    text = raw[:-2] if raw.endswith(".0") and _SPREADSHEET_FLOAT.fullmatch(raw) else raw
    try:
        reader.e164(text)
    except ValueError as exc:
        return str(exc)
    return "invalid phone"


def _line_breaks(text: str) -> int:
    return text.count("\n") + text.count("\r") - text.count("\r\n")


def _shown(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_phone_header(name: str) -> bool:
    folded = unicodedata.normalize("NFKD", name.casefold())
    ascii_name = folded.encode("ascii", "ignore").decode("ascii")
    return any(word in PHONE_HEADERS for word in _WORD.findall(ascii_name))


class BulkFileParser:
    """Streaming parser: bytes in, `Row`s out, with counters for the upload's summary."""

    def __init__(
        self,
        *,
        max_recipients: int = MAX_RECIPIENTS,
        sniff_bytes: int = SNIFF_BYTES,
        template: Template | None = None,
        country: str = DEFAULT_REGION,
    ) -> None:
        self.max_recipients = max_recipients
        # National numbers are read in `country` (the account's); `phonenumbers` decides validity.
        self._phones = phone_reader(country.upper())
        self.sniff_bytes = sniff_bytes
        # A row whose text would render longer than MAX_MESSAGE_CHARS is invalid. Only a line
        # longer than the template's safe length is measured, and only in a chunk that has one
        # (its longest line is known already): a million short rows pay nothing per row.
        self._template = template
        self._safe_line_chars = template.safe_line_chars if template is not None else MAX_LINE_CHARS
        self.total_lines = 0
        self.accepted = 0
        self.invalid = 0
        self.duplicates = 0
        self.invalid_samples: list[InvalidRow] = []
        self.max_values = 0
        self.has_header = False
        self._size = 0
        # Nothing is decoded before the binary sniff has seen its bytes, so the error a bad
        # file gets never depends on how the upload was chunked.
        self._head: bytearray | None = bytearray()
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._started = False
        self._first_line_seen = False
        self._line_no = 0
        self._tail = ""
        # Ints of the digits: half the memory of the strings, for up to a million phones.
        self._seen: set[int] = set()
        self._finished = False

    def feed(self, chunk: bytes) -> list[Row]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._size += len(chunk)
        if self._head is not None:
            self._head += chunk
            if len(self._head) < self.sniff_bytes:
                return []
            chunk = self._sniff()
        return self._decode(chunk, final=False)

    def finish(self) -> list[Row]:
        if self._finished:
            raise RuntimeError("finish() called twice")
        self._finished = True
        if self._size == 0:
            raise InvalidArgument("the file is empty")
        rows = self._decode(self._sniff() if self._head is not None else b"", final=True)
        self._validate()
        return rows

    def _sniff(self) -> bytes:
        assert self._head is not None
        head, self._head = bytes(self._head), None
        if head.startswith(_UTF16_BOMS):
            raise InvalidArgument("the file is not UTF-8 text (line 1): it is UTF-16, save it as UTF-8")
        if _CONTROL_BYTES.search(head, 0, self.sniff_bytes):
            raise InvalidArgument("the file looks binary, not text")
        return head

    def _decode(self, chunk: bytes, *, final: bool) -> list[Row]:
        try:
            text = self._decoder.decode(chunk, final)
        except UnicodeDecodeError as exc:
            # The lines before the bad byte are judged first: a file gets the error nearest its
            # start, whatever the chunking.
            self._split(self._without_bom(exc.object[: exc.start].decode("utf-8")), final=False)
            line_no = self._line_no + _line_breaks(self._tail) + 1
            raise InvalidArgument(f"the file is not UTF-8 text (line {line_no})") from None
        return self._split(self._without_bom(text), final=final)

    def _without_bom(self, text: str) -> str:
        if self._started or not text:
            return text
        self._started = True
        return text[1:] if text[0] == "\ufeff" else text

    def _split(self, text: str, *, final: bool) -> list[Row]:
        text = self._tail + text
        if "\r" in text:
            # A trailing "\r" may be the first half of a "\r\n" split across chunks.
            carry = "" if final or text[-1] != "\r" else "\r"
            text = (text[:-1] if carry else text).replace("\r\n", "\n").replace("\r", "\n")
        else:
            carry = ""
        lines = text.split("\n")
        self._tail = "" if final else lines.pop() + carry
        longest = max(map(len, lines), default=0)
        if len(self._tail) > MAX_LINE_CHARS or longest > MAX_LINE_CHARS:
            too_long = next((i for i, line in enumerate(lines) if len(line) > MAX_LINE_CHARS), len(lines))
            self._lines(lines[:too_long], MAX_LINE_CHARS)
            raise InvalidArgument(f"line {self._line_no + 1} is longer than {MAX_LINE_CHARS:,} characters")
        return self._lines(lines, longest)

    def _lines(self, lines: list[str], longest: int) -> list[Row]:
        """Rows of whole lines, the longest of which has `longest` characters."""
        if not self._first_line_seen:
            lines = self._skip_to_first_line(lines)
        # Every row allocates containers that outlive the young GC generations; none can form a
        # cycle, so collecting while they pile up only costs time (about a third of the parse).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._rows(lines, measure=longest > self._safe_line_chars)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _skip_to_first_line(self, lines: list[str]) -> list[str]:
        """Consume blank lines and the header, if any, up to the first non-blank line."""
        for position, line in enumerate(lines):
            first = line.split("|", 1)[0].strip()
            if not first and "|" not in line:
                continue
            self._first_line_seen = True
            if _DIGIT.search(first):
                break
            self._line_no += position + 1
            if not _is_phone_header(first):
                raise InvalidArgument(
                    f"no phone column: the first column must hold phone numbers (line {self._line_no})"
                )
            self.has_header = True
            return lines[position + 1 :]
        else:
            position = len(lines)
        self._line_no += position
        return lines[position:]

    def _rows(self, lines: list[str], *, measure: bool) -> list[Row]:
        """`measure`: some line is long enough that its message might exceed MAX_MESSAGE_CHARS."""
        rows: list[Row] = []
        append = rows.append
        seen = self._seen
        add = seen.add
        strip = str.strip
        line_no = self._line_no
        total = self.total_lines
        duplicates = self.duplicates
        max_values = self.max_values
        limit = self.max_recipients
        safe_line_chars = self._safe_line_chars
        accepted = len(seen)
        phones = self._phones
        plain = phones.plain_international
        code = phones.code
        national = phones.plain_national
        national_code = "+" + code
        guard = phones.national_guard.match
        read_phone = _read_phone
        phone: str | None
        for line in lines:
            line_no += 1
            fields = line.split("|")
            raw = fields[0].strip()
            if not raw and len(fields) == 1:
                continue
            total += 1
            # Fast path for the clean "+56981234567" of the browser and most exports: one match of
            # the library's patterns for the account's country (services/runtime/phones.py).
            rule = plain.get(len(raw))
            if rule is not None and rule.fullmatch(raw):
                phone = raw
            elif raw[:1] == "+":
                if rule is not None and raw.startswith(code, 1) and raw.isascii() and raw[1:].isdigit():
                    self._reject(line_no, raw)  # the country's digits, which its patterns refuse
                    continue
                phone = read_phone(raw, phones)
            elif (rule := national.get(len(raw))) is not None and rule.fullmatch(raw) and not guard(raw):
                phone = national_code + raw  # "981234567" read in the account's country
            else:
                phone = read_phone(raw, phones)
            if phone is None:
                self._reject(line_no, raw)
                continue
            if measure and len(line) > safe_line_chars and (too_long := self._too_long(fields)):
                self._reject(line_no, raw, too_long)
                continue
            add(int(phone[1:]))
            if len(seen) == accepted:
                duplicates += 1
                continue
            accepted += 1
            if accepted > limit:
                self._line_no, self.total_lines, self.accepted = line_no, total, accepted
                raise PayloadTooLarge(f"the file has more than {limit:,} recipients (line {line_no})")
            del fields[0]
            if len(fields) > max_values:
                max_values = len(fields)
            # isprintable() is False for every whitespace character but " ": such lines need no strip.
            if " " in line or not line.isprintable():
                fields = list(map(strip, fields))
            append(_new_row(Row, (line_no, phone, fields)))
        self._line_no = line_no
        self.total_lines = total
        self.accepted = accepted
        self.duplicates = duplicates
        self.max_values = max_values
        return rows

    def _too_long(self, fields: list[str]) -> str:
        """Why the row's message cannot be sent ("" when it can): `fields` as split, the phone first."""
        assert self._template is not None
        chars = self._template.rendered_chars([field.strip() for field in fields[1:]])
        if chars <= MAX_MESSAGE_CHARS:
            return ""
        return (
            f"message too long: {chars:,} characters with this row's values, "
            f"WhatsApp takes at most {MAX_MESSAGE_CHARS:,}"
        )

    def _reject(self, line_no: int, raw: str, reason: str = "") -> None:
        self.invalid += 1
        if len(self.invalid_samples) < MAX_INVALID_SAMPLES:
            reason = reason or (_why(raw, self._phones) if raw else "missing phone")
            self.invalid_samples.append(InvalidRow(line_no, _shown(raw, MAX_SAMPLE_VALUE), reason))

    def _validate(self) -> None:
        if not self._first_line_seen:
            raise InvalidArgument("the file has no recipients, only blank lines")
        if self.total_lines == 0:
            raise InvalidArgument("the file has a header but no recipients")
        if self.accepted == 0:
            first = self.invalid_samples[0]
            if first.reason.startswith("message too long"):
                raise InvalidArgument(
                    f"nothing to send: all {self.invalid:,} rows are invalid (line {first.line}: {first.reason})"
                )
            if not self.has_header:
                raise InvalidArgument("no phone column: the first column must hold phone numbers")
            problem = f"phone '{_shown(first.value)}' is {first.reason}" if first.value else first.reason
            raise InvalidArgument(
                f"no valid phone numbers: all {self.invalid:,} rows are invalid (line {first.line}: {problem})"
            )
