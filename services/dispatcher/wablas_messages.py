"""Which attempts are behind Wablas message ids, for the gateway's /webhooks/wablas: Wablas's
status callbacks name its message id and the device (by the Tracking URL the device was given),
not our attempt. The ids were kept (provider_messages) when Wablas accepted each message.

Answered for the suite's own webhook identity only (an admin bound to no account), and scoped
to the one device the callback came for: another device's message id finds nothing. This is
the `wablas` branch of the FindSenderAttempts RPC (`session` = the device's id)."""

from __future__ import annotations

from typing import Protocol

from services.runtime.errors import InvalidArgument, PermissionDenied
from services.runtime.identity import Caller

from .providers import wablas

MAX_MESSAGE_IDS = 100
MAX_MESSAGE_ID = 128  # Wablas's ids are UUIDs


class KeptMessages(Protocol):
    async def attempts_of(self, *, provider: str, sender_id: int, message_ids: list[str]) -> dict[str, str]: ...


async def attempts(messages: KeptMessages, caller: Caller, *, session: str, message_ids: list[str]) -> dict[str, str]:
    """Wablas message id → attempt id, for the messages of device `session` among those ids."""
    if not (caller.is_admin and not caller.account_id):
        raise PermissionDenied("message ids are resolved for the suite's webhooks only")
    if not (session.isdigit() and len(session) <= 18):
        raise InvalidArgument("session must be the device's id (digits) for wablas")
    if len(message_ids) > MAX_MESSAGE_IDS or any(not m or len(m) > MAX_MESSAGE_ID for m in message_ids):
        raise InvalidArgument(f"at most {MAX_MESSAGE_IDS} message ids of 1 to {MAX_MESSAGE_ID} characters")
    if not message_ids:
        return {}
    return await messages.attempts_of(provider=wablas.NAME, sender_id=int(session), message_ids=message_ids)
