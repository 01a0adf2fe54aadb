"""A bulk upload leaves the planner knowing how big the new batch is. Until autovacuum
comes by (a minute or more), a planner that takes a new batch for a handful of rows applies
every chunk of results by walking the whole batch: measured, 10 s per 500 results of a
100,000-row batch instead of 1 ms, which stalled a campaign's first minute."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from uuid import UUID

import asyncpg
import pytest

from services.campaigns.batch_publisher import Notifier
from services.campaigns.batches import Batches, SenderChoice
from services.campaigns.repo import CampaignsRepo
from services.runtime.bus import BATCH_STATE_BUCKET
from tests.conftest import bus_client, service_pool


@pytest.fixture
async def batches(fresh_db: str, own_nats: str) -> AsyncIterator[tuple[Batches, asyncpg.Pool]]:
    pool = await service_pool(fresh_db, "campaigns")
    nc, js = await bus_client(own_nats)
    try:
        yield Batches(CampaignsRepo(pool), Notifier(nc, js, await js.key_value(BATCH_STATE_BUCKET))), pool
    finally:
        await nc.close()
        await pool.close()


async def upload(batches: Batches, rows: int, first: int = 0) -> UUID:
    async def chunks() -> AsyncIterator[bytes]:
        # Chilean mobiles +569 8…, a range `phonenumbers` takes as valid.
        yield "".join(f"+5698{first + i:07d}|v{i}\n" for i in range(rows)).encode()

    ingested = await batches.ingest_bulk_file(
        account_id="stats-acc",
        file_name="list.csv",
        template="Hola @valor1",
        devices_limit=1,
        senders=[SenderChoice(id=1, rate_per_minute=0)],
        chunks=chunks(),
    )
    return UUID(str(ingested.batch["batch_id"]))


async def estimated_rows(pool: asyncpg.Pool, batch_id: UUID) -> float:
    plan = await pool.fetchval("EXPLAIN (FORMAT JSON) SELECT * FROM jobs WHERE batch_id = $1", batch_id)
    return float(json.loads(plan)[0]["Plan"]["Plan Rows"])


async def test_after_a_big_upload_the_planner_knows_the_new_batch_size(
    batches: tuple[Batches, asyncpg.Pool],
) -> None:
    service, pool = batches
    # An earlier upload: the statistics then describe a table without the next batch.
    await upload(service, 3_000)
    second = await upload(service, 6_000, first=10_000)
    assert await estimated_rows(pool, second) >= 4_500
