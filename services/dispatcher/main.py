"""Wiring: settings → runtime → repository → domain → servicer, and the dispatch engine."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
from pregonero.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc

from services.runtime.bus import BATCH_STATE_BUCKET
from services.runtime.db import check_queries
from services.runtime.lifecycle import Runtime, serve_grpc

from .call_engine import CallEngine
from .config import SIMULATED_DEVICES_REFUSED, DispatcherSettings
from .connections import Connections
from .crypto import SecretBox
from .device_states import DeviceStates
from .engine import Engine, SenderCache
from .providers import wablas, waha, whatsapp_cloud
from .providers.retell import RetellVoiceProvider
from .providers.simulated import RefusedSimulatedProvider, make_simulated
from .providers.voice import SimulatedVoiceProvider, VoiceProvider
from .repo import AttemptQ, AttemptsRepo, MessageQ, ProviderMessagesRepo, SenderQ, SendersRepo
from .runstate import RunStates
from .senders import Senders
from .server import CALLERS, DispatcherServicer
from .wablas_tracking import TrackingUrls
from .waha_sessions import WahaSessions

MIGRATIONS = Path(__file__).parent / "migrations"


def secret_box(settings: DispatcherSettings) -> SecretBox:
    return SecretBox(
        settings.pregonero_secret_key.get_secret_value(),
        key_id=settings.pregonero_secret_key_id,
        previous=settings.previous_secret_keys(),
    )


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


def waha_sessions(
    settings: DispatcherSettings, senders: Senders, messages: ProviderMessagesRepo
) -> WahaSessions | None:
    """The WhatsApp Web sessions of waha devices, when the operator runs a WAHA."""
    if not settings.waha_base_url:
        return None

    async def remember(message_id: str, sender_id: int, attempt_id: str) -> None:
        await messages.remember(provider=waha.NAME, message_id=message_id, sender_id=sender_id, attempt_id=attempt_id)

    sessions = WahaSessions(
        waha.WahaProvider(
            base_url=settings.waha_base_url,
            api_key=settings.waha_api_key.get_secret_value(),
            webhook_url=settings.waha_webhook_url,
            webhook_hmac_key=settings.waha_webhook_hmac_key.get_secret_value(),
            remember=remember,
        ),
        senders,
        messages,
    )
    senders.sessions = sessions
    return sessions


async def setup(rt: Runtime, server: grpc.aio.Server) -> list[str]:
    assert rt.pool is not None
    settings = rt.settings
    assert isinstance(settings, DispatcherSettings)
    await check_queries(rt.pool, SenderQ)
    await check_queries(rt.pool, AttemptQ)
    assert rt.js is not None
    senders = Senders(
        SendersRepo(rt.pool),
        secret_box(settings),
        DeviceStates(rt.js),
        unconfigured=settings.unconfigured_providers(),
        default_provider=settings.default_device_provider,
    )
    await check_queries(rt.pool, MessageQ)
    sessions = waha_sessions(settings, senders, ProviderMessagesRepo(rt.pool))
    runstates = RunStates(await rt.js.key_value(BATCH_STATE_BUCKET))
    wablas_provider = wablas.WablasProvider(base_url=settings.wablas_base_url, messages=ProviderMessagesRepo(rt.pool))
    tracking = None
    if settings.wablas_base_url and settings.wablas_webhook_url:
        tracking = TrackingUrls(
            wablas_provider,
            webhook_url=settings.wablas_webhook_url,
            secret=settings.wablas_webhook_secret.get_secret_value(),
        )
        senders.tracking = tracking
    engine = Engine(
        js=rt.js,
        attempts=AttemptsRepo(rt.pool),
        senders=SenderCache(senders.load_for_dispatch),
        providers={
            "simulated": (
                make_simulated(settings.simulated_provider_url or None)
                if settings.simulation_allowed
                else RefusedSimulatedProvider(SIMULATED_DEVICES_REFUSED)
            ),
            whatsapp_cloud.NAME: whatsapp_cloud.WhatsAppCloudProvider(base_url=settings.whatsapp_graph_url),
            wablas.NAME: wablas_provider,
            **({waha.NAME: sessions.provider} if sessions else {}),
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
    connections = Connections(
        repo=SendersRepo(rt.pool),
        senders=senders,
        states=DeviceStates(rt.js),
        providers=engine.providers,
        engine=engine,
        poll_seconds=settings.device_poll_seconds,
        timeout_seconds=settings.device_poll_timeout_seconds,
        tracking=tracking,
    )
    # A device that refuses a send is asked about at once, so its state is recorded and every
    # replica hears it, instead of waiting for the next poll.
    engine.ask_device = connections.ask
    rt.spawn(runstates.run(), name="runstates")
    rt.spawn(connections.run(rt.nc), name="connections")
    rt.spawn(engine.run(), name="engine")
    rt.spawn(calls.run(), name="calls")
    rt.on_stop(calls.drain, timeout=settings.call_drain_seconds)
    rt.on_stop(engine.drain, timeout=settings.send_drain_seconds)
    if sessions is not None:
        rt.on_stop(sessions.close, timeout=5)
    if tracking is not None:
        rt.on_stop(tracking.close, timeout=5)
    dispatcher_pb2_grpc.add_DispatcherServiceServicer_to_server(
        DispatcherServicer(senders, connections, sessions=sessions, messages=ProviderMessagesRepo(rt.pool)), server
    )
    return [dispatcher_pb2.DESCRIPTOR.services_by_name["DispatcherService"].full_name]


async def main() -> None:
    await serve_grpc(DispatcherSettings(), schema="dispatcher", migrations=MIGRATIONS, setup=setup, callers=CALLERS)
