"""What accounts says of an account, applied to its batches: a suspension stops them, any
change that may bring credit (a top-up, a refund, an activation, a new plan) lets the
batches suspended for credit try again."""

from __future__ import annotations

import logging
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pregonero.events.v1 import events_pb2

from services.runtime import bus

from .batches import Batches
from .repo import CampaignsRepo

log = logging.getLogger("pregonero.campaigns.accounts")

DURABLE = "campaigns-accounts"


class AccountEvents:
    def __init__(self, repo: CampaignsRepo, batches: Batches, js: JetStreamContext, wake: Callable[[], None]) -> None:
        self.repo, self.batches, self.js, self.wake = repo, batches, js, wake

    async def run(self) -> None:
        # Only what happens from now on: an old top-up has long been acted on.
        await bus.consume(self.js, "events.account.>", durable=DURABLE, handle=self.handle, deliver_new=True)

    async def handle(self, msgs: list[Msg]) -> None:
        # The latest word per account counts (a suspension then an activation = active).
        latest: dict[str, events_pb2.AccountEvent] = {}
        for msg in msgs:
            event = events_pb2.AccountEvent.FromString(msg.data)
            latest[event.account_id] = event
        for account_id, event in latest.items():
            if event.type == "suspended":
                for batch_id in await self.repo.running_batches(account_id=account_id):
                    await self.batches.suspend_running(batch_id, reason=f"account {account_id} is suspended")
            else:
                resumed = [
                    b
                    for b in await self.repo.suspended_batches(account_id=account_id)
                    if await self.batches.resume_suspended(b) is not None
                ]
                if resumed:
                    log.info("account %s %s: %d suspended batches resumed", account_id, event.type, len(resumed))
                    self.wake()
