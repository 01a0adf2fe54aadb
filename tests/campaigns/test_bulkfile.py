"""The pipe-separated WhatsApp bulk file: streaming parse, phone normalisation, every rejection."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.campaigns.bulkfile import MAX_LINE_CHARS, BulkFileParser, InvalidRow, Row, normalize_phone
from services.campaigns.template import MAX_MESSAGE_CHARS, compile_template
from services.runtime.errors import DomainError, InvalidArgument, PayloadTooLarge
from services.runtime.phones import reader as phone_reader

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def parse(data: bytes, *, chunk: int | None = None, **options: Any) -> tuple[list[Row], BulkFileParser]:
    parser = BulkFileParser(**options)
    size = chunk or max(len(data), 1)
    rows: list[Row] = []
    for start in range(0, len(data), size):
        rows += parser.feed(data[start : start + size])
    rows += parser.finish()
    return rows, parser


def rejection(data: bytes, **options: Any) -> DomainError:
    with pytest.raises(DomainError) as caught:
        parse(data, **options)
    return caught.value


# --- the sample file -------------------------------------------------------------------------


def test_sample_file() -> None:
    rows, parser = parse((FIXTURES / "whatsapp_bulk_sample.csv").read_bytes())
    assert rows == [
        Row(2, "+51987654321", ["leonardo", "12345"]),
        Row(3, "+51987654322", ["maría josé", "12346"]),
        Row(4, "+51987654323", ["juan"]),
        Row(5, "+51987654324", []),
        Row(6, "+51987654325", ["Ñandú", "ü", "extra", "values"]),
        Row(8, "+51987654326", ["sin más", "99"]),
    ]
    assert parser.has_header
    assert (parser.total_lines, parser.accepted, parser.invalid, parser.duplicates) == (6, 6, 0, 0)
    assert parser.max_values == 4
    assert parser.invalid_samples == []


def test_sample_file_byte_by_byte() -> None:
    data = (FIXTURES / "whatsapp_bulk_sample.csv").read_bytes()
    assert parse(data, chunk=1, sniff_bytes=1)[0] == parse(data)[0]


def test_feed_returns_rows_before_finish_and_keeps_the_partial_line() -> None:
    parser = BulkFileParser(sniff_bytes=1)
    assert parser.feed(b"phone|@valor1\n+51987654321|a\n+5198765") == [Row(2, "+51987654321", ["a"])]
    assert parser.feed(b"4322|b\n") == [Row(3, "+51987654322", ["b"])]
    assert parser.feed(b"+51987654323") == []
    assert parser.finish() == [Row(4, "+51987654323", [])]


def test_bom_crlf_blank_lines_and_no_header() -> None:
    data = "\ufeff\r\n  \r\n+51987654321 | a | \r\n\t\r\n51987654322|b|c|d\r\n".encode()
    rows, parser = parse(data)
    assert rows == [Row(3, "+51987654321", ["a", ""]), Row(5, "+51987654322", ["b", "c", "d"])]
    assert not parser.has_header
    assert parser.total_lines == 2
    assert parser.max_values == 3


def test_bare_carriage_returns_end_lines() -> None:
    rows, _ = parse(b"phone\r+51987654321|a\r\r+51987654322|b")
    assert rows == [Row(2, "+51987654321", ["a"]), Row(4, "+51987654322", ["b"])]


@pytest.mark.parametrize("header", ["phone", "Teléfono", "TELEFONO", "número de celular", "Móvil", "WhatsApp", "tel"])
def test_phone_headers(header: str) -> None:
    rows, parser = parse(f"{header}|nombre\n+51987654321|a\n".encode())
    assert parser.has_header
    assert rows == [Row(2, "+51987654321", ["a"])]


# --- phones ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "normalised"),
    [
        # National numbers are read in the account's country (CL here), as `phonenumbers` reads them.
        ("981234567", "+56981234567"),
        (" +56 9 8123 4567 ", "+56981234567"),
        ("56981234567", "+56981234567"),
        ("56981234567.0", "+56981234567"),  # a spreadsheet number cell, not an extra digit
        ("221234567", "+56221234567"),  # Santiago
        ("(2) 2123-4567", "+56221234567"),
        ("322123456", "+56322123456"),  # Valparaíso
        ("41 212 3456", "+56412123456"),  # Concepción
        # International numbers, with their "+", the "00" prefix, or (as exports drop it) neither.
        ("+51987654321", "+51987654321"),
        ("51 987-654-321", "+51987654321"),
        ("0051987654321", "+51987654321"),
        ("(51) 987.654.321", "+51987654321"),
        ("+54\u00a09\u00a0351\u00a0555-0101", "+5493515550101"),
        ("5491136530246", "+5491136530246"),
        ("+54 11 3653-0246", "+5491136530246"),  # WhatsApp reaches Argentine numbers as mobiles
        # Issue 16: a Chilean national number is not an Indian one, 8 digits are not +1.
        ("912345678", None),  # a range Chile has not allocated, refused rather than read as +91
        ("12345678", None),
        ("123456789012345", None),
        ("+51123123123", None),  # right length, no Peruvian range
        ("12", None),
        ("abc", None),
        ("", None),
        ("0987654321", None),
        ("+0051123123123", None),
        ("51+123123123", None),
        ("٥١٩٨٧٦٥٤٣٢١", None),
        ("5.1987654321E+10", None),
    ],
)
def test_normalize_phone(written: str, normalised: str | None) -> None:
    assert normalize_phone(written) == normalised


@pytest.mark.parametrize(
    ("written", "normalised"),
    [
        # An Argentine account's bulk file: a generic phone column is read as a mobile (FORMATS.md).
        ("11 4444 5555", "+5491144445555"),
        ("011 15 4444-5555", "+5491144445555"),
        ("0351 15 555-0101", "+5493515550101"),  # Córdoba
        ("0341 421-2345", "+5493414212345"),  # Rosario
        ("0294 15 4123456", "+5492944123456"),  # Bariloche
        ("0298 15 4123456", "+5492984123456"),  # General Roca
        ("+54 9 11 4444 5555", "+5491144445555"),
        ("+56 9 8123 4567", "+56981234567"),
        ("36530246", None),  # a local number without its area code
        ("123", None),
    ],
)
def test_normalize_phone_in_argentina(written: str, normalised: str | None) -> None:
    assert normalize_phone(written, phone_reader("AR")) == normalised


def test_an_argentine_account_reads_national_numbers_in_argentina() -> None:
    rows, parser = parse(b"phone|v\n11 4444 5555|a\n0294 15 4123456|b\n+56981234567|c\n123|d\n", country="AR")
    assert [row.phone for row in rows] == ["+5491144445555", "+5492944123456", "+56981234567"]
    assert parser.invalid_samples == [(5, "123", "invalid for AR: too short")]


def test_invalid_phones_are_skipped_and_sampled() -> None:
    lines = ["phone|v", "+51987654321|ok", "abc|x", "12|y", "|z", "+51 987 654 322|ok"]
    lines += [f"bad{i}|x" for i in range(30)]
    rows, parser = parse("\n".join(lines).encode())
    assert [row.phone for row in rows] == ["+51987654321", "+51987654322"]
    assert (parser.total_lines, parser.accepted, parser.invalid) == (35, 2, 33)
    assert parser.invalid_samples[:3] == [
        (3, "abc", "invalid for CL: not a phone number"),
        (4, "12", "invalid for CL: too short"),
        (5, "", "missing phone"),
    ]
    assert len(parser.invalid_samples) == 33  # up to MAX_INVALID_SAMPLES (100) are kept for the reply


def test_invalid_samples_stop_at_one_hundred_and_cut_long_values() -> None:
    lines = ["+51987654321|ok"] + [f"bad{i}|x" for i in range(150)]
    rows, parser = parse("\n".join(lines).encode())
    assert parser.invalid == 150 and len(parser.invalid_samples) == 100
    assert [s.line for s in parser.invalid_samples] == list(range(2, 102))
    assert parser.invalid_samples[-1] == (101, "bad99", "invalid for CL: too short")
    _, long = parse(("+51987654321|ok\n" + "9x" * 250 + "|y\n").encode())
    assert long.invalid_samples == [(2, "9x" * 48 + "9...", "invalid for CL: too long")]


def test_duplicates_keep_the_first_row() -> None:
    data = b"+51987654321|first\n0051987654321|second\n51 987 654 321|third\n+51987654322|other\n"
    rows, parser = parse(data)
    assert rows == [Row(1, "+51987654321", ["first"]), Row(4, "+51987654322", ["other"])]
    assert (parser.total_lines, parser.accepted, parser.duplicates) == (4, 2, 2)


# --- rejections ------------------------------------------------------------------------------


def test_empty_file() -> None:
    error = rejection((FIXTURES / "bad_empty.csv").read_bytes())
    assert isinstance(error, InvalidArgument)
    assert error.message == "the file is empty"


def test_header_only() -> None:
    error = rejection((FIXTURES / "bad_header_only.csv").read_bytes())
    assert isinstance(error, InvalidArgument)
    assert error.message == "the file has a header but no recipients"


def test_header_and_blank_lines_only() -> None:
    error = rejection(b"phone|@valor1\r\n\r\n   \r\n")
    assert isinstance(error, InvalidArgument)
    assert "header but no recipients" in error.message


def test_blank_lines_only() -> None:
    error = rejection(b"\n  \n\t\n")
    assert isinstance(error, InvalidArgument)
    assert "no recipients" in error.message


def test_latin1() -> None:
    error = rejection((FIXTURES / "bad_latin1.csv").read_bytes())
    assert isinstance(error, InvalidArgument)
    assert error.message == "the file is not UTF-8 text (line 1)"


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_not_utf8_names_the_line(chunk: int | None) -> None:
    data = "phone|v\n+51987654321|Muñoz\n+51987654322|Mu".encode() + b"\xf1oz\n+51987654323|x\n"
    error = rejection(data, chunk=chunk, sniff_bytes=4)
    assert isinstance(error, InvalidArgument)
    assert error.message == "the file is not UTF-8 text (line 3)"


def test_truncated_character_at_the_end() -> None:
    error = rejection("+51987654321|a\n+51987654322|€".encode()[:-1])
    assert isinstance(error, InvalidArgument)
    assert error.message == "the file is not UTF-8 text (line 2)"


def test_utf16() -> None:
    error = rejection("phone|v\n+51987654321|a\n".encode("utf-16"))
    assert isinstance(error, InvalidArgument)
    assert "not UTF-8" in error.message and "UTF-16" in error.message


def test_binary() -> None:
    error = rejection((FIXTURES / "bad_binary.csv").read_bytes())
    assert isinstance(error, InvalidArgument)
    assert error.message == "the file looks binary, not text"


@pytest.mark.parametrize("control", [b"\x00", b"\x07", b"\x1b", b"\x7f"])
def test_control_characters_in_the_first_8kb_are_binary(control: bytes) -> None:
    data = b"+51987654321|a\n" * 500 + b"+51987654322|" + control + b"\n"
    assert len(data) < 8192
    assert rejection(data, chunk=100).message == "the file looks binary, not text"


def test_control_characters_after_the_first_8kb_are_data() -> None:
    rows, _ = parse(b"+51987654321|a\n" * 600 + b"+51987654322|\x07\n")
    assert rows[-1] == Row(601, "+51987654322", ["\x07"])


def test_header_without_a_phone_column() -> None:
    error = rejection("nombre|teléfono\nJuan|+51987654321\n".encode())
    assert isinstance(error, InvalidArgument)
    assert error.message.startswith("no phone column: the first column must hold phone numbers")
    assert "line 1" in error.message


def test_names_in_the_first_column_without_a_header() -> None:
    error = rejection(b"\nJuan|+51987654321\nMaria|+51987654322\n")
    assert isinstance(error, InvalidArgument)
    assert "no phone column" in error.message and "line 2" in error.message


def test_no_valid_phone_without_a_header_is_no_phone_column() -> None:
    error = rejection(b"12345|a\n678|b\n")
    assert isinstance(error, InvalidArgument)
    assert error.message == "no phone column: the first column must hold phone numbers"


def test_no_valid_phone_under_a_phone_header() -> None:
    error = rejection(b"phone|a\n\n12345|a\nabc|b\n")
    assert isinstance(error, InvalidArgument)
    assert (
        error.message
        == "no valid phone numbers: all 2 rows are invalid (line 3: phone '12345' is invalid for CL: too short)"
    )


def test_line_too_long() -> None:
    data = b"+51987654321|a\n+51987654322|" + b"x" * MAX_LINE_CHARS + b"\n"
    for chunk in (None, 65536):
        error = rejection(data, chunk=chunk)
        assert isinstance(error, InvalidArgument)
        assert error.message.startswith("line 2 is longer than")


def test_too_many_recipients_is_raised_by_feed() -> None:
    data = b"phone|v\n" + b"".join(b"+519%08d|x\n" % i for i in range(1000))
    parser = BulkFileParser(max_recipients=5)
    fed = 0
    with pytest.raises(PayloadTooLarge) as caught:
        for start in range(0, len(data), 1024):
            parser.feed(data[start : start + 1024])
            fed += 1024
    assert fed < len(data) // 2
    assert caught.value.message == "the file has more than 5 recipients (line 7)"


def test_the_limit_counts_accepted_recipients_only() -> None:
    data = b"+51987654321\n+51987654321\nbad1\n" + b"".join(b"+519%08d\n" % i for i in range(4))
    rows, parser = parse(data, max_recipients=5)
    assert len(rows) == parser.accepted == 5
    assert parser.duplicates == parser.invalid == 1


def test_small_files_hit_the_limit_in_finish() -> None:
    data = b"".join(b"+519%08d\n" % i for i in range(6))
    assert isinstance(rejection(data, max_recipients=5), PayloadTooLarge)


# --- properties ------------------------------------------------------------------------------


@dataclass
class Line:
    text: str
    phone: str | None = None  # normalised; None for an invalid phone
    values: tuple[str, ...] = ()
    blank: bool = False


# Ranges `phonenumbers` takes as valid whatever the digits drawn after them: (country code, the
# national number's leading digits, how many digits follow).
_RANGES = [("56", "98", 7), ("56", "22", 7), ("54", "9113", 7), ("51", "9", 8), ("34", "6", 8)]


@st.composite
def valid_phones(draw: st.DrawFn) -> tuple[str, str]:
    code, lead, rest = draw(st.sampled_from(_RANGES))
    national = lead + draw(st.text("0123456789", min_size=rest, max_size=rest))
    # Chilean numbers (the default country's) may also be written nationally.
    style = draw(st.sampled_from(["+", "00", "", "formatted"] + (["national"] if code == "56" else [])))
    digits = code + national
    if style == "national":
        written = national
    elif style != "formatted":
        written = style + digits
    else:
        # No separator before the last two digits: "12345678.0" reads as a spreadsheet number.
        seps = draw(st.lists(st.sampled_from(["", "", " ", "-", "."]), min_size=len(digits), max_size=len(digits)))
        body = "".join(sep + digit for sep, digit in zip(seps[: len(digits) - 2], digits, strict=False))
        written = draw(st.sampled_from(["+", "", "00", "+ "])) + body + digits[-2:]
        if draw(st.booleans()):
            written = f"({written[:3]}){written[3:]}"
    padding = st.sampled_from(["", " ", "\t"])
    return draw(padding) + written + draw(padding), "+" + digits


# Always hold a digit, so an invalid first row is never taken for a header.
INVALID_PHONES = st.sampled_from(["12", "123-45", "+0123456789", "1234567890123456", "98765abc43", "00000000000"])
VALUES = st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="|"), max_size=6)
HEADERS = st.sampled_from(["phone|@valor1|@valor2", "Teléfono | nombre", "celular", "NUMBER|x|y|z"])
BLANKS = st.sampled_from(["", " ", "\t", "  \u3000"])


@st.composite
def row_lines(draw: st.DrawFn, *, valid: bool) -> Line:
    values = tuple(draw(st.lists(VALUES, max_size=5)))
    if valid or draw(st.integers(0, 4)):
        written, phone = draw(valid_phones())
    else:
        written, phone = draw(INVALID_PHONES), None
    return Line("|".join((written, *values)), phone, tuple(value.strip() for value in values))


@st.composite
def bulk_files(draw: st.DrawFn) -> tuple[bytes, list[Line]]:
    lines: list[Line] = []
    if draw(st.booleans()):
        lines.append(Line(draw(HEADERS), blank=True))
    rows = [draw(row_lines(valid=True))] + draw(st.lists(row_lines(valid=False), max_size=25))
    # Some repeats of earlier phones, written the same way: duplicates.
    rows += draw(st.lists(st.sampled_from(rows), max_size=3))
    for row in draw(st.permutations(rows)):
        lines += [Line(blank, blank=True) for blank in draw(st.lists(BLANKS, max_size=2))]
        lines.append(row)
    endings = draw(st.sampled_from([("\n",), ("\r\n",), ("\n", "\r\n"), ("\r",)]))
    text = "".join(line.text + draw(st.sampled_from(endings)) for line in lines)
    if draw(st.booleans()):
        text = text.rstrip("\r\n")
    bom = b"\xef\xbb\xbf" if draw(st.booleans()) else b""
    return bom + text.encode(), lines


def feed_in_pieces(data: bytes, cuts: list[int], **options: int) -> tuple[list[Row], BulkFileParser]:
    parser = BulkFileParser(**options)
    rows: list[Row] = []
    bounds = [0, *sorted(cuts), len(data)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        rows += parser.feed(data[start:end])
    rows += parser.finish()
    return rows, parser


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(file=bulk_files(), data=st.data(), sniff_bytes=st.sampled_from([0, 1, 5, 8192]))
def test_random_files_parse_to_their_rows(
    file: tuple[bytes, list[Line]], data: st.DataObject, sniff_bytes: int
) -> None:
    raw, lines = file
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12))

    expected: list[Row] = []
    seen: set[str] = set()
    invalid = duplicates = total = max_values = 0
    for line_no, line in enumerate(lines, start=1):
        if line.blank:
            continue
        total += 1
        if line.phone is None:
            invalid += 1
        elif line.phone in seen:
            duplicates += 1
        else:
            seen.add(line.phone)
            expected.append(Row(line_no, line.phone, list(line.values)))
            max_values = max(max_values, len(line.values))

    rows, parser = feed_in_pieces(raw, cuts, sniff_bytes=sniff_bytes)
    assert rows == expected
    assert rows == parse(raw)[0]
    assert (parser.total_lines, parser.accepted, parser.invalid, parser.duplicates) == (
        total,
        len(expected),
        invalid,
        duplicates,
    )
    assert parser.accepted + parser.invalid + parser.duplicates == parser.total_lines
    assert parser.max_values == max_values
    assert parser.has_header == (lines[0].blank and bool(lines[0].text.strip()))


def outcome(raw: bytes, cuts: list[int], **options: int) -> object:
    try:
        rows, parser = feed_in_pieces(raw, cuts, **options)
    except DomainError as error:
        return type(error), error.message
    return rows, parser.total_lines, parser.accepted, parser.invalid, parser.duplicates, parser.invalid_samples


PIECES = st.sampled_from(
    [b"+51987654321|a\n", b"+5198765432", b"|\xc3\xb1", b"\xc3", b"\xe2\x82\xac", b"\xe2\x82", b"\xff", b"\r", b"\n"]
    + [b"\r\n", b" ", b"abc|", b"phone|v\n", b"nombre\n", b"\x00", b"\xef\xbb\xbf", b"12\n", b"0051987654322"]
)


@settings(deadline=None, max_examples=300)
@given(
    pieces=st.lists(PIECES, max_size=30),
    data=st.data(),
    sniff_bytes=st.sampled_from([1, 16]),
    max_recipients=st.sampled_from([1, 3, 100]),
)
def test_chunking_never_changes_the_outcome(
    pieces: list[bytes], data: st.DataObject, sniff_bytes: int, max_recipients: int
) -> None:
    raw = b"".join(pieces)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12))
    options = {"sniff_bytes": sniff_bytes, "max_recipients": max_recipients}
    assert outcome(raw, cuts, **options) == outcome(raw, [], **options)


@settings(deadline=None)
@given(pieces=st.lists(PIECES.filter(lambda piece: b"\x00" not in piece), max_size=30), data=st.data())
def test_utf8_errors_name_the_line_of_the_first_bad_byte(pieces: list[bytes], data: st.DataObject) -> None:
    raw = b"".join(pieces)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start].decode("utf-8")
        line_no = before.count("\n") + before.count("\r") - before.count("\r\n") + 1
    else:
        return
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12))
    result = outcome(raw, cuts, sniff_bytes=0, max_recipients=100)
    # Lines before the bad byte may fail first (a header without a phone column).
    if result != (InvalidArgument, f"the file is not UTF-8 text (line {line_no})"):
        assert isinstance(result, tuple) and result[0] is InvalidArgument
        assert result[1].startswith("no phone column") or "longer than" in result[1]


# --- the message each row renders --------------------------------------------------------------


def test_a_row_whose_message_would_be_too_long_is_invalid_with_the_reason() -> None:
    template = compile_template("Hola @valor1, pedido @valor2 (@valor1)")
    data = (
        "phone|@valor1|@valor2\n"
        "+56981111111|ana|7\n"
        f"+56982222222|{'a' * 2040}|{'b' * 10}\n"  # 4,107 characters once rendered
        f"+56983333333|{'a' * 2020}|{'b' * 10}\n"  # 4,067: long, within the limit
        "+56982222222|ana|8\n"  # the phone is free again: the row before sends nothing
    ).encode()
    rows, parser = parse(data, template=template)
    assert [(r.line_no, r.phone) for r in rows] == [(2, "+56981111111"), (4, "+56983333333"), (5, "+56982222222")]
    assert all(len(template.render(r.values)) <= MAX_MESSAGE_CHARS for r in rows)
    assert parser.invalid == 1 and parser.duplicates == 0
    assert parser.invalid_samples == [
        InvalidRow(
            3, "+56982222222", "message too long: 4,107 characters with this row's values, WhatsApp takes at most 4,096"
        )
    ]


def test_a_file_of_rows_too_long_is_refused() -> None:
    error = rejection(f"+56981111111|{'a' * 5000}\n".encode(), template=compile_template("@valor1"))
    assert isinstance(error, InvalidArgument) and "message too long: 5,000 characters" in error.message
