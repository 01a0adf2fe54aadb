"""Workbooks built to exhaust the reader (zip bombs, rows without end, sizes that lie) are refused
with a message naming the limit and the part, in bounded memory and time, by the streaming
reader and before calamine is handed them."""

from __future__ import annotations

import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

import pytest

from services.campaigns import contacts
from services.campaigns.contacts import BadFile, TooManyRows, parse_contacts, xlsx
from services.campaigns.contacts.reading import RowSource
from services.campaigns.contacts.xlsx import XlsxRows, check_inflated_sizes
from tests.workbook_bombs import (
    MIB,
    SHARED_STRINGS,
    SHEET,
    declare,
    huge_shared_strings,
    many_cells,
    one_huge_cell,
    plain_workbook,
    sheet_with_row,
    with_part,
)


def refused(read: Callable[[], object], words: str) -> tuple[int, float]:
    """read() raises BadFile matching `words`: (peak bytes allocated, seconds) while it ran."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(BadFile, match=words):
            read()
        return tracemalloc.get_traced_memory()[1], time.monotonic() - started
    finally:
        tracemalloc.stop()


def rows_of(path: Path) -> list[object]:
    """Every row RowSource gives, as the parsers read it."""
    source = RowSource(path, path.name)
    source.header_and_first()
    return list(source.rest([0, 1, 2], 3))


def prefixed(path: Path) -> Path:
    """The same workbook with the prefixed workbook XML that the streaming reader leaves to calamine."""
    out = path.with_name("prefixed-" + path.name)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "xl/workbook.xml":
                data = data.replace(b"<workbook ", b'<x:workbook xmlns:x="x" ').replace(b"<sheets>", b"<x:sheets>")
            dst.writestr(item, data)
    return out


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    return plain_workbook(tmp_path / "plain.xlsx")


@pytest.fixture(scope="module")
def strings_bomb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """80 MiB of shared strings in an archive of about 100 KiB."""
    tmp = tmp_path_factory.mktemp("bomb")
    path = with_part(
        plain_workbook(tmp / "plain.xlsx"), tmp / "strings.xlsx", SHARED_STRINGS, huge_shared_strings(80 * MIB)
    )
    assert path.stat().st_size < 2 * MIB
    yield path


def test_the_plain_workbook_reads(plain: Path) -> None:
    source = RowSource(plain, plain.name)
    assert source._fast is not None
    header, first = source.header_and_first()
    assert header is not None and first is not None and first[1][1] == "Ana"
    check_inflated_sizes(plain)


def test_huge_shared_strings_are_refused_by_the_directory(strings_bomb: Path) -> None:
    peak, seconds = refused(lambda: rows_of(strings_bomb), r"64 MiB in xl/sharedStrings\.xml")
    assert peak < 4 * MIB and seconds < 1


def test_counting_refuses_them_when_the_directory_is_not_read(
    strings_bomb: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The counting alone, as if the directory's sizes had passed: it stops at the limit.
    monkeypatch.setattr(xlsx, "check_declared_sizes", lambda archive, limit=None: None)
    monkeypatch.setattr(xlsx, "MAX_SHARED_STRINGS_BYTES", 4 * MIB)
    peak, seconds = refused(lambda: XlsxRows(strings_bomb), r"4 MiB in xl/sharedStrings\.xml")
    assert peak < 16 * MIB and seconds < 2


def test_sizes_that_lie_are_caught_while_inflating(strings_bomb: Path, tmp_path: Path) -> None:
    liar = tmp_path / "liar.xlsx"
    liar.write_bytes(strings_bomb.read_bytes())
    declare(liar, SHARED_STRINGS, 1_000)
    # The streaming reader gets no more than the declared bytes, which then fail their checksum.
    peak, seconds = refused(lambda: rows_of(liar), r"damaged \(xl/sharedStrings\.xml")
    assert peak < 4 * MIB and seconds < 1
    # Before calamine, every part is inflated once and counted against what it declares.
    peak, seconds = refused(
        lambda: check_inflated_sizes(liar), r"xl/sharedStrings\.xml inflates to more than the 1,000 bytes"
    )
    assert peak < 4 * MIB and seconds < 1
    # A workbook that the streaming reader leaves to calamine never reaches it.
    fallback = with_part(
        prefixed(plain_workbook(tmp_path / "p.xlsx")),
        tmp_path / "fallback.xlsx",
        SHARED_STRINGS,
        huge_shared_strings(80 * MIB),
    )
    declare(fallback, SHARED_STRINGS, 1_000)
    peak, seconds = refused(lambda: rows_of(fallback), r"inflates to more than the 1,000 bytes")
    assert peak < 4 * MIB and seconds < 1


def test_a_directory_that_declares_too_much_is_refused_before_inflating(plain: Path) -> None:
    declare(plain, SHEET, 400 * MIB)
    _, seconds = refused(lambda: rows_of(plain), r"more than 384 MiB.*xl/worksheets/sheet1\.xml alone declares")
    assert seconds < 1
    # calamine, which holds the whole sheet, is handed less.
    declare(plain, SHEET, 300 * MIB)
    _, seconds = refused(lambda: check_inflated_sizes(plain), r"more than 256 MiB.*sheet1\.xml alone declares")
    assert seconds < 1


def test_the_whole_workbook_is_counted_too(plain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = with_part(plain, tmp_path / "cells.xlsx", SHEET, sheet_with_row(one_huge_cell(12 * MIB)))
    monkeypatch.setattr(xlsx, "check_declared_sizes", lambda archive, limit=None: None)
    monkeypatch.setattr(xlsx, "MAX_INFLATED_BYTES", 4 * MIB)
    peak, seconds = refused(lambda: rows_of(path), r"4 MiB in xl/worksheets/sheet1\.xml, the limit for a workbook")
    assert peak < 8 * MIB and seconds < 1
    # And before calamine.
    monkeypatch.setattr(xlsx, "MAX_FALLBACK_INFLATED_BYTES", 4 * MIB)
    peak, seconds = refused(lambda: check_inflated_sizes(path), r"more than 4 MiB \(at xl/worksheets/sheet1\.xml\)")
    assert peak < 4 * MIB and seconds < 1


def test_a_row_of_a_million_cells_is_refused(plain: Path, tmp_path: Path) -> None:
    path = with_part(plain, tmp_path / "wide.xlsx", SHEET, sheet_with_row(many_cells(1_000_000)))
    peak, seconds = refused(lambda: rows_of(path), r"more than 16,384 cells")
    assert peak < 8 * MIB and seconds < 2  # the row is 27 MiB of XML


def test_a_wide_row_within_a_chunk_is_refused_too(plain: Path, tmp_path: Path) -> None:
    path = with_part(plain, tmp_path / "wide.xlsx", SHEET, sheet_with_row(many_cells(20_000)))
    refused(lambda: rows_of(path), r"row 2 has more than 16,384 cells")


def test_a_cell_beyond_excels_last_column_is_refused(plain: Path, tmp_path: Path) -> None:
    path = with_part(plain, tmp_path / "far.xlsx", SHEET, sheet_with_row([b'<c r="XFE2" t="n"><v>1</v></c>']))
    refused(lambda: rows_of(path), r"column XFE, beyond Excel's last column \(XFD\)")


def test_a_row_without_end_is_refused(plain: Path, tmp_path: Path) -> None:
    path = with_part(plain, tmp_path / "long.xlsx", SHEET, sheet_with_row(one_huge_cell(64 * MIB)))
    peak, seconds = refused(lambda: rows_of(path), r"more than 16 MiB of XML")
    assert peak < 40 * MIB and seconds < 2


def test_a_shared_string_that_is_not_there_is_refused(plain: Path, tmp_path: Path) -> None:
    path = with_part(plain, tmp_path / "ref.xlsx", SHEET, sheet_with_row([b'<c r="A2" t="s"><v>99999</v></c>']))
    refused(lambda: rows_of(path), r"shared string 99,999")


def test_rows_beyond_the_limit_are_too_many(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contacts, "MAX_ROWS", 3)
    path = tmp_path / "ar.csv"
    path.write_text("dni,nombre,telefono\n" + "".join(f"{20_000_000 + i},Ana,1136530{i:03d}\n" for i in range(5)))
    with pytest.raises(TooManyRows, match="more than 3 rows"):
        parse_contacts(path, path.name, today=date(2026, 12, 6))
