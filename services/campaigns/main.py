"""Wiring: settings → runtime → repository → domain → servicer, feeder and results loops."""

from __future__ import annotations

from pathlib import Path

import grpc
from pregonero.accounts.v1 import accounts_pb2_grpc
from pregonero.campaigns.v1 import campaigns_pb2, campaigns_pb2_grpc
from pregonero.dispatcher.v1 import dispatcher_pb2_grpc

from services.runtime.bus import BATCH_STATE_BUCKET
from services.runtime.db import check_queries
from services.runtime.lifecycle import Rounds, Runtime, serve_grpc
from services.runtime.rpc import channel

from . import voice_repo
from .account_events import AccountEvents
from .batches import Batches
from .call_results import CallResults
from .config import CampaignsSettings
from .credit import Credit
from .delivery import DeliveryApplier
from .dialer import Dialer
from .feeder import Feeder
from .notify import Notifier
from .repo import CampaignsRepo, Q
from .results import ResultsApplier
from .server import CampaignsServicer
from .voice import VoiceBatches

MIGRATIONS = Path(__file__).parent / "migrations"
WAITING_FOLD_S = 5.0


async def setup(rt: Runtime, server: grpc.aio.Server) -> list[str]:
    assert rt.pool is not None and rt.js is not None and rt.nc is not None
    settings = rt.settings
    assert isinstance(settings, CampaignsSettings)
    await check_queries(rt.pool, Q)
    repo = CampaignsRepo(rt.pool)
    notifier = Notifier(rt.nc, rt.js, await rt.js.key_value(BATCH_STATE_BUCKET))
    batches = Batches(repo, notifier)
    credit = Credit(accounts_pb2_grpc.AccountsServiceStub(channel(settings.accounts_addr)))
    feeder = Feeder(repo, rt.js, notifier, credit, batches)
    await check_queries(rt.pool, voice_repo.Q)
    await check_queries(rt.pool, voice_repo.DialQ)
    await check_queries(rt.pool, voice_repo.ResultQ)
    calls = voice_repo.VoiceRepo(rt.pool)
    dialer = Dialer(calls, repo, rt.js, credit, notifier)
    results = ResultsApplier(
        repo, rt.js, notifier, batches, CallResults(calls), on_applied=feeder.wake, on_call_ended=dialer.wake
    )
    rt.spawn(feeder.run(), name="feeder")
    rt.spawn(dialer.run(), name="dialer")
    rt.spawn(results.run(), name="results")
    rt.spawn(DeliveryApplier(repo, rt.js).run(), name="delivery")
    # The per-minute counts of waiting voice jobs grow a row per batch and minute per write:
    # folded every few seconds, a status poll sums a handful of rows.
    rt.spawn(Rounds(calls.fold_waiting, name="waiting-fold", idle_wait=WAITING_FOLD_S).run(), name="waiting-fold")
    rt.spawn(AccountEvents(repo, batches, rt.js, wake=feeder.wake).run(), name="account-events")
    dispatcher = dispatcher_pb2_grpc.DispatcherServiceStub(channel(settings.dispatcher_addr))
    voice = VoiceBatches(calls, batches, credit)
    campaigns_pb2_grpc.add_CampaignsServiceServicer_to_server(CampaignsServicer(batches, voice, dispatcher), server)
    return [campaigns_pb2.DESCRIPTOR.services_by_name["CampaignsService"].full_name]


async def main() -> None:
    await serve_grpc(CampaignsSettings(), schema="campaigns", migrations=MIGRATIONS, setup=setup)
