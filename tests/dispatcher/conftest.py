"""A migrated dispatcher database of the module's own (a fresh one per test costs more than
the tests), for the tests that drive senders and connections on real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.dispatcher.main import MIGRATIONS
from services.runtime.db import migrate
from services.runtime.devstack import Stack


@pytest.fixture(scope="module")
async def database(infra: Stack) -> AsyncIterator[str]:
    name = f"t_dispatcher_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(infra.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = f"{infra.database_url.rpartition('/')[0]}/{name}"
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn, schema="dispatcher", directory=MIGRATIONS)
        finally:
            await conn.close()
        yield url
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
