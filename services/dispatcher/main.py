"""Wiring: settings → runtime → repository → domain → servicer, and the dispatch engine."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
from pregonero.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc

from services.runtime.bus import BATCH_STATE_BUCKET
from services.runtime.db import check_queries
from services.runtime.lifecycle import Runtime, serve_grpc

from .calls import CallEngine
from .config import DispatcherSettings
from .crypto import SecretBox
from .engine import Engine, SenderCache
from .providers import whatsapp_cloud
from .providers.retell import RetellVoiceProvider
from .providers.simulated import make_simulated
from .providers.voice import SimulatedVoiceProvider, VoiceProvider
from .repo import AttemptQ, AttemptsRepo, SenderQ, SendersRepo
from .runstate import RunStates
from .senders import Senders
from .server import DispatcherServicer

MIGRATIONS = Path(__file__).parent / "migrations"


def voice_provider(settings: DispatcherSettings) -> VoiceProvider:
    if settings.voice_provider == "retell":
        return RetellVoiceProvider(
            base_url=settings.retell_api_url,
            api_key=settings.retell_api_key.get_secret_value(),
            agent_id=settings.retell_agent_id,
            from_number=settings.retell_from_number,
            poll_seconds=settings.retell_poll_seconds,
        )
    return SimulatedVoiceProvider()


async def setup(rt: Runtime, server: grpc.aio.Server) -> list[str]:
    assert rt.pool is not None
    settings = rt.settings
    assert isinstance(settings, DispatcherSettings)
    await check_queries(rt.pool, SenderQ)
    await check_queries(rt.pool, AttemptQ)
    assert rt.js is not None
    senders = Senders(SendersRepo(rt.pool), SecretBox(settings.pregonero_secret_key.get_secret_value()))
    runstates = RunStates(await rt.js.key_value(BATCH_STATE_BUCKET))
    engine = Engine(
        js=rt.js,
        attempts=AttemptsRepo(rt.pool),
        senders=SenderCache(senders.load_for_dispatch),
        providers={
            "simulated": make_simulated(settings.simulated_provider_url or None),
            whatsapp_cloud.NAME: whatsapp_cloud.WhatsAppCloudProvider(),
        },
        runstates=runstates,
        max_in_flight=settings.max_in_flight,
        ack_wait=settings.dispatch_ack_wait_seconds,
        send_grace=settings.send_grace_seconds,
    )
    calls = CallEngine(
        js=rt.js,
        attempts=AttemptsRepo(rt.pool),
        provider=voice_provider(settings),
        line_config=json.loads(settings.simulated_voice_config or "{}"),
        ack_wait=settings.dispatch_ack_wait_seconds,
        max_calls=settings.max_calls,
    )
    rt.spawn(runstates.run(), name="runstates")
    rt.spawn(engine.run(), name="engine")
    rt.spawn(calls.run(), name="calls")
    rt.on_stop(calls.drain, timeout=settings.call_drain_seconds)
    rt.on_stop(engine.drain, timeout=settings.send_drain_seconds)
    dispatcher_pb2_grpc.add_DispatcherServiceServicer_to_server(DispatcherServicer(senders), server)
    return [dispatcher_pb2.DESCRIPTOR.services_by_name["DispatcherService"].full_name]


async def main() -> None:
    await serve_grpc(DispatcherSettings(), schema="dispatcher", migrations=MIGRATIONS, setup=setup)
