"""Wiring: settings → runtime → repository → domain → servicer."""

from __future__ import annotations

from pathlib import Path

import grpc
from pregonero.accounts.v1 import (
    accounts_pb2,
    accounts_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    notifications_pb2,
    notifications_pb2_grpc,
    sync_pb2,
    sync_pb2_grpc,
)

from services.runtime.db import check_queries
from services.runtime.lifecycle import Runtime, serve_grpc

from . import auth_repo, ledger_drift, notify_repo, sync_repo
from .audit import Audit
from .auth import build_auth
from .charges import Charges
from .config import AccountsSettings
from .domain import Accounts
from .ledger import Ledger
from .notifications import Notifications, consume_batch_events
from .notify_server import (
    AuditedAccountsServicer,
    AuditedAuthServicer,
    NotificationsServicer,
    account_event_publisher,
    nats_publisher,
)
from .repo import AccountsRepo, LedgerRepo, Q
from .server import CALLERS
from .sync_operations import SyncOperations
from .sync_server import SyncServicer

MIGRATIONS = Path(__file__).parent / "migrations"


async def setup(rt: Runtime, server: grpc.aio.Server) -> list[str]:
    assert rt.pool is not None
    settings = rt.settings
    assert isinstance(settings, AccountsSettings)
    await check_queries(rt.pool, Q)
    accounts = Accounts(AccountsRepo(rt.pool))
    # The operator's default account always exists (work from account-less clients lands there).
    # It is the operator's own, so unlimited: the clients that predate accounts keep sending.
    await accounts.create(
        account_id=settings.pregonero_default_account,
        account_name=settings.pregonero_default_account,
        plan_type="unlimited",
        exist_ok=True,
    )
    await check_queries(rt.pool, notify_repo.Q)
    assert rt.nc is not None and rt.js is not None
    notes_repo = notify_repo.NotifyRepo(rt.pool)
    notifications = Notifications(notes_repo, on_created=nats_publisher(rt.nc))
    audit = Audit(notes_repo)
    notifications_pb2_grpc.add_NotificationsServiceServicer_to_server(
        NotificationsServicer(notifications, audit), server
    )
    rt.spawn(consume_batch_events(rt.js, notifications, audit), name="notifications-batches")
    ledger = Ledger(LedgerRepo(rt.pool))
    servicer = AuditedAccountsServicer(
        accounts, ledger, audit=audit, notifications=notifications, events=account_event_publisher(rt.js)
    )
    rt.spawn(Charges(ledger, rt.js, on_charged=notifications.balance_level).run(), name="charges")
    await check_queries(rt.pool, ledger_drift.Q)
    rt.spawn(ledger_drift.LedgerDrift(rt.pool).run(), name="ledger-drift")
    accounts_pb2_grpc.add_AccountsServiceServicer_to_server(servicer, server)
    await check_queries(rt.pool, auth_repo.Q)
    auth = build_auth(rt.pool, settings)
    if settings.pregonero_admin_email and settings.pregonero_admin_password:
        await auth.ensure_admin(email=settings.pregonero_admin_email, password=settings.pregonero_admin_password)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(AuditedAuthServicer(auth, audit=audit), server)
    rt.spawn(auth.purge_forever(), name="auth-purge")
    await check_queries(rt.pool, sync_repo.Q)
    sync_operations = SyncOperations(sync_repo.SyncRepo(rt.pool))
    sync_pb2_grpc.add_SyncServiceServicer_to_server(SyncServicer(sync_operations), server)
    rt.spawn(sync_operations.purge_forever(), name="sync-purge")
    return [
        accounts_pb2.DESCRIPTOR.services_by_name["AccountsService"].full_name,
        auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name,
        notifications_pb2.DESCRIPTOR.services_by_name["NotificationsService"].full_name,
        sync_pb2.DESCRIPTOR.services_by_name["SyncService"].full_name,
    ]


async def main() -> None:
    await serve_grpc(AccountsSettings(), schema="accounts", migrations=MIGRATIONS, setup=setup, callers=CALLERS)
