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
    # The provider refused the message because the device itself cannot send now (a device
    # gateway's device disconnected, expired, out of quota or with wrong credentials; a
    # WhatsApp Web session not working, or its server unreachable): nothing went out, and the
    # recipient is not at fault. The engine gives the claim back, takes the device out of the
    # rotation and sends the message through another device (or hands it back to wait).
    # Only on a refusal (`rate_limited`), never with `sent` or `unknown`.
    device_unavailable: bool = False

    def __post_init__(self) -> None:
        if self.device_unavailable and self.status != "rate_limited":
            raise ValueError(f"device_unavailable is a refusal (rate_limited), not {self.status!r}")


def reply_object(reply: httpx.Response, max_bytes: int | None = None) -> dict[str, Any]:
    """A provider's reply as a JSON object; {} for anything else (not JSON, a list, or larger
    than `max_bytes`), so a reply's fields are read with .get() and a default."""
    if max_bytes is not None and len(reply.content) > max_bytes:
        return {}
    try:
        data = reply.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def transport_failure(exc: httpx.HTTPError, prefix: str = "") -> SendResult:
    """What a failed HTTP exchange says about a send: a connection never made carried no
    request (failed, safe to report), anything later may have been received (unknown)."""
    error = f"{prefix}{type(exc).__name__}"
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.UnsupportedProtocol):
        return SendResult(status="failed", error=error)
    return SendResult(status="unknown", error=error)


# What a provider says of a device (a Wablas device, a WAHA session): the dispatcher stops
# giving work to a device that is not connected.
Connection = Literal["connected", "disconnected", "qr_needed", "unknown"]


@dataclass(frozen=True, slots=True)
class DeviceState:
    connection: Connection
    reason: str = ""  # the provider's words, shown to the user
    quota_left: int = -1  # messages the provider still allows (-1: not known)
    qr_code: str = ""  # base64 PNG, when qr_needed


class DeviceStates(Protocol):
    """Providers whose devices can be connected or not (device gateways, WhatsApp Web) also
    implement this; the dispatcher polls it at a modest rate."""

    async def device_state(self, sender: SenderConfig) -> DeviceState: ...


class Provider(Protocol):
    name: str

    async def send(self, request: SendRequest) -> SendResult: ...

    async def lookup(self, attempt_id: str, sender: SenderConfig) -> SendResult | None:
        """The provider's own record of an attempt whose outcome we lost in a crash:
        None when the provider never accepted it."""
        ...

    async def close(self) -> None: ...
