"""Postgres: one pool per process and the migration runner (numbered .sql files per service,
each service in its own schema)."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg

log = logging.getLogger("pregonero.db")

_SCHEMA_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_MIGRATION_RE = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")


def _check_schema(schema: str) -> str:
    # Schema names are identifiers and cannot be bound as $n parameters; they come from code,
    # never from a request, and are checked against this pattern before any use.
    if not _SCHEMA_RE.match(schema):
        raise ValueError(f"invalid schema name {schema!r}")
    return schema


async def create_pool(dsn: str, *, schema: str | None, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    settings = {"application_name": f"pregonero-{schema or 'client'}"}
    if schema:
        settings["search_path"] = f"{_check_schema(schema)},public"
    return await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, server_settings=settings, command_timeout=60
    )


@asynccontextmanager
async def planned_each_time(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A connection whose statements (in one transaction) are planned for their arguments
    every time. For look-ups on a table that grows from empty at thousands of rows a second:
    a plan cached while it was small (a sequential scan) would otherwise stay until
    autovacuum's next ANALYZE, and a 500-id look-up in a table of 100,000 attempts took
    200 ms instead of 1 ms."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        yield conn


# Below this many rows, a plan misled by stale statistics costs less than an ANALYZE would.
ANALYZE_AFTER_ROWS = 2_000


async def analyze_loaded(conn: asyncpg.Connection, *, table: str, columns: Sequence[str], rows: int) -> None:
    """Fresh statistics for a table that has just taken a bulk load, inside the loading
    transaction (ANALYZE samples that transaction's own rows; the statistics are published
    with the commit), so the first statements on the new rows are planned knowing how many
    there are. Without it the planner takes a new batch for a handful of rows until
    autovacuum comes by, a minute or more later, and the results of a 100,000-row batch were
    applied by walking the whole batch once per result chunk: 10 s per 500 results, not 1 ms.
    A table held by a VACUUM or another load's ANALYZE past two seconds is left to autovacuum:
    the load itself never waits on it or fails for it."""
    if rows < ANALYZE_AFTER_ROWS:
        return
    names = ", ".join(_check_schema(c) for c in columns)  # identifiers from code, checked anyway
    try:
        async with conn.transaction():  # a savepoint: a lock timeout must not undo the load
            await conn.execute("SET LOCAL lock_timeout = '2s'")
            await conn.execute(f"ANALYZE {_check_schema(table)} ({names})")
            await conn.execute("SET LOCAL lock_timeout TO DEFAULT")
    except asyncpg.LockNotAvailableError:
        log.warning("statistics of %s not refreshed after a load of %d rows: the table is busy", table, rows)


def _lock_key(schema: str) -> int:
    # A stable 63-bit key per schema: replicas of one service serialise, services don't.
    digest = hashlib.sha256(f"pregonero.migrate.{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def migration_files(directory: Path) -> list[tuple[int, str, str]]:
    """(version, file name, sql) in version order; a duplicate version is a packaging bug."""
    found: dict[int, tuple[int, str, str]] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _MIGRATION_RE.match(path.name)
        if not m:
            raise ValueError(f"migration file {path.name} is not named NNN_name.sql")
        version = int(m.group(1))
        if version in found:
            raise ValueError(f"two migrations with version {version} in {directory}")
        found[version] = (version, path.name, path.read_text())
    return [found[v] for v in sorted(found)]


async def migrate(conn: asyncpg.Connection, *, schema: str, directory: Path) -> list[int]:
    """Apply the pending migrations of one schema; returns the versions applied now.

    Runs under a session advisory lock so that replicas starting together apply each file
    exactly once; each file runs in its own transaction with its version row."""
    _check_schema(schema)
    files = migration_files(directory)
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _lock_key(schema))
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations (
                    version integer PRIMARY KEY,
                    name text NOT NULL,
                    checksum text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        rows = await conn.fetch(f'SELECT version, checksum FROM "{schema}".schema_migrations')
        done = {r["version"]: r["checksum"] for r in rows}
        for version, name, sql in files:
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            if version in done:
                if done[version] != checksum:
                    raise RuntimeError(f"migration {name} changed after it was applied")
                continue
            async with conn.transaction():
                await conn.execute(f'SET LOCAL search_path TO "{schema}", public')
                await conn.execute(sql)
                await conn.execute(
                    f'INSERT INTO "{schema}".schema_migrations (version, name, checksum) VALUES ($1, $2, $3)',
                    version,
                    name,
                    checksum,
                )
            applied_now.append(version)
            log.info("applied migration %s to schema %s", name, schema)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _lock_key(schema))
    return applied_now


async def check_queries(pool: asyncpg.Pool, queries: object) -> None:
    """Prepare every named query (the UPPER_CASE str attributes of a queries holder) once at
    start, so a typo or a missing column fails the boot instead of a request."""
    names = [n for n in dir(queries) if n.isupper() and isinstance(getattr(queries, n), str)]
    async with pool.acquire() as conn:
        for name in names:
            try:
                await conn.prepare(getattr(queries, name))
            except asyncpg.PostgresError as exc:
                raise RuntimeError(f"query {name} does not prepare: {exc}") from exc
