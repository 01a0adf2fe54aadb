"""A local server speaking the part of Meta's Graph API the `whatsapp_cloud` adapter calls:
`POST /{version}/{phone_number_id}/messages`. Replies as Graph does: the message id on
success, an `error{message, type, code}` object otherwise. Each destination can be scripted
to fail; every accepted message is kept for the test to inspect."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

ACCESS_TOKEN = "EAAG-test-access-token"
PHONE_NUMBER_ID = "106540352242922"


@dataclass
class Refusal:
    status: int
    code: int
    message: str
    retry_after: str | None = None


@dataclass
class FakeGraph:
    refusals: dict[str, Refusal] = field(default_factory=dict)  # by destination (digits)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    message_ids: dict[str, str] = field(default_factory=dict)  # wamid by destination
    paths: list[str] = field(default_factory=list)
    url: str = ""

    def app(self) -> FastAPI:
        app = FastAPI()

        def error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
            body = {"error": {"message": message, "type": "OAuthException", "code": code, "fbtrace_id": "AbC"}}
            return JSONResponse(body, status_code=status, headers=headers)

        @app.post("/{version}/{number_id}/messages")
        async def messages(version: str, number_id: str, request: Request) -> JSONResponse:
            self.paths.append(f"/{version}/{number_id}/messages")
            if request.headers.get("authorization") != f"Bearer {ACCESS_TOKEN}":
                return error(401, 190, "Invalid OAuth access token.")
            if number_id != PHONE_NUMBER_ID:
                return error(400, 100, f"Unsupported post request. Object with ID '{number_id}' does not exist")
            body = await request.json()
            if body.get("messaging_product") != "whatsapp" or not str(body.get("to", "")).isdigit():
                return error(400, 100, "Invalid parameter")
            refusal = self.refusals.get(body["to"])
            if refusal is not None:
                headers = {"Retry-After": refusal.retry_after} if refusal.retry_after else None
                return error(refusal.status, refusal.code, refusal.message, headers)
            self.accepted.append(body)
            wamid = self.message_ids[body["to"]] = f"wamid.{secrets.token_hex(12)}"
            return JSONResponse(
                {
                    "messaging_product": "whatsapp",
                    "contacts": [{"input": body["to"], "wa_id": body["to"]}],
                    "messages": [{"id": wamid}],
                }
            )

        return app
