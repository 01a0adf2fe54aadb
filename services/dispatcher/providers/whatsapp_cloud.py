"""WhatsApp Cloud API (Meta Graph): `POST /{phone_number_id}/messages`, as text or, for
numbers outside the 24-hour customer-service window, as an approved template whose body
parameter is the job's rendered text.

A sender of this provider keeps its access token as the (encrypted) `secret`, and in
`provider_config` the business number's `phone_number_id`, optionally a `template`
(`{"name": ..., "language": "es"}`) and an `api_version`. Where Graph is (`WHATSAPP_GRAPH_URL`;
a local fake in tests) is the operator's setting, never a tenant's.

Graph has no look-up by our attempt id, so an attempt whose outcome a crash lost cannot be
resolved here: `lookup` says so, and the dispatcher marks it `unknown` rather than sending
it again."""

from __future__ import annotations

import re
from typing import Any

import httpx

from .base import SenderConfig, SendRequest, SendResult, reply_object, transport_failure

NAME = "whatsapp_cloud"
DEFAULT_BASE_URL = "https://graph.facebook.com"
DEFAULT_API_VERSION = "v21.0"
CONFIG_KEYS = frozenset({"phone_number_id", "template", "api_version"})
# Graph error codes that mean "slow down" rather than "this message is wrong": throughput
# (80007, 130429), the per-pair limit (131056) and the spam rate limit (131048).
RATE_LIMIT_CODES = frozenset({4, 80007, 130429, 131048, 131056})
DEFAULT_RETRY_AFTER = 5.0
_API_VERSION = re.compile(r"v[0-9]{1,3}\.[0-9]{1,3}")


class LookupUnsupported(RuntimeError):
    """The Cloud API cannot say whether an attempt was sent."""


def check_config(config: dict[str, Any]) -> None:
    """ValueError naming the first thing wrong with a sender's provider_config."""
    unknown = sorted(str(k) for k in config.keys() - CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown whatsapp_cloud config keys: {', '.join(unknown)}")
    number_id = config.get("phone_number_id")
    if not isinstance(number_id, str) or not number_id.isdigit():
        raise ValueError("phone_number_id is required: the digits Meta shows for the business number")
    template = config.get("template")
    if template is not None:
        if not isinstance(template, dict) or not isinstance(template.get("name"), str) or not template["name"]:
            raise ValueError('template must be {"name": ..., "language": ...}')
        if not isinstance(template.get("language", "es"), str):
            raise ValueError("template.language must be a string such as es or es_AR")
    # A path segment on the operator's Graph host: only a version, so it cannot steer the request.
    if "api_version" in config and not (
        isinstance(config["api_version"], str) and _API_VERSION.fullmatch(config["api_version"])
    ):
        raise ValueError("api_version must be a Graph version such as v21.0")


def message_body(request: SendRequest) -> dict[str, Any]:
    to = request.to.lstrip("+")  # Graph takes the number in international form without the +
    template = request.sender.config.get("template")
    if template:
        return {
            "messaging_product": "whatsapp",
            "to": to,
            "type": "template",
            "template": {
                "name": template["name"],
                "language": {"code": template.get("language", "es")},
                "components": [{"type": "body", "parameters": [{"type": "text", "text": request.text}]}],
            },
            "biz_opaque_callback_data": request.attempt_id,
        }
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": {"preview_url": False, "body": request.text},
        # Echoed in the status webhooks, so a delivery report finds its attempt.
        "biz_opaque_callback_data": request.attempt_id,
    }


class WhatsAppCloudProvider:
    name = NAME

    def __init__(self, *, base_url: str = DEFAULT_BASE_URL, timeout_s: float = 15.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(timeout=timeout_s)

    def _url(self, sender: SenderConfig) -> str:
        version = sender.config.get("api_version") or DEFAULT_API_VERSION
        return f"{self.base_url}/{version}/{sender.config['phone_number_id']}/messages"

    async def send(self, request: SendRequest) -> SendResult:
        try:
            reply = await self.http.post(
                self._url(request.sender),
                json=message_body(request),
                headers={"Authorization": f"Bearer {request.sender.secret}"},
            )
        except httpx.HTTPError as exc:
            return transport_failure(exc, "graph: ")
        data = reply_object(reply)
        if reply.status_code < 300:
            messages = data.get("messages") or [{}]
            message_id = str(messages[0].get("id") or "")
            if message_id:
                return SendResult(status="sent", provider_message_id=message_id)
            return SendResult(status="failed", error="graph: reply without a message id")
        error = found if isinstance(found := data.get("error"), dict) else {}
        code = error.get("code")
        text = f"graph {reply.status_code}" + (f" ({code})" if code is not None else "")
        text += f": {str(error.get('message') or reply.text)[:200]}"
        if reply.status_code == 429 or code in RATE_LIMIT_CODES:
            return SendResult(status="rate_limited", error=text, retry_after=_retry_after(reply))
        return SendResult(status="failed", error=text)

    async def lookup(self, attempt_id: str, sender: SenderConfig) -> SendResult | None:
        raise LookupUnsupported(f"the Cloud API cannot look up attempt {attempt_id}")

    async def close(self) -> None:
        await self.http.aclose()


def _retry_after(reply: httpx.Response) -> float:
    try:
        return max(0.0, float(reply.headers.get("retry-after", "")))
    except ValueError:
        return DEFAULT_RETRY_AFTER
