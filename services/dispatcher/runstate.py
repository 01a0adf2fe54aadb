"""Batch run states (active / paused / cancelled) from the KV bucket campaigns writes,
kept current by a watch so every send checks a dict, not the network."""

from __future__ import annotations

import contextlib
import logging

from nats.js.kv import KeyValue
from pregonero.events.v1 import events_pb2

log = logging.getLogger("pregonero.dispatcher.runstate")

ACTIVE = "active"


class RunStates:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.states: dict[str, str] = {}

    def state(self, batch_id: str) -> str:
        return self.states.get(batch_id, ACTIVE)

    def active(self, batch_id: str) -> bool:
        return self.states.get(batch_id, ACTIVE) == ACTIVE

    async def run(self) -> None:
        watcher = await self.kv.watchall()
        try:
            await self._follow(watcher)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:  # end of the initial values
                continue
            batch_id = entry.key.removeprefix("batch.")
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                self.states.pop(batch_id, None)
                continue
            state = events_pb2.BatchRunState.FromString(entry.value).state
            if state == ACTIVE:
                self.states.pop(batch_id, None)
            else:
                self.states[batch_id] = state
