"""The rows of an uploaded file: the first sheet of a workbook (calamine) or a UTF-8 CSV.

Workbooks (.xlsx, .xls) are read with calamine (Rust). openpyxl's read-only mode streams in
bounded memory but reads a 100,000-row, 45-column export in about 50 s (2,000 rows/s) on the
2-core machine, against calamine's 3 to 4 s. calamine holds the first sheet in memory while it
is read: about 300 MB for that export (bench/excel_ingest.py). Before it is handed an .xlsx, every
part of the archive is inflated once, counting, against the limits of `contacts.xlsx`, since
calamine trusts the sizes the archive declares.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path, PurePath

import python_calamine

from services.campaigns.contacts.xlsx import BadFile as BadFile
from services.campaigns.contacts.xlsx import Unsupported, XlsxRows, check_inflated_sizes

SNIFF_BYTES = 8192

_ZIP_MAGIC = b"PK\x03\x04"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_WORKBOOK_SUFFIXES = frozenset({".xlsx", ".xlsm", ".xls"})
_TEXT_SUFFIXES = frozenset({".csv", ".txt"})
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CSV_DELIMITERS = ",;|\t"


def read_rows(path: Path, filename: str) -> Iterator[tuple[int, list]]:
    """(row number, cells) of the first sheet or the CSV, the header row included.

    The content decides how a file is read, so that an .xls that is really an .xlsx (a
    common rename) still opens; the name only makes a non-workbook a CSV or an error.
    """
    suffix = PurePath(filename).suffix.lower()
    with path.open("rb") as file:
        head = file.read(SNIFF_BYTES)
    if not head:
        raise BadFile("the file is empty")
    if head.startswith(_ZIP_MAGIC):
        # calamine inflates what the archive holds as far as it goes: bounded here first.
        check_inflated_sizes(path)
    if head.startswith((_ZIP_MAGIC, _OLE_MAGIC)):
        return _workbook_rows(path)
    if suffix in _WORKBOOK_SUFFIXES:
        raise BadFile(f"the file is named {suffix} but is not an Excel workbook: open it in Excel and save it again")
    if suffix not in _TEXT_SUFFIXES:
        raise BadFile(f"unsupported file type '{suffix or filename}': upload an .xlsx, .xls or .csv file")
    if head.startswith(_UTF16_BOMS):
        raise BadFile("the file is not UTF-8 text: it is UTF-16, save it as 'CSV UTF-8'")
    if _CONTROL_BYTES.search(head):
        raise BadFile("the file looks binary, not CSV text")
    return _csv_rows(path)


class RowSource:
    """A file's rows as the parser takes them: the header and the first data row whole, then
    the rest, of which only the parser's columns need reading."""

    def __init__(self, path: Path, filename: str) -> None:
        self._fast: XlsxRows | None = None
        self._rows: Iterator[tuple[int, list]] = iter(())
        with path.open("rb") as file:
            zipped = file.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
        if zipped:
            try:
                self._fast = XlsxRows(path)
                self._rows = iter(self._fast.leading_rows())
            except Unsupported:
                if self._fast is not None:
                    self._fast.close()
                self._fast = None
            except BadFile:
                if self._fast is not None:
                    self._fast.close()
                raise
        if self._fast is None:
            self._rows = read_rows(path, filename)

    def header_and_first(self) -> tuple[tuple[int, list] | None, tuple[int, list] | None]:
        header = next_filled(self._rows)
        return header, (next_filled(self._rows) if header else None)

    def rest(self, columns: Iterable[int], width: int) -> Iterator[tuple[int, list]]:
        yield from self._rows
        if self._fast is not None:
            try:
                yield from self._fast.rest(columns, width)
            finally:
                self._fast.close()


def _workbook_rows(path: Path) -> Iterator[tuple[int, list]]:
    try:
        workbook = _open_workbook(path)
        if not workbook.sheet_names:
            raise BadFile("the workbook has no sheets")
        sheet = workbook.get_sheet_by_index(0)
    except python_calamine.PasswordError:
        raise BadFile("the workbook is password-protected: save it without a password") from None
    except python_calamine.CalamineError as exc:
        raise BadFile(
            f"the file is not a readable Excel workbook ({exc}): open it in Excel and save it again as .xlsx"
        ) from None
    # Rows start at the sheet's first row, whatever its first used one: the numbers are Excel's.
    return enumerate(sheet.iter_rows(), start=1)


def _open_workbook(path: Path) -> python_calamine.CalamineWorkbook:
    """By path, which reads the archive from disk, unless the path's suffix misleads calamine.

    calamine picks the format by the suffix when it knows it, so an .xlsx spooled as ".xls"
    fails by path; the file's bytes in memory are then sniffed instead.
    """
    try:
        return python_calamine.CalamineWorkbook.from_path(path)
    except python_calamine.CalamineError:
        with path.open("rb") as file:
            return python_calamine.CalamineWorkbook.from_filelike(file)


def _csv_rows(path: Path) -> Iterator[tuple[int, list]]:
    lines = _utf8_lines(path)
    first = next(lines, "")
    delimiter = max(_CSV_DELIMITERS, key=first.count) if first.strip() else ","
    number = 0
    try:
        for number, cells in enumerate(csv.reader(chain([first], lines), delimiter=delimiter), start=1):
            yield number, cells
    except csv.Error as exc:
        raise BadFile(f"the CSV is malformed (row {number + 1}): {exc}") from None


def _utf8_lines(path: Path) -> Iterator[str]:
    """The file's lines, decoded one by one so that a bad byte is reported on its own line."""
    with path.open("rb") as file:
        for line_no, line in enumerate(file, start=1):
            try:
                text = line.decode()
            except UnicodeDecodeError:
                raise BadFile(f"the file is not UTF-8 text (line {line_no}): save it as 'CSV UTF-8'") from None
            # The BOM that Excel's "CSV UTF-8" writes.
            yield text[1:] if line_no == 1 and text.startswith("\ufeff") else text


def _is_blank(cells: Iterable[object]) -> bool:
    return all(value is None or (isinstance(value, str) and not value.strip()) for value in cells)


def next_filled(rows: Iterator[tuple[int, list]]) -> tuple[int, list] | None:
    return next(((number, cells) for number, cells in rows if not _is_blank(cells)), None)
