"""An address-book import file, read as it is uploaded: spooled to disk chunk by chunk (its size
checked before each write), then its rows read one by one from there, never the whole file in
memory: CSV line by line, .xlsx with the streaming reader of `contacts.xlsx`, .xls with
calamine (an .xls is at most MAX_FILE_BYTES, the only format held whole while it is read).

This module finds the columns and hands out each row's cells as text; what a valid contact is
belongs to `address_book`. A file that cannot be read at all raises InvalidArgument (400) or
PayloadTooLarge (413), with a message for the user.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from itertools import chain
from pathlib import Path
from typing import NamedTuple

from services.campaigns.contacts.reading import BadFile, RowSource
from services.campaigns.contacts.values import cell_text, normalise_header
from services.runtime.errors import InvalidArgument, PayloadTooLarge

# A 200,000-row CSV of name, phone, email and group is about 12 MiB; an .xlsx of it less.
MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_ROWS = 200_000
# What a workbook may inflate to (a zip bomb is a small upload) is bounded by the reader:
# `contacts.xlsx`. 200,000 rows of four columns inflate to well under 100 MiB.

# Field → normalised header spellings (lower case, no accents, spaces or dashes). A header is
# the field's when it is one of them or starts with one ("Teléfono móvil", "Correo electrónico").
FIELDS: dict[str, tuple[str, ...]] = {
    "phone": ("phone", "telefono", "celular", "whatsapp", "movil", "mobile", "fono", "numero"),
    "name": ("name", "nombre", "fullname", "contacto"),
    "email": ("email", "correo", "mail"),
    "group": ("group", "grupo"),
}


class RawRow(NamedTuple):
    """One non-blank row below the header, its cells as text ("" for a column the file lacks)."""

    row: int  # the spreadsheet's row number (the CSV's line), the header being row 1
    phone: str
    name: str
    email: str
    group: str


@asynccontextmanager
async def spooled(chunks: AsyncIterator[bytes]) -> AsyncIterator[Path]:
    """The upload on disk while inside, deleted afterwards. The limit is checked before each
    write, so an oversized upload costs at most one chunk more than the limit."""
    fd, name = tempfile.mkstemp(prefix="contacts-", suffix=".upload")
    path = Path(name)
    try:
        size = 0
        with os.fdopen(fd, "wb") as file:
            async for chunk in chunks:
                size += len(chunk)
                if size > MAX_FILE_BYTES:
                    raise PayloadTooLarge(f"the file is larger than {MAX_FILE_BYTES // 2**20} MiB")
                file.write(chunk)
        if size == 0:
            raise InvalidArgument("the file is empty")
        yield path
    finally:
        await asyncio.to_thread(path.unlink, missing_ok=True)


def match_columns(headers: list[str]) -> dict[str, int]:
    """Field → column index: exact spellings first for every field, then prefixes."""
    names = [normalise_header(h) for h in headers]
    found: dict[str, int] = {}
    for exact in (True, False):
        for field, variants in FIELDS.items():
            if field in found:
                continue
            for i, name in enumerate(names):
                taken = i in found.values()
                if not taken and any(name == v if exact else name.startswith(v) for v in variants):
                    found[field] = i
                    break
    return found


class ImportFile:
    """The rows of a spooled upload. Opening it reads the header (and the first row) and
    raises for a file without contacts or without a phone column."""

    def __init__(self, path: Path, filename: str) -> None:
        try:
            self._source = RowSource(path, filename)
            header, self._first = self._source.header_and_first()
        except BadFile as exc:
            raise InvalidArgument(str(exc)) from None
        if header is None:
            raise InvalidArgument("the file has no rows")
        self.headers = [cell_text(v) for v in header[1]]
        self._columns = match_columns(self.headers)
        if "phone" not in self._columns:
            expected = ", ".join(FIELDS["phone"])
            raise InvalidArgument(f"the file has no phone column: expected a header such as {expected}")
        if self._first is None:
            raise InvalidArgument("the file has a header row but no contacts below it")
        self.rows_read = 0

    @property
    def columns(self) -> dict[str, str]:
        """Field → the header it is read from."""
        return {field: self.headers[i] for field, i in self._columns.items()}

    def rows(self) -> Iterator[RawRow]:
        """Every non-blank row; InvalidArgument for an unreadable one, PayloadTooLarge past MAX_ROWS."""
        assert self._first is not None
        width = len(self.headers)
        # The column the file lacks reads as the empty cell appended to every row.
        index = [self._columns.get(field, width) for field in ("phone", "name", "email", "group")]
        wanted = [i for i in index if i < width]
        try:
            for number, cells in chain([self._first], self._source.rest(wanted, width)):
                if len(cells) < width:  # a short CSV record
                    cells = [*cells, *([""] * (width - len(cells)))]
                values = [cell_text(cells[i]) if i < len(cells) else "" for i in index]
                if not any(values):
                    continue
                self.rows_read += 1
                if self.rows_read > MAX_ROWS:
                    raise PayloadTooLarge(f"the file has more than {MAX_ROWS:,} contacts (row {number})")
                yield RawRow(number, *values)
        except BadFile as exc:
            raise InvalidArgument(str(exc)) from None
