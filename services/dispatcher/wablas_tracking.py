"""The Tracking URL of each `wablas` device: where Wablas posts its message status callbacks
(the gateway's /webhooks/wablas with the device's id and its own key, `wablas.tracking_url`).

Set by the dispatcher, so a user never copies a key by hand: in the background when the
device is created (creation never waits for Wablas), and again when this process first polls
the device (a device created before WABLAS_WEBHOOK_URL was set, a set that failed, new
credentials). Best effort: a device whose URL could not be set still sends; only its delivery
reports are missing until a later poll sets it. Wablas's refusal (wrong token) is not asked
again until the credentials change; an unreachable Wablas is asked again at the next poll."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Protocol

from .providers import wablas
from .providers.base import SenderConfig

log = logging.getLogger("pregonero.dispatcher.wablas_tracking")

TIMEOUT_S = 10.0


class TrackingUrlSetter(Protocol):
    async def set_tracking_url(self, sender: SenderConfig, url: str) -> None: ...


def _credentials(sender: SenderConfig) -> str:
    return hashlib.sha256(f"{sender.token}\0{sender.secret}".encode()).hexdigest()


class TrackingUrls:
    def __init__(self, provider: TrackingUrlSetter, *, webhook_url: str, secret: str) -> None:
        self.provider = provider
        self.webhook_url = webhook_url
        self.secret = secret
        # Device id → the credentials its URL was set (or refused) with.
        self.given: dict[int, str] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def created(self, sender: SenderConfig) -> None:
        """A wablas device was just created (committed): its URL is set in the background."""
        if sender.provider != wablas.NAME:
            return
        task = asyncio.create_task(self.give(sender), name=f"wablas-tracking-{sender.id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def polled(self, sender: SenderConfig) -> None:
        """The poller is about to ask about the device: its URL is set first, once."""
        if sender.provider == wablas.NAME and self.given.get(sender.id) != _credentials(sender):
            await self.give(sender)

    async def give(self, sender: SenderConfig) -> None:
        url = wablas.tracking_url(self.webhook_url, self.secret, sender.id)
        try:
            async with asyncio.timeout(TIMEOUT_S):
                await self.provider.set_tracking_url(sender, url)
        except wablas.WablasRefused as exc:
            log.warning("wablas device %s: Tracking URL refused: %s", sender.id, exc)
        except Exception as exc:  # noqa: BLE001 - unreachable, timed out: best effort, never the poll's failure
            log.warning("wablas device %s: Tracking URL not set (%r); again at its next poll", sender.id, exc)
            return
        else:
            log.info("wablas device %s: Tracking URL set", sender.id)
        self.given[sender.id] = _credentials(sender)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
