"""The ledger's entries as a CSV or XLSX file (the reports' `transactions`), scoped like every
read of the ledger: a member's own account, an admin's every account or the one it names. The
entries are read in keyset pages by id and written by the shared streaming writers
(services/runtime/exports.py), so a ledger of millions of entries downloads in flat memory."""

from __future__ import annotations

import asyncpg

from services.runtime.errors import InvalidArgument, NotFound
from services.runtime.exports import FORMATS, INTEGER, MONEY, TEXT, TIME, Column, Export, Source
from services.runtime.identity import Caller

from .repo import LedgerRepo

# Amounts in the account's unit (credits or minutes), signed as the ledger books them.
TRANSACTION_COLUMNS = (
    Column("entry_id", INTEGER, 10),
    Column("account_id", TEXT, 14),
    Column("created_at (UTC)", TIME, 20),
    Column("kind", TEXT, 11),
    Column("unit", TEXT, 8),
    Column("amount", MONEY, 12),
    Column("held_change", MONEY, 12),
    Column("used_change", MONEY, 12),
    Column("balance_after", MONEY, 14),
    Column("held_after", MONEY, 12),
    Column("requested", MONEY, 12),
    Column("cause", TEXT, 30),
    Column("hold_id", TEXT, 30),
    Column("note", TEXT, 30),
)


class LedgerExport:
    def __init__(self, repo: LedgerRepo) -> None:
        self.repo = repo

    async def open(self, caller: Caller, *, fmt: str, account_id: str = "") -> Export:
        """The export, once the caller may make it; nothing is read of its entries yet."""
        if fmt not in FORMATS:
            raise InvalidArgument(f"format must be one of {', '.join(FORMATS)}")
        if account_id:
            scope = caller.account_scope(account_id)
            if await self.repo.account(account_id=scope) is None:
                raise NotFound(f"account {account_id} not found")
        else:
            scope = "" if caller.is_admin else caller.account_id

        async def page(after: int, limit: int) -> list[asyncpg.Record]:
            return await self.repo.export_entries(scope=scope, after=after, limit=limit)

        return Export(
            Source(
                stem="transactions",
                sheet="Transactions",
                columns=TRANSACTION_COLUMNS,
                page=page,
                key=lambda r: int(r["id"]),
            ),
            fmt,
        )
