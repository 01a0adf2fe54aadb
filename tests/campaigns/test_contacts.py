"""Customer files for voice-call campaigns (FORMATS.md): the fixtures, every rejection, the value formats.

The expected values are worked out by hand from tests/fixtures/make_fixtures.py's data (in
/work/shared/fixtures): due date = latest due date + its days late + 3, fecha máxima =
earliest due date + its days late + 7.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openpyxl import Workbook

from services.campaigns.contacts import (
    ARGENTINA,
    CHILE,
    BadFile,
    Contact,
    ParsedFile,
    Problem,
    argentina_phone,
    chile_phone,
    normalise_header,
    parse_amount,
    parse_argentine_id,
    parse_contacts,
    parse_date,
    parse_rut,
    rut_check_digit,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TODAY = date(2025, 10, 1)


def parse(name: str, **options: object) -> ParsedFile:
    return parse_contacts(FIXTURES / name, name, today=TODAY, **options)


def parse_text(tmp_path: Path, text: str, name: str = "clientes.csv", **options: object) -> ParsedFile:
    path = tmp_path / "upload"
    path.write_text(text, encoding="utf-8")
    return parse_contacts(path, name, today=TODAY, **options)


def parse_rows(tmp_path: Path, rows: list[list[object]], **options: object) -> ParsedFile:
    workbook = Workbook()
    for row in rows:
        workbook.active.append(row)
    path = tmp_path / "upload"
    workbook.save(path)
    return parse_contacts(path, "clientes.xlsx", today=TODAY, **options)


def rejection(path: Path, filename: str, **options: object) -> str:
    with pytest.raises(BadFile) as caught:
        parse_contacts(path, filename, today=TODAY, **options)
    return str(caught.value)


# --- the fixtures -------------------------------------------------------------------------------


def test_chile_basic_fixture() -> None:
    parsed = parse("chile_cobranza_basica.xlsx")
    assert parsed.detected_format == CHILE == "chile_debt_collection"
    assert parsed.columns == {
        "rut": "RUTS",
        "name": "Nombre",
        "amount": "Saldo actualizado",
        "mobile": "Teléfono móvil",
        "landline": "Teléfono Residencial",
        "company": "Origen Empresa",
        "due_date": "FechaVencimiento",
        "days_late": "diasRetraso",
    }
    # 14 people, every third with 3 debts: 24 rows. Person 6 has no phone (3 rows). The fixture's
    # invented mobiles +569 14… and +569 15… are in ranges Chile has not allocated, which
    # `phonenumbers` refuses: row 16's debtor has no other phone, row 6's keeps its landline.
    assert (parsed.total_rows, len(parsed.contacts), parsed.duplicates) == (24, 12, 0)
    assert parsed.invalid == [
        Problem(12, "no phone"),
        Problem(13, "no phone"),
        Problem(14, "no phone"),
        Problem(16, "no valid phone: phone '56914216016' is invalid for CL: not a valid number"),
    ]
    assert parsed.warnings == [
        Problem(6, "phone '56915641638' is invalid for CL: not a valid number"),
        Problem(15, "no RUT: the debtor is known only by their phone"),
    ]
    table = [
        (c.row, c.dni, c.phones, c.debt_amount, c.due_date, c.fecha_maxima, c.cantidad_cupones, c.days_late)
        for c in parsed.contacts
    ]
    d, m = date, Decimal
    assert table == [
        # RUT as "12.345.678-5"; mobile "+56..."; debts 120.500 + 38981 + 15990; 09-01 late 42 .. 09-15 late 0.
        (2, "5.944.938-9", ("+56986513102", "+56228908662"), m("175471"), d(2025, 9, 18), d(2025, 10, 20), 3, 42),
        # "25269059-K"; mobile 9 digits, landline "+56..."; "45.300,50".
        (5, "25.269.059-K", ("+56997853808", "+56228929172"), m("45300.50"), d(2025, 9, 5), d(2025, 9, 9), 1, 0),
        # "250283172"; mobile "569..." not allocated; a Santiago landline of 8 digits gets the 2.
        (6, "25.028.317-2", ("+56225033810",), m("120500"), d(2025, 9, 6), d(2025, 9, 10), 1, 0),
        # A number cell 105934688.0; mobile "09-..." (trunk 0); landline "(2) 914 9208".
        (7, "10.593.468-8", ("+56950798275", "+56229149208"), m("204781.50"), d(2025, 11, 2), d(2025, 9, 14), 3, 42),
        # Mobile "(9) 4202-4521".
        (10, "20.170.006-K", ("+56942024521", "+56226020941"), m("38981"), d(2025, 9, 11), d(2025, 9, 15), 1, 3),
        # Landline only.
        (11, "21.060.310-7", ("+56222726639",), m("120500"), d(2025, 9, 9), d(2025, 9, 13), 1, 0),
        # No RUT: a job of its own, known by its phone.
        (15, "", ("+56984699699",), m("15990"), d(2025, 9, 26), d(2025, 9, 30), 1, 15),
        (17, "17.050.392-9", ("+56945035464", "+56229708229"), m("204781.50"), d(2025, 9, 27), d(2025, 9, 20), 3, 42),
        # "58268844" is RUT 5.826.884-4.
        (20, "5.826.884-4", ("+56925120003", "+56225247830"), m("120500"), d(2025, 9, 29), d(2025, 10, 3), 1, 15),
        # An 8-digit mobile without its leading 9 ("56684513"): a mobile from before the 9 was added.
        (21, "11.966.383-0", ("+56956684513", "+56225376081"), m("45300.50"), d(2025, 9, 18), d(2025, 9, 22), 1, 3),
        (22, "5.139.299-K", ("+56999177428", "+56227718587"), m("152480"), d(2025, 10, 15), d(2025, 9, 20), 3, 15),
        (25, "25.856.202-K", ("+56988894332", "+56229241055"), m("120500"), d(2025, 10, 29), d(2025, 11, 2), 1, 42),
    ]  # fmt: skip
    first = parsed.contacts[0]
    assert (first.name, first.company, first.reference_number, first.key) == (
        "Matías Morales Martínez",
        "Retail Express",
        "",
        "5944938-9",
    )
    assert [c.key for c in parsed.contacts][6:8] == ["+56984699699", "17050392-9"]


def test_chile_full_export_fixture() -> None:
    """43 columns, two extra empty sheets, RUTs as number cells, Excel dates, mobiles as numbers."""
    parsed = parse("chile_cobranza_completa.xlsx")
    assert parsed.detected_format == CHILE
    assert parsed.columns == {
        "due_date": "FechaVencimiento",
        "amount": "Saldo actualizado",
        "days_late": "Días de retraso",
        "name": "Nombre",
        "landline": "Teléfono Residencial",
        "mobile": "Teléfono móvil",
        "company": "Origen Empresa",
        "rut": "RUTS",
    }
    # 2000 debts drawn from 1000 people: 868 of them owe something.
    assert (parsed.total_rows, len(parsed.contacts), parsed.duplicates) == (2000, 868, 0)
    # The invented mobiles of unallocated ranges (+569 1…) are refused with the library's reason;
    # every debtor still has its landline.
    assert parsed.invalid == []
    assert len(parsed.warnings) == 236
    assert all(w.reason.endswith("is invalid for CL: not a valid number") for w in parsed.warnings)
    assert sum(c.cantidad_cupones for c in parsed.contacts) == 2000
    assert sum(c.debt_amount for c in parsed.contacts) == Decimal("890748083")
    assert sum(len(c.phones) == 2 and c.phones[0].startswith("+569") for c in parsed.contacts) == 766
    assert all(c.phones for c in parsed.contacts)
    # Row 2's debtor has rows due 2025-09-21 (late 170) and twice 2025-07-15 (late 47 and 33):
    # on the same earliest date, the row most overdue counts.
    assert parsed.contacts[0] == Contact(
        row=2,
        name="Josefa Morales Muñoz",
        dni="22.809.354-8",
        phones=("+56954285929", "+56222800793"),
        company="Retail Express",
        debt_amount=Decimal("1169560"),
        due_date=date(2026, 3, 13),
        fecha_maxima=date(2025, 9, 7),
        cantidad_cupones=3,
        days_late=170,
        reference_number="",
        key="22809354-8",
    )


@pytest.mark.parametrize("name", ["argentina.xlsx", "argentina.csv"])
def test_argentina_fixtures(name: str) -> None:
    parsed = parse(name)
    assert parsed.detected_format == ARGENTINA == "argentina"
    assert parsed.columns == {"name": "nombre", "phone": "telefono", "dni": "dni"}
    assert (parsed.total_rows, len(parsed.contacts), parsed.duplicates) == (6, 5, 0)
    assert parsed.invalid == [Problem(7, "no phone")]
    assert parsed.warnings == []
    assert [(c.row, c.name, c.dni, c.phones, c.key) for c in parsed.contacts] == [
        # DNIs written "30123456", formatted as python-stdnum formats them.
        (2, "Lucía Fernández", "30.123.456", ("+5491136530246",), "30123456"),
        (3, "Martín Gómez", "28.999.111", ("+5491136530247",), "28999111"),
        (4, "Carla Ruiz", "33.444.555", ("+5491136530248",), "33444555"),
        (5, "Pablo Sosa", "40.111.222", ("+5491136530249",), "40111222"),
        (6, "Ana Benítez", "27.666.777", ("+5493515550101",), "27666777"),
    ]
    assert all(
        (c.debt_amount, c.due_date, c.fecha_maxima, c.cantidad_cupones, c.days_late) == (None, None, None, 0, None)
        for c in parsed.contacts
    )


# --- files that cannot be read ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("bad_not_really.xlsx", "not a readable Excel workbook"),
        ("bad_empty.csv", "the file is empty"),
        ("bad_header_only.csv", "the file has a header row but no customers below it"),
        ("bad_latin1.csv", "the file is not UTF-8 text (line 1)"),
        ("bad_binary.csv", "the file looks binary, not CSV text"),
    ],
)
def test_bad_fixtures(name: str, message: str) -> None:
    assert message in rejection(FIXTURES / name, name)


def test_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "upload"
    path.write_text("nombre,telefono,dni\nAna,1136530246,30123456\n", encoding="utf-8")
    assert rejection(path, "clientes.xlsx") == (
        "the file is named .xlsx but is not an Excel workbook: open it in Excel and save it again"
    )
    assert rejection(path, "clientes.pdf") == "unsupported file type '.pdf': upload an .xlsx, .xls or .csv file"
    path.write_text("nombre,dni\nAna,30123456\n", encoding="utf-8")
    assert rejection(path, "c.csv").startswith("the file has no phone column: expected a header containing one of")
    path.write_text("nombre,telefono\nAna,1136530246\n", encoding="utf-8")
    assert "cannot tell the file's format" in rejection(path, "c.csv")
    assert rejection(path, "c.csv", country="CL") == "the file has no RUT column: expected one of 'ruts', 'rut'"
    path.write_text("\n \n", encoding="utf-8")
    assert rejection(path, "c.csv") == "the file has no rows: its first sheet, if it is a workbook, is empty"
    path.write_bytes("nombre,telefono,dni\n".encode("utf-16"))
    assert rejection(path, "c.csv") == "the file is not UTF-8 text: it is UTF-16, save it as 'CSV UTF-8'"
    path.write_bytes(b"nombre,telefono,dni\nAna,1136530246,30123456\nMu\xf1oz,1136530247,1\n")
    assert rejection(path, "c.csv") == "the file is not UTF-8 text (line 3): save it as 'CSV UTF-8'"


def test_bad_workbooks(tmp_path: Path) -> None:
    with pytest.raises(BadFile, match="the file has no rows: its first sheet, if it is a workbook, is empty"):
        parse_rows(tmp_path, [])
    with pytest.raises(BadFile, match="the file has a header row but no customers below it"):
        parse_rows(tmp_path, [["RUT", "Celular"]])


def test_unknown_country_is_the_callers_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown country 'PE'"):
        parse_text(tmp_path, "rut,celular\n1-9,912345678\n", country="PE")


# --- reading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("delimiter", [",", ";", "|", "\t"])
def test_csv_delimiters_and_bom(tmp_path: Path, delimiter: str) -> None:
    text = "\ufeff" + delimiter.join(["Nombre", "DNI", "Teléfono"]) + "\n"
    text += delimiter.join(["Ana", "30.123.456", "11-3653-0246"]) + "\n"
    parsed = parse_text(tmp_path, text)
    assert parsed.columns == {"name": "Nombre", "dni": "DNI", "phone": "Teléfono"}
    assert [(c.dni, c.key, c.phones) for c in parsed.contacts] == [("30.123.456", "30123456", ("+5491136530246",))]


def test_blank_rows_short_records_and_quoted_fields(tmp_path: Path) -> None:
    text = 'nombre,dni,telefono,notas\n\n"Pérez, Ana",1,1136530246\n,,,solo una nota\nLuis,2,1136530247,x\n'
    parsed = parse_text(tmp_path, text)
    assert parsed.total_rows == 2
    assert [(c.row, c.name) for c in parsed.contacts] == [(3, "Pérez, Ana"), (5, "Luis")]


@pytest.mark.parametrize("name", ["clientes.xls", "clientes.csv", "clientes"])
def test_a_workbook_is_read_by_its_content_whatever_its_name(tmp_path: Path, name: str) -> None:
    path = tmp_path / "upload.xls"
    path.write_bytes((FIXTURES / "argentina.xlsx").read_bytes())
    assert len(parse_contacts(path, name, today=TODAY).contacts) == 5


def test_chile_values_in_every_cell_type(tmp_path: Path) -> None:
    parsed = parse_rows(
        tmp_path,
        [
            ["Rut", "Nombre", "Empresa", "Saldo", "Fecha de Vencimiento", "Dias de atraso", "Celular", "Teléfono fijo"],
            [213731017, "Ana", "Tienda Sur", 1000, datetime(2025, 9, 1), 2, 981234567, 221234567],
            ["21.373.101-7", "", "", "$ 2.000", 45910, "5", "+56 9 8123 4567", ""],
            ["21373101-7", "", "", 0.5, "20/09/2025", None, "", "(2) 123 4567"],
        ],
    )
    assert parsed.warnings == [] and parsed.invalid == []
    assert parsed.contacts == [
        Contact(
            row=2,
            name="Ana",
            dni="21.373.101-7",
            phones=("+56981234567", "+56221234567"),
            company="Tienda Sur",
            debt_amount=Decimal("3000.5"),
            # Latest: 2025-09-20, no days late given; earliest: 2025-09-01, 2 days late.
            due_date=date(2025, 9, 23),
            fecha_maxima=date(2025, 9, 10),
            cantidad_cupones=3,
            days_late=5,
            reference_number="",
            key="21373101-7",
        )
    ]


def test_unreadable_values_are_warnings(tmp_path: Path) -> None:
    text = "rut,nombre,saldo,vencimiento,dias de retraso,celular,telefono fijo\n"
    text += "12345678-5,Ana,mucho,ayer,tres,981234567,12\n"
    text += "12345678-5,Ana,1.000,2025-09-01,3,,\n"
    parsed = parse_text(tmp_path, text)
    assert parsed.warnings == [
        Problem(2, "landline '12' is invalid for CL: too short"),
        Problem(2, "'mucho' is not an amount: left out of the debt"),
        Problem(2, "days late 'tres' is not a number of days"),
        Problem(2, "due date 'ayer' is not a date"),
    ]
    (contact,) = parsed.contacts
    assert (contact.debt_amount, contact.due_date, contact.cantidad_cupones) == (Decimal(1000), date(2025, 9, 7), 2)


def test_a_debtor_without_any_phone_is_invalid_on_every_row(tmp_path: Path) -> None:
    text = "rut,celular,telefono residencial\n12345678-5,123,\n12345678-5,,\n1-9,,221234567\n1-9,,\n"
    parsed = parse_text(tmp_path, text)
    assert parsed.invalid == [
        Problem(2, "no valid phone: phone '123' is invalid for CL: too short"),
        Problem(3, "no phone"),
    ]
    # The second debtor's phone comes from its other row.
    assert [(c.dni, c.phones, c.cantidad_cupones) for c in parsed.contacts] == [("1-9", ("+56221234567",), 2)]


# --- header matching ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "normalised"),
    [
        ("Días de retraso", "diasderetraso"),
        ("dias_de_retraso", "diasderetraso"),
        ("Teléfono  Móvil", "telefonomovil"),
        ("Origen-Empresa", "origenempresa"),
        ("RUTS", "ruts"),
        (None, ""),
        (12, "12"),
    ],
)
def test_normalise_header(header: object, normalised: str) -> None:
    assert normalise_header(header) == normalised


@pytest.mark.parametrize(
    "columns",
    [
        {
            "rut": "RUTS",
            "name": "Nombre",
            "company": "OrigenEmpresa",
            "amount": "Saldo actualizado",
            "due_date": "FechaVencimiento",
            "days_late": "diasRetraso",
            "mobile": "Teléfono móvil",
        },
        {
            "rut": "Rut",
            "company": "Empresa",
            "amount": "saldo",
            "due_date": "Fecha Vencimiento",
            "days_late": "Días de retraso",
            "mobile": "Telefono movil",
            "landline": "Teléfono fijo",
        },
        {
            "rut": "RUT",
            "company": "Origen Empresa",
            "due_date": "Vencimiento",
            "days_late": "Dias de atraso",
            "mobile": "Teléfono celular",
            "landline": "Teléfono Residencial",
        },
        {
            "rut": "RUT",
            "due_date": "Fecha de Vencimiento",
            "days_late": "dias_de_retraso",
            "mobile": "Celular",
            "reference": "Nº Referencia",
        },
    ],
)
def test_chile_header_variants(tmp_path: Path, columns: dict[str, str]) -> None:
    headers = list(columns.values())
    parsed = parse_text(tmp_path, ";".join(headers) + "\n" + ";".join(["x"] * len(headers)) + "\n")
    assert parsed.detected_format == CHILE
    assert parsed.columns == columns


def test_exact_headers_win_over_containment_and_short_names_only_match_at_an_end(tmp_path: Path) -> None:
    # "Estructura" contains "rut" and "Saldo Principal" contains "saldo": neither is taken.
    text = "Estructura,Saldo Principal,Saldo,Teléfono,Teléfono Residencial,RUT deudor\n"
    text += "E1,1,2,912345678,221234567,12345678-5\n"
    parsed = parse_text(tmp_path, text)
    assert parsed.columns == {
        "amount": "Saldo",
        "mobile": "Teléfono",
        "landline": "Teléfono Residencial",
        "rut": "RUT deudor",
    }
    assert parsed.contacts[0].debt_amount == Decimal(2)


def test_argentina_landline_column(tmp_path: Path) -> None:
    text = "cliente,cuit,celular,telefono fijo\nAna,20-30123456-7,,011 4555-0101\nLuis,,1136530246,11 4555-0102\n"
    parsed = parse_text(tmp_path, text)
    assert parsed.columns == {"name": "cliente", "dni": "cuit", "phone": "celular", "landline": "telefono fijo"}
    assert [(c.key, c.phones) for c in parsed.contacts] == [
        ("20301234567", ("+541145550101",)),
        ("+5491136530246", ("+5491136530246", "+541145550102")),
    ]


@pytest.mark.parametrize(
    ("value", "formatted", "key", "warning"),
    [
        ("30.123.456", "30.123.456", "30123456", ""),  # DNI
        (30123456.0, "30.123.456", "30123456", ""),
        ("7654321", "7.654.321", "7654321", ""),
        ("20-30123456-3", "20-30123456-3", "20301234563", ""),  # CUIL of a person
        ("20301234563", "20-30123456-3", "20301234563", ""),
        ("30-70912345-5", "30-70912345-5", "30709123455", ""),  # CUIT of a company
        ("20-30123456-7", "20-30123456-7", "20301234567", "CUIT/CUIL 20-30123456-7: wrong check digit (expected 3)"),
        ("30709123451", "30-70912345-1", "30709123451", "CUIT/CUIL 30-70912345-1: wrong check digit (expected 5)"),
        ("99-30123456-3", "99-30123456-3", "99301234563", "CUIT/CUIL 99-30123456-3: unknown type 99"),
        ("A-12", "A-12", "A12", "id 'A-12' is not a DNI, CUIT or CUIL: kept as written"),
        ("", "", "", ""),
    ],
)
def test_parse_argentine_id(value: object, formatted: str, key: str, warning: str) -> None:
    assert tuple(parse_argentine_id(value)) == (formatted, key, warning)


def test_argentine_ids_with_a_wrong_check_digit_are_kept_with_a_warning(tmp_path: Path) -> None:
    text = "nombre,cuil,celular\nAna,20-30123456-3,1136530246\nLuis,20-30123456-7,1136530247\n"
    parsed = parse_text(tmp_path, text)
    assert [(c.dni, c.key) for c in parsed.contacts] == [
        ("20-30123456-3", "20301234563"),
        ("20-30123456-7", "20301234567"),
    ]
    assert parsed.warnings == [Problem(3, "CUIT/CUIL 20-30123456-7: wrong check digit (expected 3)")]


def test_a_rut_with_a_wrong_check_digit_is_kept_with_a_warning(tmp_path: Path) -> None:
    text = "rut,celular\n12.345.678-5,981234567\n12.345.678-0,981234568\n25.269.059-1,981234569\n"
    parsed = parse_text(tmp_path, text)
    assert [c.dni for c in parsed.contacts] == ["12.345.678-5", "12.345.678-0", "25.269.059-1"]
    assert parsed.warnings == [
        Problem(3, "RUT 12.345.678-0: wrong check digit (expected 5)"),
        Problem(4, "RUT 25.269.059-1: wrong check digit (expected K)"),
    ]


# --- duplicates and the form's day counts -------------------------------------------------------


def test_duplicates_in_the_file(tmp_path: Path) -> None:
    text = "nombre,dni,telefono\nAna,30.123.456,1136530246\nAna bis,30123456,1136530299\n"
    text += "Luis,,1136530247\nLuis bis,,11-3653-0247\nEva,,1136530248\n"
    parsed = parse_text(tmp_path, text)
    assert (len(parsed.contacts), parsed.duplicates, parsed.total_rows) == (3, 2, 5)
    assert [c.key for c in parsed.contacts] == ["30123456", "+5491136530247", "+5491136530248"]
    allowed = parse_text(tmp_path, text, allow_duplicates=True)
    assert (len(allowed.contacts), allowed.duplicates) == (5, 0)


def test_chile_rows_of_one_rut_are_grouped_not_duplicates(tmp_path: Path) -> None:
    text = "rut,celular\n12.345.678-5,981234567\n12345678-5,981234567\n,981234568\n,981234568\n"
    parsed = parse_text(tmp_path, text)
    assert [(c.key, c.cantidad_cupones) for c in parsed.contacts] == [("12345678-5", 2), ("+56981234568", 1)]
    assert parsed.duplicates == 1
    allowed = parse_text(tmp_path, text, allow_duplicates=True)
    assert [(c.key, c.cantidad_cupones) for c in allowed.contacts] == [
        ("12345678-5", 2),
        ("+56981234568", 1),
        ("+56981234568", 1),
    ]


def test_form_day_counts_replace_the_dates() -> None:
    parsed = parse("chile_cobranza_basica.xlsx", dias_fecha_limite=5, dias_fecha_maxima=10)
    assert {(c.due_date, c.fecha_maxima) for c in parsed.contacts} == {(date(2025, 10, 6), date(2025, 10, 11))}
    only_limit = parse("chile_cobranza_basica.xlsx", dias_fecha_limite=0)
    assert (only_limit.contacts[0].due_date, only_limit.contacts[0].fecha_maxima) == (TODAY, date(2025, 10, 20))


# --- RUTs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "formatted", "valid"),
    [
        ("12.345.678-5", "12.345.678-5", True),
        ("12345678-5", "12.345.678-5", True),
        ("123456785", "12.345.678-5", True),
        (" 12 345 678 - 5 ", "12.345.678-5", True),
        (123456785.0, "12.345.678-5", True),
        (123456785, "12.345.678-5", True),
        ("123456785.0", "12.345.678-5", True),
        ("25269059-k", "25.269.059-K", True),
        ("5.139.299-K", "5.139.299-K", True),
        ("11.966.383-0", "11.966.383-0", True),
        ("1-9", "1-9", True),
        ("12.345.678-0", "12.345.678-0", False),
        ("25269059-1", "25.269.059-1", False),
    ],
)
def test_parse_rut(value: object, formatted: str, valid: bool) -> None:
    rut = parse_rut(value)
    assert (rut.formatted, rut.valid) == (formatted, valid)
    assert rut.key == formatted.replace(".", "")


@pytest.mark.parametrize("value", ["", "abc", "12.345.678-X", "123456789-0", "K", "12.345.678-55"])
def test_not_a_rut(value: str) -> None:
    with pytest.raises(ValueError, match="is not a RUT"):
        parse_rut(value)


@pytest.mark.parametrize(("body", "digit"), [(12345678, "5"), (25269059, "K"), (11966383, "0"), (1, "9")])
def test_rut_check_digit(body: int, digit: str) -> None:
    assert rut_check_digit(body) == digit


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=99_999_999))
def test_any_rut_formats_and_parses_back_to_itself(body: int) -> None:
    rut = parse_rut(f"{body}{rut_check_digit(body)}")
    assert rut.valid
    assert parse_rut(rut.formatted) == rut
    assert parse_rut(rut.key) == rut


# --- phones -------------------------------------------------------------------------------------


def read(phone: Callable[..., str], value: object, landline: bool) -> str | None:
    """The E.164 a reader gives, None when it refuses the value (with a reason, checked elsewhere)."""
    try:
        return phone(value, landline=landline)
    except ValueError as exc:
        assert str(exc).startswith("invalid for ")
        return None


@pytest.mark.parametrize(
    ("value", "landline", "e164"),
    [
        ("+56981234567", False, "+56981234567"),
        ("56981234567", False, "+56981234567"),
        ("981234567", False, "+56981234567"),
        (981234567.0, False, "+56981234567"),
        ("981234567.0", False, "+56981234567"),
        ("09-81234567", False, "+56981234567"),
        ("(9) 8123-4567", False, "+56981234567"),
        ("+56 9 8123 4567", False, "+56981234567"),
        ("98123456", False, "+56998123456"),  # an 8-digit 9xxxxxxx gets another 9
        ("98123456", True, "+56998123456"),
        ("81234567", False, "+56981234567"),  # in a mobile column, any old 8-digit mobile
        ("221234567", True, "+56221234567"),
        ("+56221234567", True, "+56221234567"),
        ("21234567", True, "+56221234567"),  # an 8-digit Santiago number gets the 2
        ("21234567", False, "+56221234567"),
        ("21234567", True, "+56221234567"),
        ("2345678", True, "+56222345678"),  # a 7-digit one gets the 22
        ("(2) 123 4567", True, "+56221234567"),
        ("02 2123 4567", True, "+56221234567"),
        ("322123456", True, "+56322123456"),  # Valparaíso
        ("(32) 212 3456", True, "+56322123456"),
        ("412123456", True, "+56412123456"),  # Concepción
        ("041 212 3456", True, "+56412123456"),
        ("", False, None),
        ("12345", False, None),
        ("812345678", False, "+56812345678"),  # a fixed line of a range the library knows
        ("912345678", False, None),  # no operator has this range: refused, with the library's reason
        ("81234567", True, None),  # a Santiago number 2 8123 4567: not allocated
        ("+51987654321", False, None),
        ("9123456789", False, None),
        ("abc", False, None),
    ],
)
def test_chile_phone(value: object, landline: bool, e164: str | None) -> None:
    assert read(chile_phone, value, landline) == e164


@pytest.mark.parametrize(
    ("value", "landline", "e164"),
    [
        ("5491136530246", False, "+5491136530246"),
        ("11-3653-0246", False, "+5491136530246"),
        ("1136530246", False, "+5491136530246"),
        ("91136530246", False, "+5491136530246"),
        ("011 15 3653-0246", False, "+5491136530246"),
        ("+54 11 3653-0246", False, "+5491136530246"),
        ("36530246", False, "+5491136530246"),  # 8 digits: Buenos Aires
        ("15 3653-0246", False, "+5491136530246"),
        (1136530246.0, False, "+5491136530246"),
        ("+54 9 351 555-0101", False, "+5493515550101"),
        ("0351 15 555-0101", False, "+5493515550101"),  # Córdoba
        ("0341 15 421-2345", False, "+5493414212345"),  # Rosario
        ("0294 15 4123456", False, "+5492944123456"),  # Bariloche: no hand-kept list misses it now
        ("0298 15 4123456", False, "+5492984123456"),  # General Roca
        ("294 15 4123456", False, "+5492944123456"),  # the 15 without the trunk 0
        ("02966 15 41-0101", False, "+5492966410101"),  # a four-digit area code
        ("011 4555-0101", True, "+541145550101"),
        ("36530246", True, "+541136530246"),
        ("+54 11 4555-0101", True, "+541145550101"),
        ("0341 421-2345", True, "+543414212345"),
        ("0294 442-1234", True, "+542944421234"),
        ("011 15 3653-0246", True, "+5491136530246"),  # written as a mobile, it stays one
        ("+54 9 11 3653-0246", True, "+5491136530246"),
        ("", False, None),
        ("12345", False, None),
        ("+56912345678", False, None),
        ("4136530246", False, None),
        ("1236530246", False, None),
        ("011 16 3653-0246", False, None),
    ],
)
def test_argentina_phone(value: object, landline: bool, e164: str | None) -> None:
    assert read(argentina_phone, value, landline) == e164


@pytest.mark.parametrize(
    ("phone", "value", "reason"),
    [
        (chile_phone, "12345", "invalid for CL: too short"),
        (chile_phone, "912345678", "invalid for CL: not a valid number"),
        (chile_phone, "+51987654321", "invalid for CL: a number of another country"),
        (chile_phone, "abc", "invalid for CL: not a phone number"),
        (argentina_phone, "12345", "invalid for AR: too short"),
        (argentina_phone, "+56981234567", "invalid for AR: a number of another country"),
    ],
)
def test_phone_reasons(phone: Callable[..., str], value: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        phone(value)
    assert str(caught.value) == reason


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=999_999))
def test_any_8_digit_98_number_is_a_mobile(number: int) -> None:
    digits = f"98{number:06d}"
    assert chile_phone(digits) == chile_phone(digits, landline=True) == "+569" + digits


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=9_999_999), st.integers(min_value=0, max_value=5))
def test_any_written_chilean_mobile_is_the_same_e164(number: int, style: int) -> None:
    n = f"98{number:07d}"
    written = [f"+56{n}", n, f"56{n}", f"0{n[:1]}-{n[1:]}", f"({n[0]}) {n[1:5]}-{n[5:]}", float(n)][style]
    assert chile_phone(written) == "+56" + n


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=20_000_000, max_value=69_999_999))
def test_any_buenos_aires_mobile_in_every_spelling(number: int) -> None:
    n = str(number)
    spellings = [f"54911{n}", f"11-{n[:4]}-{n[4:]}", f"11{n}", f"911{n}", f"011 15 {n[:4]}-{n[4:]}", n]
    assert {argentina_phone(spelling) for spelling in spellings} == {f"+54911{n}"}


# --- amounts and dates --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "amount"),
    [
        (15990, Decimal(15990)),
        (38981.0, Decimal(38981)),
        (1234.56, Decimal("1234.56")),
        ("$ 120.500", Decimal(120500)),
        ("45.300,50", Decimal("45300.50")),
        ("1.234.567", Decimal(1234567)),
        ("15990", Decimal(15990)),
        ("-2.500", Decimal(-2500)),
        ("0,5", Decimal("0.5")),
        ("", None),
        (None, None),
    ],
)
def test_parse_amount(value: object, amount: Decimal | None) -> None:
    assert parse_amount(value) == amount


@pytest.mark.parametrize("value", ["abc", "1500.5", "12.34", "1,234,567", "$", True])
def test_not_an_amount(value: object) -> None:
    with pytest.raises(ValueError, match="is not an amount"):
        parse_amount(value)


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (date(2025, 9, 1), date(2025, 9, 1)),
        (datetime(2025, 9, 1, 13, 30), date(2025, 9, 1)),
        (45901, date(2025, 9, 1)),
        (45901.75, date(2025, 9, 1)),
        ("45901", date(2025, 9, 1)),
        ("01/09/2025", date(2025, 9, 1)),
        ("1/9/2025", date(2025, 9, 1)),
        ("1-9-2025", date(2025, 9, 1)),
        ("13/09/25", date(2025, 9, 13)),
        ("2025-09-01", date(2025, 9, 1)),
        ("2025-09-01 00:00:00", date(2025, 9, 1)),
        ("2025-09-01T08:00", date(2025, 9, 1)),
        ("", None),
    ],
)
def test_parse_date(value: object, parsed: date | None) -> None:
    assert parse_date(value) == parsed


@pytest.mark.parametrize("value", ["ayer", "31/02/2025", "2025-13-01", "09/2025", 0, 1e9, "nan"])
def test_not_a_date(value: object) -> None:
    with pytest.raises(ValueError, match="is not a date"):
        parse_date(value)


def test_a_legacy_xls_workbook_reads_like_the_xlsx(tmp_path: Path) -> None:
    """.xls (Excel 97-2003) goes through calamine; the same rows give the same jobs."""
    import xlwt

    rows = [
        ["RUT", "Nombre", "Saldo actualizado", "FechaVencimiento", "diasRetraso", "Teléfono móvil", "Teléfono fijo"],
        [213731017.0, "Ana Pérez", 120500, "15/10/2025", 3, 987654321, "223456789"],
        ["21.373.101-7", "Ana Pérez", "$ 45.300,50", "01/11/2025", 0, "+56 9 8765 4321", ""],
        ["12.345.678-5", "Luis Soto", 1000, "2025-12-01", 1, "", "22 345 6789"],
    ]
    book = xlwt.Workbook()
    sheet = book.add_sheet("Hoja1")
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            sheet.write(r, c, value)
    book.add_sheet("vacía")
    path = tmp_path / "upload.xls"
    book.save(str(path))

    parsed = parse_contacts(path, "deudores.xls", today=date(2025, 10, 1))
    assert parsed.detected_format == "chile_debt_collection" and parsed.total_rows == 3
    ana, luis = sorted(parsed.contacts, key=lambda c: c.name)
    assert ana.dni == "21.373.101-7" and ana.cantidad_cupones == 2 and ana.debt_amount == Decimal("165800.50")
    assert ana.phones == ("+56987654321", "+56223456789")
    assert luis.phones == ("+56223456789",) and luis.debt_amount == Decimal(1000)
