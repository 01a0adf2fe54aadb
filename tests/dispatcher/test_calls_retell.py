"""The call engine placing calls through the `retell` adapter, on real PostgreSQL and NATS
JetStream, against the local Retell-style server: a dispatcher that dies mid-call leaves the
call's id on record, and the one that takes the chunk over follows that call to its end
instead of calling the debtor again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from pregonero.events.v1 import events_pb2

from services.dispatcher.call_engine import CallEngine
from services.dispatcher.providers.retell import RetellVoiceProvider
from services.dispatcher.repo import AttemptsRepo
from services.runtime import bus
from tests.conftest import bus_client, collected, service_pool
from tests.dispatcher.fake_retell import API_KEY, FakeRetell, Script
from tests.http_server import running


@dataclass
class Env:
    pool: asyncpg.Pool
    js: JetStreamContext
    nc: NATS
    fake: FakeRetell
    results: list[events_pb2.ResultChunk]

    @property
    def outcomes(self) -> list[events_pb2.JobOutcome]:
        return [o for chunk in self.results for o in chunk.outcomes]

    def engine(self) -> CallEngine:
        provider = RetellVoiceProvider(
            base_url=self.fake.url, api_key=API_KEY, agent_id="agent_1", from_number="+56229998877", poll_seconds=0.05
        )
        # A short ack wait: the chunk of a dead dispatcher comes back within a second.
        return CallEngine(js=self.js, attempts=AttemptsRepo(self.pool), provider=provider, line_config={}, ack_wait=1.0)


@pytest.fixture
async def env(fresh_db: str, own_nats: str) -> AsyncIterator[Env]:
    pool = await service_pool(fresh_db, "dispatcher")
    nc, js = await bus_client(own_nats)
    try:
        async with (
            collected(nc, "events.job.>", events_pb2.ResultChunk.FromString) as results,
            running(FakeRetell()) as fake,
        ):
            yield Env(pool, js, nc, fake, results)
    finally:
        await nc.close()
        await pool.close()


async def release_call(env: Env, to: str) -> tuple[str, str]:
    batch_id = str(uuid.uuid4())
    attempt_id = f"{batch_id}:1:1"
    chunk = events_pb2.DispatchChunk(
        batch_id=batch_id,
        account_id="acc-1",
        channel="voice",
        chunk_seq=1,
        items=[
            events_pb2.WorkItem(
                job_id=1,
                attempt_id=attempt_id,
                to=to,
                attempt_no=1,
                variables_json=json.dumps(
                    {
                        "variables": {"nombre": "Ana"},
                        "max_call_duration": 120,
                        "agent_id": "agent_acme",
                        "from_number": "+56229990000",
                    }
                ),
            )
        ],
        price_per_minute="100",
        price_per_call="10",
    )
    await bus.publish(env.js, "dispatch.voice.acc-1", chunk, msg_id=f"{batch_id}:1")
    return batch_id, attempt_id


async def eventually(check: Any, *, within: float = 15.0) -> Any:
    """What `check` returns once it is truthy (asked every 50 ms)."""
    async with asyncio.timeout(within):
        while not (found := await check()):  # noqa: ASYNC110 - the state is in the database
            await asyncio.sleep(0.05)
    return found


async def test_a_call_cut_by_a_crash_is_followed_to_its_end_by_the_next_dispatcher(env: Env) -> None:
    to = "+56977777777"
    env.fake.scripts[to] = Script(polls_until_end=60, duration_ms=66_000)
    _, attempt_id = await release_call(env, to)

    first = env.engine()
    running_first = asyncio.create_task(first.run())
    call_id = await eventually(
        lambda: env.pool.fetchval("SELECT provider_message_id FROM attempts WHERE attempt_id = $1", attempt_id)
    )
    # SIGKILL, as far as this process can tell: everything stops, nothing is acked or reported.
    running_first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running_first
    for task in list(first.tasks):
        task.cancel()
    await asyncio.gather(*first.tasks, return_exceptions=True)
    assert env.outcomes == []
    assert env.fake.calls[call_id].gets < 60, "cut while the call was up"

    second = env.engine()
    running_second = asyncio.create_task(second.run())
    try:
        await eventually(lambda: _true(env.outcomes), within=20)
    finally:
        running_second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running_second

    (placed,) = env.fake.placed_to(to)  # the debtor was called once, by the account's own agent and number
    assert (placed.body["override_agent_id"], placed.body["from_number"]) == ("agent_acme", "+56229990000")
    (outcome,) = env.outcomes
    assert (outcome.attempt_id, outcome.status, outcome.provider_message_id) == (attempt_id, "completed", call_id)
    # 10 for the call + 66 started seconds at 100 a minute, rounded up.
    assert outcome.cost == "120.0000"
    shown = json.loads(outcome.result_json)
    assert shown["summary"]["call_analysis"]["call_summary"] == "El cliente promete pagar el lunes."
    row = await env.pool.fetchrow("SELECT status, provider_message_id FROM attempts WHERE attempt_id = $1", attempt_id)
    assert (row["status"], row["provider_message_id"]) == ("completed", call_id)


async def _true(items: list[Any]) -> bool:
    return bool(items)
