"""Workbooks built to exhaust a reader: small archives whose parts inflate far, rows without
end, directories whose declared sizes lie. Written part by part, so building one holds a MiB
at a time whatever it inflates to."""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from openpyxl import Workbook

MIB = 2**20
SHEET = "xl/worksheets/sheet1.xml"
SHARED_STRINGS = "xl/sharedStrings.xml"
_XML = b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
_MAIN = b'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'


def plain_workbook(path: Path) -> Path:
    """A small, valid Chile debt-collection workbook: the base the bombs are built on."""
    book = Workbook()
    sheet = book.active
    sheet.append(["RUT", "Nombre", "Celular"])
    sheet.append(["12.345.678-5", "Ana", "987654321"])
    book.save(path)
    return path


def with_part(src: Path, dst: Path, name: str, chunks: Iterable[bytes]) -> Path:
    """`src` with its part `name` (added if missing) written from `chunks`, deflated."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as new:
        for item in old.infolist():
            if item.filename != name:
                new.writestr(item, old.read(item))
        with new.open(name, "w") as out:
            for chunk in chunks:
                out.write(chunk)
    return dst


def huge_shared_strings(size: int) -> Iterator[bytes]:
    """A shared-string table of one string of `size` bytes."""
    yield _XML + b"<sst " + _MAIN + b' count="1" uniqueCount="1"><si><t>'
    block = b"A" * MIB
    for _ in range(size // MIB):
        yield block
    yield b"</t></si></sst>"


def sheet_with_row(row: Iterable[bytes]) -> Iterator[bytes]:
    """A sheet of a header row, then row 2 made of `row`'s pieces of XML."""
    yield _XML + b"<worksheet " + _MAIN + b"><sheetData>"
    yield b'<row r="1"><c r="A1" t="inlineStr"><is><t>telefono</t></is></c></row><row r="2">'
    yield from row
    yield b"</row></sheetData></worksheet>"


def many_cells(count: int) -> Iterator[bytes]:
    cell = b'<c r="A2" t="n"><v>1</v></c>'
    for _ in range(count // 10_000):
        yield cell * 10_000


def one_huge_cell(size: int) -> Iterator[bytes]:
    yield b'<c r="A2" t="inlineStr"><is><t>'
    block = b"9" * MIB
    for _ in range(size // MIB):
        yield block
    yield b"</t></is></c>"


def declare(path: Path, name: str, size: int) -> Path:
    """Rewrite the inflated size the archive declares for `name` (directory and local header)."""
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    entries, directory = struct.unpack_from("<H4xI", data, end + 10)
    position = directory
    for _ in range(entries):
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, position + 28)
        if data[position + 46 : position + 46 + name_length] == name.encode():
            struct.pack_into("<I", data, position + 24, size)
            local = struct.unpack_from("<I", data, position + 42)[0]
            struct.pack_into("<I", data, local + 22, size)
        position += 46 + name_length + extra_length + comment_length
    path.write_bytes(bytes(data))
    return path
