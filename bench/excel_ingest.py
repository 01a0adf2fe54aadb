"""How fast the campaigns service ingests a large Chile debt-collection workbook.

`python -m bench.excel_ingest [rows]` writes a realistic 45-column export (the layout of
tests/fixtures/chile_cobranza_completa.xlsx plus the two address columns real exports carry)
to a temporary folder and times `parse_contacts` on it. The target is 20,000 rows/s for
100,000 rows on the 2-core machine, with the process's peak RSS reported beside it.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import multiprocessing
import random
import resource
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape

from services.campaigns.contacts import parse_contacts

HEADERS = [
    "Título", "Cuota", "NúmeroPedido", "CicloCaptacion", "CicloIndicador", "Grupo", "NúmeroFactura",
    "FechaPedido", "FechaVencimientoOriginal", "FechaVencimiento", "ValorTítulo", "Saldo Principal",
    "Saldo Financiero", "Saldo Total", "Saldo actualizado", "Situación", "Días de retraso",
    "Control/Fecha de Envío la Pérdida", "FechaSaldo", "Data Saldo Corregido", "Fecha de pago",
    "Fecha de Encerramiento", "EntidadConciliación", "Negociación", "Fase del Cobro",
    "Cód Estructura Padre", "Estructura Padre", "Cód Estructura", "Estructura", "CódigoPersona",
    "Nombre", "Dirección", "Comuna", "Región", "Teléfono Residencial", "Teléfono móvil",
    "Correo electrónico personal", "Entidad de credito/cobro", "CodPlanRecibimiento", "PlanRecibimiento",
    "CodModeloComercial", "ModeloComercial", "Contestado", "Origen Empresa", "RUTS",
]  # fmt: skip
FIRST = ["Juan", "María", "José", "Camila", "Pedro", "Valentina", "Diego", "Josefa", "Matías", "Sofía"]
LAST = ["Pérez", "González", "Muñoz", "Rojas", "Díaz", "Soto", "Contreras", "Silva", "Sepúlveda"]
COMPANIES = ["Retail Express", "Tienda Sur", "Casa Andina"]
COMUNAS = ["Santiago", "Maipú", "Puente Alto", "La Florida", "Ñuñoa", "Valparaíso", "Concepción"]

_EXCEL_EPOCH = dt.date(1899, 12, 30)
_NS = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_REL = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_PKG = "http://schemas.openxmlformats.org/package/2006"
_XML = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
_SHEET_START = f'{_XML}<worksheet xmlns="{_NS}"><sheetData>'
_SHEETS = ("Hoja1", "Hoja2", "Hoja3")
_PARTS = {
    "[Content_Types].xml": (
        f'{_XML}<Types xmlns="{_PKG}/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/xl/workbook.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
        '<Override PartName="/xl/styles.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.styles+xml"/>'
        '<Override PartName="/xl/sharedStrings.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sharedStrings+xml"/>'
        + "".join(
            f'<Override PartName="/xl/worksheets/sheet{n}.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
            for n in range(1, len(_SHEETS) + 1)
        )
        + "</Types>"
    ),
    "_rels/.rels": (
        f'{_XML}<Relationships xmlns="{_PKG}/relationships">'
        f'<Relationship Id="rId1" Type="{_REL}/officeDocument" Target="xl/workbook.xml"/></Relationships>'
    ),
    "xl/workbook.xml": (
        f'{_XML}<workbook xmlns="{_NS}" xmlns:r="{_REL}"><sheets>'
        + "".join(f'<sheet name="{name}" sheetId="{n}" r:id="rId{n}"/>' for n, name in enumerate(_SHEETS, 1))
        + "</sheets></workbook>"
    ),
    "xl/_rels/workbook.xml.rels": (
        f'{_XML}<Relationships xmlns="{_PKG}/relationships">'
        + "".join(
            f'<Relationship Id="rId{n}" Type="{_REL}/worksheet" Target="worksheets/sheet{n}.xml"/>'
            for n in range(1, len(_SHEETS) + 1)
        )
        + f'<Relationship Id="rId{len(_SHEETS) + 1}" Type="{_REL}/styles" Target="styles.xml"/>'
        + f'<Relationship Id="rId{len(_SHEETS) + 2}" Type="{_REL}/sharedStrings" Target="sharedStrings.xml"/>'
        + "</Relationships>"
    ),
    # Style 1 is the built-in short date format (numFmtId 14), which readers turn into dates.
    "xl/styles.xml": (
        f'{_XML}<styleSheet xmlns="{_NS}"><fonts count="1"><font><sz val="11"/><name val="Calibri"/></font></fonts>'
        '<fills count="1"><fill><patternFill patternType="none"/></fill></fills>'
        '<borders count="1"><border/></borders><cellStyleXfs count="1"><xf/></cellStyleXfs>'
        '<cellXfs count="2"><xf numFmtId="0"/><xf numFmtId="14" applyNumberFormat="1"/></cellXfs></styleSheet>'
    ),
    **{f"xl/worksheets/sheet{n}.xml": f"{_SHEET_START}</sheetData></worksheet>" for n in range(2, len(_SHEETS) + 1)},
}


def _check_digit(body: int) -> str:
    total, factor = 0, 2
    for digit in reversed(str(body)):
        total += int(digit) * factor
        factor = 2 if factor == 7 else factor + 1
    return {11: "0", 10: "K"}.get(11 - total % 11, str(11 - total % 11))


def _debtor(rng: random.Random) -> tuple[object, str, object, str]:
    body = rng.randint(5_000_000, 25_999_999)
    dv = _check_digit(body)
    # Number cells where the RUT allows it, as the real exports store them.
    rut: object = float(f"{body}{dv}") if dv.isdigit() else f"{body:,}".replace(",", ".") + f"-{dv}"
    mobile = f"9{rng.randint(10_000_000, 99_999_999)}"
    landline = f"22{rng.randint(1_000_000, 9_999_999)}"
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)} {rng.choice(LAST)}"
    return rut, name, int(mobile) if rng.random() < 0.7 else f"+56 {mobile}", landline


def _column_letters(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, remainder = divmod(index - 1, 26)
        letters = chr(65 + remainder) + letters
    return letters


def _rows(rows: int) -> Iterator[list[object]]:
    rng = random.Random(rows)
    debtors = [_debtor(rng) for _ in range(max(rows // 2, 1))]
    start = dt.date(2025, 6, 1)
    yield list(HEADERS)
    for i in range(rows):
        rut, name, mobile, landline = debtors[rng.randrange(len(debtors))]
        due = start + dt.timedelta(days=rng.randint(0, 120))
        balance = rng.randint(5_000, 900_000)
        late = rng.randint(0, 180)
        yield [
            f"T{i:07d}", rng.randint(1, 12), 4_000_000 + i, "2025-06", "C1", f"G{i % 40}", f"F{i:08d}",
            due - dt.timedelta(days=30), due, due, balance, balance, 0, balance, balance, "Vencido", late,
            None, due + dt.timedelta(days=late), balance, None, None, "Banco Sur", "No", "Prejudicial",
            100 + i % 7, "Regional", 200 + i % 13, "Zona Centro", 900_000 + i, name,
            f"Calle {rng.randint(1, 999)} #{rng.randint(1, 9999)}", rng.choice(COMUNAS), "RM",
            landline, mobile, f"cliente{i}@correo.cl", "Cobranza Ltda", 7, "Plan 7", 3, "Retail", None,
            COMPANIES[i % 3], rut,
        ]  # fmt: skip


def make_workbook(path: Path, rows: int = 100_000) -> None:
    """A first sheet of `rows` debts over about rows/2 debtors, most columns filled, then two empty sheets.

    Written as Excel writes it (shared strings, dates as serials with a date style, cell
    references) straight to XML: openpyxl takes over a minute for 100,000 rows and writes
    inline strings, which make the sheet several times larger than a real export's.
    """
    letters = [_column_letters(i) for i in range(len(HEADERS))]
    strings: dict[str, int] = {}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, text in _PARTS.items():
            archive.writestr(name, text)
        with archive.open("xl/worksheets/sheet1.xml", "w") as raw, io.TextIOWrapper(raw, "utf-8") as sheet:
            sheet.write(_SHEET_START)
            for number, values in enumerate(_rows(rows), start=1):
                cells = []
                for letter, value in zip(letters, values, strict=True):
                    if value is None:
                        continue
                    ref = f"{letter}{number}"
                    if isinstance(value, str):
                        index = strings.setdefault(value, len(strings))
                        cells.append(f'<c r="{ref}" t="s"><v>{index}</v></c>')
                    elif isinstance(value, dt.date):
                        cells.append(f'<c r="{ref}" s="1"><v>{(value - _EXCEL_EPOCH).days}</v></c>')
                    else:
                        cells.append(f'<c r="{ref}"><v>{value}</v></c>')
                sheet.write(f'<row r="{number}">{"".join(cells)}</row>')
            sheet.write("</sheetData></worksheet>")
        with archive.open("xl/sharedStrings.xml", "w") as raw, io.TextIOWrapper(raw, "utf-8") as shared:
            shared.write(f'{_XML}<sst xmlns="{_NS}" count="{len(strings)}" uniqueCount="{len(strings)}">')
            for text in strings:
                shared.write(f"<si><t>{escape(text)}</t></si>")
            shared.write("</sst>")


def measure(rows: int = 100_000) -> dict[str, float]:
    """Parse a fresh `rows`-row workbook; the workbook's writing is not timed."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cobranza.xlsx"
        # Written in a child process, so that the peak RSS measured below is the parse's alone.
        writer = multiprocessing.get_context("fork").Process(target=make_workbook, args=(path, rows))
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            raise RuntimeError(f"writing the workbook failed (exit code {writer.exitcode})")
        started = time.perf_counter()
        parsed = parse_contacts(path, path.name, today=dt.date(2025, 10, 1))
        seconds = time.perf_counter() - started
    assert parsed.total_rows == rows, (parsed.total_rows, rows)
    # ru_maxrss is in KiB on Linux: the peak of this process, imports included.
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds),
        "peak_rss_mb": round(peak_mb, 1),
    }


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)))
