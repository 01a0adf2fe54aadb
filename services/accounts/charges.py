"""Charges for work done: the dispatchers' results become captures against their holds.

Results arrive in chunks on `events.job.>`; each attempt that carries a cost is charged
once (captures are idempotent per attempt id, so a redelivered chunk charges nothing more).
Captures are booked in batches, one ledger transaction per account per fetch: one gRPC call
per result would cap the pipeline far below the dispatchers' pace.

Results naming an unknown account are poison (bus.Poison: dead-lettered, not dropped); a
database failure propagates and is retried by the consumer for as long as it lasts."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pregonero.events.v1 import events_pb2

from services.runtime import bus
from services.runtime.errors import NotFound
from services.runtime.identity import ADMIN, Caller

from .ledger import MAX_CAPTURE_ITEMS, Balance, CaptureItem, Ledger

DURABLE = "accounts-charges"
SYSTEM = Caller(role=ADMIN, account_id="", user_id="accounts-charges")

Charged = Callable[[Balance], Awaitable[None]]


def charges_of(chunk: events_pb2.ResultChunk) -> list[CaptureItem]:
    if not chunk.hold_id:
        return []
    return [
        CaptureItem(attempt_id=o.attempt_id, hold_id=chunk.hold_id, amount=o.cost)
        # Whatever carries a cost is charged: a sent message, a call (setup and minutes).
        for o in chunk.outcomes
        if o.cost and o.status != "requeue"
    ]


class Charges:
    def __init__(self, ledger: Ledger, js: JetStreamContext, *, on_charged: Charged) -> None:
        self.ledger, self.js = ledger, js
        self.on_charged = on_charged

    async def run(self) -> None:
        await bus.consume(self.js, "events.job.>", durable=DURABLE, handle=self.handle)

    async def handle(self, msgs: list[Msg]) -> None:
        by_account: dict[str, list[CaptureItem]] = defaultdict(list)
        for msg in msgs:
            chunk = events_pb2.ResultChunk.FromString(msg.data)
            by_account[chunk.account_id].extend(charges_of(chunk))
        for account_id, items in by_account.items():
            balance = None
            for start in range(0, len(items), MAX_CAPTURE_ITEMS):
                try:
                    result = await self.ledger.capture(
                        SYSTEM, account_id=account_id, items=items[start : start + MAX_CAPTURE_ITEMS]
                    )
                except NotFound as exc:
                    # Never dropped: dead-lettered, to be replayed once the account is sorted
                    # out. A database that is away is not this: it is retried until it is back.
                    raise bus.Poison(f"results charge unknown account {account_id!r}") from exc
                balance = result.balance
            if balance is not None:
                await self.on_charged(balance)
