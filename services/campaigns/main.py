"""Wiring: settings → runtime → repository → domain → servicer, feeder and results loops."""

from __future__ import annotations

from pathlib import Path

import grpc
from pregonero.accounts.v1 import accounts_pb2_grpc
from pregonero.campaigns.v1 import (
    address_book_pb2,
    address_book_pb2_grpc,
    campaigns_pb2,
    campaigns_pb2_grpc,
    messages_pb2,
    messages_pb2_grpc,
)
from pregonero.dispatcher.v1 import dispatcher_pb2_grpc

from services.runtime.bus import BATCH_STATE_BUCKET
from services.runtime.db import check_queries
from services.runtime.lifecycle import Rounds, Runtime, serve_grpc
from services.runtime.rpc import channel

from . import address_book_repo, analytics_repo, voice_repo
from .account_events import AccountEvents
from .address_book import AccountCountry, AddressBook
from .address_book_server import AddressBookServicer
from .analytics import Analytics
from .batch_publisher import Notifier
from .batches import Batches
from .call_outcomes import CallResults
from .config import CampaignsSettings
from .credit import Credit
from .delivery import DeliveryApplier
from .device_events import RETRY_WAITING_S, DeviceEvents
from .dialer import Dialer
from .exports import Exports
from .feeder import Feeder
from .messages_repo import MessagesRepo
from .messages_repo import Q as MessagesQ
from .messages_server import ScheduledMessagesServicer
from .repo import CampaignsRepo, Q
from .results_applier import ResultsApplier
from .scheduled_messages import Devices, DueMessages, ScheduledMessages
from .server import CampaignsServicer
from .voice_batches import VoiceBatches

MIGRATIONS = Path(__file__).parent / "migrations"
WAITING_FOLD_S = 5.0
ACTIVITY_FOLD_S = 10.0


async def setup(rt: Runtime, server: grpc.aio.Server) -> list[str]:
    assert rt.pool is not None and rt.js is not None and rt.nc is not None
    settings = rt.settings
    assert isinstance(settings, CampaignsSettings)
    await check_queries(rt.pool, Q)
    repo = CampaignsRepo(rt.pool)
    notifier = Notifier(rt.nc, rt.js, await rt.js.key_value(BATCH_STATE_BUCKET))
    credit = Credit(
        accounts_pb2_grpc.AccountsServiceStub(channel(settings.accounts_addr, audience="accounts", keyring=rt.keyring))
    )
    # One account-country cache for the bulk file's and the address book's national numbers.
    account_country = AccountCountry(credit.account)
    batches = Batches(repo, notifier, country_of=account_country)
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
    device_events = DeviceEvents(repo, batches, rt.js, wake=feeder.wake)
    rt.spawn(device_events.run(), name="device-events")
    waiting = Rounds(device_events.retry_waiting, name="waiting-for-devices", idle_wait=RETRY_WAITING_S / 5)
    rt.spawn(waiting.run(), name="waiting-for-devices")
    dispatcher = dispatcher_pb2_grpc.DispatcherServiceStub(
        channel(settings.dispatcher_addr, audience="dispatcher", keyring=rt.keyring)
    )
    voice = VoiceBatches(calls, batches, credit)
    await check_queries(rt.pool, address_book_repo.Q)
    book_repo = address_book_repo.AddressBookRepo(rt.pool)
    await check_queries(rt.pool, MessagesQ)
    messages_repo = MessagesRepo(rt.pool)
    exports = Exports(batches=batches, voice=voice, repo=repo, calls=calls, book=book_repo, messages=messages_repo)
    await check_queries(rt.pool, analytics_repo.Q)
    analytics = Analytics(analytics_repo.AnalyticsRepo(rt.pool))
    # The WhatsApp figures' deltas grow a row per batch, hour and results statement: folded
    # every few seconds, so a chart over a year reads a row per batch and hour.
    rt.spawn(Rounds(analytics.fold, name="activity-fold", idle_wait=ACTIVITY_FOLD_S).run(), name="activity-fold")
    campaigns_pb2_grpc.add_CampaignsServiceServicer_to_server(
        CampaignsServicer(batches, voice, dispatcher, exports, analytics), server
    )
    devices = Devices(dispatcher)
    messages = ScheduledMessages(messages_repo, batches, notifier, credit, devices)
    messages_pb2_grpc.add_ScheduledMessagesServiceServicer_to_server(ScheduledMessagesServicer(messages), server)
    book = AddressBook(book_repo, account_country)
    address_book_pb2_grpc.add_AddressBookServiceServicer_to_server(AddressBookServicer(book), server)
    rt.spawn(DueMessages(messages_repo, notifier, devices, on_started=feeder.wake).run(), name="due-messages")
    return [
        campaigns_pb2.DESCRIPTOR.services_by_name["CampaignsService"].full_name,
        messages_pb2.DESCRIPTOR.services_by_name["ScheduledMessagesService"].full_name,
        address_book_pb2.DESCRIPTOR.services_by_name["AddressBookService"].full_name,
    ]


async def main() -> None:
    await serve_grpc(CampaignsSettings(), schema="campaigns", migrations=MIGRATIONS, setup=setup)
