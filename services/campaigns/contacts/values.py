"""One cell's value in a customer file: headers, RUTs, DNI/CUIT/CUIL, Chilean and Argentine phones,
amounts, dates.

Each helper takes a cell as the readers give it (text, a number, a date) and returns the
normalised value; the ones that can be wrong raise ValueError with a message for the preview.
Phones are validated by `phonenumbers` (services/runtime/phones.py) after FORMATS.md's own
completions, which are stricter or older than the library (a Chilean 8-digit mobile from before
2012, an Argentine generic column read as a mobile); check digits by `python-stdnum`.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import NamedTuple

from stdnum.ar import cuit as ar_cuit
from stdnum.ar import dni as ar_dni
from stdnum.cl import rut as cl_rut

from services.runtime.phones import argentine_mobile
from services.runtime.phones import reader as phone_reader

_HEADER_DROPPED = re.compile(r"[\s\-_]+")
_PHONE_PUNCTUATION = re.compile(r"[\s\-()]+")
# A number cell read as text: "213731017.0". Dropping the dot would add a digit.
_SPREADSHEET_FLOAT = re.compile(r"\d+\.0")
_RUT = re.compile(r"(\d{1,8})([\dK])")
_AMOUNT = re.compile(r"-?(?:\d{1,3}(?:\.\d{3})+|\d+)(?:,\d+)?")
_DAY_FIRST = re.compile(r"(\d{1,2})[/-](\d{1,2})[/-](\d{4}|\d{2})")
_ISO = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})(?:[T ][\d:.]*)?")
_EXCEL_EPOCH = date(1899, 12, 30)
_SERIAL = re.compile(r"\d+(?:\.\d+)?")
# Serials from 1900 to 2199: any other number in a date column is not a date.
_EXCEL_SERIALS = (1, 109_575)

_ID_PUNCTUATION = re.compile(r"[\s.\-/]+")
_CHILE = phone_reader("CL")


class Rut(NamedTuple):
    body: int
    check_digit: str

    @property
    def formatted(self) -> str:
        return f"{self.body:,}".replace(",", ".") + "-" + self.check_digit

    @property
    def key(self) -> str:
        return f"{self.body}-{self.check_digit}"

    @property
    def valid(self) -> bool:
        # Not `cl_rut.is_valid`, which also wants 7 to 8 body digits: a short RUT stays a RUT.
        return rut_check_digit(self.body) == self.check_digit


def normalise_header(header: object) -> str:
    """Lower case, accents removed, no spaces, dashes or underscores: "Días de retraso" → "diasderetraso"."""
    text = unicodedata.normalize("NFKD", str(header or "").casefold())
    text = "".join(char for char in text if not unicodedata.combining(char))
    return _HEADER_DROPPED.sub("", text)


def rut_check_digit(body: int) -> str:
    """The check digit a RUT body should have (mod 11, K for 10), as `python-stdnum` computes it."""
    return str(cl_rut.calc_check_digit(str(body)))


class ArgentineId(NamedTuple):
    """An Argentine id column's value: DNI (7 or 8 digits) or CUIT/CUIL (11)."""

    formatted: str  # "30.123.456", "20-30123456-3"; as written when it is neither
    key: str  # the digits, for duplicates
    warning: str  # what is wrong with it ("" when nothing is)


def parse_argentine_id(value: object) -> ArgentineId:
    """A DNI, CUIT or CUIL from "30.123.456", "20-30123456-3" or a number cell, formatted.

    A CUIT/CUIL's wrong check digit or unknown type, or an id of neither shape, is kept with a
    warning: the call can still be made, and the id is the customer's to correct.
    """
    text = cell_text(value)
    if _SPREADSHEET_FLOAT.fullmatch(text):
        text = text[:-2]
    compact = _ID_PUNCTUATION.sub("", text).upper()
    if len(compact) == 11 and compact.isdigit():
        formatted = ar_cuit.format(compact)
        if compact[:2] not in ("20", "23", "24", "27", "30", "33", "34"):
            return ArgentineId(formatted, compact, f"CUIT/CUIL {formatted}: unknown type {compact[:2]}")
        if not ar_cuit.is_valid(compact):
            expected = ar_cuit.calc_check_digit(compact[:-1])
            return ArgentineId(formatted, compact, f"CUIT/CUIL {formatted}: wrong check digit (expected {expected})")
        return ArgentineId(formatted, compact, "")
    if ar_dni.is_valid(compact):
        return ArgentineId(ar_dni.format(compact), compact, "")
    warning = f"id '{shown(text)}' is not a DNI, CUIT or CUIL: kept as written" if compact else ""
    return ArgentineId(text, compact, warning)


def parse_rut(value: object) -> Rut:
    """A RUT from "12.345.678-5", "12345678-5", "123456785", "7654321k" or a number cell.

    Raises ValueError when it is not shaped like a RUT; a wrong check digit is left for
    `Rut.valid` to tell, since the preview only warns about it.
    """
    text = cell_text(value)
    if _SPREADSHEET_FLOAT.fullmatch(text):
        text = text[:-2]
    match = _RUT.fullmatch(text.replace(".", "").replace("-", "").replace(" ", "").upper())
    if match is None:
        raise ValueError(f"'{shown(text)}' is not a RUT")
    return Rut(int(match[1]), match[2])


def chile_phone(value: object, *, landline: bool = False) -> str:
    """E.164 of a Chilean phone; ValueError with the reason ("invalid for CL: too short") when
    `phonenumbers` does not take it as a valid number.

    Before the library decides, FORMATS.md's completions: a trunk 0 is dropped (the library
    keeps it: Chile dropped trunk prefixes in 2013); 8 digits starting with 9, and in a mobile
    column any 8 digits but a Santiago number's, are a mobile from before 2012, when mobiles got
    the leading 9; 7 digits and (in a landline column) 8 are a Santiago number from before the 2
    and the 22 were prefixed.
    """
    digits = _national_digits(value, country_code="56", international_lengths=(10, 11), region="CL")
    if digits[:1] == "0":  # the trunk prefix of domestic dialling
        digits = digits[1:]
    if len(digits) == 8 and digits[0] in "23456789":
        digits = ("9" if digits[0] == "9" or (not landline and digits[0] != "2") else "2") + digits
    elif len(digits) == 7 and digits[0] in "23456789":
        digits = "22" + digits
    number = "+56" + digits
    # The library's patterns matched inline, as the bulk file does: a workbook has 200,000 phones.
    rule = _CHILE.plain_international.get(len(number))
    if rule is not None and number.isascii():
        if rule.fullmatch(number):
            return number
        # A length Chile's numbers have, digits its patterns refuse: what `e164` would say.
        raise ValueError("invalid for CL: not a valid number")
    return _CHILE.e164(number)  # the library's reason for another length


def argentina_phone(value: object, landline: bool = False) -> str:
    """E.164 of an Argentine phone; ValueError with the reason when `phonenumbers` does not take
    it as a valid number.

    The library reads the trunk 0 and the domestic mobile 15 after any area code. Mobiles are
    `+54 9` and the 10 digits of area code and number, landlines `+54` and those 10 digits; a
    number is a mobile when written as one (the 9, the 15) or when the column is not a landline
    column, since campaigns reach mobiles. 8 digits are a Buenos Aires (11) number, and so are
    10 that start with 15 (a Buenos Aires mobile dialled locally).
    """
    digits = _national_digits(value, country_code="54", international_lengths=(12, 13), region="AR")
    if len(digits) == 10 and digits.startswith("15"):
        digits, landline = "11" + digits[2:], False
    elif len(digits) == 8:
        digits = "11" + digits
    phone = phone_reader("AR").e164(digits)
    return phone if landline else argentine_mobile(phone)


def parse_amount(value: object) -> Decimal | None:
    """A number cell as it is; text like "$ 120.500" or "45.300,50" (dots for thousands). None when empty."""
    if isinstance(value, bool):
        raise ValueError(f"'{value}' is not an amount")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(int(value)) if value.is_integer() else Decimal(repr(value))
    text = cell_text(value)
    if not text:
        return None
    compact = text.replace("$", "").replace(" ", "").replace("\xa0", "")
    if not _AMOUNT.fullmatch(compact):
        raise ValueError(f"'{shown(text)}' is not an amount")
    return Decimal(compact.replace(".", "").replace(",", "."))


def parse_date(value: object) -> date | None:
    """An Excel date, a serial number (days from 1899-12-30), D/M/Y or D-M-Y (day first), or ISO. None when empty."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        serial = value
    else:
        text = cell_text(value)
        if not text:
            return None
        if iso := _ISO.fullmatch(text):
            return _date(text, int(iso[1]), int(iso[2]), int(iso[3]))
        if day_first := _DAY_FIRST.fullmatch(text):
            year = int(day_first[3])
            return _date(text, year + 2000 if year < 100 else year, int(day_first[2]), int(day_first[1]))
        if not _SERIAL.fullmatch(text):
            raise ValueError(f"'{shown(text)}' is not a date")
        serial = float(text)
    # A serial's fraction is the time of day.
    if not _EXCEL_SERIALS[0] <= serial < _EXCEL_SERIALS[1]:
        raise ValueError(f"'{shown(cell_text(value))}' is not a date")
    return _EXCEL_EPOCH + timedelta(days=int(serial))


def _date(text: str, year: int, month: int, day: int) -> date:
    try:
        return date(year, month, day)
    except ValueError:
        raise ValueError(f"'{shown(text)}' is not a date") from None


def cell_text(value: object) -> str:
    if isinstance(value, str):
        return value.strip()
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _national_digits(value: object, *, country_code: str, international_lengths: tuple[int, int], region: str) -> str:
    """The national digits of a phone: punctuation, a float's ".0" and the country code dropped.

    ValueError when the cell holds no digits, or a number of another country.
    """
    # The usual cells of big exports, a number or bare digits, skip the regular expressions.
    if type(value) is float and value.is_integer():
        plus, digits = False, str(int(value))
    elif type(value) is str and value.isdigit():
        plus, digits = False, value
    else:
        text = cell_text(value)
        if _SPREADSHEET_FLOAT.fullmatch(text):
            text = text[:-2]
        text = _PHONE_PUNCTUATION.sub("", text)
        plus = text[:1] == "+"
        digits = text[1:] if plus else text
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"invalid for {region}: not a phone number")
    if plus or (digits.startswith(country_code) and len(digits) in international_lengths):
        # With a "+" the country code is certain; without it, only the length tells.
        if not digits.startswith(country_code):
            raise ValueError(f"invalid for {region}: a number of another country")
        digits = digits[len(country_code) :]
    return digits


def shown(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."
