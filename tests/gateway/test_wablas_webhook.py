"""Wablas's status callbacks at /webhooks/wablas, over HTTP into the route with a real NATS
(the dispatcher's look-up of message ids is a stub): only calls carrying the operator's key
are taken, each status of one of our messages becomes a delivery report on
`events.delivery.wablas` naming its attempt (once, however often Wablas repeats it), odd
bodies are a clear 4xx, and reports that arrive out of order still leave a read message read."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import pytest
from fastapi import FastAPI
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pregonero.dispatcher.v1 import dispatcher_pb2
from pregonero.events.v1 import events_pb2
from pydantic import SecretStr

from services.campaigns.delivery import _Job
from services.dispatcher.providers import wablas
from services.gateway import errors
from services.gateway.routes import wablas_webhook
from services.runtime.bus import EVENTS_STREAM
from services.runtime.devstack import Stack
from tests.conftest import bus_client

pytestmark = pytest.mark.timeout(20)

KEY = "wablas-tracking-key-for-tests"
SUBJECT = "events.delivery.wablas"


@pytest.fixture
async def js(infra: Stack) -> AsyncIterator[JetStreamContext]:
    nc, js = await bus_client(infra.nats_url)
    try:
        yield js
    finally:
        await nc.close()


class Dispatcher:
    """The dispatcher's FindSenderAttempts: the messages it kept, by (device, message id)."""

    def __init__(self) -> None:
        self.kept: dict[tuple[str, str], str] = {}
        self.asked: list[dispatcher_pb2.FindSenderAttemptsRequest] = []
        self.down = False

    async def FindSenderAttempts(  # noqa: N802 - the gRPC method's name
        self,
        request: dispatcher_pb2.FindSenderAttemptsRequest,
        *,
        metadata: Any,
        timeout: float | None = None,  # noqa: ASYNC109 - the gRPC stub's signature
    ) -> dispatcher_pb2.FindSenderAttemptsResponse:
        self.asked.append(request)
        if self.down:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "dispatcher restarting"
            )
        found = {
            m: self.kept[(request.session, m)]
            for m in request.provider_message_ids
            if (request.session, m) in self.kept
        }
        return dispatcher_pb2.FindSenderAttemptsResponse(attempt_ids=found)


@pytest.fixture
def dispatcher() -> Dispatcher:
    return Dispatcher()


def gateway(js: JetStreamContext, dispatcher: Dispatcher | None = None, secret: str = KEY) -> httpx.AsyncClient:
    app = FastAPI()
    errors.install(app)
    app.include_router(wablas_webhook.router)
    app.state.settings = SimpleNamespace(wablas_webhook_secret=SecretStr(secret))
    app.state.runtime = SimpleNamespace(js=js)
    app.state.backends = SimpleNamespace(dispatcher=dispatcher or Dispatcher())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


def at(device: str) -> dict[str, str]:
    """The query of a device's own Tracking URL."""
    return {"device": device, "key": wablas.device_key(KEY, int(device))}


def attempt_id() -> str:
    return f"{uuid.uuid4()}:{uuid.uuid4().int % 10_000}:1"


async def last(js: JetStreamContext) -> tuple[int, events_pb2.DeliveryReports | None]:
    try:
        msg = await js.get_last_msg(EVENTS_STREAM, SUBJECT)
    except NotFoundError:
        return 0, None
    return msg.seq or 0, events_pb2.DeliveryReports.FromString(msg.data or b"")


def tracking(message_id: str, status: str, **extra: Any) -> dict[str, Any]:
    """A body as Wablas posts it to a device's Tracking URL."""
    return {"id": message_id, "phone": "56912345678", "status": status, "note": "", "deviceId": "A5DOYJ", **extra}


async def test_only_the_operators_or_the_devices_key_is_taken(js: JetStreamContext) -> None:
    before = await last(js)
    body = tracking(str(uuid.uuid4()), "delivered")
    async with gateway(js) as client:
        assert (await client.post("/webhooks/wablas", json=body)).status_code == 401
        assert (await client.post("/webhooks/wablas", params={"key": "guess"}, json=body)).status_code == 401
        # A device's URL takes that device's key only, not the operator's nor another device's.
        for params in ({"device": "41", "key": KEY}, {"device": "41", "key": at("42")["key"]}):
            assert (await client.post("/webhooks/wablas", params=params, json=body)).status_code == 401
    async with gateway(js, secret="") as client:
        off = await client.post("/webhooks/wablas", params={"key": ""}, json=body)
        assert off.status_code == 404 and "WABLAS_WEBHOOK_SECRET" in off.text
    assert await last(js) == before  # nothing published


async def test_a_status_becomes_one_delivery_report_naming_its_attempt(
    js: JetStreamContext, dispatcher: Dispatcher
) -> None:
    message_id, attempt = str(uuid.uuid4()), attempt_id()
    dispatcher.kept[("41", message_id)] = attempt
    async with gateway(js, dispatcher) as client:
        r = await client.post("/webhooks/wablas", params=at("41"), json=tracking(message_id, "read", extra="ignored"))
        assert r.status_code == 200 and r.json() == {"received": 1}
        seq, published = await last(js)
        assert published is not None and published.provider == "wablas"
        (report,) = published.reports
        assert (report.provider_message_id, report.attempt_id, report.status) == (message_id, attempt, "read")
        assert report.at.seconds > 0
        (asked,) = dispatcher.asked
        assert (asked.provider, asked.session, list(asked.provider_message_ids)) == ("wablas", "41", [message_id])

        # Repeated by Wablas: the same report is not published again.
        again = await client.post("/webhooks/wablas", params=at("41"), json=tracking(message_id, "read"))
        assert again.status_code == 200 and (await last(js))[0] == seq

        # The same message id under another device finds nothing: not ours to report.
        other_device = await client.post("/webhooks/wablas", params=at("42"), json=tracking(message_id, "delivered"))
        assert other_device.json() == {"received": 0} and (await last(js))[0] == seq


async def test_an_echoed_ref_id_names_the_attempt_without_asking_the_dispatcher(
    js: JetStreamContext, dispatcher: Dispatcher
) -> None:
    message_id, attempt = str(uuid.uuid4()), attempt_id()
    async with gateway(js, dispatcher) as client:
        # The key may also come as a header; a refusal keeps Wablas's note.
        r = await client.post(
            "/webhooks/wablas",
            headers={"X-Webhook-Key": KEY},
            json=[tracking(message_id, "rejected", note="number not on whatsapp", ref_id=attempt)],
        )
        assert r.status_code == 200 and r.json() == {"received": 1}
        (report,) = (await last(js))[1].reports  # type: ignore[union-attr]
        assert (report.provider_message_id, report.attempt_id, report.status) == (message_id, attempt, "failed")
        assert report.error == "wablas: rejected: number not on whatsapp"
        # A ref_id that is not one of our attempt ids (someone else's use of it) is not taken.
        stranger = await client.post(
            "/webhooks/wablas", params={"key": KEY}, json=tracking(str(uuid.uuid4()), "read", ref_id="pengumuman")
        )
        assert stranger.json() == {"received": 0}
    assert dispatcher.asked == []


async def test_a_devices_url_does_not_believe_a_ref_id(js: JetStreamContext, dispatcher: Dispatcher) -> None:
    # The device's owner holds that URL's key: a body naming another account's attempt in its
    # ref_id must not report on it. Only the device's own messages (kept by the dispatcher) count.
    before = await last(js)
    async with gateway(js, dispatcher) as client:
        r = await client.post(
            "/webhooks/wablas", params=at("41"), json=tracking("m-unknown", "read", ref_id=attempt_id())
        )
    assert r.status_code == 200 and r.json() == {"received": 0}
    assert await last(js) == before


async def test_the_url_the_dispatcher_gives_a_device_is_taken(js: JetStreamContext, dispatcher: Dispatcher) -> None:
    url = httpx.URL(wablas.tracking_url("https://api.example.cl/webhooks/wablas", KEY, 41))
    assert url.path == "/webhooks/wablas"
    dispatcher.kept[("41", "m-41")] = attempt_id()
    async with gateway(js, dispatcher) as client:
        r = await client.post("/webhooks/wablas", params=dict(url.params), json=tracking("m-41", "delivered"))
    assert r.status_code == 200 and r.json() == {"received": 1}


async def test_a_dispatcher_that_cannot_answer_gets_the_callback_refused_for_a_retry(
    js: JetStreamContext, dispatcher: Dispatcher
) -> None:
    before = await last(js)
    dispatcher.down = True
    async with gateway(js, dispatcher) as client:
        r = await client.post("/webhooks/wablas", params=at("41"), json=tracking("m-1", "read"))
    assert r.status_code == 503
    assert await last(js) == before


async def test_out_of_order_reports_leave_a_read_message_read(js: JetStreamContext, dispatcher: Dispatcher) -> None:
    message_id = str(uuid.uuid4())
    dispatcher.kept[("7", message_id)] = attempt_id()
    seen = []
    async with gateway(js, dispatcher) as client:
        for status in ("read", "sent", "received", "pending"):
            params = at("7")
            r = await client.post("/webhooks/wablas", params=params, json=tracking(message_id, status))
            assert r.status_code == 200
            if r.json()["received"]:
                seen.extend((await last(js))[1].reports)  # type: ignore[union-attr]
    assert [r.status for r in seen] == ["read", "sent", "delivered"]  # pending adds nothing
    job = _Job()  # as campaigns applies them: the furthest state wins
    for report in seen:
        job.add(report)
    assert job.status == "read" and job.delivered_at is not None and job.read_at is not None


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"not json", 400, "not JSON"),
        (json.dumps({"status": "read"}).encode(), 400, "id: Field required"),
        (json.dumps({"id": "", "status": "read"}).encode(), 400, "id"),
        (json.dumps({"id": "x" * 129, "status": "read"}).encode(), 400, "id"),
        (json.dumps([tracking("m", "read")] * 101).encode(), 413, "at most 100"),
        (json.dumps({"id": "m", "status": "read", "note": "x" * 70_000}).encode(), 413, "larger than 65536"),
        (json.dumps(tracking("m", "read")).encode(), 422, "device"),  # with device=abc below
    ],
)
async def test_bad_bodies_are_refused_with_their_reason(
    js: JetStreamContext, body: bytes, status: int, words: str
) -> None:
    before = await last(js)
    params = {"key": KEY, "device": "abc"} if status == 422 else at("7")
    async with gateway(js) as client:
        r = await client.post(
            "/webhooks/wablas", params=params, content=body, headers={"content-type": "application/json"}
        )
    assert r.status_code == status and words in r.text
    assert await last(js) == before
