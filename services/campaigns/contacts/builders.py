"""Rows into call jobs: Chilean debtors grouped by RUT, Argentine rows one by one."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal

from services.campaigns.contacts.values import (
    Rut,
    argentina_phone,
    cell_text,
    chile_phone,
    parse_amount,
    parse_argentine_id,
    parse_date,
    parse_rut,
    rut_check_digit,
    shown,
)


@dataclass(frozen=True, slots=True)
class Contact:
    """One call job: a Chilean debtor (all their rows) or one Argentine row."""

    row: int  # the first source row, counting the header as row 1
    name: str
    dni: str  # Chile: the formatted RUT "12.345.678-5"; Argentina: "30.123.456" or "20-30123456-3"
    phones: tuple[str, ...]  # E.164, the mobile first
    company: str
    debt_amount: Decimal | None
    due_date: date | None
    fecha_maxima: date | None
    cantidad_cupones: int  # Chile: the rows grouped into this debtor; Argentina has no debts: 0
    days_late: int | None  # the largest of the debtor's rows
    reference_number: str
    key: str  # for duplicates: the RUT or DNI without punctuation, else the first phone


@dataclass(frozen=True, slots=True)
class Problem:
    row: int
    reason: str


class _Builder:
    """What both formats count, and their phones."""

    def __init__(self, allow_duplicates: bool) -> None:
        self.allow_duplicates = allow_duplicates
        self.invalid: list[Problem] = []
        self.warnings: list[Problem] = []
        self.total_rows = 0
        self.duplicates = 0
        # A debtor's phones repeat on each of their rows: the pair of cells is parsed once.
        self._phone_pairs: dict[tuple[object, object], tuple[list[str], list[str]]] = {}

    def _phone(self, raw: object, *, landline: bool) -> str:
        """E.164; ValueError with `phonenumbers`' reason ("invalid for CL: too short")."""
        raise NotImplementedError

    def _phones(self, mobile: object, landline: object) -> tuple[list[str], list[str]]:
        """The row's phones, its mobile first, and what was wrong with the cells that held none."""
        try:
            return self._phone_pairs[mobile, landline]
        except KeyError:
            pass
        phones: list[str] = []
        complaints: list[str] = []
        for raw, is_landline in ((mobile, False), (landline, True)):
            if raw == "":
                continue
            try:
                phone = self._phone(raw, landline=is_landline)
            except ValueError as exc:
                kind = "landline" if is_landline else "phone"
                complaints.append(f"{kind} '{shown(cell_text(raw))}' is {exc}")
                continue
            if phone not in phones:
                phones.append(phone)
        self._phone_pairs[mobile, landline] = phones, complaints
        return phones, complaints

    @staticmethod
    def _no_phone(complaints: list[str]) -> str:
        return "no valid phone: " + "; ".join(complaints) if complaints else "no phone"


@dataclass(slots=True)
class _Debtor:
    """A Chilean debtor's rows so far, folded as they come so memory does not grow with their count."""

    row: int
    rut: Rut | None
    name: str = ""
    company: str = ""
    reference: str = ""
    phones: list[str] = field(default_factory=list)
    rows: int = 0
    amount: Decimal | None = None
    latest: tuple[date, int] | None = None  # (due date, days late), the latest
    earliest: tuple[date, int] | None = None  # (due date, -days late), the earliest
    days_late: int | None = None
    # Held back until the end, when it is known whether any row gave the debtor a phone.
    warnings: list[Problem] = field(default_factory=list)
    phoneless: list[Problem] = field(default_factory=list)


class ChileBuilder(_Builder):
    """Rows grouped by RUT into one job per debtor; a row without a RUT is a debtor of its own."""

    def __init__(self, allow_duplicates: bool) -> None:
        super().__init__(allow_duplicates)
        self._debtors: dict[str | int, _Debtor] = {}
        # The debtor of each RUT cell value seen: most rows skip the parsing and the formatting.
        self._by_cell: dict[object, _Debtor] = {}
        self._rutless_phones: set[str] = set()

    def _phone(self, raw: object, *, landline: bool) -> str:
        return chile_phone(raw, landline=landline)

    def add(
        self,
        number: int,
        raw_rut: object,
        name: object,
        company: object,
        amount: object,
        due: object,
        late: object,
        landline: object,
        mobile: object,
        reference: object,
    ) -> None:
        """One row, its cells in the order of the package's CHILE_FIELDS."""
        self.total_rows += 1
        phones, complaints = self._phones(mobile, landline)
        debtor = self._by_cell.get(raw_rut)
        if debtor is None:
            debtor = self._debtor(number, raw_rut, phones, complaints)
            if debtor is None:
                return
        debtor.rows += 1
        if phones:
            if phones != debtor.phones:
                debtor.phones.extend(phone for phone in phones if phone not in debtor.phones)
            if complaints:
                debtor.warnings.extend(Problem(number, complaint) for complaint in complaints)
        else:
            debtor.phoneless.append(Problem(number, self._no_phone(complaints)))
        if not debtor.name:
            debtor.name = cell_text(name)
        if not debtor.company:
            debtor.company = cell_text(company)
        if not debtor.reference:
            debtor.reference = cell_text(reference)
        if type(amount) is float and amount.is_integer():  # the usual number cell, without the checks
            debtor.amount = Decimal(int(amount)) if debtor.amount is None else debtor.amount + int(amount)
        elif amount != "":
            try:
                value = parse_amount(amount)
            except ValueError as exc:
                debtor.warnings.append(Problem(number, f"{exc}: left out of the debt"))
            else:
                debtor.amount = value if debtor.amount is None or value is None else debtor.amount + value
        days = self._days_late(debtor, number, late)
        if type(due) is date:  # a date cell, without the checks
            self._fold_due(debtor, due, days or 0)
        elif due != "":
            try:
                due_date = parse_date(due)
            except ValueError as exc:
                debtor.warnings.append(Problem(number, f"due date {exc}"))
            else:
                self._fold_due(debtor, due_date, days or 0)

    def _debtor(self, number: int, raw_rut: object, phones: list[str], complaints: list[str]) -> _Debtor | None:
        """The debtor of a RUT cell not seen before; None when the row is invalid or a duplicate."""
        try:
            rut = parse_rut(raw_rut)
        except ValueError as exc:
            unknown = str(exc) if raw_rut != "" else "no RUT"
        else:
            debtor = self._debtors.get(rut.key)
            if debtor is None:
                debtor = self._debtors[rut.key] = _Debtor(number, rut)
                if not rut.valid:
                    reason = f"RUT {rut.formatted}: wrong check digit (expected {rut_check_digit(rut.body)})"
                    debtor.warnings.append(Problem(number, reason))
            self._by_cell[raw_rut] = debtor
            return debtor
        # Without a RUT, the row is a debtor of its own, known by its phone.
        if not phones:
            self.invalid.append(Problem(number, self._no_phone(complaints)))
            return None
        if phones[0] in self._rutless_phones and not self.allow_duplicates:
            self.duplicates += 1
            return None
        self._rutless_phones.add(phones[0])
        debtor = self._debtors[number] = _Debtor(number, None)
        debtor.warnings.append(Problem(number, f"{unknown}: the debtor is known only by their phone"))
        return debtor

    @staticmethod
    def _days_late(debtor: _Debtor, number: int, late: object) -> int | None:
        if isinstance(late, float) and late.is_integer():
            days = int(late)
        elif late == "":
            return None
        else:
            text = cell_text(late)
            if not text.isdigit():
                debtor.warnings.append(Problem(number, f"days late '{shown(text)}' is not a number of days"))
                return None
            days = int(text)
        if debtor.days_late is None or days > debtor.days_late:
            debtor.days_late = days
        return days

    @staticmethod
    def _fold_due(debtor: _Debtor, due_date: date | None, days: int) -> None:
        if due_date is None:
            return
        # On the same due date, the row most overdue counts for both ends.
        if debtor.latest is None or (due_date, days) > debtor.latest:
            debtor.latest = (due_date, days)
        if debtor.earliest is None or (due_date, -days) < debtor.earliest:
            debtor.earliest = (due_date, -days)

    def finish(self, today: date, dias_fecha_limite: int | None, dias_fecha_maxima: int | None) -> list[Contact]:
        contacts: list[Contact] = []
        for debtor in self._debtors.values():
            if not debtor.phones:
                self.invalid.extend(debtor.phoneless)
                continue
            self.warnings.extend(debtor.warnings)
            if dias_fecha_limite is not None:
                due_date: date | None = today + timedelta(days=dias_fecha_limite)
            elif debtor.latest is not None:
                due_date = debtor.latest[0] + timedelta(days=debtor.latest[1] + 3)
            else:
                due_date = None
            if dias_fecha_maxima is not None:
                fecha_maxima: date | None = today + timedelta(days=dias_fecha_maxima)
            elif debtor.earliest is not None:
                fecha_maxima = debtor.earliest[0] + timedelta(days=-debtor.earliest[1] + 7)
            else:
                fecha_maxima = None
            rut = debtor.rut
            contacts.append(
                Contact(
                    row=debtor.row,
                    name=debtor.name,
                    dni=rut.formatted if rut else "",
                    phones=_mobile_first(debtor.phones, "+569"),
                    company=debtor.company,
                    debt_amount=debtor.amount,
                    due_date=due_date,
                    fecha_maxima=fecha_maxima,
                    cantidad_cupones=debtor.rows,
                    days_late=debtor.days_late,
                    reference_number=debtor.reference,
                    key=rut.key if rut else debtor.phones[0],
                )
            )
        return contacts


def _mobile_first(phones: list[str], mobile_prefix: str) -> tuple[str, ...]:
    """Mobiles first, whichever row or column gave them: a debtor's first row may have had only a landline."""
    if len(phones) < 2 or phones[0].startswith(mobile_prefix):
        return tuple(phones)
    return tuple(sorted(phones, key=lambda phone: not phone.startswith(mobile_prefix)))


class ArgentinaBuilder(_Builder):
    """One job per row."""

    def __init__(self, allow_duplicates: bool) -> None:
        super().__init__(allow_duplicates)
        self._contacts: list[Contact] = []
        self._keys: set[str] = set()

    def _phone(self, raw: object, *, landline: bool) -> str:
        return argentina_phone(raw, landline=landline)

    def add(self, number: int, name: object, dni: object, landline: object, phone: object, reference: object) -> None:
        """One row, its cells in the order of the package's ARGENTINA_FIELDS."""
        self.total_rows += 1
        phones, complaints = self._phones(phone, landline)
        if not phones:
            self.invalid.append(Problem(number, self._no_phone(complaints)))
            return
        identifier = parse_argentine_id(dni)
        key = identifier.key or phones[0]
        if key in self._keys and not self.allow_duplicates:
            self.duplicates += 1
            return
        self._keys.add(key)
        if identifier.warning:
            self.warnings.append(Problem(number, identifier.warning))
        self.warnings.extend(Problem(number, complaint) for complaint in complaints)
        self._contacts.append(
            Contact(
                row=number,
                name=cell_text(name),
                dni=identifier.formatted,
                # A number written as a mobile in the landline column goes first all the same.
                phones=_mobile_first(phones, "+549"),
                company="",
                debt_amount=None,
                due_date=None,
                fecha_maxima=None,
                cantidad_cupones=0,
                days_late=None,
                reference_number=cell_text(reference),
                key=key,
            )
        )

    def finish(self, today: date, dias_fecha_limite: int | None, dias_fecha_maxima: int | None) -> list[Contact]:
        """The form's day counts are for Chile's dates: Argentine files have none."""
        return self._contacts
