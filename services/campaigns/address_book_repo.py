"""SQL of the address book. `scope` is the caller's account, or '' for an admin (all).

Every statement that takes a contact or group id also takes the scope, so an id of another
account finds nothing; memberships are only ever made between a group and contacts of the
group's own account."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import asyncpg

from services.runtime.db import analyze_loaded

IMPORT_TABLE = "contact_import_rows"
IMPORT_COLUMNS = ("import_id", "row_no", "name", "phone", "email", "group_name")


class Q:
    # --- contacts ---
    GET_CONTACT = """
        SELECT c.*, array(SELECT m.group_id FROM group_members m WHERE m.contact_id = c.contact_id
                          ORDER BY m.group_id) AS group_ids
        FROM contacts c WHERE c.contact_id = $1 AND ($2 = '' OR c.account_id = $2)"""
    CONTACT_BY_PHONE = "SELECT contact_id, name FROM contacts WHERE account_id = $1 AND phone = $2"
    # $2: a name pattern ('' = no search); $3: a phone pattern ('' when the search has no digits);
    # $4: a group (0 = any); $5: is_active (NULL = either).
    LIST_CONTACTS = """
        SELECT c.*, array(SELECT m.group_id FROM group_members m WHERE m.contact_id = c.contact_id
                          ORDER BY m.group_id) AS group_ids
        FROM contacts c
        WHERE ($1 = '' OR c.account_id = $1)
          AND ($2 = '' OR c.name ILIKE $2 OR ($3 <> '' AND c.phone LIKE $3))
          AND ($4 = 0 OR EXISTS (SELECT 1 FROM group_members m WHERE m.group_id = $4 AND m.contact_id = c.contact_id))
          AND ($5::boolean IS NULL OR c.is_active = $5)
        ORDER BY c.contact_id LIMIT $6 OFFSET $7"""
    COUNT_CONTACTS = """
        SELECT count(*) FROM contacts c
        WHERE ($1 = '' OR c.account_id = $1)
          AND ($2 = '' OR c.name ILIKE $2 OR ($3 <> '' AND c.phone LIKE $3))
          AND ($4 = 0 OR EXISTS (SELECT 1 FROM group_members m WHERE m.group_id = $4 AND m.contact_id = c.contact_id))
          AND ($5::boolean IS NULL OR c.is_active = $5)"""
    # ON CONFLICT: the caller names the existing contact instead of failing on the constraint.
    INSERT_CONTACT = """
        INSERT INTO contacts (account_id, name, phone, email, is_active) VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (account_id, phone) DO NOTHING RETURNING contact_id"""
    UPDATE_CONTACT = """
        UPDATE contacts SET name = $3, phone = $4, email = $5, is_active = $6, updated_at = now()
        WHERE contact_id = $1 AND ($2 = '' OR account_id = $2) RETURNING contact_id"""
    DELETE_CONTACT = "DELETE FROM contacts WHERE contact_id = $1 AND ($2 = '' OR account_id = $2)"
    # Which of the ids are contacts of the account (the rest are not found).
    CONTACTS_OF_ACCOUNT = "SELECT contact_id FROM contacts WHERE account_id = $1 AND contact_id = ANY($2::bigint[])"

    # An export's page of the address book, along contacts_account (the primary key for an
    # admin's every account); a contact's groups by name, in one cell.
    EXPORT_CONTACTS = """
        SELECT c.contact_id, c.account_id, c.name, c.phone, c.email, c.is_active,
               array_to_string(array(SELECT g.name FROM group_members m JOIN contact_groups g USING (group_id)
                                     WHERE m.contact_id = c.contact_id ORDER BY g.name), ', ') AS groups,
               c.created_at, c.updated_at
        FROM contacts c WHERE ($1 = '' OR c.account_id = $1) AND c.contact_id > $2
        ORDER BY c.contact_id LIMIT $3"""

    # --- groups ---
    # An export's page of the groups, along the primary key.
    EXPORT_GROUPS = """
        SELECT group_id, account_id, name, description, contact_count, created_at, updated_at
        FROM contact_groups WHERE ($1 = '' OR account_id = $1) AND group_id > $2
        ORDER BY group_id LIMIT $3"""
    GET_GROUP = "SELECT * FROM contact_groups WHERE group_id = $1 AND ($2 = '' OR account_id = $2)"
    GROUP_BY_NAME = "SELECT group_id FROM contact_groups WHERE account_id = $1 AND name = $2"
    GROUPS_OF_ACCOUNT = """
        SELECT group_id FROM contact_groups WHERE account_id = $1 AND group_id = ANY($2::bigint[])"""
    LIST_GROUPS = """
        SELECT * FROM contact_groups
        WHERE ($1 = '' OR account_id = $1) AND ($2 = '' OR name ILIKE $2)
        ORDER BY name, group_id LIMIT $3 OFFSET $4"""
    COUNT_GROUPS = """
        SELECT count(*) FROM contact_groups WHERE ($1 = '' OR account_id = $1) AND ($2 = '' OR name ILIKE $2)"""
    INSERT_GROUP = """
        INSERT INTO contact_groups (account_id, name, description, created_by) VALUES ($1, $2, $3, $4)
        ON CONFLICT (account_id, name) DO NOTHING RETURNING *"""
    UPDATE_GROUP = """
        UPDATE contact_groups SET name = $3, description = $4, updated_at = now()
        WHERE group_id = $1 AND ($2 = '' OR account_id = $2) RETURNING *"""
    DELETE_GROUP = "DELETE FROM contact_groups WHERE group_id = $1 AND ($2 = '' OR account_id = $2)"
    # The group's account, not the caller's: an admin cannot put one account's contacts into
    # another's group either.
    ADD_MEMBERS = """
        INSERT INTO group_members (group_id, contact_id)
        SELECT $1::bigint, c.contact_id FROM contacts c WHERE c.account_id = $2 AND c.contact_id = ANY($3::bigint[])
        ON CONFLICT DO NOTHING"""
    REMOVE_MEMBER = "DELETE FROM group_members WHERE group_id = $1 AND contact_id = $2"

    # --- import (rows staged in contact_import_rows by COPY, within one transaction) ---
    NEXT_IMPORT_ID = "SELECT nextval('contact_import_seq')"
    # Groups named in the file's group column that the account does not have yet.
    IMPORT_GROUPS = """
        INSERT INTO contact_groups (account_id, name, created_by)
        SELECT DISTINCT $2::text, group_name, $3::text FROM contact_import_rows
        WHERE import_id = $1 AND group_name <> ''
        ON CONFLICT (account_id, name) DO NOTHING"""
    # A phone repeated in the file: its first row counts (DISTINCT ON keeps the lowest row_no).
    IMPORT_SKIPPING = """
        WITH src AS (
            SELECT DISTINCT ON (phone) phone, name, email FROM contact_import_rows
            WHERE import_id = $1 ORDER BY phone, row_no)
        INSERT INTO contacts (account_id, name, phone, email) SELECT $2::text, name, phone, email FROM src
        ON CONFLICT (account_id, phone) DO NOTHING"""
    # An empty cell keeps what the contact has; a row that changes nothing is not an update.
    # xmax = 0 tells a row this statement inserted from one it updated.
    IMPORT_UPDATING = """
        WITH src AS (
            SELECT DISTINCT ON (phone) phone, name, email FROM contact_import_rows
            WHERE import_id = $1 ORDER BY phone, row_no),
        up AS (
            INSERT INTO contacts AS c (account_id, name, phone, email) SELECT $2::text, name, phone, email FROM src
            ON CONFLICT (account_id, phone) DO UPDATE
            SET name = CASE WHEN excluded.name <> '' THEN excluded.name ELSE c.name END,
                email = CASE WHEN excluded.email <> '' THEN excluded.email ELSE c.email END,
                updated_at = now()
            WHERE (excluded.name <> '' AND excluded.name <> c.name)
               OR (excluded.email <> '' AND excluded.email <> c.email)
            RETURNING (c.xmax = 0) AS created)
        SELECT count(*) FILTER (WHERE created) AS created, count(*) FILTER (WHERE NOT created) AS updated
        FROM up"""
    # Every phone of the file joins the import's group, the existing contacts' too. A phone
    # repeated in the file proposes its membership twice: DO NOTHING takes the second as a
    # conflict, which costs less than making the rows distinct first.
    IMPORT_INTO_GROUP = """
        INSERT INTO group_members (group_id, contact_id)
        SELECT $3::bigint, c.contact_id
        FROM contact_import_rows r JOIN contacts c ON c.account_id = $2 AND c.phone = r.phone
        WHERE r.import_id = $1
        ON CONFLICT DO NOTHING"""
    IMPORT_GROUP_COLUMN = """
        INSERT INTO group_members (group_id, contact_id)
        SELECT g.group_id, c.contact_id
        FROM contact_import_rows r
        JOIN contacts c ON c.account_id = $2 AND c.phone = r.phone
        JOIN contact_groups g ON g.account_id = $2 AND g.name = r.group_name
        WHERE r.import_id = $1 AND r.group_name <> ''
        ON CONFLICT DO NOTHING"""
    # Held until the import commits, so the group it fills cannot be deleted under it.
    LOCK_GROUP = "SELECT group_id FROM contact_groups WHERE group_id = $1 AND account_id = $2 FOR SHARE"
    END_IMPORT = "DELETE FROM contact_import_rows WHERE import_id = $1"

    # --- opt-outs ---
    INSERT_OPT_OUT = """
        INSERT INTO opt_outs (account_id, phone, source) VALUES ($1, $2, $3)
        ON CONFLICT (account_id, phone) DO NOTHING RETURNING *"""
    GET_OPT_OUT = "SELECT * FROM opt_outs WHERE account_id = $1 AND phone = $2"
    LIST_OPT_OUTS = """
        SELECT * FROM opt_outs WHERE ($1 = '' OR account_id = $1)
        ORDER BY created_at DESC, account_id, phone LIMIT $2 OFFSET $3"""
    COUNT_OPT_OUTS = "SELECT count(*) FROM opt_outs WHERE ($1 = '' OR account_id = $1)"
    DELETE_OPT_OUT = "DELETE FROM opt_outs WHERE account_id = $1 AND phone = $2"


def _count(status: str) -> int:
    """The row count of a command tag: 'INSERT 0 12' → 12, 'DELETE 3' → 3."""
    return int(status.split()[-1])


class AddressBookRepo:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self.pool.acquire() as conn, conn.transaction():
            yield conn

    # --- contacts ---

    async def get_contact(
        self, *, contact_id: int, scope: str, conn: asyncpg.Connection | None = None
    ) -> asyncpg.Record | None:
        return await (conn or self.pool).fetchrow(Q.GET_CONTACT, contact_id, scope)

    async def export_contacts(self, *, scope: str, after: int, limit: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(Q.EXPORT_CONTACTS, scope, after, limit)

    async def export_groups(self, *, scope: str, after: int, limit: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(Q.EXPORT_GROUPS, scope, after, limit)

    async def contact_by_phone(self, *, account_id: str, phone: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(Q.CONTACT_BY_PHONE, account_id, phone)

    async def list_contacts(
        self,
        *,
        scope: str,
        name_pattern: str,
        phone_pattern: str,
        group_id: int,
        is_active: bool | None,
        limit: int,
        offset: int,
    ) -> tuple[list[asyncpg.Record], int]:
        filters = (scope, name_pattern, phone_pattern, group_id, is_active)
        rows = await self.pool.fetch(Q.LIST_CONTACTS, *filters, limit, offset)
        return rows, int(await self.pool.fetchval(Q.COUNT_CONTACTS, *filters))

    async def insert_contact(
        self, conn: asyncpg.Connection, *, account_id: str, name: str, phone: str, email: str, is_active: bool
    ) -> int | None:
        """The new contact's id; None when the account has a contact with that phone."""
        return await conn.fetchval(Q.INSERT_CONTACT, account_id, name, phone, email, is_active)

    async def update_contact(
        self, *, contact_id: int, scope: str, name: str, phone: str, email: str, is_active: bool
    ) -> int | None:
        """None when no such contact; UniqueViolationError when another has the phone."""
        return await self.pool.fetchval(Q.UPDATE_CONTACT, contact_id, scope, name, phone, email, is_active)

    async def delete_contact(self, *, contact_id: int, scope: str) -> bool:
        return _count(await self.pool.execute(Q.DELETE_CONTACT, contact_id, scope)) > 0

    async def contacts_of_account(
        self, conn: asyncpg.Connection, *, account_id: str, contact_ids: Sequence[int]
    ) -> set[int]:
        rows = await conn.fetch(Q.CONTACTS_OF_ACCOUNT, account_id, list(contact_ids))
        return {r["contact_id"] for r in rows}

    # --- groups ---

    async def get_group(
        self, *, group_id: int, scope: str, conn: asyncpg.Connection | None = None
    ) -> asyncpg.Record | None:
        return await (conn or self.pool).fetchrow(Q.GET_GROUP, group_id, scope)

    async def group_by_name(self, *, account_id: str, name: str) -> int | None:
        return await self.pool.fetchval(Q.GROUP_BY_NAME, account_id, name)

    async def groups_of_account(
        self, conn: asyncpg.Connection, *, account_id: str, group_ids: Sequence[int]
    ) -> set[int]:
        return {r["group_id"] for r in await conn.fetch(Q.GROUPS_OF_ACCOUNT, account_id, list(group_ids))}

    async def list_groups(
        self, *, scope: str, name_pattern: str, limit: int, offset: int
    ) -> tuple[list[asyncpg.Record], int]:
        rows = await self.pool.fetch(Q.LIST_GROUPS, scope, name_pattern, limit, offset)
        return rows, int(await self.pool.fetchval(Q.COUNT_GROUPS, scope, name_pattern))

    async def insert_group(
        self, *, account_id: str, name: str, description: str, created_by: str
    ) -> asyncpg.Record | None:
        """None when the account has a group of that name."""
        return await self.pool.fetchrow(Q.INSERT_GROUP, account_id, name, description, created_by)

    async def update_group(self, *, group_id: int, scope: str, name: str, description: str) -> asyncpg.Record | None:
        """None when no such group; UniqueViolationError when another has the name."""
        return await self.pool.fetchrow(Q.UPDATE_GROUP, group_id, scope, name, description)

    async def delete_group(self, *, group_id: int, scope: str) -> bool:
        return _count(await self.pool.execute(Q.DELETE_GROUP, group_id, scope)) > 0

    async def add_members(
        self, conn: asyncpg.Connection, *, group_id: int, account_id: str, contact_ids: Sequence[int]
    ) -> int:
        return _count(await conn.execute(Q.ADD_MEMBERS, group_id, account_id, list(contact_ids)))

    async def remove_member(self, *, group_id: int, contact_id: int) -> bool:
        return _count(await self.pool.execute(Q.REMOVE_MEMBER, group_id, contact_id)) > 0

    # --- import: every call inside the import's transaction ---

    async def start_import(self, conn: asyncpg.Connection) -> int:
        return int(await conn.fetchval(Q.NEXT_IMPORT_ID))

    async def lock_group(self, conn: asyncpg.Connection, *, group_id: int, account_id: str) -> bool:
        return await conn.fetchval(Q.LOCK_GROUP, group_id, account_id) is not None

    async def stage_rows(self, conn: asyncpg.Connection, *, records: Sequence[tuple[object, ...]]) -> None:
        """records: (import_id, row_no, name, phone, email, group_name)."""
        await conn.copy_records_to_table(IMPORT_TABLE, records=records, columns=IMPORT_COLUMNS)

    async def apply_import(
        self, conn: asyncpg.Connection, *, import_id: int, account_id: str, created_by: str, update: bool,
        group_id: int, staged: int,
    ) -> tuple[int, int]:  # fmt: skip
        """(created, updated) contacts; memberships and missing groups made; the staged rows gone."""
        # The staged rows were invisible to the statistics: without them the planner takes the
        # joins below for a handful of rows.
        await analyze_loaded(conn, table=IMPORT_TABLE, columns=("import_id", "phone", "group_name"), rows=staged)
        await conn.execute(Q.IMPORT_GROUPS, import_id, account_id, created_by)
        if update:
            counts = await conn.fetchrow(Q.IMPORT_UPDATING, import_id, account_id)
            created, updated = int(counts["created"]), int(counts["updated"])
        else:
            created, updated = _count(await conn.execute(Q.IMPORT_SKIPPING, import_id, account_id)), 0
        if group_id:
            await conn.execute(Q.IMPORT_INTO_GROUP, import_id, account_id, group_id)
        await conn.execute(Q.IMPORT_GROUP_COLUMN, import_id, account_id)
        await conn.execute(Q.END_IMPORT, import_id)
        return created, updated

    # --- opt-outs ---

    async def insert_opt_out(self, *, account_id: str, phone: str, source: str) -> asyncpg.Record | None:
        """None when the number had already opted out."""
        return await self.pool.fetchrow(Q.INSERT_OPT_OUT, account_id, phone, source)

    async def get_opt_out(self, *, account_id: str, phone: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(Q.GET_OPT_OUT, account_id, phone)

    async def list_opt_outs(self, *, scope: str, limit: int, offset: int) -> tuple[list[asyncpg.Record], int]:
        rows = await self.pool.fetch(Q.LIST_OPT_OUTS, scope, limit, offset)
        return rows, int(await self.pool.fetchval(Q.COUNT_OPT_OUTS, scope))

    async def delete_opt_out(self, *, account_id: str, phone: str) -> bool:
        return _count(await self.pool.execute(Q.DELETE_OPT_OUT, account_id, phone)) > 0
