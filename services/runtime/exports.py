"""Streaming export writers, shared by the services that export rows (campaigns: results, jobs,
messages, the address book; accounts: the ledger): a file made while its rows are read and
sent while it is made, so the first byte goes out at once and memory stays flat whatever the
number of rows.

Rows come in keyset pages (PAGE_ROWS a query, `key > last ORDER BY key`), each page its own
statement: no transaction or connection is held while a client downloads, and a changing
table's export shows each row as it was when its page was read. The next page is read while
the current one is written.

CSV is UTF-8 with a BOM (so Excel reads it as UTF-8) and a header row; both go out before the
first page is read.

XLSX is a zip of XML parts, written here with zipfile onto a sink that cannot seek: each part's
sizes then follow its data (a data descriptor) instead of being patched into its header, so
every byte can leave as soon as it is deflated. The worksheets come first (the first sheet's
header goes out before a row is read), the parts that list them (workbook, relationships,
content types) last, once it is known how many sheets there are; a zip's central directory
comes last anyway. Sheet XML is made per page with inline strings (no shared string table:
that would have to sit in memory until the end), its cells typed: numbers as numbers, times
and dates as Excel serial numbers in a date format, money in a money format, flags as
booleans; under a bold, frozen header row, in columns of set widths. A sheet holds Excel's
1,048,576 rows at most, and less than 4 GiB of XML (so no part needs ZIP64, which some
readers of streamed zips refuse); the rows go on in a next sheet. A sheet states no size (no
`<dimension>`: it is not known when the sheet starts); spreadsheets count the rows themselves,
and openpyxl's read-only mode has no max_row to give. A page's XML and its deflating run in a
worker thread, so the service's event loop keeps its turns; nothing is written to disk, so a
download given up leaves nothing behind.

Text cells are neutralised against formula injection in both formats: text starting with =,
+, -, @, a tab or a carriage return (or the full-width = + - @ some spreadsheets also take for
a formula) gets a leading apostrophe. A plain number (a phone `+56911111111`, an amount `-5`)
is left as it is: no spreadsheet reads a formula into it, and its digits stay usable.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import io
import re
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

FORMATS = ("csv", "xlsx")
PAGE_ROWS = 5_000
CHUNK_BYTES = 64 * 1024
CONTENT_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}
# Rows of an XLSX worksheet, the header included (Excel's limit): more go on to a next sheet.
SHEET_ROWS = 1_048_576
# A worksheet's XML stays under 4 GiB, the most a zip entry holds without ZIP64.
SHEET_BYTES = 2**32 - 2**26
# Deflate level 1: 200,000 bulk results (the bench's rows) are written at 129,000 rows/s into
# 9.3 MB at level 1, at 87,000 rows/s into 7.5 MB at level 6: a quarter more bytes for half
# as much again of the export's time, and the rate is what the million-row target is about.
COMPRESS_LEVEL = 1
# Excel's limit for one cell's text; a longer one makes it call the file damaged.
CELL_CHARS = 32_767

# Kinds of cell: how a column's values are written.
TEXT, INTEGER, NUMBER, MONEY, TIME, DATE, FLAG = "text", "integer", "number", "money", "time", "date", "flag"

_FORMULA_STARTS = frozenset("=+-@\t\r＝＋－＠")
_PLAIN_NUMBER = re.compile(r"[+-]?[0-9][0-9.,]*")
# Excel's day 0 (its serial dates count days from 1899-12-30, as date.toordinal() from 0001-01-01).
_EXCEL_EPOCH_ORDINAL = date(1899, 12, 30).toordinal()
_UNIX_EPOCH_SERIAL = 25569.0  # 1970-01-01 as an Excel serial date


def neutral(text: str | None) -> str:
    """The text as a cell that no spreadsheet evaluates."""
    if not text:
        return ""
    if text[0] in _FORMULA_STARTS and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


@dataclass(frozen=True, slots=True)
class Column:
    title: str
    kind: str = TEXT
    width: float = 14


def _as_is(row: Any) -> Sequence[Any]:
    return row  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Source:
    """What one export reads: its columns, a page of rows after a key, a row's key and cells.

    A row may hold more values than there are columns (the key, at the end): only as many as
    there are columns are written."""

    stem: str  # the file's name, without its extension
    sheet: str  # the worksheet's name (31 characters at most, none of []:*?/\)
    columns: tuple[Column, ...]
    page: Callable[[int, int], Awaitable[Sequence[Any]]]  # (after key, limit) → rows
    key: Callable[[Any], int]
    cells: Callable[[Any], Sequence[Any]] = field(default=_as_is)


@dataclass(frozen=True)
class Export:
    source: Source
    format: str

    @property
    def file_name(self) -> str:
        return f"{self.source.stem}.{self.format}"

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    def chunks(self) -> AsyncIterator[bytes]:
        return csv_chunks(self.source) if self.format == "csv" else xlsx_chunks(self.source)


async def pages(source: Source, *, size: int = PAGE_ROWS) -> AsyncIterator[Sequence[Any]]:
    """The source's rows in keyset pages; the next page is read while the caller works on this one."""
    reading = asyncio.ensure_future(source.page(0, size))
    try:
        while True:
            rows = await reading
            if len(rows) < size:
                if rows:
                    yield rows
                return
            reading = asyncio.ensure_future(source.page(source.key(rows[-1]), size))
            yield rows
    finally:
        if not reading.done():
            reading.cancel()


async def _in_thread(call: Callable[..., Any], *args: Any) -> Any:
    """call(*args) in a worker thread. A caller cancelled meanwhile (its client went away)
    still waits for it to end, since a thread cannot be stopped: nothing is then writing into
    the export's state as the generator that owns it is closed."""
    task = asyncio.ensure_future(asyncio.to_thread(call, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


# --- CSV -------------------------------------------------------------------------------------


def _csv_time(value: datetime | None) -> str:
    # UTC, as the database hands it; "YYYY-MM-DD HH:MM:SS" is what spreadsheets read as a time.
    return "" if value is None else value.isoformat(" ", "seconds")[:19]


def _csv_date(value: date | None) -> str:
    return "" if value is None else value.isoformat()


def _csv_flag(value: bool | None) -> str:
    return "" if value is None else ("TRUE" if value else "FALSE")


# Numbers pass as they are: the csv module writes str() of each, and None as an empty cell.
_CSV_CELLS: dict[str, Callable[[Any], Any] | None] = {
    TEXT: neutral,
    INTEGER: None,
    NUMBER: None,
    MONEY: None,
    TIME: _csv_time,
    DATE: _csv_date,
    FLAG: _csv_flag,
}


def _taken(buffer: io.StringIO) -> bytes:
    data = buffer.getvalue().encode()
    buffer.seek(0)
    buffer.truncate()
    return data


async def csv_chunks(source: Source) -> AsyncIterator[bytes]:
    """The file in chunks of CHUNK_BYTES (the last shorter); the BOM and header come first, at once."""
    buffer = io.StringIO()
    out = csv.writer(buffer)
    out.writerow([c.title for c in source.columns])
    yield codecs.BOM_UTF8 + _taken(buffer)
    formats = [_CSV_CELLS[c.kind] for c in source.columns]
    cells = source.cells
    held = bytearray()
    async for rows in pages(source):
        out.writerows([v if f is None else f(v) for f, v in zip(formats, cells(r), strict=False)] for r in rows)
        held += _taken(buffer)
        whole = len(held) - len(held) % CHUNK_BYTES
        for start in range(0, whole, CHUNK_BYTES):
            yield bytes(held[start : start + CHUNK_BYTES])
        del held[:whole]
    if held:
        yield bytes(held)


# --- XLSX ------------------------------------------------------------------------------------

_MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_DOC_RELS = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_PKG_RELS = "http://schemas.openxmlformats.org/package/2006/relationships"
_HEAD = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'

# Styles by index (cellXfs in _STYLES): the header's bold, then the number formats.
_BOLD, _TIME_STYLE, _DATE_STYLE, _MONEY_STYLE = 1, 2, 3, 4
_STYLES = f"""{_HEAD}<styleSheet xmlns="{_MAIN}">\
<numFmts count="3"><numFmt numFmtId="164" formatCode="yyyy-mm-dd hh:mm:ss"/>\
<numFmt numFmtId="165" formatCode="yyyy-mm-dd"/><numFmt numFmtId="166" formatCode="#,##0.00"/></numFmts>\
<fonts count="2"><font><sz val="11"/><name val="Calibri"/><family val="2"/></font>\
<font><b/><sz val="11"/><name val="Calibri"/><family val="2"/></font></fonts>\
<fills count="2"><fill><patternFill patternType="none"/></fill>\
<fill><patternFill patternType="gray125"/></fill></fills>\
<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border></borders>\
<cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/></cellStyleXfs>\
<cellXfs count="5"><xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/>\
<xf numFmtId="0" fontId="1" fillId="0" borderId="0" xfId="0" applyFont="1"/>\
<xf numFmtId="164" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/>\
<xf numFmtId="165" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/>\
<xf numFmtId="166" fontId="0" fillId="0" borderId="0" xfId="0" applyNumberFormat="1"/></cellXfs>\
<cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/></cellStyles>\
</styleSheet>"""
_ROOT_RELS = f"""{_HEAD}<Relationships xmlns="{_PKG_RELS}">\
<Relationship Id="rId1" Type="{_DOC_RELS}/officeDocument" Target="xl/workbook.xml"/></Relationships>"""

# Text that needs more than copying into the XML: markup characters, a carriage return (which
# XML would read as a newline), characters XML 1.0 forbids (control characters, lone
# surrogates, U+FFFE/U+FFFF: removed) and Excel's own escapes (`_x000D_` would be read as a
# carriage return: its underscore is escaped as `_x005F_`).
_NEEDS_ESCAPE = re.compile("[&<>\r\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]|_x[0-9A-Fa-f]{4}_")
_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_EXCEL_ESCAPE = re.compile("_(?=x[0-9A-Fa-f]{4}_)")
_SPACES = " \t\n\r"


def column_letters(index: int) -> str:
    """The spreadsheet name of the 0-based column: A … Z, AA … (the contact workbooks' reader
    names columns the same way)."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(65 + rest) + letters
    return letters


def xml_text(text: str) -> str:
    """The text as the content of an element: escaped, and without what XML 1.0 cannot hold."""
    if len(text) > CELL_CHARS:
        text = text[:CELL_CHARS]
    if not _NEEDS_ESCAPE.search(text):
        return text
    text = _ILLEGAL.sub("", text)
    text = _EXCEL_ESCAPE.sub("_x005F_", text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")


def _text_cell(ref: str, text: str, style: str = "") -> str:
    body = xml_text(text)
    # Leading or trailing spaces survive only where the element says so.
    if text[0] in _SPACES or text[-1] in _SPACES:
        return f'<c r="{ref}"{style} t="inlineStr"><is><t xml:space="preserve">{body}</t></is></c>'
    return f'<c r="{ref}"{style} t="inlineStr"><is><t>{body}</t></is></c>'


def _neutral_cell(ref: str, text: str) -> str:
    # neutral(), inlined: most text starts with none of these.
    if text[0] in _FORMULA_STARTS and not _PLAIN_NUMBER.fullmatch(text):
        text = "'" + text
    return _text_cell(ref, text)


def _float(value: Any) -> str:
    number = float(value)
    # NaN and the infinities have no spelling in a cell: the cell is left empty.
    return repr(number) if number - number == 0 else ""


def _time_serial(value: datetime) -> str:
    # UTC, as the database hands it (a spreadsheet's times have no zone); a naive time is taken as UTC.
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return repr(value.timestamp() / 86400 + _UNIX_EPOCH_SERIAL)


def _number_cell(ref: str, number: str, style: str = "") -> str:
    return f'<c r="{ref}"{style}><v>{number}</v></c>' if number else ""


# One writer per kind: (cell reference, value not None nor "") → the cell's XML.
_XLSX_CELLS: dict[str, Callable[[str, Any], str]] = {
    TEXT: _neutral_cell,
    INTEGER: lambda r, v: f'<c r="{r}"><v>{int(v)}</v></c>',
    NUMBER: lambda r, v: _number_cell(r, _float(v)),
    MONEY: lambda r, v: _number_cell(r, _float(v), f' s="{_MONEY_STYLE}"'),
    TIME: lambda r, v: f'<c r="{r}" s="{_TIME_STYLE}"><v>{_time_serial(v)}</v></c>',
    DATE: lambda r, v: f'<c r="{r}" s="{_DATE_STYLE}"><v>{v.toordinal() - _EXCEL_EPOCH_ORDINAL}</v></c>',
    FLAG: lambda r, v: f'<c r="{r}" t="b"><v>{1 if v else 0}</v></c>',
}


class _Sink:
    """Where zipfile writes: bytes kept until taken. It cannot seek, so zipfile writes each
    part's sizes after its data and never goes back over what was taken."""

    def __init__(self) -> None:
        self.held = bytearray()

    def write(self, data: bytes) -> int:
        self.held += data
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        data = bytes(self.held)
        self.held.clear()
        return data


class XlsxWriter:
    """One workbook of typed cells, written page by page onto a sink whose bytes are taken as
    they are made. Not thread-safe: one caller at a time (the export, from its worker thread)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.sink = _Sink()
        self.zip = zipfile.ZipFile(self.sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=COMPRESS_LEVEL)
        self.letters = [column_letters(i) for i in range(len(source.columns))]
        self.writers = [_XLSX_CELLS[c.kind] for c in source.columns]
        self.sheets = 0
        self.part: Any = None  # the open worksheet's zip entry
        self.row = 0  # the last row written in the open sheet
        self.written = 0  # bytes of the open sheet's XML
        self._new_sheet()

    def _new_sheet(self) -> None:
        self._end_sheet()
        self.sheets += 1
        # Our own sizes bound the part below 4 GiB: no ZIP64 records.
        self.part = self.zip.open(f"xl/worksheets/sheet{self.sheets}.xml", "w", force_zip64=False)
        self.written = 0
        widths = "".join(
            f'<col min="{n}" max="{n}" width="{c.width}" customWidth="1"/>'
            for n, c in enumerate(self.source.columns, start=1)
        )
        header = "".join(
            _text_cell(f"{letter}1", c.title, f' s="{_BOLD}"')
            for letter, c in zip(self.letters, self.source.columns, strict=True)
        )
        selected = ' tabSelected="1"' if self.sheets == 1 else ""
        self._put(
            f'{_HEAD}<worksheet xmlns="{_MAIN}" xmlns:r="{_DOC_RELS}">'
            f'<sheetViews><sheetView workbookViewId="0"{selected}>'
            '<pane ySplit="1" topLeftCell="A2" activePane="bottomLeft" state="frozen"/>'
            '<selection pane="bottomLeft" activeCell="A2" sqref="A2"/></sheetView></sheetViews>'
            f'<sheetFormatPr defaultRowHeight="15"/><cols>{widths}</cols>'
            f'<sheetData><row r="1">{header}</row>'
        )
        self.row = 1

    def _end_sheet(self) -> None:
        if self.part is not None:
            self._put("</sheetData></worksheet>")
            self.part.close()
            self.part = None

    def _put(self, xml: str) -> None:
        data = xml.encode()
        self.part.write(data)
        self.written += len(data)

    def _rows_xml(self, rows: Sequence[Any], first: int) -> str:
        cells, letters, writers = self.source.cells, self.letters, self.writers
        parts = []
        n = first
        for record in rows:
            number = str(n)
            parts.append(f'<row r="{number}">')
            for letter, write, value in zip(letters, writers, cells(record), strict=False):
                if value is not None and value != "":  # an empty cell is no cell
                    parts.append(write(letter + number, value))
            parts.append("</row>")
            n += 1
        return "".join(parts)

    def write(self, rows: Sequence[Any]) -> bytes:
        """The page's rows, going on to a next sheet when this one is full; the bytes made so far."""
        while rows:
            if self.row == SHEET_ROWS:
                self._new_sheet()
            fit = rows[: SHEET_ROWS - self.row]
            xml = self._rows_xml(fit, self.row + 1).encode()
            if self.written + len(xml) > SHEET_BYTES and self.row > 1:
                self._new_sheet()  # this sheet's XML is near 4 GiB: the page starts the next one
                continue
            self.part.write(xml)
            self.written += len(xml)
            self.row += len(fit)
            rows = rows[len(fit) :]
        return self.sink.take()

    def close(self) -> bytes:
        """The workbook's last parts and the zip's directory: the file's last bytes."""
        self._end_sheet()
        names = [self.source.sheet if n == 1 else f"{self.source.sheet} {n}" for n in range(1, self.sheets + 1)]
        numbers = range(1, self.sheets + 1)
        sheets = "".join(
            f'<sheet name="{xml_text(name)}" sheetId="{n}" r:id="rId{n}"/>'
            for n, name in zip(numbers, names, strict=True)
        )
        rels = "".join(
            f'<Relationship Id="rId{n}" Type="{_DOC_RELS}/worksheet" Target="worksheets/sheet{n}.xml"/>'
            for n in numbers
        )
        rels += f'<Relationship Id="rId{self.sheets + 1}" Type="{_DOC_RELS}/styles" Target="styles.xml"/>'
        overrides = "".join(
            f'<Override PartName="/xl/worksheets/sheet{n}.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
            for n in numbers
        )
        parts = {
            "xl/workbook.xml": f'{_HEAD}<workbook xmlns="{_MAIN}" xmlns:r="{_DOC_RELS}">'
            f'<bookViews><workbookView activeTab="0"/></bookViews><sheets>{sheets}</sheets></workbook>',
            "xl/_rels/workbook.xml.rels": f'{_HEAD}<Relationships xmlns="{_PKG_RELS}">{rels}</Relationships>',
            "xl/styles.xml": _STYLES,
            "_rels/.rels": _ROOT_RELS,
            "[Content_Types].xml": f'{_HEAD}<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/xl/workbook.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
            '<Override PartName="/xl/styles.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.styles+xml"/>'
            f"{overrides}</Types>",
        }
        for name, xml in parts.items():
            with self.zip.open(name, "w") as part:
                part.write(xml.encode())
        self.zip.close()
        return self.sink.take()


async def xlsx_chunks(source: Source) -> AsyncIterator[bytes]:
    """The workbook in chunks of at most CHUNK_BYTES, each sent as soon as it is deflated: the
    zip's first header and the sheet's start at once, then each page's rows."""
    book = XlsxWriter(source)
    for chunk in _split(book.sink.take()):
        yield chunk
    async for rows in pages(source):
        for chunk in _split(await _in_thread(book.write, rows)):
            yield chunk
    for chunk in _split(await _in_thread(book.close)):
        yield chunk


def _split(data: bytes) -> list[bytes]:
    return [data[start : start + CHUNK_BYTES] for start in range(0, len(data), CHUNK_BYTES)]
