"""Wablas: hosted WhatsApp devices (a phone linked through WhatsApp Web on Wablas's servers),
each reached with its own credentials. What this adapter follows of Wablas's public API
documentation (the "Documentation API Gateway" pages served by each Wablas server, e.g.
https://bdg.wablas.com/documentation, and the official PHP package silvanixdev/plugin-wablas):

- Authentication: the header `Authorization: <token>.<secret_key>`; the token and the secret
  key are per device (Device → Settings), which is why they live on the sender, never in the
  operator's settings. Device info is the one call documented with `?token=<token>` alone.
- Send: `POST /api/v2/send-message`, JSON `{"data": [{"phone", "message", "ref_id"}]}` (up to
  100 items; we send one). The phone is the international number without the "+". A text is at
  most 1024 characters. The reply `{"status": true, "data": {"device_id", "quota",
  "messages": [{"id", "phone", "status": "pending", ...}]}}` carries the message id; Wablas
  queues the message and sends it from the device later, so "accepted" is our `sent`.
- Refusals: `{"status": false, "message": "<reason>"}`, with or without an HTTP error status.
  The documentation lists no error codes, so the reason is classified by its words (device
  disconnected or expired, quota, too many requests, invalid number, token) and kept in the
  result's error text verbatim.
- `ref_id` ("transaction ID from client") is stored with the message and is a filter of
  `GET /api/report/message?ref_id=...`: we send the attempt id there, which lets `lookup` find
  an attempt whose outcome a crash lost (statuses pending, sent, read, cancel, ...).
- Device info: `GET /api/device/info?token=<token>` → `{"status": true, "data": {"status":
  "connected"|"disconnected", "active": bool, "quota": <int or "unlimited">, "expired_date"}}`.
- Status callbacks ("Webhook For Tracking", the device's Tracking URL) carry `{id, phone,
  status, note, deviceId}`, no signature and (as documented) not our ref_id: each accepted
  message's id is kept with its attempt (`MessageIds`) so that a callback finds its recipient;
  see services/gateway/routes/wablas_webhook.py. `POST /api/device/change-tracking-url`
  (form field `tracking_url`) sets a device's Tracking URL: `set_tracking_url` gives each
  device its own (`tracking_url`: the device's id and a key derived for it alone).

The server is the operator's (`WABLAS_BASE_URL`: Wablas runs regional servers and a device
exists on one of them), never a tenant's: a device's provider_config takes no keys at all.

A device that cannot send (disconnected, expired, out of quota, wrong token or secret key)
answers `rate_limited` with `device_unavailable` set (base.SendResult), a long `retry_after`
and an error that starts with "wablas: device unavailable": the message was refused, not
queued, so the engine gives its claim back and sends it through another device (or hands it
back to wait for one); `failed` would end the recipient for a fault of the device."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from typing import Any, Protocol
from urllib.parse import urlencode

import httpx

from .base import DeviceState, SenderConfig, SendRequest, SendResult, reply_object, transport_failure

log = logging.getLogger("pregonero.dispatcher.wablas")

NAME = "wablas"
CONFIG_KEYS: frozenset[str] = frozenset()
MAX_TEXT = 1024  # Wablas's documented limit for a text message
MAX_REPLY_BYTES = 1_000_000  # a reply larger than this is not Wablas's: not parsed
DEFAULT_RETRY_AFTER = 5.0  # "too many requests" without a Retry-After
# A disconnected or exhausted device comes back when its owner scans the QR or tops up, not
# in seconds: the engine rests the device this long after such a refusal (its work goes to
# the job's other devices), and by then the device poller (every 30 s by default) has seen it.
DEVICE_RETRY_AFTER = 30.0
DEVICE_UNAVAILABLE = "wablas: device unavailable"
_PHONE = re.compile(r"[1-9][0-9]{5,14}")
ACCEPTED = (True, "true", "success")  # the reply's "status" when Wablas took the message
MAX_MESSAGE_ID = 128  # Wablas's ids are UUIDs
# Wablas's per-message states (reports and tracking) that mean it will never be sent.
REFUSED_STATES = frozenset({"cancel", "canceled", "cancelled", "reject", "rejected", "failed", "error"})
_THROTTLED = ("too many", "rate limit", "slow down", "try again later")
_DEVICE = ("disconnect", "not connected", "scan", "qr", "expired", "not active", "inactive", "device is off")
_QUOTA = ("quota",)
_INVALID_NUMBER = (
    "not registered",
    "not on whatsapp",
    "not exist",
    "invalid phone",
    "invalid number",
    "phone is invalid",
)
_CREDENTIALS = ("token", "secret", "unauthori", "access denied", "forbidden")


class MessageIds(Protocol):
    """Where Wablas's message id is kept with our attempt (the dispatcher's provider_messages):
    a status callback that names only the former still finds its recipient."""

    async def remember(self, *, provider: str, message_id: str, sender_id: int, attempt_id: str) -> None: ...


class WablasRefused(RuntimeError):
    """Wablas refused a device call (its reason is the message)."""


class LookupFailed(RuntimeError):
    """Wablas could not say whether it has an attempt (the dispatcher marks it `unknown`)."""


def check_config(config: dict[str, Any]) -> None:
    """ValueError naming what a wablas device's provider_config must not hold (anything: the
    server is the operator's setting, the credentials are the device's token and secret)."""
    unknown = sorted(str(k) for k in config.keys() - CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"unknown wablas config keys: {', '.join(unknown)} (the Wablas server is the operator's "
            "WABLAS_BASE_URL; the device's token and secret key go in token and secret)"
        )


def device_key(secret: str, sender_id: int) -> str:
    """The key of one device's Tracking URL: the device's owner sees it in Wablas's settings,
    so it is good for that device's callbacks only (the gateway derives the same)."""
    return hmac.new(secret.encode(), f"wablas-device:{sender_id}".encode(), hashlib.sha256).hexdigest()


def tracking_url(webhook_url: str, secret: str, sender_id: int) -> str:
    """Where a device's status callbacks go: the gateway's /webhooks/wablas for this device."""
    return f"{webhook_url.rstrip('/')}?{urlencode({'device': sender_id, 'key': device_key(secret, sender_id)})}"


def device_unavailable(result: SendResult) -> bool:
    """True for a refusal that says the device cannot send now (not the message's fault):
    the engine moves the message to another device (`SendResult.device_unavailable`)."""
    return result.device_unavailable


def classify_refusal(status_code: int, reason: str, retry_after: float | None) -> SendResult:
    """What a refusal of Wablas means for the attempt (nothing was queued)."""
    words = reason.casefold()
    text = f"wablas {status_code}: {reason[:200]}" if status_code >= 300 else f"wablas: {reason[:200]}"
    if status_code == 429 or any(w in words for w in _THROTTLED):
        return SendResult(status="rate_limited", error=text, retry_after=retry_after or DEFAULT_RETRY_AFTER)
    quota = any(w in words for w in _QUOTA)
    if quota or any(w in words for w in _DEVICE):
        return SendResult(
            status="rate_limited",
            error=f"{DEVICE_UNAVAILABLE}: {'quota exhausted: ' if quota else ''}{reason[:200]}",
            retry_after=DEVICE_RETRY_AFTER,
            device_unavailable=True,
        )
    if any(w in words for w in _INVALID_NUMBER):
        return SendResult(status="failed", error=f"wablas: invalid number: {reason[:200]}")
    if status_code in (401, 403) or any(w in words for w in _CREDENTIALS):
        # Every send of this device would fail the same way until its owner corrects it:
        # the device cannot send, the recipients are not at fault.
        return SendResult(
            status="rate_limited",
            error=f"{DEVICE_UNAVAILABLE}: wrong token or secret key: {reason[:200]}",
            retry_after=DEVICE_RETRY_AFTER,
            device_unavailable=True,
        )
    return SendResult(status="failed", error=text)


class WablasProvider:
    name = NAME

    def __init__(self, *, base_url: str, timeout_s: float = 15.0, messages: MessageIds | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.messages = messages
        self.http = httpx.AsyncClient(timeout=timeout_s)

    def _auth(self, sender: SenderConfig) -> dict[str, str]:
        return {"Authorization": f"{sender.token}.{sender.secret}"}

    async def send(self, request: SendRequest) -> SendResult:
        if not self.base_url:
            return SendResult(status="failed", error="wablas is not configured on this deployment (WABLAS_BASE_URL)")
        phone = request.to.removeprefix("+")
        if not _PHONE.fullmatch(phone):
            return SendResult(status="failed", error=f"wablas: invalid number: {request.to[:32]!r}")
        if len(request.text) > MAX_TEXT:
            return SendResult(status="failed", error=f"wablas: the text is longer than {MAX_TEXT} characters")
        body = {"data": [{"phone": phone, "message": request.text, "ref_id": request.attempt_id}]}
        try:
            reply = await self.http.post(
                f"{self.base_url}/api/v2/send-message", json=body, headers=self._auth(request.sender)
            )
        except httpx.HTTPError as exc:
            return transport_failure(exc, "wablas: ")
        data = reply_object(reply, MAX_REPLY_BYTES)
        if reply.status_code >= 500 and reply.status_code != 503:
            # The server broke while or after handling it: the message may be queued.
            return SendResult(status="unknown", error=f"wablas {reply.status_code}: {_reason(data, reply)}")
        if reply.status_code == 503:
            return SendResult(status="rate_limited", error="wablas 503: unavailable", retry_after=_retry_after(reply))
        if reply.status_code >= 300:
            return classify_refusal(reply.status_code, _reason(data, reply), _header_retry_after(reply))
        message = _first_message(data.get("data"))
        message_id = str(message.get("id") or "")[:MAX_MESSAGE_ID]
        # A reply naming a message means Wablas queued it, whatever else it says: taking it for
        # a refusal could send that person a second message.
        if not message_id and data.get("status") in ACCEPTED:
            return SendResult(status="unknown", error="wablas: accepted without a message id")
        if not message_id and not data:
            return SendResult(status="unknown", error=f"wablas {reply.status_code}: a reply that is not Wablas's")
        if not message_id:
            return classify_refusal(reply.status_code, _reason(data, reply), _header_retry_after(reply))
        state = str(message.get("status") or "").casefold()
        if state in REFUSED_STATES:
            return SendResult(status="failed", provider_message_id=message_id, error=f"wablas: message {state}")
        if self.messages is not None:
            try:
                await self.messages.remember(
                    provider=NAME, message_id=message_id, sender_id=request.sender.id, attempt_id=request.attempt_id
                )
            except Exception as exc:  # noqa: BLE001 - it was queued: only its status callbacks are lost
                log.warning("attempt %s: wablas message id %s not kept: %r", request.attempt_id, message_id, exc)
        return SendResult(status="sent", provider_message_id=message_id)

    async def lookup(self, attempt_id: str, sender: SenderConfig) -> SendResult | None:
        """Wablas's record of the message we sent with ref_id = attempt_id, or None when it
        has none (it never accepted it). Raises LookupFailed when it cannot say."""
        if not self.base_url:
            raise LookupFailed("wablas is not configured on this deployment")
        try:
            reply = await self.http.get(
                f"{self.base_url}/api/report/message",
                params={"ref_id": attempt_id, "perPage": "10"},
                headers=self._auth(sender),
            )
        except httpx.HTTPError as exc:
            raise LookupFailed(f"wablas report: {type(exc).__name__}") from exc
        data = reply_object(reply, MAX_REPLY_BYTES)
        if reply.status_code >= 300 or data.get("status") not in ACCEPTED:
            raise LookupFailed(f"wablas report {reply.status_code}: {_reason(data, reply)}")
        # The report names its list "message" (sic); "data" is accepted as well.
        rows = data.get("message") if isinstance(data.get("message"), list) else data.get("data")
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict) and row.get("ref_id") == attempt_id and row.get("id"):
                state = str(row.get("status") or "").casefold()
                if state in REFUSED_STATES:
                    return SendResult(
                        status="failed", provider_message_id=str(row["id"]), error=f"wablas: message {state}"
                    )
                return SendResult(status="sent", provider_message_id=str(row["id"]))
        return None

    async def device_state(self, sender: SenderConfig) -> DeviceState:
        if not self.base_url:
            return DeviceState("unknown", reason="wablas is not configured on this deployment")
        try:
            reply = await self.http.get(f"{self.base_url}/api/device/info", params={"token": sender.token})
        except httpx.HTTPError as exc:
            return DeviceState("unknown", reason=f"wablas unreachable: {type(exc).__name__}")
        data = reply_object(reply, MAX_REPLY_BYTES)
        if reply.status_code >= 500:
            return DeviceState("unknown", reason=f"wablas {reply.status_code}")
        info = data.get("data")
        if reply.status_code >= 300 or data.get("status") not in ACCEPTED or not isinstance(info, dict):
            # A token Wablas does not know: this device cannot send until it is corrected.
            return DeviceState("disconnected", reason=f"wablas: {_reason(data, reply)}")
        quota = _quota(info.get("quota"))
        if info.get("active") is False:
            expired = str(info.get("expired_date") or "")[:32]
            return DeviceState(
                "disconnected",
                reason=f"device not active (expired {expired})" if expired else "device not active",
                quota_left=quota,
            )
        if str(info.get("status") or "").casefold() != "connected":
            return DeviceState(
                "disconnected", reason="WhatsApp is not linked: scan the QR code in Wablas", quota_left=quota
            )
        if quota == 0:
            # Linked, but every send would be refused: to the engine, a device that cannot send.
            return DeviceState("disconnected", reason="quota exhausted: top it up in Wablas", quota_left=0)
        return DeviceState("connected", quota_left=quota)

    async def set_tracking_url(self, sender: SenderConfig, url: str) -> None:
        """Point the device's status callbacks at `url` (see `tracking_url`); WablasRefused
        with Wablas's reason, or httpx.HTTPError when it cannot be reached."""
        if not self.base_url:
            raise WablasRefused("wablas is not configured on this deployment")
        reply = await self.http.post(
            f"{self.base_url}/api/device/change-tracking-url", data={"tracking_url": url}, headers=self._auth(sender)
        )
        data = reply_object(reply, MAX_REPLY_BYTES)
        if reply.status_code >= 300 or data.get("status") not in ACCEPTED:
            raise WablasRefused(f"wablas {reply.status_code}: {_reason(data, reply)}")

    async def close(self) -> None:
        await self.http.aclose()


def _reason(data: dict[str, Any], reply: httpx.Response) -> str:
    message = data.get("message")
    if isinstance(message, str) and message:
        return message[:200]
    return (reply.text[:200] or reply.reason_phrase or "no reason given").strip()


def _first_message(data: Any) -> dict[str, Any]:
    """The one message of a send reply: data.messages[0] (data.message in some replies; a
    list of devices' objects when the account sends through random devices)."""
    if isinstance(data, list):
        data = data[0] if data and isinstance(data[0], dict) else {}
    if not isinstance(data, dict):
        return {}
    messages = data.get("messages", data.get("message"))
    if isinstance(messages, dict):
        return messages
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return messages[0]
    return {}


def _quota(value: Any) -> int:
    """Messages left, -1 when unlimited or not said ("unlimited" is a documented value)."""
    if isinstance(value, bool):
        return -1
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return -1


def _header_retry_after(reply: httpx.Response) -> float | None:
    try:
        return max(0.0, float(reply.headers.get("retry-after", "")))
    except ValueError:
        return None


def _retry_after(reply: httpx.Response) -> float:
    found = _header_retry_after(reply)
    return DEFAULT_RETRY_AFTER if found is None else found
