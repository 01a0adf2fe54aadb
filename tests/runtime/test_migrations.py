"""The migration runner: order, once-only under concurrency, atomic failures, drift checks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from services.runtime.db import migrate, migration_files

FILES = {
    "001_create.sql": "CREATE TABLE things (id int PRIMARY KEY, name text);",
    "002_seed.sql": "INSERT INTO things VALUES (1, 'one'); SELECT pg_sleep(0.2);",
    "010_more.sql": "ALTER TABLE things ADD COLUMN extra int NOT NULL DEFAULT 7;",
}


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql)
    return directory


async def test_applies_in_version_order_and_only_once(fresh_db: str, tmp_path: Path) -> None:
    folder = write(tmp_path / "m", FILES)
    conn = await asyncpg.connect(fresh_db)
    try:
        assert await migrate(conn, schema="svc", directory=folder) == [1, 2, 10]
        assert await migrate(conn, schema="svc", directory=folder) == []
        row = await conn.fetchrow("SELECT id, name, extra FROM svc.things")
        assert dict(row) == {"id": 1, "name": "one", "extra": 7}
        versions = await conn.fetch("SELECT version FROM svc.schema_migrations ORDER BY version")
        assert [r["version"] for r in versions] == [1, 2, 10]
    finally:
        await conn.close()


async def test_replicas_starting_together_apply_each_file_once(fresh_db: str, tmp_path: Path) -> None:
    folder = write(tmp_path / "m", FILES)
    conns = [await asyncpg.connect(fresh_db) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c, schema="svc", directory=folder) for c in conns))
        # Exactly one replica applied everything; the seed row exists once.
        assert sorted(results, key=len) == [[], [], [], [1, 2, 10]]
        assert await conns[0].fetchval("SELECT count(*) FROM svc.things") == 1
    finally:
        for c in conns:
            await c.close()


async def test_failed_migration_changes_nothing(fresh_db: str, tmp_path: Path) -> None:
    folder = write(
        tmp_path / "m",
        {"001_ok.sql": FILES["001_create.sql"], "002_bad.sql": "INSERT INTO things VALUES (1, 'x'); SELEC oops;"},
    )
    conn = await asyncpg.connect(fresh_db)
    try:
        with pytest.raises(asyncpg.PostgresSyntaxError):
            await migrate(conn, schema="svc", directory=folder)
        assert await conn.fetchval("SELECT count(*) FROM svc.things") == 0
        assert await conn.fetchval("SELECT max(version) FROM svc.schema_migrations") == 1
        # The lock was released: a fixed file applies on the next start.
        (folder / "002_bad.sql").write_text("INSERT INTO things VALUES (1, 'x');")
        assert await migrate(conn, schema="svc", directory=folder) == [2]
    finally:
        await conn.close()


async def test_edited_applied_migration_stops_the_start(fresh_db: str, tmp_path: Path) -> None:
    folder = write(tmp_path / "m", {"001_create.sql": FILES["001_create.sql"]})
    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn, schema="svc", directory=folder)
        (folder / "001_create.sql").write_text("CREATE TABLE things (id bigint);")
        with pytest.raises(RuntimeError, match="changed after it was applied"):
            await migrate(conn, schema="svc", directory=folder)
    finally:
        await conn.close()


def test_badly_named_or_duplicate_files_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NNN_name"):
        migration_files(write(tmp_path / "a", {"create.sql": "select 1"}))
    with pytest.raises(ValueError, match="two migrations"):
        migration_files(write(tmp_path / "b", {"001_a.sql": "select 1", "0001_b.sql": "select 1"}))


async def test_schemas_are_separate(fresh_db: str, tmp_path: Path) -> None:
    folder = write(tmp_path / "m", {"001_create.sql": FILES["001_create.sql"]})
    conn = await asyncpg.connect(fresh_db)
    try:
        assert await migrate(conn, schema="one", directory=folder) == [1]
        assert await migrate(conn, schema="two", directory=folder) == [1]
        with pytest.raises(ValueError):
            await migrate(conn, schema='x"; DROP', directory=folder)
    finally:
        await conn.close()
