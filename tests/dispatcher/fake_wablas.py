"""A local server speaking the part of Wablas's API the `wablas` adapter calls, as its
documentation describes it: `POST /api/v2/send-message` (header `Authorization:
<token>.<secret>`), `GET /api/report/message?ref_id=`, `GET /api/device/info?token=`,
`POST /api/device/change-tracking-url`. Replies
are `{"status": true, ...}` or `{"status": false, "message": <reason>}`.

It hosts one device (TOKEN, SECRET) unless a test adds more (`add_device`), each with its own
state. Failure modes a test can script: a destination refused (invalid number), a device
disconnected or expired or out of quota (its every send refused, and device info says so),
throttling (the next sends answered 429 with Retry-After), replies of odd shapes, and
destinations whose reply comes too late (the message is queued first: the request did reach
Wablas). Every accepted message is kept, with the token of the device that took it, for the
test to inspect."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

TOKEN = "wablas-device-token-0001"
SECRET = "s3cr3tKy"
SERIAL = "A5DOYJ"


@dataclass
class Refusal:
    message: str
    status: int = 200  # Wablas often says no with a 200 and "status": false
    retry_after: str | None = None


@dataclass
class FakeDevice:
    secret: str
    serial: str
    connected: bool = True
    active: bool = True
    quota: int | str = 100  # messages left, or "unlimited"
    expired_date: str = "2027-12-31"


@dataclass
class FakeWablas:
    devices: dict[str, FakeDevice] = field(default_factory=lambda: {TOKEN: FakeDevice(SECRET, SERIAL)})
    refusals: dict[str, Refusal] = field(default_factory=dict)  # by phone (digits)
    throttled: int = 0  # the next n sends are answered 429
    odd: list[tuple[int, str]] = field(default_factory=list)  # the next sends' raw (status, body)
    hang: set[str] = field(default_factory=set)  # phones whose reply comes too late for the client
    hang_s: float = 2.0  # longer than the client's timeout, shorter than the server's stop
    accepted: list[dict[str, Any]] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    tracking_urls: dict[str, str] = field(default_factory=dict)  # by device token
    url: str = ""

    def device(self, token: str = TOKEN) -> FakeDevice:
        return self.devices[token]

    def add_device(self, token: str, secret: str) -> FakeDevice:
        self.devices[token] = FakeDevice(secret, serial=token[:6].upper())
        return self.devices[token]

    def by_phone(self, phone: str) -> dict[str, Any]:
        (found,) = [m for m in self.accepted if m["phone"] == phone.lstrip("+")]
        return found

    def tracking(self, phone: str, status: str, note: str = "") -> dict[str, Any]:
        """The body Wablas posts to the device's Tracking URL about the message to `phone`
        (as documented: no ref_id, no time)."""
        m = self.by_phone(phone)
        return {
            "id": m["id"],
            "phone": m["phone"],
            "status": status,
            "note": note,
            "deviceId": self.devices[m["device"]].serial,
            "sender": "56900000000",
        }

    def _authorized(self, request: Request) -> tuple[str, FakeDevice] | None:
        token, _, secret = request.headers.get("authorization", "").partition(".")
        found = self.devices.get(token)
        return (token, found) if found is not None and secret == found.secret else None

    def app(self) -> FastAPI:
        app = FastAPI()

        def no(message: str, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
            return JSONResponse({"status": False, "message": message}, status_code=status, headers=headers)

        @app.post("/api/v2/send-message")
        async def send(request: Request) -> JSONResponse:
            self.auth_headers.append(request.headers.get("authorization", ""))
            authorized = self._authorized(request)
            if authorized is None:
                return no("token invalid", 401)
            token, device = authorized
            if self.odd:
                status, raw = self.odd.pop(0)
                return Response(raw, status_code=status, media_type="application/json")
            if self.throttled > 0:
                self.throttled -= 1
                return no("Too many requests, please try again later", 429, {"Retry-After": "2"})
            if not device.active:
                return no(f"device expired on {device.expired_date}")
            if not device.connected:
                return no("device disconnected, please scan qr code")
            if device.quota != "unlimited" and int(device.quota) <= 0:
                return no("quota is not enough, please top up")
            body = await request.json()
            items = body.get("data") if isinstance(body, dict) else None
            if not isinstance(items, list) or not 1 <= len(items) <= 100:
                return no("data is required", 400)
            out = []
            for item in items:
                phone, text = str(item.get("phone", "")), item.get("message")
                if not phone.isdigit() or not isinstance(text, str) or len(text) > 1024:
                    return no("phone and message are required", 400)
                refusal = self.refusals.get(phone)
                if refusal is not None:
                    headers = {"Retry-After": refusal.retry_after} if refusal.retry_after else None
                    return no(refusal.message, refusal.status, headers)
                message = {
                    "id": str(uuid.uuid4()),
                    "phone": phone,
                    "message": text,
                    "status": "pending",
                    "ref_id": item.get("ref_id"),
                }
                self.accepted.append({**message, "device": token})
                if device.quota != "unlimited":
                    device.quota = int(device.quota) - 1
                out.append(message)
                if phone in self.hang:
                    await asyncio.sleep(self.hang_s)  # queued, but the answer comes too late
            return JSONResponse(
                {
                    "status": True,
                    "message": "Message is pending and waiting to be processed",
                    "data": {"device_id": device.serial, "quota": device.quota, "messages": out},
                }
            )

        @app.get("/api/report/message")
        async def report(request: Request, ref_id: str = "") -> JSONResponse:
            authorized = self._authorized(request)
            if authorized is None:
                return no("token invalid", 401)
            rows = [
                {
                    "id": m["id"],
                    "phone": {"from": "56900000000", "to": m["phone"]},
                    "category": "text",
                    "text": m["message"],
                    "status": m["status"],
                    "ref_id": m["ref_id"],
                }
                for m in self.accepted
                if m["device"] == authorized[0] and (not ref_id or m["ref_id"] == ref_id)
            ]
            return JSONResponse({"status": True, "totalData": len(rows), "page": "1", "message": rows})

        @app.post("/api/device/change-tracking-url")
        async def change_tracking_url(request: Request) -> JSONResponse:
            authorized = self._authorized(request)
            if authorized is None:
                return no("token invalid", 401)
            form = parse_qs((await request.body()).decode())
            url = (form.get("tracking_url") or [""])[0]
            if not url.startswith(("http://", "https://")):
                return no("tracking url is invalid", 400)
            self.tracking_urls[authorized[0]] = url
            return JSONResponse({"status": True, "message": "tracking url successfully changed"})

        @app.get("/api/device/info")
        async def info(token: str = "") -> JSONResponse:
            device = self.devices.get(token)
            if device is None:
                return no("token invalid")
            return JSONResponse(
                {
                    "status": True,
                    "data": {
                        "name": "Ventas",
                        "serial": device.serial,
                        "sender": "56900000000",
                        "quota": device.quota,
                        "expired_date": device.expired_date,
                        "active": device.active,
                        "status": "connected" if device.connected else "disconnected",
                    },
                }
            )

        return app
