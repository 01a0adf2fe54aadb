"""What the dispatchers say of WhatsApp devices, applied to the batches that wait for them.

A batch none of whose devices could send (disconnected, waiting for a QR scan, at its daily
cap) is suspended by the results (results_applier.py, NO_CONNECTED_DEVICES). It resumes when one of
its devices connects again: a `DeviceEvent` connected on `events.device.<account_id>`, which
the dispatcher also publishes when a capped device's local day turns. Device events are best
effort and a device may connect between the hand-back and the suspension, so a batch that
has waited RETRY_WAITING_S is also tried again: if its devices still cannot send, the
dispatcher hands its window back and it is suspended once more. Resuming twice is harmless
(`resume_suspended` acts only on a suspended batch)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from uuid import UUID

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pregonero.events.v1 import events_pb2

from services.runtime import bus

from .batches import Batches
from .repo import NO_CONNECTED_DEVICES, CampaignsRepo

log = logging.getLogger("pregonero.campaigns.devices")

DURABLE = "campaigns-devices"
SUBJECTS = "events.device.>"
# How long a batch waits for its devices before it is tried again anyway: each try costs
# one window sent to the dispatchers and handed back (and a credit hold taken and freed).
RETRY_WAITING_S = 300.0


class DeviceEvents:
    def __init__(self, repo: CampaignsRepo, batches: Batches, js: JetStreamContext, wake: Callable[[], None]) -> None:
        self.repo, self.batches, self.js, self.wake = repo, batches, js, wake

    async def run(self) -> None:
        # Only what happens from now on: the batches waiting since before are retried anyway.
        await bus.consume(self.js, SUBJECTS, durable=DURABLE, handle=self.handle, deliver_new=True)

    async def handle(self, msgs: list[Msg]) -> None:
        connected: dict[str, set[int]] = defaultdict(set)
        for msg in msgs:
            event = events_pb2.DeviceEvent.FromString(msg.data)
            if event.status == "connected":
                connected[event.account_id].add(event.sender_id)
        for account_id, sender_ids in connected.items():
            waiting = await self.repo.waiting_for_devices(
                account_id=account_id, reason=NO_CONNECTED_DEVICES, sender_ids=sorted(sender_ids)
            )
            await self._resume(waiting, why=f"a device of account {account_id} connected")

    async def retry_waiting(self) -> int:
        """One round of the safety net: batches that have waited long are tried again."""
        waiting = await self.repo.long_waiting_for_devices(reason=NO_CONNECTED_DEVICES, older_than_s=RETRY_WAITING_S)
        return await self._resume(waiting, why="they waited long")

    async def _resume(self, batch_ids: Iterable[UUID], *, why: str) -> int:
        resumed = [b for b in batch_ids if await self.batches.resume_suspended(b) is not None]
        if resumed:
            log.info("%d batches waiting for devices resumed: %s", len(resumed), why)
            self.wake()
        return len(resumed)
