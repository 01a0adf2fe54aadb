"""The export writers on rows of their own (no database): every row once, in pages and in
chunks of the set size, text neutralised, cells typed, and a workbook that outgrows a sheet
going on to the next. The whole path, with the database and the gateway, is
tests/e2e/test_exports.py."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from openpyxl import load_workbook

from services.campaigns import exports
from services.campaigns.exports import (
    CHUNK_BYTES,
    DATE,
    FLAG,
    INTEGER,
    MONEY,
    PAGE_ROWS,
    TEXT,
    TIME,
    Column,
    Source,
    neutral,
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
