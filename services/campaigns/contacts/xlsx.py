"""A streaming reader of .xlsx sheets that decodes only the columns the parser uses.

Real exports carry 45 columns of which a debt-collection campaign reads seven. A general
reader (calamine) builds a Python value for every cell of the sheet, in memory: 4.5 million
for 100,000 rows, most of a second per 20,000 rows on the 2-core machine. Here the sheet's XML
is inflated in chunks and one regular expression, compiled for the wanted column letters,
finds their cells; the rest of the XML is skipped at the speed of the regex engine, and
memory stays at one chunk plus the shared-string table.

The header row and the first data row are read whole (their columns decide what is wanted).
Values come out as calamine gives them where it matters to the parser: text as str, numbers
as float (dates stay Excel serial numbers, which parse_date reads), booleans as bool.

Anything this reader does not expect (prefixed XML namespaces, cells without references,
a workbook layout it cannot follow) raises `Unsupported`, and the caller falls back to
calamine: a slower read, never a wrong one.

A workbook is a zip archive, and a few KiB of it can inflate to gigabytes. What its parts may
inflate to is bounded twice: by the sizes its directory declares, before anything is inflated
(`check_declared_sizes`), and by the bytes actually inflated as each part is read, since a
declared size can lie (this reader counts them as it reads; `check_inflated_sizes` inflates
every part once, counting, before calamine, which trusts the archive, is handed it). Rows are
bounded in cells and in XML bytes, so a row that never ends is not buffered without end. Past
a limit the file is refused with `BadFile`, never read by the other reader."""

from __future__ import annotations

import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from html import unescape
from pathlib import Path
from typing import IO

from services.runtime.exports import column_letters

CHUNK = 1 << 20

# A 100,000-row, 45-column export (bench/excel_ingest.py) is a 26 MiB file that inflates to
# 143 MiB, 13 MiB of it shared strings: the 64 MiB upload limit at that ratio is about 350 MiB.
# This reader holds a row at a time, whatever the sheet's size; calamine holds the whole sheet
# (about 2.3 times its XML), so what it is handed is bounded lower.
MAX_INFLATED_BYTES = 384 * 2**20  # all the parts of a workbook together
MAX_FALLBACK_INFLATED_BYTES = 256 * 2**20  # the same, for a workbook calamine reads
MAX_SHARED_STRINGS_BYTES = 64 * 2**20  # read whole
MAX_LAYOUT_BYTES = 16 * 2**20  # workbook.xml and its relationships, read whole: a few KiB in an export
MAX_PARTS = 10_000  # an export has a few dozen
MAX_CELLS_PER_ROW = 16_384  # Excel's own: columns A to XFD
MAX_ROW_BYTES = 16 * 2**20  # one row's XML, held whole while it is read
SHARED_STRINGS = "xl/sharedStrings.xml"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length

_SHEET = re.compile(rb'<sheet\b[^>]*?\br:id="([^"]+)"')
_REL = re.compile(rb"<Relationship\b([^>]*)/?>")
_REL_ID = re.compile(rb'\bId="([^"]+)"')
_REL_TARGET = re.compile(rb'\bTarget="([^"]+)"')
_SI = re.compile(rb"<si>(.*?)</si>|<si/>", re.S)
_T = re.compile(rb"<t(?:\s[^>]*)?>([^<]*)</t>|<t/>")
_ROW_END = b"</row>"
_ANY_CELL = re.compile(rb'<c r="([A-Z]{1,3})(\d+)"([^>]*?)(?:/>|>(.*?)</c>)', re.S)
_TYPE = re.compile(rb'\bt="([a-zA-Z]+)"')
_V = re.compile(rb"<v>([^<]*)</v>")
_CELL_START = b"<c "
# Markup only (text holds "<" as "&lt;"): Excel never writes a DTD, and its entities are what
# XML bombs are made of. This reader expands none, but a workbook that declares them is crafted.
_DTD = b"<!DOCTYPE"


class BadFile(Exception):
    """The file cannot be read at all; the message is shown to the user as it is."""


def _mib(size: int) -> str:
    return f"{size // 2**20:,} MiB" if size % 2**20 == 0 else f"{size:,} bytes"


def check_declared_sizes(archive: zipfile.ZipFile, limit: int | None = None) -> None:
    """BadFile for a workbook whose directory declares more than the limits (`limit` in all,
    MAX_INFLATED_BYTES by default), before any part is inflated."""
    limit = MAX_INFLATED_BYTES if limit is None else limit
    infos = archive.infolist()
    if len(infos) > MAX_PARTS:
        raise BadFile(f"the workbook has more than {MAX_PARTS:,} parts: it is not an Excel export")
    for info in infos:
        if info.filename == SHARED_STRINGS and info.file_size > MAX_SHARED_STRINGS_BYTES:
            raise _too_large(SHARED_STRINGS, MAX_SHARED_STRINGS_BYTES, "a workbook's shared strings")
    total = sum(info.file_size for info in infos)
    if total > limit:
        largest = max(infos, key=lambda info: info.file_size)
        raise BadFile(
            f"the workbook unpacks to more than {_mib(limit)}, the limit for a workbook "
            f"({largest.filename} alone declares {largest.file_size:,} bytes): remove what the campaign "
            "does not need, or upload a CSV"
        )


def _too_large(part: str, limit: int, what: str) -> BadFile:
    return BadFile(
        f"the workbook unpacks to more than {_mib(limit)} in {part}, the limit for {what}: "
        "remove what the campaign does not need, or upload a CSV"
    )


def check_inflated_sizes(path: Path) -> None:
    """BadFile for a workbook whose parts inflate beyond what its directory declares or beyond
    the limits, found by inflating each part once, in chunks, counting what comes out. An
    archive that does not open is left to the reader, which says what is wrong with it."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return
    try:
        with archive, path.open("rb") as file:
            check_declared_sizes(archive, MAX_FALLBACK_INFLATED_BYTES)
            budget = MAX_FALLBACK_INFLATED_BYTES
            for info in archive.infolist():
                budget -= _inflated_size(file, info, budget)
    except (zipfile.BadZipFile, zlib.error, struct.error, OSError) as exc:
        raise BadFile(f"the workbook is damaged ({exc}): open it in Excel and save it again") from None


def _inflated_size(file: IO[bytes], info: zipfile.ZipInfo, budget: int) -> int:
    limit = min(info.file_size, budget)
    if info.compress_type == zipfile.ZIP_STORED:
        size = info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        file.seek(info.header_offset)
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(file.read(_LOCAL_HEADER.size))
        if signature != b"PK\x03\x04":
            raise zipfile.BadZipFile(f"{info.filename} has no local header")
        file.seek(info.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        size, left = 0, info.compress_size
        while left > 0 and not inflater.eof:
            data = file.read(min(CHUNK, left))
            if not data:
                break
            left -= len(data)
            while data and not inflater.eof:
                size += len(inflater.decompress(data, CHUNK))
                if size > limit:
                    break
                data = inflater.unconsumed_tail
            if size > limit:
                break
    else:
        raise BadFile(f"{info.filename} is compressed with a method Excel does not use: save the workbook again")
    if size > info.file_size:
        raise BadFile(
            f"{info.filename} inflates to more than the {info.file_size:,} bytes the workbook declares: "
            "the file is damaged or crafted, not an Excel export"
        )
    if size > budget:
        raise BadFile(
            f"the workbook unpacks to more than {_mib(MAX_FALLBACK_INFLATED_BYTES)} (at {info.filename}), the limit "
            "for a workbook: remove what the campaign does not need, or upload a CSV"
        )
    return size


class SharedStrings:
    """The workbook's shared strings, decoded when first asked for: an export holds hundreds
    of thousands (one per distinct name or address) and the parser reads a few columns."""

    def __init__(self, xml: bytes) -> None:
        self._raw = _SI.findall(xml)
        self._decoded: dict[int, str] = {}

    def get(self, index: int) -> str:
        text = self._decoded.get(index)
        if text is None:
            if not 0 <= index < len(self._raw):
                raise BadFile(f"a cell refers to shared string {index:,}, which the workbook does not have")
            # Rich text splits a string into runs: its text is all the runs' <t> together.
            text = self._decoded[index] = _text(b"".join(_T.findall(self._raw[index])))
        return text


class Unsupported(Exception):
    """This workbook is read by the general reader instead."""


def column_index(letters: str) -> int:
    """0-based index of a column reference: A → 0, Z → 25, AA → 26."""
    index = 0
    for ch in letters:
        index = index * 26 + ord(ch) - 64
    return index - 1


def _text(raw: bytes) -> str:
    text = raw.decode()
    return unescape(text) if "&" in text else text


class XlsxRows:
    """The first sheet's rows: `header()`, `first()` whole, then `rows(columns)` partially."""

    def __init__(self, path: Path) -> None:
        # What is left of MAX_INFLATED_BYTES, as the parts are inflated.
        self._budget = MAX_INFLATED_BYTES
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise Unsupported(str(exc)) from exc
        try:
            check_declared_sizes(self._zip)
            sheet = self._first_sheet()
            self._strings = self._shared_strings()
            self._sheet = sheet
            self._stream = self._zip.open(sheet)
        except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, OSError) as exc:
            self._zip.close()
            raise Unsupported(str(exc)) from exc
        except BadFile:
            self._zip.close()
            raise
        # The sheet's XML after the last row end read, and the cells begun in it.
        self._buffer = bytearray()
        self._pending_cells = 0
        self._done = False

    def close(self) -> None:
        self._zip.close()

    # --- the workbook's layout ---

    def _read(self, part: str, limit: int, what: str) -> bytes:
        """A whole part, inflated in chunks and counted against `limit` and the budget."""
        pieces: list[bytes] = []
        size = 0
        with self._zip.open(part) as stream:
            while chunk := self._inflate(stream, part):
                size += len(chunk)
                if size > limit:
                    raise _too_large(part, limit, what)
                pieces.append(chunk)
        return b"".join(pieces)

    def _inflate(self, stream: IO[bytes], part: str) -> bytes:
        """The next chunk of a part, charged to the workbook's budget."""
        try:
            chunk = stream.read(CHUNK)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise BadFile(f"the workbook is damaged ({part}: {exc}): open it in Excel and save it again") from None
        self._budget -= len(chunk)
        if self._budget < 0:
            raise _too_large(part, MAX_INFLATED_BYTES, "a workbook")
        if _DTD in chunk:
            raise BadFile(f"the workbook's XML declares a DTD ({part}): the file is crafted, not an Excel export")
        return chunk

    def _first_sheet(self) -> str:
        workbook = self._read("xl/workbook.xml", MAX_LAYOUT_BYTES, "a workbook's layout")
        if b"<x:" in workbook[:2000] or b"<sheets" not in workbook:
            raise Unsupported("prefixed or unknown workbook XML")
        first = _SHEET.search(workbook)
        if first is None:
            raise Unsupported("no sheet in the workbook")
        rels = self._read("xl/_rels/workbook.xml.rels", MAX_LAYOUT_BYTES, "a workbook's layout")
        for attributes in _REL.findall(rels):
            rel_id, target = _REL_ID.search(attributes), _REL_TARGET.search(attributes)
            if rel_id and target and rel_id.group(1) == first.group(1):
                name = target.group(1).decode()
                return name.lstrip("/") if name.startswith("/") else f"xl/{name}"
        raise Unsupported("the first sheet's part is not found")

    def _shared_strings(self) -> SharedStrings:
        try:
            xml = self._read(SHARED_STRINGS, MAX_SHARED_STRINGS_BYTES, "a workbook's shared strings")
        except KeyError:
            return SharedStrings(b"")
        return SharedStrings(xml)

    # --- the sheet, chunk by chunk ---

    def _rows_xml(self) -> Iterator[bytes]:
        """Pieces of the sheet XML that end at a row's end (so no cell is cut in two)."""
        buffer = self._buffer
        while not self._done:
            chunk = self._inflate(self._stream, self._sheet)
            if not chunk:
                self._done = True
                if buffer:
                    yield bytes(buffer)
                    buffer.clear()
                return
            # A row end split between the buffer and the chunk is found too.
            start = max(len(buffer) - len(_ROW_END) + 1, 0)
            buffer += chunk
            cut = buffer.rfind(_ROW_END, start)
            if cut < 0:
                # A row that goes on: bounded before it is buffered any further. (A "<c " split
                # between two chunks goes uncounted: one cell per MiB.)
                self._pending_cells += chunk.count(_CELL_START)
                if self._pending_cells > MAX_CELLS_PER_ROW:
                    raise BadFile(
                        f"a row of the sheet ({self._sheet}) has more than {MAX_CELLS_PER_ROW:,} cells, "
                        "Excel's own limit: the file is not an Excel export"
                    )
                if len(buffer) > MAX_ROW_BYTES:
                    raise BadFile(
                        f"a row of the sheet ({self._sheet}) takes more than {_mib(MAX_ROW_BYTES)} of XML, "
                        "the limit for a row: the file is not an Excel export"
                    )
                continue
            cut += len(_ROW_END)
            piece = bytes(buffer[:cut])
            del buffer[:cut]
            self._pending_cells = buffer.count(_CELL_START)
            yield piece

    def _value(self, attributes: bytes, inner: bytes | None) -> object:
        """The cell's value as calamine gives it; "" for an empty cell."""
        if not inner:
            return ""
        kind = _TYPE.search(attributes)
        t = kind.group(1) if kind else b"n"
        if t == b"inlineStr":
            return _text(b"".join(_T.findall(inner)))
        v = _V.search(inner)
        if v is None:
            return ""
        raw = v.group(1)
        if t == b"s":
            return self._strings.get(int(raw))
        if t == b"n":
            return float(raw)
        if t == b"b":
            return raw == b"1"
        return _text(raw)  # str (formula text), e (error), d (ISO date)

    def leading_rows(self, wanted: int = 2) -> list[tuple[int, list[object]]]:
        """Whole rows from the top until `wanted` non-blank ones are among them (or the sheet
        ends): the header and the first data row decide which columns the rest needs. Blank
        rows are left out, so a sheet of blank rows does not pile up here."""
        rows: list[tuple[int, list[object]]] = []
        for piece in self._rows_xml():
            if b"<x:row" in piece or b"<c>" in piece or (b"<c " in piece and b'<c r="' not in piece):
                raise Unsupported("cells without references or prefixed XML")
            current = -1
            cells: list[object] = []
            count = 0
            for m in _ANY_CELL.finditer(piece):
                number = int(m.group(2))
                if number != current:
                    if current >= 0 and any(v != "" for v in cells):
                        rows.append((current, cells))
                    current, cells, count = number, [], 0
                count += 1
                if count > MAX_CELLS_PER_ROW:
                    raise BadFile(
                        f"row {number} has more than {MAX_CELLS_PER_ROW:,} cells, Excel's own limit: "
                        "the file is not an Excel export"
                    )
                index = column_index(m.group(1).decode())
                if index >= MAX_CELLS_PER_ROW:
                    raise BadFile(
                        f"row {number} has a cell in column {m.group(1).decode()}, beyond Excel's last "
                        f"column ({column_letters(MAX_CELLS_PER_ROW - 1)}): the file is not an Excel export"
                    )
                if index >= len(cells):
                    cells.extend([""] * (index + 1 - len(cells)))
                cells[index] = self._value(m.group(3), m.group(4))
            if current >= 0 and any(v != "" for v in cells):
                rows.append((current, cells))
            if len(rows) >= wanted:
                break
        return rows

    def rest(self, columns: Iterable[int], width: int) -> Iterator[tuple[int, list[object]]]:
        """The rows after the leading ones, `width` wide, with only `columns` read."""
        index_of = {column_letters(i).encode(): i for i in set(columns)}
        # Excel writes a cell as <c r="B7" s="3" t="s"><v>12</v></c>: the plain <v> form is
        # taken apart by the pattern itself, anything richer by _value.
        pattern = re.compile(
            rb'<c r="(' + b"|".join(index_of) + rb')(\d+)"([^>]*?)(?:/>|>(?:<v>([^<]*)</v>|(.*?))</c>)', re.S
        )
        strings = self._strings.get
        for piece in self._rows_xml():
            # No row yet while `current` is b"" (a row number never is): `cells` is a typed
            # placeholder, not an `| None` that the per-cell store would have to narrow.
            current = b""
            cells: list[object] = []
            for letters, number, attributes, v, inner in pattern.findall(piece):
                if number != current:
                    if current:
                        yield int(current), cells
                    current, cells = number, [""] * width
                if v:
                    if b't="s"' in attributes:
                        value: object = strings(int(v))
                    elif b" t=" not in attributes or b't="n"' in attributes:
                        value = float(v)
                    else:
                        value = self._value(attributes, b"<v>" + v + b"</v>")
                else:
                    value = self._value(attributes, inner) if inner else ""
                cells[index_of[letters]] = value
            if current:
                yield int(current), cells
