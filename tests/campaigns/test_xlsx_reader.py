"""The streaming .xlsx reader reads what calamine reads, for the columns it is asked for."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path

import pytest
import python_calamine
from hypothesis import given, settings
from hypothesis import strategies as st
from openpyxl import Workbook

from services.campaigns.contacts import parse_date
from services.campaigns.contacts.reading import RowSource
from services.campaigns.contacts.xlsx import XlsxRows, column_index, column_letters

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

cell = st.one_of(
    st.none(),
    # (openpyxl writes a text starting with "=" as a formula: not a value an export holds)
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12).filter(
        lambda t: not t.startswith("=")
    ),
    st.integers(min_value=-(10**9), max_value=10**12),
    st.floats(min_value=-1e9, max_value=1e9, allow_nan=False).map(lambda f: round(f, 4)),
    st.dates(min_value=date(1990, 1, 1), max_value=date(2040, 12, 31)),
    st.booleans(),
)


def same(ours: object, theirs: object) -> bool:
    """Dates come out as Excel serials here and as datetimes from calamine: the same day."""
    if isinstance(theirs, (datetime, date)):
        return parse_date(ours) == parse_date(theirs)
    # The parser reads text stripped (cell_text): surrounding spaces are not data.
    if isinstance(theirs, str) and isinstance(ours, str):
        return ours.strip() == theirs.strip()
    if theirs in ("", None):
        return ours in ("", None) or (isinstance(ours, str) and not ours.strip())
    return ours == theirs


def calamine_rows(path: Path) -> list[list[object]]:
    return python_calamine.CalamineWorkbook.from_path(path).get_sheet_by_index(0).to_python()


def write(path: Path, rows: list[list[object]]) -> None:
    wb = Workbook()
    ws = wb.active
    for row in rows:
        ws.append(row)
    wb.create_sheet("empty")  # real exports carry extra sheets
    wb.save(path)


def test_column_letters_round_trip() -> None:
    for index in (0, 1, 25, 26, 27, 51, 52, 701, 702, 16383):
        assert column_index(column_letters(index)) == index
    assert column_letters(0) == "A" and column_letters(26) == "AA" and column_index("XFD") == 16383


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(cell, min_size=45, max_size=45), min_size=3, max_size=30),
    st.sets(st.integers(0, 44), min_size=1, max_size=7),
)
def test_the_wanted_columns_read_as_calamine_reads_them(
    tmp_path_factory: pytest.TempPathFactory, rows: list[list[object]], wanted: set[int]
) -> None:
    header = [f"col {i} & <más>" for i in range(45)]
    path = tmp_path_factory.mktemp("xlsx") / "sheet.xlsx"
    write(path, [header, *rows])
    theirs = calamine_rows(path)
    reader = XlsxRows(path)
    leading = reader.leading_rows(wanted=1)
    ours = {number: cells for number, cells in leading}
    ours.update(dict(reader.rest(sorted(wanted), 45)))
    reader.close()
    assert ours[1][:45] == header
    for number, expected in enumerate(theirs, start=1):
        got = ours.get(number, [""] * 45)
        columns = range(45) if number in dict(leading) else wanted
        for i in columns:
            assert same(got[i] if i < len(got) else "", expected[i] if i < len(expected) else ""), (number, i)


def test_fixtures_take_the_fast_path() -> None:
    for name in ("chile_cobranza_basica.xlsx", "chile_cobranza_completa.xlsx", "argentina.xlsx"):
        source = RowSource(FIXTURES / name, name)
        assert source._fast is not None, name


def test_what_it_does_not_follow_goes_to_calamine(tmp_path: Path) -> None:
    # A workbook whose XML uses a prefixed namespace, as some exporters write it.
    import zipfile

    plain = tmp_path / "plain.xlsx"
    write(plain, [["RUT", "Nombre", "Celular"], ["12.345.678-5", "Ana", "987654321"]])
    prefixed = tmp_path / "prefixed.xlsx"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(prefixed, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "xl/workbook.xml":
                data = data.replace(b"<workbook ", b'<x:workbook xmlns:x="x" ').replace(b"<sheets>", b"<x:sheets>")
            dst.writestr(item, data)
    source = RowSource(prefixed, "prefixed.xlsx")
    assert source._fast is None
    header, first = source.header_and_first()
    assert header is not None and first is not None and first[1][1] == "Ana"
