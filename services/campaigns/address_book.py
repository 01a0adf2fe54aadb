"""Address-book rules: contacts, groups and opt-outs of an account, and the import of a file.

Phones are stored as E.164, as `phonenumbers` reads them: a national number in the account's
country (CL or AR, or the one the request names), and refused with the library's reason when
it calls the number invalid. One contact per phone and account, one group per name and
account; a conflict names the contact or group that is already there. Every look-up is
scoped to the caller's account (admins: any), and another account's id is "not found".
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import asyncpg
import grpc

from services.runtime import phones
from services.runtime.errors import AlreadyExists, InvalidArgument, NotFound
from services.runtime.identity import Caller

from .address_book_repo import AddressBookRepo
from .batches import listing_scope, scope_of
from .contact_import import ImportFile, RawRow, spooled
from .credit import AccountInfo

COUNTRIES = ("CL", "AR")
DEFAULT_COUNTRY = "CL"
MAX_NAME = 200
MAX_EMAIL = 254  # RFC 5321's limit on a forward path
MAX_DESCRIPTION = 2000
MAX_SEARCH = 200
MAX_IDS = 1000  # contact ids per AddGroupContacts, and groups per contact
MAX_INVALID_SAMPLES = 100
MAX_SAMPLE_VALUE = 100
# Rows checked (in a worker thread) and COPYed per round of an import.
IMPORT_ROUND_ROWS = 20_000
COUNTRY_TTL_S = 60.0
SOURCES = ("user", "inbound")
ON_DUPLICATE = ("skip", "update")

_INT64_MAX = 2**63 - 1
_ID = re.compile(r"[0-9]{1,19}")
# A shape check, not RFC 5322: one @, no spaces, a dot in the domain.
_EMAIL = re.compile(r"[^@\s]+@[^@\s.]+(?:\.[^@\s.]+)+")
_NOT_DIGIT = re.compile(r"\D")
# A search is matched against phones only when it reads as a number ("+56 9 8123", "8123-45"):
# "Juan 2" or a name with digits in it must not bring every phone that contains a 2.
_PHONE_LIKE = re.compile(r"[\d\s+().-]+")
_LIKE_SPECIAL = re.compile(r"([\\%_])")
# --- single values ------------------------------------------------------------------------------


def phone_e164(text: str, country: str) -> str:
    """E.164 of a written phone, national numbers read in `country`; ValueError with the reason
    ("invalid for CL: too short") when `phonenumbers` finds it invalid."""
    return phones.e164(text, country)


def checked_email(text: str) -> str:
    """The address, trimmed ("" for none); ValueError when it is too long or not shaped like one."""
    text = text.strip()
    if len(text) > MAX_EMAIL:
        raise ValueError(f"email is longer than {MAX_EMAIL} characters")
    if text and not _EMAIL.fullmatch(text):
        raise ValueError(f"email '{shown(text)}' is not an address")
    return text


def checked_name(text: str, what: str = "name", limit: int = MAX_NAME) -> str:
    text = text.strip()
    if len(text) > limit:
        raise ValueError(f"{what} is longer than {limit} characters")
    return text


def parse_id(text: str, what: str) -> int:
    """The key an id names; an id that cannot name one is "not found", like an unknown one."""
    text = text.strip()
    if _ID.fullmatch(text) and 0 < (key := int(text)) <= _INT64_MAX:
        return key
    raise NotFound(f"{what} {text[:64]} not found")


def shown(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def like_pattern(text: str) -> str:
    """A LIKE pattern matching `text` anywhere, its wildcards taken literally."""
    escaped = _LIKE_SPECIAL.sub(r"\\\1", text)
    return f"%{escaped}%"


def _invalid(exc: ValueError) -> InvalidArgument:
    return InvalidArgument(str(exc))


def _check(rule: Callable[[], str]) -> str:
    """A value rule's result, its ValueError as a 400."""
    try:
        return rule()
    except ValueError as exc:
        raise _invalid(exc) from None


# --- the account's country ----------------------------------------------------------------------


class AccountCountry:
    """The country an account's national numbers are read in, asked of accounts at most once
    a minute per account. An account accounts does not know reads in CL, like a new one."""

    def __init__(self, account: Callable[[str], Awaitable[AccountInfo]]) -> None:
        self._account = account
        self._known: dict[str, tuple[float, str]] = {}

    async def __call__(self, account_id: str) -> str:
        now = time.monotonic()
        cached = self._known.get(account_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            country = (await self._account(account_id)).country.upper()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            country = DEFAULT_COUNTRY
        country = country if country in COUNTRIES else DEFAULT_COUNTRY
        self._known[account_id] = (now + COUNTRY_TTL_S, country)
        return country


# --- the import's rows --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InvalidRow:
    row: int
    value: str
    reason: str


@dataclass(slots=True)
class RowChecker:
    """Checks an import's rows into COPY records, counting and sampling the invalid ones."""

    import_id: int
    country: str
    valid: int = 0
    invalid: int = 0
    samples: list[InvalidRow] = field(default_factory=list)

    def take(self, rows: Iterator[RawRow], n: int) -> list[tuple[object, ...]]:
        """Up to `n` records (import_id, row, name, phone, email, group) of the next rows."""
        records: list[tuple[object, ...]] = []
        for raw in rows:
            try:
                phone = phone_e164(raw.phone, self.country)
            except ValueError as exc:
                self._reject(raw.row, raw.phone, str(exc))
                continue
            try:
                cell = raw.name
                name = checked_name(cell)
                cell = raw.email
                email = checked_email(cell)
                cell = raw.group
                group = checked_name(cell, "group name")
            except ValueError as exc:
                self._reject(raw.row, cell, str(exc))
                continue
            records.append((self.import_id, raw.row, name, phone, email, group))
            if len(records) >= n:
                break
        self.valid += len(records)
        return records

    def _reject(self, row: int, value: str, reason: str) -> None:
        self.invalid += 1
        if len(self.samples) < MAX_INVALID_SAMPLES:
            self.samples.append(InvalidRow(row, shown(value, MAX_SAMPLE_VALUE), reason))


@dataclass(frozen=True, slots=True)
class ImportRequest:
    account_id: str
    file_name: str
    group_id: str
    on_duplicate: str
    country: str


@dataclass(frozen=True, slots=True)
class ImportOutcome:
    created: int
    updated: int
    skipped: int
    invalid: int
    invalid_rows: list[InvalidRow]
    group_id: int


@dataclass(frozen=True, slots=True)
class ContactPatch:
    """The fields an update names; None leaves the field as it is."""

    name: str | None = None
    phone: str | None = None
    email: str | None = None
    is_active: bool | None = None


# --- the rules ----------------------------------------------------------------------------------


class AddressBook:
    def __init__(self, repo: AddressBookRepo, country_of: Callable[[str], Awaitable[str]]) -> None:
        self.repo = repo
        self._country_of = country_of

    async def _country(self, account_id: str, requested: str) -> str:
        if requested:
            if requested.upper() not in COUNTRIES:
                raise InvalidArgument(f"country must be one of {', '.join(COUNTRIES)}")
            return requested.upper()
        return await self._country_of(account_id)

    # --- contacts ---

    async def get_contact(self, caller: Caller, contact_id: str) -> asyncpg.Record:
        row = await self.repo.get_contact(contact_id=parse_id(contact_id, "contact"), scope=scope_of(caller))
        if row is None:
            raise NotFound(f"contact {contact_id} not found")
        return row

    async def list_contacts(
        self,
        caller: Caller,
        *,
        account_id: str,
        search: str,
        group_id: str,
        is_active: bool | None,
        limit: int,
        offset: int,
    ) -> tuple[list[asyncpg.Record], int]:
        scope = listing_scope(caller, account_id=account_id, limit=limit, skip=offset)
        group = 0
        if group_id:
            group = (await self.get_group(caller, group_id))["group_id"]
        return await self._contacts(
            scope=scope, search=search, group_id=group, is_active=is_active, limit=limit, offset=offset
        )

    async def _contacts(
        self, *, scope: str, search: str, group_id: int, is_active: bool | None, limit: int, offset: int
    ) -> tuple[list[asyncpg.Record], int]:
        search = search.strip()
        if len(search) > MAX_SEARCH:
            raise InvalidArgument(f"search is longer than {MAX_SEARCH} characters")
        digits = _NOT_DIGIT.sub("", search) if _PHONE_LIKE.fullmatch(search) else ""
        return await self.repo.list_contacts(
            scope=scope,
            name_pattern=like_pattern(search) if search else "",
            phone_pattern=f"%{digits}%" if digits else "",
            group_id=group_id,
            is_active=is_active,
            limit=limit,
            offset=offset,
        )

    async def create_contact(
        self,
        caller: Caller,
        *,
        account_id: str,
        name: str,
        phone: str,
        email: str,
        is_active: bool,
        group_ids: Sequence[str],
        country: str,
    ) -> asyncpg.Record:
        account_id = caller.account_scope(account_id)
        name = _check(lambda: checked_name(name))
        email = _check(lambda: checked_email(email))
        if len(group_ids) > MAX_IDS:
            raise InvalidArgument(f"a contact joins at most {MAX_IDS} groups at once")
        groups = sorted({parse_id(g, "group") for g in group_ids})
        country = await self._country(account_id, country)
        e164 = _check(lambda: phone_e164(phone, country))
        async with self.repo.transaction() as conn:
            if missing := set(groups) - await self.repo.groups_of_account(
                conn, account_id=account_id, group_ids=groups
            ):
                raise NotFound(f"group {min(missing)} not found")
            contact_id = await self.repo.insert_contact(
                conn, account_id=account_id, name=name, phone=e164, email=email, is_active=is_active
            )
            if contact_id is None:
                raise await self._phone_taken(account_id, e164)
            for group_id in groups:
                await self.repo.add_members(conn, group_id=group_id, account_id=account_id, contact_ids=[contact_id])
            row = await self.repo.get_contact(contact_id=contact_id, scope=account_id, conn=conn)
        assert row is not None
        return row

    async def _phone_taken(self, account_id: str, phone: str) -> AlreadyExists:
        existing = await self.repo.contact_by_phone(account_id=account_id, phone=phone)
        who = f"contact {existing['contact_id']} ({existing['name'] or 'no name'})" if existing else "another contact"
        return AlreadyExists(f"{phone} is already the phone of {who}")

    async def update_contact(
        self, caller: Caller, contact_id: str, patch: ContactPatch, *, country: str
    ) -> asyncpg.Record:
        current = await self.get_contact(caller, contact_id)
        name = current["name"] if patch.name is None else _check(lambda: checked_name(patch.name or ""))
        email = current["email"] if patch.email is None else _check(lambda: checked_email(patch.email or ""))
        phone = current["phone"]
        if patch.phone is not None:
            reading = await self._country(current["account_id"], country)
            phone = _check(lambda: phone_e164(patch.phone or "", reading))
        is_active = current["is_active"] if patch.is_active is None else patch.is_active
        try:
            done = await self.repo.update_contact(
                contact_id=current["contact_id"],
                scope=current["account_id"],
                name=name,
                phone=phone,
                email=email,
                is_active=is_active,
            )
        except asyncpg.UniqueViolationError:
            raise await self._phone_taken(current["account_id"], phone) from None
        if done is None:  # deleted in between
            raise NotFound(f"contact {contact_id} not found")
        return await self.get_contact(caller, contact_id)

    async def delete_contact(self, caller: Caller, contact_id: str) -> None:
        if not await self.repo.delete_contact(contact_id=parse_id(contact_id, "contact"), scope=scope_of(caller)):
            raise NotFound(f"contact {contact_id} not found")

    # --- import ---

    async def import_contacts(
        self, caller: Caller, request: ImportRequest, chunks: AsyncIterator[bytes]
    ) -> ImportOutcome:
        """Read while the upload arrives, COPY the valid rows as they come and apply them, all in
        one transaction: a bad file (or a dropped upload) leaves nothing behind."""
        account_id = caller.account_scope(request.account_id)
        on_duplicate = request.on_duplicate or "skip"
        if on_duplicate not in ON_DUPLICATE:
            raise InvalidArgument(f"on_duplicate must be one of {', '.join(ON_DUPLICATE)}")
        group_id = 0
        if request.group_id:
            group_id = parse_id(request.group_id, "group")
            if await self.repo.get_group(group_id=group_id, scope=account_id) is None:
                raise NotFound(f"group {request.group_id} not found")
        country = await self._country(account_id, request.country)
        async with spooled(chunks) as path:
            # Parsing is CPU work of seconds for a large file: done in a thread, round by round,
            # so the service keeps answering meanwhile.
            file = await asyncio.to_thread(ImportFile, path, request.file_name)
            rows = file.rows()
            async with self.repo.transaction() as conn:
                if group_id and not await self.repo.lock_group(conn, group_id=group_id, account_id=account_id):
                    raise NotFound(f"group {request.group_id} not found")
                checker = RowChecker(await self.repo.start_import(conn), country)
                while records := await asyncio.to_thread(checker.take, rows, IMPORT_ROUND_ROWS):
                    await self.repo.stage_rows(conn, records=records)
                created, updated = await self.repo.apply_import(
                    conn,
                    import_id=checker.import_id,
                    account_id=account_id,
                    created_by=caller.user_id,
                    update=on_duplicate == "update",
                    group_id=group_id,
                    staged=checker.valid,
                )
        return ImportOutcome(
            created=created,
            updated=updated,
            skipped=checker.valid - created - updated,
            invalid=checker.invalid,
            invalid_rows=checker.samples,
            group_id=group_id,
        )

    # --- groups ---

    async def get_group(self, caller: Caller, group_id: str) -> asyncpg.Record:
        row = await self.repo.get_group(group_id=parse_id(group_id, "group"), scope=scope_of(caller))
        if row is None:
            raise NotFound(f"group {group_id} not found")
        return row

    async def list_groups(
        self, caller: Caller, *, account_id: str, search: str, limit: int, offset: int
    ) -> tuple[list[asyncpg.Record], int]:
        scope = listing_scope(caller, account_id=account_id, limit=limit, skip=offset)
        search = search.strip()
        if len(search) > MAX_SEARCH:
            raise InvalidArgument(f"search is longer than {MAX_SEARCH} characters")
        return await self.repo.list_groups(
            scope=scope, name_pattern=like_pattern(search) if search else "", limit=limit, offset=offset
        )

    @staticmethod
    def _group_fields(name: str, description: str) -> tuple[str, str]:
        name = _check(lambda: checked_name(name, "group name"))
        if not name:
            raise InvalidArgument("group name is empty")
        return name, _check(lambda: checked_name(description, "description", MAX_DESCRIPTION))

    async def _name_taken(self, account_id: str, name: str) -> AlreadyExists:
        existing = await self.repo.group_by_name(account_id=account_id, name=name)
        which = f" (group {existing})" if existing else ""
        return AlreadyExists(f"a group named '{shown(name)}' already exists{which}")

    async def create_group(self, caller: Caller, *, account_id: str, name: str, description: str) -> asyncpg.Record:
        account_id = caller.account_scope(account_id)
        name, description = self._group_fields(name, description)
        row = await self.repo.insert_group(
            account_id=account_id, name=name, description=description, created_by=caller.user_id
        )
        if row is None:
            raise await self._name_taken(account_id, name)
        return row

    async def update_group(
        self, caller: Caller, group_id: str, *, name: str | None, description: str | None
    ) -> asyncpg.Record:
        current = await self.get_group(caller, group_id)
        new_name, new_description = self._group_fields(
            current["name"] if name is None else name,
            current["description"] if description is None else description,
        )
        try:
            row = await self.repo.update_group(
                group_id=current["group_id"], scope=current["account_id"], name=new_name, description=new_description
            )
        except asyncpg.UniqueViolationError:
            raise await self._name_taken(current["account_id"], new_name) from None
        if row is None:
            raise NotFound(f"group {group_id} not found")
        return row

    async def delete_group(self, caller: Caller, group_id: str) -> None:
        if not await self.repo.delete_group(group_id=parse_id(group_id, "group"), scope=scope_of(caller)):
            raise NotFound(f"group {group_id} not found")

    async def group_contacts(
        self, caller: Caller, group_id: str, *, search: str, is_active: bool | None, limit: int, offset: int
    ) -> tuple[list[asyncpg.Record], int]:
        group = await self.get_group(caller, group_id)
        listing_scope(caller, account_id="", limit=limit, skip=offset)  # the page's checks
        return await self._contacts(
            scope=group["account_id"],
            search=search,
            group_id=group["group_id"],
            is_active=is_active,
            limit=limit,
            offset=offset,
        )

    async def add_group_contacts(
        self, caller: Caller, group_id: str, contact_ids: Sequence[str]
    ) -> tuple[int, asyncpg.Record]:
        """(contacts added, the group after). A contact of another account is "not found",
        and then none is added."""
        if not contact_ids:
            raise InvalidArgument("contact_ids is empty: name at least one contact")
        if len(contact_ids) > MAX_IDS:
            raise InvalidArgument(f"at most {MAX_IDS} contacts at once")
        group = await self.get_group(caller, group_id)
        keys = sorted({parse_id(c, "contact") for c in contact_ids})
        account_id = group["account_id"]
        async with self.repo.transaction() as conn:
            found = await self.repo.contacts_of_account(conn, account_id=account_id, contact_ids=keys)
            if missing := [k for k in keys if k not in found]:
                raise NotFound(f"contact {missing[0]} not found")
            added = await self.repo.add_members(
                conn, group_id=group["group_id"], account_id=account_id, contact_ids=keys
            )
            after = await self.repo.get_group(group_id=group["group_id"], scope=account_id, conn=conn)
        if after is None:
            raise NotFound(f"group {group_id} not found")
        return added, after

    async def remove_group_contact(self, caller: Caller, group_id: str, contact_id: str) -> None:
        group = await self.get_group(caller, group_id)
        if not await self.repo.remove_member(group_id=group["group_id"], contact_id=parse_id(contact_id, "contact")):
            raise NotFound(f"contact {contact_id} is not in group {group_id}")

    # --- opt-outs ---

    async def add_opt_out(
        self, caller: Caller, *, account_id: str, phone: str, source: str, country: str
    ) -> tuple[asyncpg.Record, bool]:
        """(the opt-out, whether it is new): adding a number twice keeps the first."""
        account_id = caller.account_scope(account_id)
        source = source or "user"
        if source not in SOURCES:
            raise InvalidArgument(f"source must be one of {', '.join(SOURCES)}")
        reading = await self._country(account_id, country)
        if source == "inbound" and not phone.strip().startswith("+"):
            # WhatsApp gives a sender's number international without its "+" ("5491123456789"):
            # read nationally, a number of another country would be refused.
            phone = "+" + phone.strip()
        e164 = _check(lambda: phone_e164(phone, reading))
        row = await self.repo.insert_opt_out(account_id=account_id, phone=e164, source=source)
        if row is not None:
            return row, True
        existing = await self.repo.get_opt_out(account_id=account_id, phone=e164)
        if existing is None:  # deleted in between: add it again
            return await self.add_opt_out(caller, account_id=account_id, phone=e164, source=source, country=country)
        return existing, False

    async def list_opt_outs(
        self, caller: Caller, *, account_id: str, limit: int, offset: int
    ) -> tuple[list[asyncpg.Record], int]:
        scope = listing_scope(caller, account_id=account_id, limit=limit, skip=offset)
        return await self.repo.list_opt_outs(scope=scope, limit=limit, offset=offset)

    async def delete_opt_out(self, caller: Caller, *, account_id: str, phone: str, country: str) -> None:
        account_id = caller.account_scope(account_id)
        reading = await self._country(account_id, country)
        try:
            e164 = phone_e164(phone, reading)
        except ValueError:
            raise NotFound(f"{shown(phone)} is not on the opt-out list") from None
        if not await self.repo.delete_opt_out(account_id=account_id, phone=e164):
            raise NotFound(f"{e164} is not on the opt-out list")
