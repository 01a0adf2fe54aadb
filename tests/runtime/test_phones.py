"""The phone module: its fast path agrees with `phonenumbers`, and real numbers of Chile and Argentina."""

from __future__ import annotations

import random

import phonenumbers
import pytest
from phonenumbers import NumberParseException, PhoneNumberFormat, PhoneNumberType, ValidationResult

from services.runtime.phones import PhoneReader, argentine_mobile, e164

REGIONS = ("CL", "AR", "PE", "BR", "MX", "CO", "UY", "ES", "DE", "FR", "IN", "US", "GB")
_TYPES = (
    PhoneNumberType.MOBILE,
    PhoneNumberType.FIXED_LINE,
    PhoneNumberType.TOLL_FREE,
    PhoneNumberType.PREMIUM_RATE,
    PhoneNumberType.SHARED_COST,
    PhoneNumberType.VOIP,
    PhoneNumberType.UAN,
)
_WHY = {
    ValidationResult.TOO_SHORT: "too short",
    ValidationResult.TOO_LONG: "too long",
    ValidationResult.INVALID_LENGTH: "wrong number of digits",
    ValidationResult.INVALID_COUNTRY_CODE: "unknown country code",
    ValidationResult.IS_POSSIBLE_LOCAL_ONLY: "a local number without its area code",
}


def library(text: str, region: str) -> str:
    """The library alone, no fast path: E.164, or "!" and the reason."""
    try:
        number = phonenumbers.parse(text, region)
    except NumberParseException:
        return "!unparsed"
    if phonenumbers.is_valid_number(number):
        return phonenumbers.format_number(number, PhoneNumberFormat.E164)
    where = phonenumbers.region_code_for_country_code(number.country_code)
    possible = phonenumbers.is_possible_number_with_reason(number)
    why = "not a valid number" if possible == ValidationResult.IS_POSSIBLE else _WHY[possible]
    return f"!invalid for {where if where != 'ZZ' else region}: {why}"


def ours(text: str, region: str) -> str:
    try:
        return PhoneReader(region).e164(text)
    except ValueError as exc:
        return f"!{exc}"


def numbers_of(region: str, rnd: random.Random, count: int) -> list[str]:
    """National significant numbers near the library's examples (mostly valid), and random digits."""
    examples = [phonenumbers.example_number_for_type(region, kind) for kind in _TYPES]
    seeds = [phonenumbers.national_significant_number(n) for n in examples if n is not None]
    found = []
    for i in range(count):
        if seeds and i % 3:
            seed = rnd.choice(seeds)
            keep = rnd.randint(1, len(seed))  # the example's leading digits, the rest drawn
            found.append(seed[:keep] + "".join(rnd.choice("0123456789") for _ in seed[keep:]))
        else:
            found.append("".join(rnd.choice("0123456789") for _ in range(rnd.randint(1, 14))))
    return found


@pytest.mark.parametrize("region", REGIONS)
def test_the_fast_path_agrees_with_the_library(region: str) -> None:
    """`is_valid_number`'s verdict, the E.164 and the reason of an invalid number, for national
    digits and "+<code><digits>", over generated numbers of the region (many valid)."""
    rnd = random.Random(region)
    code = str(phonenumbers.country_code_for_region(region))
    reader = PhoneReader(region)
    valid = fast = 0
    for nsn in numbers_of(region, rnd, 4000):
        for text, plus in ((nsn, False), ("+" + code + nsn, True)):
            expected = library(text, region)
            got = ours(text, region)
            if expected == "!unparsed":
                assert got.startswith("!invalid for"), text
            else:
                assert got == expected, text
            fast += reader.canonical(text.lstrip("+"), plus=plus) is not None
            valid += not expected.startswith("!")
    assert valid > 1000  # the comparison covers valid numbers, not only refusals
    if region not in ("US", "GB"):  # +1 and +44 are shared by several regions: always the library
        assert fast > 4000


def test_invalid_reasons() -> None:
    assert ours("12345678", "CL") == "!invalid for CL: too short"
    assert ours("123", "AR") == "!invalid for AR: too short"
    assert ours("+569123456789012", "CL") == "!invalid for CL: too long"
    assert ours("912345678", "CL") == "!invalid for CL: not a valid number"  # a range not allocated
    assert ours("abc", "CL") == "!invalid for CL: not a phone number"
    assert ours("", "CL") == "!no phone"
    assert ours("+1234", "CL") == "!invalid for US: too short"  # not +1 234 5678 (issue 16)
    assert ours("+12345678", "CL") == "!invalid for US: a local number without its area code"


@pytest.mark.parametrize(
    ("written", "region", "expected"),
    [
        # Chile: mobiles, Santiago (2), Valparaíso (32), Concepción (41), written every way.
        ("981234567", "CL", "+56981234567"),
        ("+56 9 8123 4567", "CL", "+56981234567"),
        ("56981234567", "CL", "+56981234567"),
        ("(2) 2123 4567", "CL", "+56221234567"),
        ("+56 32 212 3456", "CL", "+56322123456"),
        ("41 212 3456", "CL", "+56412123456"),
        # Argentina: Buenos Aires (11), Córdoba (351), Rosario (341), Bariloche (294), General Roca (298).
        ("11 4444 5555", "AR", "+541144445555"),
        ("011 15 4444-5555", "AR", "+5491144445555"),
        ("0351 15 555-0101", "AR", "+5493515550101"),
        ("0341 421-2345", "AR", "+543414212345"),
        ("0294 15 4123456", "AR", "+5492944123456"),
        ("0298 15 4123456", "AR", "+5492984123456"),
        ("+54 9 294 412-3456", "AR", "+5492944123456"),
        # International numbers whatever the region.
        ("+54 9 11 4444 5555", "CL", "+5491144445555"),
        ("+56 9 8123 4567", "AR", "+56981234567"),
    ],
)
def test_real_numbers(written: str, region: str, expected: str) -> None:
    assert e164(written, region) == expected


def test_argentine_mobile_form() -> None:
    assert argentine_mobile("+541144445555") == "+5491144445555"
    assert argentine_mobile("+5492944123456") == "+5492944123456"
    assert argentine_mobile("+56221234567") == "+56221234567"
