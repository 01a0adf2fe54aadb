"""Reading an address-book import: the upload spooled within its limit, the columns found by
name, the rows handed out as text with the spreadsheet's row numbers, and the row checks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import openpyxl
import pytest

from services.campaigns import contact_import
from services.campaigns.address_book import RowChecker, phone_e164
from services.campaigns.contact_import import ImportFile, RawRow, match_columns, spooled
from services.campaigns.contacts import xlsx
from services.runtime.errors import InvalidArgument, PayloadTooLarge


async def chunks_of(data: bytes, size: int = 7) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def rows_of(tmp_path: Path, data: bytes, name: str = "c.csv") -> list[RawRow]:
    return list(ImportFile(write(tmp_path, name, data), name).rows())


def test_headers_are_found_by_name_in_any_case_and_accent() -> None:
    assert match_columns(["Nombre", "TELÉFONO", "Correo electrónico", "Grupo"]) == {
        "name": 0,
        "phone": 1,
        "email": 2,
        "group": 3,
    }
    assert match_columns(["notas", "WhatsApp", "Name"]) == {"phone": 1, "name": 2}
    # An exact spelling wins over a longer header that starts with another field's word.
    assert match_columns(["Teléfono móvil", "celular"]) == {"phone": 1}
    assert match_columns(["E-mail", "Group name", "Full Name", "mobile"]) == {
        "email": 0,
        "group": 1,
        "name": 2,
        "phone": 3,
    }


def test_csv_rows_keep_their_line_numbers(tmp_path: Path) -> None:
    data = "\ufeffnombre;teléfono;notas\nAna;+56981234567;x\n\n;;solo notas\nBea;981234568\nCé\n".encode()
    assert rows_of(tmp_path, data) == [
        RawRow(2, "+56981234567", "Ana", "", ""),
        RawRow(5, "981234568", "Bea", "", ""),
        RawRow(6, "", "Cé", "", ""),
    ]


def test_xlsx_rows_give_number_cells_as_digits(tmp_path: Path) -> None:
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["Teléfono", "Nombre", "Grupo"])
    sheet.append([56981234567, "Ana", "VIP"])
    sheet.append([None, None, None])
    sheet.append(["+56 9 8123 4568", None, None])
    path = tmp_path / "c.xlsx"
    book.save(path)
    assert list(ImportFile(path, "c.xlsx").rows()) == [
        RawRow(2, "56981234567", "Ana", "", "VIP"),
        RawRow(4, "+56 9 8123 4568", "", "", ""),
    ]


@pytest.mark.parametrize(
    ("data", "name", "words"),
    [
        (b"nombre,correo\nAna,a@b.cl\n", "c.csv", "no phone column"),
        (b"nombre,telefono\n", "c.csv", "no contacts below it"),
        (b"\n\n", "c.csv", "no rows"),
        (b"\x00\x01binary", "c.csv", "binary"),
        (b"telefono\n+56981234567\n", "c.pdf", "unsupported file type"),
        (b"not a workbook", "c.xlsx", "not an Excel workbook"),
    ],
)
def test_unreadable_files_are_refused(tmp_path: Path, data: bytes, name: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        rows_of(tmp_path, data, name)


def test_a_bad_line_after_good_ones_is_refused_when_reached(tmp_path: Path) -> None:
    file = ImportFile(write(tmp_path, "c.csv", b"telefono\n+56981234567\n+5698\xff\n"), "c.csv")
    rows = file.rows()
    assert next(rows).phone == "+56981234567"
    with pytest.raises(InvalidArgument, match=r"not UTF-8 text \(line 3\)"):
        next(rows)


def test_too_many_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(contact_import, "MAX_ROWS", 3)
    data = b"telefono\n" + b"".join(b"+5698123456%d\n" % i for i in range(3))
    assert len(rows_of(tmp_path, data)) == 3
    with pytest.raises(PayloadTooLarge, match=r"more than 3 contacts \(row 6\)"):
        rows_of(tmp_path, data + b"\n+56981234569\n")


def test_spooling_is_bounded_and_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    async def spool(data: bytes) -> Path:
        async with spooled(chunks_of(data)) as path:
            assert path.read_bytes() == data
            return path

    path = asyncio.run(spool(b"telefono\n+56981234567\n"))
    assert not path.exists()
    with pytest.raises(InvalidArgument, match="the file is empty"):
        asyncio.run(spool(b""))
    monkeypatch.setattr(contact_import, "MAX_FILE_BYTES", 10)
    with pytest.raises(PayloadTooLarge, match="larger than"):
        asyncio.run(spool(b"x" * 11))


@pytest.mark.parametrize(
    ("text", "country", "e164"),
    [
        ("+56 9 8123 4567", "CL", "+56981234567"),
        ("981234567", "CL", "+56981234567"),
        ("56981234567", "CL", "+56981234567"),
        ("11 2345-6789", "AR", "+541123456789"),
        ("+54 9 11 2345-6789", "CL", "+5491123456789"),
    ],
)
def test_phones_become_e164(text: str, country: str, e164: str) -> None:
    assert phone_e164(text, country) == e164


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no phone"),
        ("12345", "invalid for CL: too short"),
        ("+56912000000", "invalid for CL: not a valid number"),
        ("+54 12", "invalid for AR: too short"),
        ("llámame", "invalid for CL: not a phone number"),
        ("9" * 80, "invalid for CL: too long"),
    ],
)
def test_invalid_phones_say_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"^{reason}$"):
        phone_e164(text, "CL")


def test_row_checker_takes_rounds_and_samples_the_invalid() -> None:
    checker = RowChecker(import_id=7, country="CL")
    rows = iter(
        [
            RawRow(2, "981234567", " Ana ", "ana@example.cl", ""),
            RawRow(3, "12", "Bea", "", ""),
            RawRow(4, "981234568", "x" * 201, "", ""),
            RawRow(5, "981234569", "Cé", "no-es-correo", ""),
            RawRow(6, "981234570", "Dai", "", "VIP"),
            RawRow(7, "981234571", "Eva", "", ""),
        ]
    )
    assert checker.take(rows, 2) == [
        (7, 2, "Ana", "+56981234567", "ana@example.cl", ""),
        (7, 6, "Dai", "+56981234570", "", "VIP"),
    ]
    assert checker.take(rows, 2) == [(7, 7, "Eva", "+56981234571", "", "")]
    assert checker.take(rows, 2) == []
    assert (checker.valid, checker.invalid) == (3, 3)
    assert [(s.row, s.value, s.reason) for s in checker.samples] == [
        (3, "12", "invalid for CL: too short"),
        (4, "x" * 97 + "...", "name is longer than 200 characters"),
        (5, "no-es-correo", "email 'no-es-correo' is not an address"),
    ]


def test_a_workbook_that_inflates_too_far_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xlsx, "MAX_INFLATED_BYTES", 100_000)
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["telefono", "nombre"])
    for i in range(2000):
        sheet.append([f"+5698{i:07d}", "x" * 50])
    path = tmp_path / "c.xlsx"
    book.save(path)
    assert path.stat().st_size < 100_000
    with pytest.raises(InvalidArgument, match=r"unpacks to more than 100,000 bytes.*xl/worksheets/sheet1.xml"):
        ImportFile(path, "c.xlsx")
