"""Exports of campaigns' rows: a bulk batch's per-recipient results, a scheduled message's,
a voice batch's jobs, the scheduled messages, the address book's contacts and groups, as CSV
or XLSX. This module says what each kind reads and who may read it, scoped like every read;
the files are made, while the rows are read, by the writers every service shares
(services/runtime/exports.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from services.runtime.errors import InvalidArgument, NotFound
from services.runtime.exports import (
    DATE,
    FLAG,
    FORMATS,
    INTEGER,
    MONEY,
    NUMBER,
    TEXT,
    TIME,
    Column,
    Export,
    Source,
)
from services.runtime.identity import Caller

from .address_book_repo import AddressBookRepo
from .batches import Batches, scope_of
from .messages_repo import MessagesRepo
from .repo import CampaignsRepo
from .scheduled_messages import parse_id
from .template import NAMED_VARIABLES, compile_template
from .voice_batches import VoiceBatches
from .voice_repo import VoiceRepo

# The guide's types first, then the suite's (the gateway documents them in this order);
# `transactions` is the accounts service's (services/accounts/ledger_export.py).
KINDS = ("messages", "contacts", "groups", "message_results", "bulk_job_results", "voice_batch_jobs")
# A bulk result's own values (`@valorN`) exported at most: a template may name `@valor99999`,
# and a page's cells (PAGE_ROWS times the columns) must stay few.
MAX_VALUE_COLUMNS = 50

# --- what is exported ------------------------------------------------------------------------

BULK_COLUMNS = (
    Column("row", INTEGER, 8),
    Column("phone", TEXT, 16),
    Column("status", TEXT, 10),
    Column("device_id", INTEGER, 10),
    Column("error", TEXT, 30),
    Column("attempts", INTEGER, 9),
    Column("finished_at (UTC)", TIME, 20),
    Column("delivery", TEXT, 10),
    Column("delivered_at (UTC)", TIME, 20),
    Column("read_at (UTC)", TIME, 20),
    Column("delivery_error", TEXT, 30),
)
VOICE_COLUMNS = (
    Column("job_id", TEXT, 12),
    Column("name", TEXT, 24),
    Column("dni", TEXT, 12),
    Column("phone", TEXT, 16),
    Column("other_phones", TEXT, 16),
    Column("status", TEXT, 12),
    Column("outcome", TEXT, 14),
    Column("attempts", INTEGER, 9),
    Column("max_attempts", INTEGER, 12),
    Column("call_started_at (UTC)", TIME, 20),
    Column("call_ended_at (UTC)", TIME, 20),
    Column("call_duration_seconds", NUMBER, 12),
    Column("cost", MONEY, 10),
    Column("summary", TEXT, 50),
    Column("sentiment", TEXT, 12),
    Column("fecha_pago_cliente", DATE, 12),
    Column("monto_pago_cliente", MONEY, 12),
    Column("finished_at (UTC)", TIME, 20),
    Column("cancellation_reason", TEXT, 24),
)
CONTACT_COLUMNS = (
    Column("id", INTEGER, 10),
    Column("account_id", TEXT, 14),
    Column("name", TEXT, 24),
    Column("phone", TEXT, 16),
    Column("email", TEXT, 26),
    Column("is_active", FLAG, 9),
    Column("groups", TEXT, 30),
    Column("created_at (UTC)", TIME, 20),
    Column("updated_at (UTC)", TIME, 20),
)


MESSAGE_COLUMNS = (
    Column("id", INTEGER, 10),
    Column("account_id", TEXT, 14),
    Column("content", TEXT, 50),
    Column("state", TEXT, 10),
    Column("scheduled_for (UTC)", TIME, 20),
    Column("started_at (UTC)", TIME, 20),
    Column("finished_at (UTC)", TIME, 20),
    Column("late", FLAG, 7),
    Column("groups", TEXT, 30),
    Column("recipients", INTEGER, 11),
    Column("sent", INTEGER, 9),
    Column("failed", INTEGER, 9),
    Column("cancelled", INTEGER, 10),
    Column("error", TEXT, 30),
    Column("created_at (UTC)", TIME, 20),
    Column("updated_at (UTC)", TIME, 20),
)
GROUP_COLUMNS = (
    Column("id", INTEGER, 10),
    Column("account_id", TEXT, 14),
    Column("name", TEXT, 24),
    Column("description", TEXT, 40),
    Column("contact_count", INTEGER, 14),
    Column("created_at (UTC)", TIME, 20),
    Column("updated_at (UTC)", TIME, 20),
)


def _values_spread(record: asyncpg.Record) -> list[Any]:
    """A bulk result's row with its recipient's values (its last column) as cells of their own."""
    row = list(record)
    row[-1:] = row[-1]
    return row


class Exports:
    """The exports a caller may make, scoped like every read: a member's own account (another
    account's batch or message is not found), an admin's any (every account's, or the one it
    names, for the listings)."""

    def __init__(
        self,
        *,
        batches: Batches,
        voice: VoiceBatches,
        repo: CampaignsRepo,
        calls: VoiceRepo,
        book: AddressBookRepo,
        messages: MessagesRepo,
    ) -> None:
        self.batches, self.voice = batches, voice
        self.repo, self.calls, self.book, self.messages = repo, calls, book, messages

    async def open(
        self, caller: Caller, *, kind: str, fmt: str, batch_id: str = "", message_id: str = "", account_id: str = ""
    ) -> Export:
        """The export, once the caller may make it; nothing is read of its rows yet."""
        if fmt not in FORMATS:
            raise InvalidArgument(f"format must be one of {', '.join(FORMATS)}")
        if kind == "bulk_job_results":
            return Export(await self._bulk_results(caller, batch_id), fmt)
        if kind == "voice_batch_jobs":
            return Export(await self._voice_jobs(caller, batch_id), fmt)
        if kind == "message_results":
            return Export(await self._message_results(caller, message_id), fmt)
        if kind in ("contacts", "groups", "messages"):
            scope = caller.account_scope(account_id) if account_id else scope_of(caller)
            return Export(self._listing(kind, scope), fmt)
        raise InvalidArgument(f"type must be one of {', '.join(KINDS)}")

    async def _bulk_results(self, caller: Caller, batch_id: str) -> Source:
        batch = await self.batches.get(caller, batch_id)
        if batch["channel"] != "whatsapp":
            raise InvalidArgument(f"batch {batch_id} is a voice campaign: export it as voice_batch_jobs")
        if batch["template_syntax"] == "named":
            # A scheduled message's recipients carry their contact's name and phone (the phone
            # has its column already).
            titles = list(NAMED_VARIABLES[:1])
        else:
            # The values the message used (`@valor1` … `@valorN`), one column each.
            used = min(compile_template(batch["message_template"]).max_index, MAX_VALUE_COLUMNS)
            titles = [f"valor{n}" for n in range(1, used + 1)]
        return self._results(batch["batch_id"], titles, stem=f"job-{batch['batch_id']}-results")

    async def _message_results(self, caller: Caller, message_id: str) -> Source:
        message = await self.messages.export_message(message_id=parse_id(message_id), scope=scope_of(caller))
        if message is None:
            raise NotFound(f"message {message_id} not found")
        # A message that has not started has no batch yet: its file is its header.
        titles = list(NAMED_VARIABLES[:1])
        return self._results(message["batch_id"], titles, stem=f"message-{message['message_id']}-results")

    def _results(self, key: Any, titles: Sequence[str], *, stem: str) -> Source:
        columns = BULK_COLUMNS + tuple(Column(title, TEXT, 16) for title in titles)
        used = len(titles)

        async def page(after: int, limit: int) -> list[asyncpg.Record]:
            if key is None:
                return []
            return await self.repo.export_results(batch_id=key, after=after, limit=limit, values=used)

        return Source(
            stem=stem, sheet="Results", columns=columns, page=page, key=lambda r: int(r["job_id"]), cells=_values_spread
        )

    async def _voice_jobs(self, caller: Caller, batch_id: str) -> Source:
        batch = await self.voice.get(caller, batch_id)
        if batch["channel"] != "voice":
            raise InvalidArgument(f"batch {batch_id} is a WhatsApp send: export it as bulk_job_results")
        key = batch["batch_id"]

        async def page(after: int, limit: int) -> list[asyncpg.Record]:
            return await self.calls.export_jobs(batch_id=key, after=after, limit=limit)

        return Source(
            stem=f"batch-{key}-jobs", sheet="Jobs", columns=VOICE_COLUMNS, page=page, key=lambda r: int(r["id"])
        )

    def _listing(self, kind: str, scope: str) -> Source:
        """An account's (or, for an admin, every account's) messages, contacts or groups."""
        columns: tuple[Column, ...]
        if kind == "messages":
            read, columns, sheet, key = self.messages.export_messages, MESSAGE_COLUMNS, "Messages", "message_id"
        elif kind == "groups":
            read, columns, sheet, key = self.book.export_groups, GROUP_COLUMNS, "Groups", "group_id"
        else:
            read, columns, sheet, key = self.book.export_contacts, CONTACT_COLUMNS, "Contacts", "contact_id"

        async def page(after: int, limit: int) -> list[asyncpg.Record]:
            return await read(scope=scope, after=after, limit=limit)

        return Source(stem=kind, sheet=sheet, columns=columns, page=page, key=lambda r: int(r[key]))
