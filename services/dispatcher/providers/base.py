"""The interface every provider adapter implements: a few async methods, nothing else.

Rate and concurrency come from the sender's configuration and are enforced by the
dispatcher, not by adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

SendStatus = Literal["sent", "failed", "rate_limited"]


@dataclass(frozen=True, slots=True)
class SenderConfig:
    """What the dispatcher knows of one sender when it sends through it."""

    id: int
    account_id: str
    provider: str
    rate_per_minute: int = 0  # 0 = no limit
    jitter_ms: int = 0  # random extra pause between two sends (anti-ban pacing)
    concurrency: int = 4  # sends in flight at once through this sender
    token: str = ""
    secret: str = ""
    phone: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # provider-specific settings


@dataclass(frozen=True, slots=True)
class SendRequest:
    attempt_id: str  # idempotency key: one attempt is sent at most once
    sender: SenderConfig
    to: str  # E.164
    text: str
    variables: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SendResult:
    status: SendStatus
    provider_message_id: str = ""
    error: str = ""
    retry_after: float = 0.0  # seconds, for rate_limited


class Provider(Protocol):
    name: str

    async def send(self, request: SendRequest) -> SendResult: ...

    async def lookup(self, attempt_id: str, sender: SenderConfig) -> SendResult | None:
        """The provider's own record of an attempt whose outcome we lost in a crash:
        None when the provider never accepted it."""
        ...

    async def close(self) -> None: ...
