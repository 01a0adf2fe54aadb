"""Exports: a bulk batch's per-recipient results, a voice batch's jobs or the address book as a
CSV or XLSX file, made while its rows are read and sent while it is made, so memory stays flat
whatever the number of rows.

Rows come in keyset pages (PAGE_ROWS a query, `key > last ORDER BY key`), each page its own
statement: no transaction or connection is held while a client downloads, and a running
batch's export shows each row as it was when its page was read. The next page is read while
the current one is written.

CSV is UTF-8 with a BOM (so Excel reads it as UTF-8) and a header row; both go out before the
first page is read. XLSX is written by xlsxwriter in constant_memory mode (a row is flushed to
a temporary file as the next begins; the workbook is zipped when closed) into a temporary
directory of the export's own, removed when the export ends or its client goes away, then
sent in chunks. Its cells are typed (times and dates as dates, money and counts as numbers),
under a frozen header row, in columns of set widths; the writing runs in a worker thread, so
the service's event loop (feeder, results, other calls) keeps its turns.

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
import os
import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import asyncpg
import xlsxwriter  # type: ignore[import-untyped]

from services.runtime.errors import InvalidArgument
from services.runtime.identity import Caller

from .address_book_repo import AddressBookRepo
from .batches import Batches, scope_of
from .repo import CampaignsRepo
from .template import NAMED_VARIABLES, compile_template
from .voice import VoiceBatches
from .voice_repo import VoiceRepo

# The guide's types first, then the suite's (the gateway documents them in this order).
KINDS = ("contacts", "bulk_job_results", "voice_batch_jobs")
FORMATS = ("csv", "xlsx")
PAGE_ROWS = 5_000
CHUNK_BYTES = 64 * 1024
CONTENT_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}
# Rows of an XLSX worksheet, the header included (Excel's limit): more go on to a next sheet.
SHEET_ROWS = 1_048_576
# A bulk result's own values (`@valorN`) exported at most: a template may name `@valor99999`,
# and a page's cells (PAGE_ROWS times the columns) must stay few.
MAX_VALUE_COLUMNS = 50

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


def _as_is(record: asyncpg.Record) -> Sequence[Any]:
    return record


@dataclass(frozen=True)
class Source:
    """What one export reads: its columns, a page of rows after a key, a row's key and cells.

    A row may hold more values than there are columns (the key, at the end): only as many as
    there are columns are written."""

    stem: str  # the file's name, without its extension
    sheet: str
    columns: tuple[Column, ...]
    page: Callable[[int, int], Awaitable[list[asyncpg.Record]]]  # (after key, limit) → rows
    key: Callable[[asyncpg.Record], int]
    cells: Callable[[asyncpg.Record], Sequence[Any]] = field(default=_as_is)


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


async def pages(source: Source, *, size: int = PAGE_ROWS) -> AsyncIterator[list[asyncpg.Record]]:
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


class _Workbook:
    """One workbook of typed cells written row by row (constant_memory: rows in order)."""

    def __init__(self, path: str, source: Source, *, tmpdir: str) -> None:
        self.source = source
        self.book = xlsxwriter.Workbook(
            path,
            {
                "constant_memory": True,
                "tmpdir": tmpdir,
                # Text stays text: never turned into a number, a formula or a link.
                "strings_to_numbers": False,
                "strings_to_formulas": False,
                "strings_to_urls": False,
                # ZIP64 only where a part passes 4 GiB (a million rows of long texts); the
                # zip module writes its records then alone.
                "use_zip64": True,
            },
        )
        self.bold = self.book.add_format({"bold": True})
        self.formats = {
            TIME: self.book.add_format({"num_format": "yyyy-mm-dd hh:mm:ss"}),
            DATE: self.book.add_format({"num_format": "yyyy-mm-dd"}),
            MONEY: self.book.add_format({"num_format": "#,##0.00##"}),
        }
        self.sheets = 0
        self._new_sheet()

    def _new_sheet(self) -> None:
        self.sheets += 1
        name = self.source.sheet if self.sheets == 1 else f"{self.source.sheet} {self.sheets}"
        sheet = self.book.add_worksheet(name)
        for col, column in enumerate(self.source.columns):
            sheet.set_column(col, col, column.width)
            sheet.write_string(0, col, column.title, self.bold)
        sheet.freeze_panes(1, 0)
        self.row = 1
        # One writer per column, bound to this sheet: (row, col, value) for a value not None.
        # xlsxwriter's undecorated writers: its public ones first try to read the row as "A1"
        # notation, a tenth of the time a cell takes when there are millions.
        string, number, flag = sheet._write_string, sheet._write_number, sheet._write_boolean
        time_format, date_format, money_format = self.formats[TIME], self.formats[DATE], self.formats[MONEY]
        starts, plain = _FORMULA_STARTS, _PLAIN_NUMBER.fullmatch
        writers: dict[str, Callable[[int, int, Any], Any]] = {
            # neutral(), inlined: most text starts with none of these.
            TEXT: lambda r, c, v: string(r, c, "'" + v if v[0] in starts and not plain(v) else v),
            INTEGER: number,
            NUMBER: lambda r, c, v: number(r, c, float(v)),
            MONEY: lambda r, c, v: number(r, c, float(v), money_format),
            # UTC, as the database hands it (a spreadsheet's times have no zone).
            TIME: lambda r, c, v: number(r, c, v.timestamp() / 86400 + _UNIX_EPOCH_SERIAL, time_format),
            DATE: lambda r, c, v: number(r, c, v.toordinal() - _EXCEL_EPOCH_ORDINAL, date_format),
            FLAG: flag,
        }
        self.writers = [writers[c.kind] for c in self.source.columns]

    def write(self, rows: Iterable[asyncpg.Record]) -> None:
        cells, writers = self.source.cells, self.writers
        for record in rows:
            if self.row == SHEET_ROWS:
                self._new_sheet()
                writers = self.writers
            row = self.row
            for col, (write, value) in enumerate(zip(writers, cells(record), strict=False)):
                if value is not None and value != "":  # an empty cell is no cell
                    write(row, col, value)
            self.row = row + 1

    def close(self) -> None:
        self.book.close()


async def _in_thread(call: Callable[..., Any], *args: Any) -> Any:
    """call(*args) in a worker thread. A caller cancelled meanwhile (its client went away)
    still waits for it to end, since a thread cannot be stopped: nothing is then writing into
    the export's directory as it is removed."""
    task = asyncio.ensure_future(asyncio.to_thread(call, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise


async def xlsx_chunks(source: Source) -> AsyncIterator[bytes]:
    """The workbook in chunks of CHUNK_BYTES, once it is written whole (a zip's directory comes
    last, so nothing of it can go earlier)."""
    with tempfile.TemporaryDirectory(prefix="pregonero-export-", ignore_cleanup_errors=True) as tmpdir:
        path = os.path.join(tmpdir, f"{source.stem}.xlsx")
        # Dropped unfinished (its client went away), the workbook is never zipped: its rows'
        # temporary file goes with the directory.
        book = _Workbook(path, source, tmpdir=tmpdir)
        async for rows in pages(source):
            await _in_thread(book.write, rows)
        await _in_thread(book.close)
        f = await asyncio.to_thread(open, path, "rb")
        try:
            # Read a few chunks a time in the worker thread, sent one by one.
            while block := await asyncio.to_thread(f.read, CHUNK_BYTES * 16):
                for start in range(0, len(block), CHUNK_BYTES):
                    yield block[start : start + CHUNK_BYTES]
        finally:
            f.close()


# --- what is exported ------------------------------------------------------------------------

BULK_COLUMNS = (
    Column("row", INTEGER, 8),
    Column("phone", TEXT, 16),
    Column("status", TEXT, 10),
    Column("device_id", INTEGER, 10),
    Column("error", TEXT, 30),
    Column("attempts", INTEGER, 9),
    Column("finished_at (UTC)", TIME, 20),
    Column("delivery", TEXT, 10),
    Column("delivered_at (UTC)", TIME, 20),
    Column("read_at (UTC)", TIME, 20),
    Column("delivery_error", TEXT, 30),
)
VOICE_COLUMNS = (
    Column("job_id", TEXT, 12),
    Column("name", TEXT, 24),
    Column("dni", TEXT, 12),
    Column("phone", TEXT, 16),
    Column("other_phones", TEXT, 16),
    Column("status", TEXT, 12),
    Column("outcome", TEXT, 14),
    Column("attempts", INTEGER, 9),
    Column("max_attempts", INTEGER, 12),
    Column("call_started_at (UTC)", TIME, 20),
    Column("call_ended_at (UTC)", TIME, 20),
    Column("call_duration_seconds", NUMBER, 12),
    Column("cost", MONEY, 10),
    Column("summary", TEXT, 50),
    Column("sentiment", TEXT, 12),
    Column("fecha_pago_cliente", DATE, 12),
    Column("monto_pago_cliente", MONEY, 12),
    Column("finished_at (UTC)", TIME, 20),
    Column("cancellation_reason", TEXT, 24),
)
CONTACT_COLUMNS = (
    Column("id", INTEGER, 10),
    Column("account_id", TEXT, 14),
    Column("name", TEXT, 24),
    Column("phone", TEXT, 16),
    Column("email", TEXT, 26),
    Column("is_active", FLAG, 9),
    Column("groups", TEXT, 30),
    Column("created_at (UTC)", TIME, 20),
    Column("updated_at (UTC)", TIME, 20),
)


def _values_spread(record: asyncpg.Record) -> list[Any]:
    """A bulk result's row with its recipient's values (its last column) as cells of their own."""
    row = list(record)
    row[-1:] = row[-1]
    return row


class Exports:
    """The exports a caller may make, scoped like every read: a member's own account (another
    account's batch is not found), an admin's any."""

    def __init__(
        self,
        *,
        batches: Batches,
        voice: VoiceBatches,
        repo: CampaignsRepo,
        calls: VoiceRepo,
        book: AddressBookRepo,
    ) -> None:
        self.batches, self.voice = batches, voice
        self.repo, self.calls, self.book = repo, calls, book

    async def open(self, caller: Caller, *, kind: str, fmt: str, batch_id: str = "", account_id: str = "") -> Export:
        """The export, once the caller may make it; nothing is read of its rows yet."""
        if fmt not in FORMATS:
            raise InvalidArgument(f"format must be one of {', '.join(FORMATS)}")
        if kind == "bulk_job_results":
            return Export(await self._bulk_results(caller, batch_id), fmt)
        if kind == "voice_batch_jobs":
            return Export(await self._voice_jobs(caller, batch_id), fmt)
        if kind == "contacts":
            return Export(self._contacts(caller, account_id), fmt)
        raise InvalidArgument(f"type must be one of {', '.join(KINDS)}")

    async def _bulk_results(self, caller: Caller, batch_id: str) -> Source:
        batch = await self.batches.get(caller, batch_id)
        if batch["channel"] != "whatsapp":
            raise InvalidArgument(f"batch {batch_id} is a voice campaign: export it as voice_batch_jobs")
        key = batch["batch_id"]
        if batch["template_syntax"] == "named":
            # A scheduled message's recipients carry their contact's name and phone (the phone
            # has its column already).
            titles = list(NAMED_VARIABLES[:1])
        else:
            # The values the message used (`@valor1` … `@valorN`), one column each.
            used = min(compile_template(batch["message_template"]).max_index, MAX_VALUE_COLUMNS)
            titles = [f"valor{n}" for n in range(1, used + 1)]
        columns = BULK_COLUMNS + tuple(Column(title, TEXT, 16) for title in titles)
        used = len(titles)

        async def page(after: int, limit: int) -> list[asyncpg.Record]:
            return await self.repo.export_results(batch_id=key, after=after, limit=limit, values=used)

        return Source(
            stem=f"job-{key}-results",
            sheet="Results",
            columns=columns,
            page=page,
            key=lambda r: int(r["job_id"]),
            cells=_values_spread,
        )

    async def _voice_jobs(self, caller: Caller, batch_id: str) -> Source:
        batch = await self.voice.get(caller, batch_id)
        if batch["channel"] != "voice":
            raise InvalidArgument(f"batch {batch_id} is a WhatsApp send: export it as bulk_job_results")
        key = batch["batch_id"]

        async def page(after: int, limit: int) -> list[asyncpg.Record]:
            return await self.calls.export_jobs(batch_id=key, after=after, limit=limit)

        return Source(
            stem=f"batch-{key}-jobs", sheet="Jobs", columns=VOICE_COLUMNS, page=page, key=lambda r: int(r["id"])
        )

    def _contacts(self, caller: Caller, account_id: str) -> Source:
        scope = caller.account_scope(account_id) if account_id else scope_of(caller)

        async def page(after: int, limit: int) -> list[asyncpg.Record]:
            return await self.book.export_contacts(scope=scope, after=after, limit=limit)

        return Source(
            stem="contacts", sheet="Contacts", columns=CONTACT_COLUMNS, page=page, key=lambda r: int(r["contact_id"])
        )
