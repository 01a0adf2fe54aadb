"""Phone numbers as Google's libphonenumber (`phonenumbers`) reads and validates them, at ingest speed.

Every phone that enters the suite (bulk files, voice workbooks, contacts, devices) is read here:
a national number in a country (the account's, `CL` by default), refused with the library's
reason when it calls the number invalid (`invalid for CL: too short`).

`phonenumbers.parse` and `is_valid_number` cost 20 to 40 µs a number, 20 to 40 s for the
million-row bulk file that is ingested in under 4 s. So a number already in a canonical shape,
`+<country code><digits>` or the bare national digits of the country it is read in, is checked
with one regular expression per region and length, compiled once from the library's own
metadata: the patterns and possible lengths `is_valid_number` tries, in one alternation, so the
library's data still decide (tests/runtime/test_phones.py compares the two over many numbers).
The shape is canonical only where `parse` would take the digits as they are: no international
or national prefix it would strip, no country code shared by several regions (where the
library picks the region by the number). Everything else (spaces, punctuation, trunk prefixes)
goes through `phonenumbers.parse`, which also gives an invalid number its reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

import phonenumbers
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, NumberParseException, PhoneMetadata, PhoneNumberFormat
from phonenumbers import ValidationResult as Possible

DEFAULT_REGION = "CL"
# Longer text is no phone, and parsing it would only cost time.
MAX_PHONE_TEXT = 64

# The number types `is_valid_number` tries after the general description; a number is valid
# when its length and pattern fit the general description and one of these. Mobiles first: the
# order does not change what matches, but most numbers of a send list match the first tried.
_TYPES = (
    "mobile",
    "fixed_line",
    "premium_rate",
    "toll_free",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
)
_WHY_IMPOSSIBLE = {
    Possible.TOO_SHORT: "too short",
    Possible.TOO_LONG: "too long",
    Possible.INVALID_LENGTH: "wrong number of digits",
    Possible.INVALID_COUNTRY_CODE: "unknown country code",
    Possible.IS_POSSIBLE_LOCAL_ONLY: "a local number without its area code",
}
_WHY_UNPARSED = {
    NumberParseException.INVALID_COUNTRY_CODE: "unknown country code",
    NumberParseException.NOT_A_NUMBER: "not a phone number",
    NumberParseException.TOO_SHORT_AFTER_IDD: "too short",
    NumberParseException.TOO_SHORT_NSN: "too short",
    NumberParseException.TOO_LONG: "too long",
}
# Country calling codes are a prefix code: the first 1 to 3 digits that are one are the one.
_CODES = frozenset(str(code) for code in COUNTRY_CODE_TO_REGION_CODE)


@dataclass(frozen=True, slots=True)
class _Region:
    """One region's metadata as regular expressions: which digits `is_valid_number` accepts."""

    region: str
    code: str  # the country calling code, "56"
    national: dict[int, re.Pattern[str]]  # by length: the national significant numbers that are valid
    international: dict[int, re.Pattern[str]]  # by length: code and national number, "56912345678"
    idd: re.Pattern[str] | None  # the international prefix `parse` strips from national digits
    national_prefix: re.Pattern[str] | None  # the trunk prefix (and carrier code) `parse` may strip
    lengths: frozenset[int]  # the general description's possible lengths
    local_lengths: frozenset[int]  # and those of numbers dialled without their area code

    def why(self, nsn: str) -> str:
        """Why a national number the patterns refuse is invalid, as `is_possible_number_with_reason`
        words it: the reason `parse` would lead to, without parsing again."""
        size = len(nsn)
        if -1 in self.lengths:  # a region without numbers of its own
            return _WHY_IMPOSSIBLE[Possible.INVALID_LENGTH]
        if size in self.local_lengths:
            return _WHY_IMPOSSIBLE[Possible.IS_POSSIBLE_LOCAL_ONLY]
        if size in self.lengths:
            return "not a valid number"
        if size < min(self.lengths):
            return _WHY_IMPOSSIBLE[Possible.TOO_SHORT]
        if size > max(self.lengths):
            return _WHY_IMPOSSIBLE[Possible.TOO_LONG]
        return _WHY_IMPOSSIBLE[Possible.INVALID_LENGTH]

    def valid_national(self, digits: str) -> bool | None:
        """Whether national digits (ASCII) are a valid number here; None when `parse` would not
        take them as they are."""
        if digits.startswith(self.code) or (self.idd is not None and self.idd.match(digits)):
            return None
        return self._valid_nsn(digits, self.national.get(len(digits)))

    def valid_international(self, digits: str) -> bool | None:
        """Whether the digits after a "+" (ASCII, starting with this region's code) are valid."""
        return self._valid_nsn(digits[len(self.code) :], self.international.get(len(digits)), whole=digits)

    def _valid_nsn(self, nsn: str, rule: re.Pattern[str] | None, whole: str = "") -> bool | None:
        if self.national_prefix is not None and (found := self.national_prefix.match(nsn)) and found.end():
            return None  # `parse` may strip a prefix: only it knows whether it does
        # A length no number type has is invalid, as `parse` and `is_valid_number` would find.
        return rule is not None and rule.fullmatch(whole or nsn) is not None


@cache
def _region(region: str) -> _Region | None:
    """The compiled rules of a region; None for one whose code other regions share (+1, +7, +44)."""
    metadata = PhoneMetadata.metadata_for_region(region)
    if metadata is None or metadata.country_code is None or metadata.general_desc is None:
        return None
    if not metadata.general_desc.national_number_pattern:
        return None
    if len(COUNTRY_CODE_TO_REGION_CODE.get(metadata.country_code, ())) != 1:
        return None
    general = metadata.general_desc
    code = str(metadata.country_code)
    national: dict[int, re.Pattern[str]] = {}
    international: dict[int, re.Pattern[str]] = {}
    for length in general.possible_length:
        patterns: list[str] = []
        for name in _TYPES:
            desc = getattr(metadata, name)
            if desc is None or not desc.national_number_pattern:
                continue
            if desc.possible_length and length not in desc.possible_length:
                continue
            if desc.national_number_pattern not in patterns:
                patterns.append(desc.national_number_pattern)
        if not patterns:
            continue
        # The general description in a lookahead, the types in one alternation: fullmatch
        # backtracks through every alternative, so it matches when one of them does.
        rule = f"(?=(?:{general.national_number_pattern})\\Z)(?:{'|'.join(patterns)})"
        # ASCII: `\d` must not take other scripts' digits, which only `parse` normalises.
        national[length] = re.compile(rule, re.ASCII)
        international[len(code) + length] = re.compile(f"{code}{rule}", re.ASCII)
    idd = metadata.international_prefix
    prefix = metadata.national_prefix_for_parsing
    return _Region(
        region=region,
        code=code,
        national=national,
        international=international,
        idd=re.compile(idd) if idd else None,
        national_prefix=re.compile(prefix) if prefix else None,
        lengths=frozenset(general.possible_length),
        local_lengths=frozenset(general.possible_length_local_only),
    )


def region_of_code(digits: str) -> str | None:
    """The region of the country code the digits start with, when only one region has it."""
    for size in (1, 2, 3):
        if digits[:size] in _CODES:
            regions = COUNTRY_CODE_TO_REGION_CODE[int(digits[:size])]
            return regions[0] if len(regions) == 1 and regions[0] != "001" else None
    return None


class PhoneReader:
    """Reads written phones in one region: E.164 of the valid ones, the library's reason for the others."""

    def __init__(self, region: str = DEFAULT_REGION) -> None:
        self.region = region.upper()
        rules = _region(self.region)
        if rules is None and PhoneMetadata.metadata_for_region(self.region) is None:
            raise ValueError(f"unknown region {region}")
        self._rules = rules
        self.code = str(phonenumbers.country_code_for_region(self.region))
        # By length, the rules of "+<code><digits>" when nothing else needs checking (no national
        # prefix `parse` could strip): a bulk file's loop matches them inline, "+" included.
        self.plain_international: dict[int, re.Pattern[str]] = {}
        if rules is not None and rules.national_prefix is None:
            self.plain_international = {
                size + 1: re.compile(f"\\+{rule.pattern}", re.ASCII) for size, rule in rules.international.items()
            }
        # The same for national digits, unless they start with what `parse` reads as a country
        # code or an international prefix (`national_guard` matches those).
        self.plain_national = rules.national if rules and rules.national_prefix is None else {}
        guard = f"{self.code}|{rules.idd.pattern}" if rules and rules.idd else self.code
        self.national_guard = re.compile(f"(?:{guard})", re.ASCII)

    def canonical(self, digits: str, *, plus: bool) -> bool | None:
        """Whether ASCII digits, after a "+" or national, are a valid number; None when only
        `phonenumbers.parse` can tell (the caller then asks `e164`)."""
        rules = self._rules_of(digits, plus=plus)
        if rules is None:
            return None
        return rules.valid_international(digits) if plus else rules.valid_national(digits)

    def _rules_of(self, digits: str, *, plus: bool) -> _Region | None:
        rules = self._rules
        if plus and (rules is None or not digits.startswith(rules.code)):
            region = region_of_code(digits)
            rules = _region(region) if region else None
        return rules

    def e164(self, text: str) -> str:
        """E.164 of a written phone; ValueError with the library's reason when it is not a valid one."""
        text = text.strip()
        if not text:
            raise ValueError("no phone")
        if len(text) > MAX_PHONE_TEXT:
            raise ValueError(f"invalid for {self.region}: too long")
        plus = text[0] == "+"
        digits = text[1:] if plus else text
        if digits.isascii() and digits.isdigit() and (rules := self._rules_of(digits, plus=plus)) is not None:
            valid = rules.valid_international(digits) if plus else rules.valid_national(digits)
            if valid:
                return "+" + digits if plus else "+" + self.code + digits
            if valid is not None:
                nsn = digits[len(rules.code) :] if plus else digits
                raise ValueError(f"invalid for {rules.region}: {rules.why(nsn)}")
        return self._parsed(text)

    def _parsed(self, text: str) -> str:
        try:
            number = phonenumbers.parse(text, self.region)
        except NumberParseException as exc:
            why = _WHY_UNPARSED.get(exc.error_type, "not a phone number")
            raise ValueError(f"invalid for {self.region}: {why}") from None
        if phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, PhoneNumberFormat.E164)
        # The reason is worked out only for the few numbers that need one.
        region = phonenumbers.region_code_for_country_code(number.country_code or 0)
        where = region if region != "ZZ" else self.region
        possible = phonenumbers.is_possible_number_with_reason(number)
        if possible != Possible.IS_POSSIBLE:
            raise ValueError(f"invalid for {where}: {_WHY_IMPOSSIBLE.get(possible, 'not a possible number')}")
        raise ValueError(f"invalid for {where}: not a valid number")

    def valid(self, text: str) -> str | None:
        """E.164 of a written phone, or None when it is not a valid one."""
        try:
            return self.e164(text)
        except ValueError:
            return None


@cache
def reader(region: str = DEFAULT_REGION) -> PhoneReader:
    return PhoneReader(region)


def e164(text: str, region: str = DEFAULT_REGION) -> str:
    """E.164 of a written phone, national numbers read in `region`; ValueError with the reason
    ("invalid for CL: too short") when `phonenumbers` finds it invalid."""
    return reader(region.upper()).e164(text)


def argentine_mobile(e164_number: str) -> str:
    """An Argentine landline's mobile form (`+54 9` and the same ten digits) when the library
    takes that as valid, else the number as it is. Campaigns reach mobiles (FORMATS.md)."""
    if not e164_number.startswith("+54") or e164_number.startswith("+549"):
        return e164_number
    mobile = "+549" + e164_number[3:]
    return mobile if reader("AR").canonical(mobile[1:], plus=True) else e164_number
