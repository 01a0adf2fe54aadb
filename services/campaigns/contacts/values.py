"""One cell's value in a customer file: headers, RUTs, Chilean and Argentine phones, amounts, dates.

Each helper takes a cell as the readers give it (text, a number, a date) and returns the
normalised value; the ones that can be wrong raise ValueError with a message for the preview.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import date, datetime, timedelta
from decimal import Decimal
from operator import mul
from typing import NamedTuple

_HEADER_DROPPED = re.compile(r"[\s\-_]+")
_PHONE_PUNCTUATION = re.compile(r"[\s\-()]+")
# A number cell read as text: "213731017.0". Dropping the dot would add a digit.
_SPREADSHEET_FLOAT = re.compile(r"\d+\.0")
_RUT_WEIGHTS = (2, 3, 4, 5, 6, 7) * 2
_RUT = re.compile(r"(\d{1,8})([\dK])")
_AMOUNT = re.compile(r"-?(?:\d{1,3}(?:\.\d{3})+|\d+)(?:,\d+)?")
_DAY_FIRST = re.compile(r"(\d{1,2})[/-](\d{1,2})[/-](\d{4}|\d{2})")
_ISO = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})(?:[T ][\d:.]*)?")
_EXCEL_EPOCH = date(1899, 12, 30)
_SERIAL = re.compile(r"\d+(?:\.\d+)?")
# Serials from 1900 to 2199: any other number in a date column is not a date.
_EXCEL_SERIALS = (1, 109_575)

# Argentine area codes of three digits; "11" (Buenos Aires) is the only one of two, and all
# others have four. Needed to find the domestic mobile "15" that follows the area code.
_AR_AREA_CODES_3 = frozenset(
    "220 221 223 230 236 237 249 260 261 263 264 266 280 291 297 299 336 341 342 343 345 348 "
    "351 353 358 362 364 370 376 379 380 381 383 385 387 388".split()
)


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
        return rut_check_digit(self.body) == self.check_digit


def normalise_header(header: object) -> str:
    """Lower case, accents removed, no spaces, dashes or underscores: "Días de retraso" → "diasderetraso"."""
    text = unicodedata.normalize("NFKD", str(header or "").casefold())
    text = "".join(char for char in text if not unicodedata.combining(char))
    return _HEADER_DROPPED.sub("", text)


def rut_check_digit(body: int) -> str:
    """Mod 11 over the digits from the right, weighted 2 to 7 and again; 10 is written K and 11 is 0."""
    total = sum(map(mul, map(int, reversed(str(body))), _RUT_WEIGHTS))
    remainder = 11 - total % 11
    return "K" if remainder == 10 else "0" if remainder == 11 else str(remainder)


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


def chile_phone(value: object, *, landline: bool = False) -> str | None:
    """E.164 (`+56` and 9 digits) of a Chilean phone, or None when it is not one.

    Mobiles are 9 and 8 digits; landlines an area code and the number (Santiago 2 and 8
    digits). Short numbers are completed: 8 digits starting with 9, and in a mobile column
    any 8 digits but a Santiago number's, are a mobile from before 2012, when mobiles got the
    leading 9; 7 digits and (in a landline column) 8 are a Santiago number from before the
    2 and the 22 were prefixed.
    """
    digits = _national_digits(value, country_code="56", international_lengths=(10, 11))
    if digits is None:
        return None
    if digits[:1] == "0":  # the trunk prefix of domestic dialling
        digits = digits[1:]
    if len(digits) == 8 and digits[0] in "23456789":
        digits = ("9" if digits[0] == "9" or (not landline and digits[0] != "2") else "2") + digits
    elif len(digits) == 7 and digits[0] in "23456789":
        digits = "22" + digits
    if len(digits) != 9 or digits[0] not in "2345679":
        return None
    return "+56" + digits


def argentina_phone(value: object, landline: bool = False) -> str | None:
    """E.164 of an Argentine phone, or None when it is not one.

    Mobiles are `+54 9` and the 10 digits of area code and number; landlines `+54` and those
    10 digits. A number is a mobile when written as one (the 9 after 54, the domestic 15 after
    the area code) or when the column is not a landline column, since campaigns reach mobiles.
    8 digits are a Buenos Aires (11) number.
    """
    digits = _national_digits(value, country_code="54", international_lengths=(12, 13))
    if digits is None:
        return None
    mobile = not landline
    if digits[:1] == "0":  # the trunk prefix of domestic dialling
        digits = digits[1:]
    elif digits[:1] == "9" and len(digits) == 11:  # the international mobile 9 without the 54
        digits, mobile = digits[1:], True
    if len(digits) == 12:
        area = 2 if digits.startswith("11") else 3 if digits[:3] in _AR_AREA_CODES_3 else 4
        if digits[area : area + 2] != "15":
            return None
        digits, mobile = digits[:area] + digits[area + 2 :], True
    elif len(digits) == 10 and digits.startswith("15"):  # a Buenos Aires mobile dialled locally
        digits, mobile = "11" + digits[2:], True
    elif len(digits) == 8:
        digits = "11" + digits
    if len(digits) != 10 or digits[0] not in "123" or (digits[0] == "1" and digits[1] != "1"):
        return None
    return ("+549" if mobile else "+54") + digits


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


def _national_digits(value: object, *, country_code: str, international_lengths: tuple[int, int]) -> str | None:
    """The national digits of a phone: punctuation, a float's ".0" and the country code dropped."""
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
        return None
    if plus or (digits.startswith(country_code) and len(digits) in international_lengths):
        # With a "+" the country code is certain; without it, only the length tells.
        if not digits.startswith(country_code):
            return None
        digits = digits[len(country_code) :]
    return digits


def shown(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."
