"""Customer files for voice-call campaigns (FORMATS.md): Chile debt collection and Argentina.

`parse_contacts` turns an upload that the caller has spooled to disk into call jobs
(`Contact`s) plus the problems the preview shows; a file that cannot be read at all raises
`BadFile`, whose message goes to the user as it is. Cross-batch duplicates are the caller's:
it compares `Contact.key` with the keys of the account's other active batches.

The package: `values` normalises single cells (RUTs, phones, amounts, dates), `reading` turns
the file into rows, `builders` turns rows into contacts; here the headers are matched and
the whole put together.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from itertools import chain
from operator import itemgetter
from pathlib import Path

from services.campaigns.contacts.builders import ArgentinaBuilder, ChileBuilder, Contact, Problem
from services.campaigns.contacts.reading import BadFile, RowSource
from services.campaigns.contacts.values import (
    ArgentineId,
    Rut,
    argentina_phone,
    cell_text,
    chile_phone,
    normalise_header,
    parse_amount,
    parse_argentine_id,
    parse_date,
    parse_rut,
    rut_check_digit,
)

__all__ = [
    "ARGENTINA",
    "CHILE",
    "BadFile",
    "Contact",
    "ParsedFile",
    "ArgentineId",
    "Problem",
    "Rut",
    "TooManyRows",
    "argentina_phone",
    "chile_phone",
    "normalise_header",
    "parse_amount",
    "parse_argentine_id",
    "parse_contacts",
    "parse_date",
    "parse_rut",
    "rut_check_digit",
]

CHILE = "chile_debt_collection"
ARGENTINA = "argentina"
# Non-blank rows below the header: the bulk file's recipient limit (FORMATS.md). A workbook's
# own size is bounded by the reader (`xlsx`), this the jobs a file makes.
MAX_ROWS = 1_000_000


class TooManyRows(BadFile):
    """The file has more rows than MAX_ROWS (the caller answers 413, as for any oversized upload)."""


# Field → normalised header spellings, most specific first. The dicts' order is the order in
# which fields claim columns, so the landline claims "Teléfono fijo" before the generic phone.
CHILE_FIELDS = {
    "rut": ("ruts", "rut"),
    "name": ("nombre",),
    "company": ("origenempresa", "empresa"),
    "amount": ("saldoactualizado", "saldo"),
    "due_date": ("fechavencimiento", "fechadevencimiento", "vencimiento"),
    "days_late": ("diasretraso", "diasderetraso", "diasdeatraso", "retraso", "atraso"),
    "landline": ("telefonoresidencial", "telefonofijo", "residencial", "fijo"),
    "mobile": ("telefonomovil", "telefonocelular", "celular", "movil", "telefono", "fono"),
    "reference": ("referencia", "reference"),
}
ARGENTINA_FIELDS = {
    "name": ("nombre", "name", "cliente"),
    "dni": ("dni", "cuit", "cuil", "id"),
    "landline": ("telefonofijo", "fijo", "residencial"),
    "phone": ("telefono", "phone", "celular", "mobile", "movil"),
    "reference": ("referencia", "reference"),
}
# Only these make a file Argentine when no country is given: a bare "id" column is everywhere.
_ARGENTINA_ID_HEADERS = {"dni": ("dni", "cuit", "cuil")}
# Shorter spellings match only at either end of a header: "rut" is inside "estructura",
# "id" inside "residencial" and "cuit" inside "circuito".
_SHORT_VARIANT = 5


@dataclass(frozen=True, slots=True)
class ParsedFile:
    contacts: list[Contact]
    invalid: list[Problem]  # rows that give no job
    warnings: list[Problem]  # rows that give a job, with something the user should check
    total_rows: int  # non-blank rows below the header
    duplicates: int
    detected_format: str
    columns: dict[str, str]  # field → the header it was read from


# --- matching the columns -----------------------------------------------------------------------


def _match_columns(names: list[str], fields: Mapping[str, tuple[str, ...]]) -> dict[str, int]:
    """Field → column index: exact spellings first, for every field, then containment."""
    found: dict[str, int] = {}
    for name, variants in fields.items():
        for variant in variants:
            if variant in names and (index := names.index(variant)) not in found.values():
                found[name] = index
                break
    for name, variants in fields.items():
        if name in found:
            continue
        for variant in variants:
            column = next(
                (i for i, header in enumerate(names) if i not in found.values() and _contains(header, variant)), None
            )
            if column is not None:
                found[name] = column
                break
    return found


def _contains(header: str, variant: str) -> bool:
    if len(variant) < _SHORT_VARIANT:
        return header.startswith(variant) or header.endswith(variant)
    return variant in header


def _detect(names: list[str], country: str | None) -> str:
    if country is not None:
        formats = {"CL": CHILE, "AR": ARGENTINA}
        if country.upper() not in formats:
            raise ValueError(f"unknown country {country!r}: expected 'CL' or 'AR'")
        return formats[country.upper()]
    if "rut" in _match_columns(names, {"rut": CHILE_FIELDS["rut"]}):
        return CHILE
    if _match_columns(names, _ARGENTINA_ID_HEADERS):
        return ARGENTINA
    raise BadFile(
        "cannot tell the file's format: expected a RUT column (Chile debt collection) "
        "or a DNI, CUIT or CUIL column (Argentina)"
    )


def _expected(variants: tuple[str, ...]) -> str:
    return ", ".join(f"'{variant}'" for variant in variants)


# --- the file as a whole ------------------------------------------------------------------------


def parse_contacts(
    path: Path,
    filename: str,
    *,
    country: str | None = None,
    allow_duplicates: bool = False,
    dias_fecha_limite: int | None = None,
    dias_fecha_maxima: int | None = None,
    today: date,
) -> ParsedFile:
    """The call jobs of an uploaded customer file spooled to `path`; `filename` is the name it was uploaded as.

    `country` is "CL" or "AR", or None to tell from the headers (a RUT column is Chile, a
    DNI/CUIT/CUIL column Argentina). `dias_fecha_limite` / `dias_fecha_maxima` (Chile) make
    every due date / fecha máxima `today` plus that many days.
    """
    source = RowSource(path, filename)
    header, first = source.header_and_first()
    if header is None:
        raise BadFile("the file has no rows: its first sheet, if it is a workbook, is empty")
    if first is None:
        raise BadFile("the file has a header row but no customers below it")
    headers = [cell_text(value) for value in header[1]]
    names = [normalise_header(value) for value in headers]
    detected = _detect(names, country)
    fields = CHILE_FIELDS if detected == CHILE else ARGENTINA_FIELDS
    columns = _match_columns(names, fields)
    phone_fields = ("mobile", "landline") if detected == CHILE else ("phone", "landline")
    if not any(name in columns for name in phone_fields):
        expected = _expected(fields[phone_fields[0]] + fields["landline"])
        raise BadFile(f"the file has no phone column: expected a header containing one of {expected}")
    if detected == CHILE and "rut" not in columns:
        raise BadFile(f"the file has no RUT column: expected one of {_expected(CHILE_FIELDS['rut'])}")
    # Every row gets one empty cell appended, which stands for the columns the file lacks.
    width = len(headers)
    getter = itemgetter(*(columns.get(name, -1) for name in fields))
    rows = chain([first], source.rest([i for i in columns.values() if i >= 0], width))
    if detected == CHILE:
        builder: ChileBuilder | ArgentinaBuilder = ChileBuilder(allow_duplicates)
    else:
        builder = ArgentinaBuilder(allow_duplicates)
    # Every row leaves containers behind (debtors, caches) that outlive the young GC generations;
    # none can form a cycle, so collecting while they pile up only costs time (a third of the parse).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for number, cells in rows:
            if len(cells) < width:  # a short CSV record
                cells += [""] * (width - len(cells))
            cells.append("")
            values = getter(cells)
            # Only the columns read count: a row of totals or notes elsewhere is as good as blank.
            if values.count("") != len(values):
                builder.add(number, *values)
                if builder.total_rows > MAX_ROWS:
                    raise TooManyRows(f"the file has more than {MAX_ROWS:,} rows (row {number})")
        contacts = builder.finish(today, dias_fecha_limite, dias_fecha_maxima)
    finally:
        if gc_was_enabled:
            gc.enable()
    return ParsedFile(
        contacts=contacts,
        invalid=sorted(builder.invalid, key=_by_row),
        warnings=sorted(builder.warnings, key=_by_row),
        total_rows=builder.total_rows,
        duplicates=builder.duplicates,
        detected_format=detected,
        columns={name: headers[index] for name, index in sorted(columns.items(), key=itemgetter(1))},
    )


def _by_row(problem: Problem) -> int:
    return problem.row
