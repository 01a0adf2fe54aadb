"""The interface every provider adapter implements: a few async methods, nothing else.

Rate and concurrency come from the sender's configuration and are enforced by the
dispatcher, not by adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx

# unknown: the request may have reached the provider but no answer came back (a timeout, a
# dropped connection); it must never be sent again, nor reported as failed (a retry of the
# failed ones would contact that person a second time).
SendStatus = Literal["sent", "failed", "rate_limited", "unknown"]


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
    version: int = 0  # moves on every edit; a send is claimed through the version it uses


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


def transport_failure(exc: httpx.HTTPError, prefix: str = "") -> SendResult:
    """What a failed HTTP exchange says about a send: a connection never made carried no
    request (failed, safe to report), anything later may have been received (unknown)."""
    error = f"{prefix}{type(exc).__name__}"
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.UnsupportedProtocol):
        return SendResult(status="failed", error=error)
    return SendResult(status="unknown", error=error)


class Provider(Protocol):
    name: str

    async def send(self, request: SendRequest) -> SendResult: ...

    async def lookup(self, attempt_id: str, sender: SenderConfig) -> SendResult | None:
        """The provider's own record of an attempt whose outcome we lost in a crash:
        None when the provider never accepted it."""
        ...

    async def close(self) -> None: ...
