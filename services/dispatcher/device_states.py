"""WhatsApp device states for the account's live sockets: a `DeviceEvent` on
`events.device.<account_id>` whenever a device's connection changes. Today a device is
`connected` while it is active and `disconnected` otherwise (created, (de)activated, deleted);
a WhatsApp Web session adds `qr_needed` with its QR through the same `publish`.

Published after the change is committed, and best effort: a socket that misses one reads the
device's state on its next request, and a device edit must not fail because NATS is away."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from nats.js import JetStreamContext
from pregonero.events.v1 import events_pb2

from services.runtime import bus
from services.runtime.protos import to_timestamp

log = logging.getLogger("pregonero.dispatcher.device_states")

SUBJECT_PREFIX = "events.device."
CONNECTED, DISCONNECTED, QR_NEEDED = "connected", "disconnected", "qr_needed"
STATES = (CONNECTED, DISCONNECTED, QR_NEEDED)
# Only WhatsApp devices have a connection the scheduler's clients watch; voice caller ids do not.
CHANNEL = "whatsapp"


def state_of(status: str) -> str:
    """A device's connection as its row says it: only an active device sends."""
    return CONNECTED if status == "active" else DISCONNECTED


class DeviceStates:
    def __init__(self, js: JetStreamContext | None) -> None:
        self.js = js

    async def publish(
        self, *, account_id: str, sender_id: int, state: str, qr_code: str = "", reason: str = ""
    ) -> None:
        if state not in STATES:
            raise ValueError(f"unknown device state {state!r}")
        if self.js is None:
            return
        event = events_pb2.DeviceEvent(
            account_id=account_id,
            sender_id=sender_id,
            status=state,
            qr_code=qr_code if state == QR_NEEDED else "",
            reason=reason,
            at=to_timestamp(datetime.now(UTC)),
        )
        try:
            # Each change is news of its own: the id only dedups a retried publish of it.
            await bus.publish(self.js, SUBJECT_PREFIX + account_id, event, msg_id=f"device:{uuid.uuid4().hex}")
        except Exception as exc:  # noqa: BLE001 - see the module docstring: the change stands
            log.warning("device %s: state %s not published: %r", sender_id, state, exc)
