"""The shared export writers on rows of their own (no database): every row once, in pages and
in chunks of the set size, text neutralised, cells typed, XML escaped and cleaned of what XML
cannot hold, a workbook that outgrows a sheet going on to the next, and its first bytes out
before its last page is read. The whole path, with the database and the gateway, is
tests/e2e/test_exports.py."""

from __future__ import annotations

import asyncio
import csv
import io
import zipfile
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from openpyxl import load_workbook

from services.runtime import exports
from services.runtime.exports import (
    CHUNK_BYTES,
    DATE,
    FLAG,
    INTEGER,
    MONEY,
    NUMBER,
    PAGE_ROWS,
    TEXT,
    TIME,
    Column,
    Source,
    neutral,
    xml_text,
)

COLUMNS = (
    Column("id", INTEGER),
    Column("name", TEXT),
    Column("at", TIME),
    Column("on", DATE),
    Column("amount", MONEY),
    Column("active", FLAG),
)
AT = datetime(2026, 12, 6, 17, 52, 30, tzinfo=UTC)


def rows(n: int) -> list[tuple[Any, ...]]:
    # A trailing value past the columns (as the repositories' keys are) is never written.
    return [
        (
            i,
            f"=cmd {i}" if i % 1000 == 0 else f"Cliente {i}",
            AT,
            date(2026, 12, 24),
            Decimal("1234.5"),
            i % 2 == 0,
            "k",
        )
        for i in range(1, n + 1)
    ]


def source(data: list[tuple[Any, ...]], reads: list[int] | None = None) -> Source:
    async def page(after: int, limit: int) -> list[tuple[Any, ...]]:
        if reads is not None:
            reads.append(after)
        return [r for r in data if r[0] > after][:limit]

    return Source(stem="t", sheet="Rows", columns=COLUMNS, page=page, key=lambda r: int(r[0]))


async def collected(chunks: AsyncIterator[bytes]) -> list[bytes]:
    return [c async for c in chunks]


@pytest.mark.parametrize(
    ("text", "cell"),
    [
        ("=1+2", "'=1+2"),
        ("+SUM(A1)", "'+SUM(A1)"),
        ("-2+3", "'-2+3"),
        ("@cmd", "'@cmd"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("＝1+2", "'＝1+2"),
        ("+56911111111", "+56911111111"),  # a phone: a plain number stays as it is
        ("-5", "-5"),
        ("1,5", "1,5"),
        ("Ana = Luis", "Ana = Luis"),
        ("", ""),
        (None, ""),
    ],
)
def test_text_that_a_spreadsheet_would_run_is_neutralised(text: str | None, cell: str) -> None:
    assert neutral(text) == cell


async def test_csv_has_a_bom_a_header_and_every_row_once_in_whole_chunks() -> None:
    data = rows(2 * PAGE_ROWS + 7)
    reads: list[int] = []
    chunks = await collected(exports.csv_chunks(source(data, reads)))
    assert reads == [0, PAGE_ROWS, 2 * PAGE_ROWS]  # keyset pages, each after the last key
    assert chunks[0].startswith(b"\xef\xbb\xbf") and chunks[0].endswith(b"active\r\n")
    assert all(len(c) == CHUNK_BYTES for c in chunks[1:-1]) and 0 < len(chunks[-1]) <= CHUNK_BYTES
    table = list(csv.reader(io.StringIO(b"".join(chunks).decode("utf-8-sig"))))
    assert table[0] == ["id", "name", "at", "on", "amount", "active"]
    assert [int(r[0]) for r in table[1:]] == [r[0] for r in data]
    assert table[1] == ["1", "Cliente 1", "2026-12-06 17:52:30", "2026-12-24", "1234.5", "FALSE"]
    assert table[1000][1] == "'=cmd 1000"


async def test_an_empty_export_is_its_header() -> None:
    chunks = await collected(exports.csv_chunks(source([])))
    assert b"".join(chunks) == b"\xef\xbb\xbfid,name,at,on,amount,active\r\n"


async def test_xlsx_has_typed_cells_under_a_frozen_header_and_fills_sheet_after_sheet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(exports, "SHEET_ROWS", 1001)  # a header and 1,000 rows a sheet
    data = rows(2500)
    book = load_workbook(io.BytesIO(b"".join(await collected(exports.xlsx_chunks(source(data))))))
    assert book.sheetnames == ["Rows", "Rows 2", "Rows 3"]
    seen = []
    for sheet in book.worksheets:
        assert sheet.freeze_panes == "A2"
        table = list(sheet.iter_rows(values_only=True))
        assert table[0] == ("id", "name", "at", "on", "amount", "active")
        seen += [r[0] for r in table[1:]]
    assert seen == [r[0] for r in data]
    first = next(book.worksheets[0].iter_rows(min_row=2, max_row=2, values_only=True))
    assert first == (1, "Cliente 1", AT.replace(tzinfo=None), datetime(2026, 12, 24), 1234.5, False)
    assert book.worksheets[0]["B1001"].value == "'=cmd 1000"
    assert book.worksheets[0]["C2"].number_format == "yyyy-mm-dd hh:mm:ss"
    assert book.worksheets[0]["E2"].number_format == "#,##0.00"
    assert book.worksheets[0]["A1"].font.b  # a bold header
    assert book.worksheets[0].column_dimensions["A"].width == 14


async def test_a_sheet_whose_xml_would_pass_its_byte_limit_goes_on_to_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(exports, "SHEET_BYTES", 3_000_000)  # two pages' XML a sheet
    data = rows(4 * PAGE_ROWS)
    made = b"".join(await collected(exports.xlsx_chunks(source(data))))
    with zipfile.ZipFile(io.BytesIO(made)) as z:
        sheets = [n for n in z.namelist() if n.startswith("xl/worksheets/")]
        assert len(sheets) > 1 and all(z.getinfo(n).file_size <= 3_000_000 for n in sheets)
    book = load_workbook(io.BytesIO(made))
    seen = [r[0] for sheet in book.worksheets for r in sheet.iter_rows(min_row=2, values_only=True)]
    assert seen == [r[0] for r in data]


@pytest.mark.parametrize(
    ("text", "xml"),
    [
        ("plain", "plain"),
        ("a < b & c > d", "a &lt; b &amp; c &gt; d"),
        ("bell\x07 nul\x00 vt\x0b ff\x0c esc\x1b", "bell nul vt ff esc"),
        ("tab\tnewline\n", "tab\tnewline\n"),  # the whitespace XML 1.0 allows stays
        ("cr\r", "cr&#13;"),  # XML would read a bare carriage return as a newline
        ("lone \ud800 surrogate \ufffe", "lone  surrogate "),
        ("_x000D_ stays text", "_x005F_x000D_ stays text"),  # Excel's own escape, escaped
        ("ñandú 🎉", "ñandú 🎉"),
    ],
)
def test_text_is_escaped_and_cleaned_for_xml(text: str, xml: str) -> None:
    assert xml_text(text) == xml


async def test_xlsx_cells_keep_their_text_and_spaces_and_leave_out_what_xml_cannot_hold() -> None:
    columns = (Column("id", INTEGER), Column("text", TEXT), Column("n", NUMBER))
    data = [
        (1, "  <b>Tom & Jerry</b>  ", 2.5),
        (2, "bad\x00\x1fchars\ufffe", float("nan")),  # NaN has no cell
        (3, "x" * 40_000, 1),  # longer than a cell holds: cut to Excel's limit
    ]

    async def page(after: int, limit: int) -> list[tuple[Any, ...]]:
        return [r for r in data if r[0] > after][:limit]

    made = b"".join(await collected(exports.xlsx_chunks(Source("t", "T", columns, page, lambda r: int(r[0])))))
    with zipfile.ZipFile(io.BytesIO(made)) as z:
        assert z.testzip() is None
        assert set(z.namelist()) >= {
            "[Content_Types].xml",
            "_rels/.rels",
            "xl/workbook.xml",
            "xl/_rels/workbook.xml.rels",
            "xl/styles.xml",
            "xl/worksheets/sheet1.xml",
        }
        assert b'xml:space="preserve"' in z.read("xl/worksheets/sheet1.xml")
    sheet = load_workbook(io.BytesIO(made)).worksheets[0]
    assert [c.value for c in sheet[2]] == [1, "  <b>Tom & Jerry</b>  ", 2.5]
    assert [c.value for c in sheet[3]] == [2, "badchars", None]
    assert len(sheet["B4"].value) == exports.CELL_CHARS


async def test_xlsx_sends_its_first_bytes_before_its_last_page_is_read() -> None:
    data = rows(3 * PAGE_ROWS)
    last_page = asyncio.Event()

    async def page(after: int, limit: int) -> list[tuple[Any, ...]]:
        if after >= 2 * PAGE_ROWS:
            await last_page.wait()  # the last page is held back until the test lets it go
        return [r for r in data if r[0] > after][:limit]

    chunks = exports.xlsx_chunks(Source("t", "Rows", COLUMNS, page, lambda r: int(r[0])))
    sent = [await anext(chunks)]
    assert sent[0].startswith(b"PK\x03\x04")  # the zip's first local header, at once
    while len(b"".join(sent)) < 20_000:  # the first pages' deflated rows, the last not read yet
        sent.append(await asyncio.wait_for(anext(chunks), 10))
    assert not last_page.is_set()
    last_page.set()
    sent += await collected(chunks)
    book = load_workbook(io.BytesIO(b"".join(sent)))
    assert book.worksheets[0].max_row == len(data) + 1


async def test_a_workbook_given_up_midway_stops_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    chunks = exports.xlsx_chunks(source(rows(10 * PAGE_ROWS), reads))
    async for _ in chunks:
        if len(reads) >= 3:
            break
    await chunks.aclose()
    await asyncio.sleep(0.05)
    assert len(reads) <= 4  # the page being read ahead, no more
