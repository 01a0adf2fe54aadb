"""WhatsApp Web sessions run by a WAHA-style HTTP API (github.com/devlikeapro/waha): one
session per device, linked by scanning a QR with the phone, sending with `POST /api/sendText`.

Where WAHA runs, its API key and the webhook it calls back come from the operator's
settings, never from a device: a waha device has no token, secret or provider_config. The
suite names each device's session `pregonero-<sender id>`, so a webhook that names a session
names the device, and nobody has to store the pairing (WAHA Core runs only a session named
`default`: one device per WAHA at most; these names need WAHA Plus).

What the engine gets back from a send (engine.py retries `rate_limited` on the same device,
except a refusal with `device_unavailable` set):
- a session that is not WORKING (WAHA's 422 "Session status is not as expected", or 404 for
  a session WAHA no longer has) refused the message before WhatsApp saw it: `rate_limited`
  with `device_unavailable` and an error starting with DEVICE_DOWN (as wablas.py does), so
  the recipient is never failed for it and never sent twice: the engine gives its claim back,
  rests the device and sends it through another device (or hands it back to wait for one);
  the device's state (a `session.status` webhook, or `device_state`) keeps the device out of
  the rotation until it works again;
- a WAHA we cannot connect to: as a session that is not WORKING (no request left);
- 429: `rate_limited` after Retry-After (the device is fine: it waits);
- no answer after the request went out (a read timeout, a dropped connection, a proxy's
  502/503/504): `unknown`, never resent;
- any other refusal (a malformed number, WhatsApp's error through WAHA's 500): `failed`.

WAHA cannot find a message by our attempt id, so `lookup` cannot resolve a send a crash cut
off: it says so, and the dispatcher marks the attempt `unknown` rather than send it again."""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from .base import DeviceState, SenderConfig, SendRequest, SendResult, reply_object

log = logging.getLogger("pregonero.dispatcher.waha")

NAME = "waha"
SESSION_PREFIX = "pregonero-"
_SESSION = re.compile(r"pregonero-([1-9][0-9]{0,18})")
# The prefix of a send's error when the device's session could not take it (see the docstring).
DEVICE_DOWN = "waha: device unavailable"
# Short: a session comes back only when its owner scans the QR or restarts it (minutes), so
# waiting on this device helps nothing; the message belongs on another device
# (device_unavailable), and what keeps the device out of the rotation is its state (the
# session.status webhook). WAHA itself unreachable may be a restart of seconds.
DEVICE_DOWN_RETRY_S = 2.0
DEFAULT_RETRY_AFTER = 5.0
MAX_QR_BYTES = 256 * 1024  # a WhatsApp QR PNG is a few KiB; anything larger is not one
MAX_REPLY_TEXT = 200
# WAHA's session statuses (docs: "Session Status") as the device's connection.
CONNECTION = {
    "WORKING": "connected",
    "SCAN_QR_CODE": "qr_needed",
    "STARTING": "disconnected",
    "STOPPED": "disconnected",
    "FAILED": "disconnected",
}
STATUSES = frozenset(CONNECTION)
WEBHOOK_EVENTS = ("session.status", "message.ack")
MAX_MESSAGE_ID = 256
# Keeps (message id, sender id, attempt id) of an accepted send: `message.ack` names only
# WAHA's message id, and its delivery report must find the recipient.
Remember = Callable[[str, int, str], Awaitable[None]]


class LookupUnsupported(RuntimeError):
    """WAHA cannot say whether an attempt was sent."""


class WahaUnavailable(RuntimeError):
    """WAHA did not answer, or answered with an error, to a session call."""


def device_unavailable(result: SendResult) -> bool:
    """True for a refusal that says the session cannot send now (not the message's fault):
    nothing went out, and the engine moves the message to another device
    (`SendResult.device_unavailable`)."""
    return result.device_unavailable


def session_name(sender_id: int) -> str:
    return f"{SESSION_PREFIX}{sender_id}"


def sender_of(session: str) -> int | None:
    """The sender id a session name of ours stands for; None for anyone else's session."""
    m = _SESSION.fullmatch(session)
    return int(m.group(1)) if m and int(m.group(1)) < 2**63 else None


def connection_of(status: str) -> str:
    """Statuses WAHA may add later (passkey steps...) leave the device unable to send."""
    return CONNECTION.get(status, "disconnected")


def check_config(config: dict[str, Any]) -> None:
    """A waha device has nothing to configure: WAHA's address is the operator's to set."""
    if config:
        raise ValueError(
            "waha devices take no provider_config (the WAHA server is set by the operator): "
            + ", ".join(sorted(str(k) for k in config))
        )


def chat_id(to: str) -> str:
    """WAHA's chat id of a phone: its international digits and `@c.us`."""
    return f"{to.lstrip('+')}@c.us"


@dataclass(frozen=True, slots=True)
class Session:
    name: str
    status: str  # WAHA's word (WORKING, SCAN_QR_CODE, ...); "" when WAHA has no such session


class WahaProvider:
    name = NAME

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str = "",
        webhook_url: str = "",
        webhook_hmac_key: str = "",
        timeout_s: float = 15.0,
        remember: Remember | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.remember = remember
        self.webhook_url = webhook_url
        self.webhook_hmac_key = webhook_hmac_key
        headers = {"X-Api-Key": api_key} if api_key else {}
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout_s)

    # --- sending ---

    async def send(self, request: SendRequest) -> SendResult:
        session = session_name(request.sender.id)
        chat = chat_id(request.to)
        body = {"session": session, "chatId": chat, "text": request.text, "linkPreview": False}
        try:
            reply = await self.http.post("/api/sendText", json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # No connection, no request: WAHA is down or restarting, the recipient waits.
            return SendResult(
                status="rate_limited", error=f"{DEVICE_DOWN}: waha unreachable ({type(exc).__name__})",
                retry_after=DEVICE_DOWN_RETRY_S, device_unavailable=True,
            )  # fmt: skip
        except httpx.HTTPError as exc:
            return SendResult(status="unknown", error=f"waha: {type(exc).__name__}")
        data = reply_object(reply)
        if reply.status_code < 300:
            message_id = message_id_of(data, chat)
            if message_id and self.remember is not None:
                try:
                    await self.remember(message_id, request.sender.id, request.attempt_id)
                except Exception as exc:  # noqa: BLE001 - it was sent: only its delivery reports are lost
                    log.warning("attempt %s: message id %s not kept: %r", request.attempt_id, message_id, exc)
            return SendResult(status="sent", provider_message_id=message_id)
        text = f"waha {reply.status_code}: {_words(data, reply)}"
        if reply.status_code == 404 or (reply.status_code == 422 and data.get("status") in STATUSES):
            state = str(data.get("status") or "no session")
            return SendResult(
                status="rate_limited", error=f"{DEVICE_DOWN}: session {session} is {state}",
                retry_after=DEVICE_DOWN_RETRY_S, device_unavailable=True,
            )  # fmt: skip
        if reply.status_code == 429:
            return SendResult(status="rate_limited", error=text, retry_after=_retry_after(reply))
        if reply.status_code in (502, 503, 504):
            # A proxy in front of WAHA answered: the request may have reached it.
            return SendResult(status="unknown", error=text)
        return SendResult(status="failed", error=text)

    async def lookup(self, attempt_id: str, sender: SenderConfig) -> SendResult | None:
        raise LookupUnsupported(f"WAHA cannot look up attempt {attempt_id}")

    async def close(self) -> None:
        await self.http.aclose()

    # --- sessions ---

    def session_config(self, sender_id: int) -> dict[str, Any]:
        """The session's config: the webhooks it calls back, signed with the operator's key."""
        config: dict[str, Any] = {"metadata": {"pregonero.sender_id": str(sender_id)}}
        if self.webhook_url:
            webhook: dict[str, Any] = {
                "url": self.webhook_url,
                "events": list(WEBHOOK_EVENTS),
                # WAHA's default is a few tries; a gateway restart must not lose a state change.
                "retries": {"policy": "exponential", "delaySeconds": 2, "attempts": 10},
            }
            if self.webhook_hmac_key:
                webhook["hmac"] = {"key": self.webhook_hmac_key}
            config["webhooks"] = [webhook]
        return config

    async def create_session(self, sender_id: int) -> Session:
        """Create and start the device's session; one that exists already (a retry, a device
        recreated) gets the current config and is started. Idempotent."""
        name = session_name(sender_id)
        config = self.session_config(sender_id)
        reply = await self._call("POST", "/api/sessions", json={"name": name, "start": True, "config": config})
        if reply.status_code in (409, 422):  # exists: WAHA answers 422 ("already exists")
            reply = await self._call("PUT", f"/api/sessions/{quote(name)}", json={"name": name, "config": config})
            self._check(reply, "update session")
            reply = await self._call("POST", f"/api/sessions/{quote(name)}/start")
        self._check(reply, "create session")
        return Session(name, str(reply_object(reply).get("status") or "STARTING"))

    async def session(self, sender_id: int) -> Session:
        name = session_name(sender_id)
        reply = await self._call("GET", f"/api/sessions/{quote(name)}")
        if reply.status_code == 404:
            return Session(name, "")
        self._check(reply, "get session")
        return Session(name, str(reply_object(reply).get("status") or ""))

    async def restart(self, sender_id: int) -> Session:
        """Stop and start the session (WAHA's advice for FAILED); one WAHA lost is created."""
        name = session_name(sender_id)
        reply = await self._call("POST", f"/api/sessions/{quote(name)}/restart")
        if reply.status_code == 404:
            return await self.create_session(sender_id)
        self._check(reply, "restart session")
        return Session(name, str(reply_object(reply).get("status") or "STARTING"))

    async def logout(self, sender_id: int) -> Session:
        """Unlink the phone; WAHA starts the session again from scratch, with a new QR."""
        name = session_name(sender_id)
        reply = await self._call("POST", f"/api/sessions/{quote(name)}/logout")
        if reply.status_code == 404:
            return await self.create_session(sender_id)
        self._check(reply, "logout session")
        return Session(name, str(reply_object(reply).get("status") or "STARTING"))

    async def delete_session(self, sender_id: int) -> None:
        """Stop, log out and forget the session (the device is gone). Idempotent."""
        reply = await self._call("DELETE", f"/api/sessions/{quote(session_name(sender_id))}")
        if reply.status_code != 404:
            self._check(reply, "delete session")

    async def qr_png(self, sender_id: int) -> bytes:
        """The QR to scan, as PNG bytes; empty when the session shows none (not SCAN_QR_CODE)."""
        reply = await self._call(
            "GET", f"/api/{quote(session_name(sender_id))}/auth/qr", params={"format": "image"},
            headers={"Accept": "image/png"},
        )  # fmt: skip
        if reply.status_code in (404, 422):  # no such session, or it is not showing a QR
            return b""
        self._check(reply, "get QR")
        if reply.headers.get("content-type", "").startswith("application/json"):
            # Some WAHA versions answer base64 in JSON whatever the Accept says.
            try:
                png = base64.b64decode(str(reply_object(reply).get("data") or ""), validate=True)
            except ValueError as exc:
                raise WahaUnavailable("waha: the QR reply is not base64") from exc
        else:
            png = reply.content
        if len(png) > MAX_QR_BYTES or not png.startswith(b"\x89PNG"):
            raise WahaUnavailable("waha: the QR reply is not a PNG image")
        return png

    async def device_state(self, sender: SenderConfig) -> DeviceState:
        try:
            found = await self.session(sender.id)
            if not found.status:
                return DeviceState(connection="disconnected", reason="no session at WAHA")
            connection = connection_of(found.status)
            qr = await self.qr_png(sender.id) if connection == "qr_needed" else b""
        except WahaUnavailable as exc:
            return DeviceState(connection="unknown", reason=str(exc))
        return DeviceState(
            connection=connection,  # type: ignore[arg-type]
            reason=found.status,
            qr_code=base64.b64encode(qr).decode() if qr else "",
        )

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise WahaUnavailable(f"waha: {type(exc).__name__} on {method} {path}") from exc

    @staticmethod
    def _check(reply: httpx.Response, what: str) -> None:
        if reply.status_code >= 300:
            raise WahaUnavailable(f"waha: {what} answered {reply.status_code}: {_words(reply_object(reply), reply)}")


def message_id_of(data: dict[str, Any], chat: str) -> str:
    """The sent message's id as `message.ack` will name it (`true_<chat>_<id>`). Engines
    answer differently: WEBJS an `id` object with `_serialized`, others the id itself or
    a `key.id` without the chat."""
    found = data.get("id")
    if isinstance(found, dict):
        found = found.get("_serialized") or found.get("id")
    if isinstance(found, str) and found:
        return found[:MAX_MESSAGE_ID]
    key = data.get("key")
    if isinstance(key, dict) and isinstance(key.get("id"), str) and key["id"]:
        return f"true_{chat}_{key['id']}"[:MAX_MESSAGE_ID]
    return ""


def _words(data: dict[str, Any], reply: httpx.Response) -> str:
    words = data.get("message") or data.get("error") or reply.text
    exception = data.get("exception")
    if isinstance(exception, dict) and exception.get("message"):
        words = f"{words} ({exception['message']})"
    return str(words)[:MAX_REPLY_TEXT]


def _retry_after(reply: httpx.Response) -> float:
    try:
        return max(0.0, float(reply.headers.get("retry-after", "")))
    except ValueError:
        return DEFAULT_RETRY_AFTER
