"""The `wablas` adapter over HTTP against a local server speaking Wablas's API: sends with the
device's token and secret, each refusal → the right result, the look-up of a lost attempt by
its ref_id, and the device's state."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.dispatcher.crypto import SecretBox
from services.dispatcher.providers.base import DeviceState, SenderConfig, SendRequest
from services.dispatcher.providers.wablas import (
    DEVICE_RETRY_AFTER,
    WablasProvider,
    WablasRefused,
    check_config,
    classify_refusal,
    device_key,
    device_unavailable,
    tracking_url,
)
from services.dispatcher.repo import SendersRepo
from services.dispatcher.senders import Senders
from services.runtime.devstack import Stack, free_port
from services.runtime.errors import InvalidArgument
from services.runtime.identity import MEMBER, Caller
from tests.conftest import service_pool
from tests.dispatcher.fake_wablas import SECRET, TOKEN, FakeWablas, Refusal
from tests.http_server import running

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
async def wablas() -> AsyncIterator[FakeWablas]:
    async with running(FakeWablas()) as fake:
        yield fake


@pytest.fixture
async def provider(wablas: FakeWablas) -> AsyncIterator[WablasProvider]:
    p = WablasProvider(base_url=wablas.url, timeout_s=1.0)
    yield p
    await p.close()


def device(*, token: str = TOKEN, secret: str = SECRET, **config: Any) -> SenderConfig:
    return SenderConfig(id=9, account_id="acc-1", provider="wablas", token=token, secret=secret, config=config)


def message(
    to: str = "+56912345678", text: str = "Hola María, su cuota vence hoy.", s: SenderConfig | None = None
) -> SendRequest:
    return SendRequest(attempt_id=f"b:1:{to}", sender=s or device(), to=to, text=text)


async def test_a_text_goes_out_with_the_devices_token_and_secret(wablas: FakeWablas, provider: WablasProvider) -> None:
    result = await provider.send(message())
    assert result.status == "sent"
    (sent,) = wablas.accepted
    assert result.provider_message_id == sent["id"]
    assert (sent["phone"], sent["message"], sent["ref_id"]) == (
        "56912345678",
        "Hola María, su cuota vence hoy.",
        "b:1:+56912345678",
    )
    assert wablas.auth_headers == [f"{TOKEN}.{SECRET}"]


class Kept:
    def __init__(self, fail: bool = False) -> None:
        self.fail, self.rows = fail, []

    async def remember(self, *, provider: str, message_id: str, sender_id: int, attempt_id: str) -> None:
        if self.fail:
            raise OSError("database away")
        self.rows.append((provider, message_id, sender_id, attempt_id))


async def test_each_accepted_message_id_is_kept_with_its_attempt(wablas: FakeWablas) -> None:
    kept, broken = Kept(), Kept(fail=True)
    async with contextlib.AsyncExitStack() as stack:
        p = WablasProvider(base_url=wablas.url, timeout_s=1.0, messages=kept)
        stack.push_async_callback(p.close)
        q = WablasProvider(base_url=wablas.url, timeout_s=1.0, messages=broken)
        stack.push_async_callback(q.close)
        sent = await p.send(message())
        assert kept.rows == [("wablas", sent.provider_message_id, 9, "b:1:+56912345678")]
        # Not kept (the database is away): still sent, never sent again; only its callbacks
        # will not find it.
        assert (await q.send(message(to="+56912340000"))).status == "sent"
        wablas.device().connected = False
        assert device_unavailable(await p.send(message(to="+56912349999")))
        assert len(kept.rows) == 1  # a refusal keeps nothing


@pytest.mark.parametrize(
    ("script", "status", "retry_after", "error"),
    [
        ({"connected": False}, "rate_limited", DEVICE_RETRY_AFTER, "device unavailable: device disconnected"),
        ({"active": False}, "rate_limited", DEVICE_RETRY_AFTER, "device unavailable: device expired"),
        ({"quota": 0}, "rate_limited", DEVICE_RETRY_AFTER, "device unavailable: quota exhausted"),
        ({"throttled": 1}, "rate_limited", 2.0, "wablas 429: Too many requests"),
    ],
)
async def test_a_device_that_cannot_send_or_a_throttle_asks_to_wait(
    wablas: FakeWablas, provider: WablasProvider, script: dict[str, Any], status: str, retry_after: float, error: str
) -> None:
    for key, value in script.items():
        setattr(wablas if key == "throttled" else wablas.device(), key, value)
    result = await provider.send(message())
    assert (result.status, result.retry_after) == (status, retry_after)
    assert error in result.error
    # Only the device's faults say "another device may send it"; a throttle is per device too,
    # but passes.
    assert device_unavailable(result) is result.device_unavailable is ("device unavailable" in error)
    assert wablas.accepted == []


async def test_the_device_sends_again_once_the_throttle_passes(wablas: FakeWablas, provider: WablasProvider) -> None:
    wablas.throttled = 1
    assert (await provider.send(message())).status == "rate_limited"
    assert (await provider.send(message())).status == "sent"
    assert len(wablas.accepted) == 1


async def test_an_invalid_number_fails_with_wablas_reason(wablas: FakeWablas, provider: WablasProvider) -> None:
    wablas.refusals["56987654321"] = Refusal("phone number 56987654321 is not registered on whatsapp")
    result = await provider.send(message(to="+56987654321"))
    assert result.status == "failed"
    assert result.error == "wablas: invalid number: phone number 56987654321 is not registered on whatsapp"
    # Refused before Wablas: a number it could never take, a text over its limit.
    assert (await provider.send(message(to="+0123"))).status == "failed"
    long = await provider.send(message(text="x" * 1025))
    assert long.status == "failed" and "1024" in long.error
    assert wablas.accepted == []


async def test_wrong_credentials_stop_the_device_and_an_unreachable_server_fails_the_attempt(
    wablas: FakeWablas, provider: WablasProvider
) -> None:
    # Every send of that device would be refused until its owner corrects it: not the
    # recipients' fault, so not their failure.
    wrong = await provider.send(message(s=device(secret="guess")))
    assert device_unavailable(wrong) and "wrong token or secret key: token invalid" in wrong.error
    down = WablasProvider(base_url=f"http://127.0.0.1:{free_port()}", timeout_s=1.0)
    try:
        refused = await down.send(message())
    finally:
        await down.close()
    assert refused.status == "failed" and "ConnectError" in refused.error
    unconfigured = WablasProvider(base_url="")
    try:
        assert "WABLAS_BASE_URL" in (await unconfigured.send(message())).error
    finally:
        await unconfigured.close()


@pytest.mark.parametrize(
    ("status", "body", "result", "error"),
    [
        # Named a message: queued, whatever the rest says.
        (200, '{"status": "success", "data": {"messages": [{"id": "m-1", "status": "pending"}]}}', "sent", ""),
        (200, '{"status": false, "data": {"messages": [{"id": "m-2", "status": "pending"}]}}', "sent", ""),
        (200, '{"status": true, "data": {"messages": [{"id": "m-3", "status": "rejected"}]}}', "failed", "rejected"),
        # Taken but unnamed, or not Wablas's words: it may go out, so it is never sent again.
        (200, '{"status": true, "data": {"messages": []}}', "unknown", "without a message id"),
        (200, "<html>ok</html>", "unknown", "not Wablas's"),
        (502, "Bad Gateway", "unknown", "wablas 502"),
        (503, "", "rate_limited", "wablas 503"),
        (400, '{"status": false, "message": "message is required"}', "failed", "wablas 400: message is required"),
    ],
)
async def test_odd_replies_never_lose_or_double_a_message(
    wablas: FakeWablas, provider: WablasProvider, status: int, body: str, result: str, error: str
) -> None:
    wablas.odd.append((status, body))
    got = await provider.send(message())
    assert got.status == result and error in got.error


async def test_a_reply_that_never_comes_is_unknown_and_found_by_lookup(
    wablas: FakeWablas, provider: WablasProvider
) -> None:
    wablas.hang.add("56911112222")
    request = message(to="+56911112222")
    result = await provider.send(request)
    # Wablas queued it: sending it again would message that person twice.
    assert result.status == "unknown" and "ReadTimeout" in result.error
    found = await provider.lookup(request.attempt_id, device())
    assert found is not None and found.status == "sent"
    assert found.provider_message_id == wablas.by_phone("+56911112222")["id"]
    # An attempt Wablas never took is absent: the dispatcher may send it.
    assert await provider.lookup("b:1:+56900000001", device()) is None


async def test_two_devices_each_send_with_their_own_credentials_and_state(
    wablas: FakeWablas, provider: WablasProvider
) -> None:
    wablas.add_device("second-device-token", "other-secret").connected = False
    second = device(token="second-device-token", secret="other-secret")
    down = await provider.send(message(to="+56911110000", s=second))
    up = await provider.send(message(to="+56911110000"))
    assert device_unavailable(down) and up.status == "sent"
    assert [m["device"] for m in wablas.accepted] == [TOKEN]
    assert (await provider.device_state(second)).connection == "disconnected"
    # Each device's report is its own: the other device's message is not found through it.
    assert await provider.lookup("b:1:+56911110000", second) is None
    assert await provider.lookup("b:1:+56911110000", device()) is not None


async def test_a_lookup_wablas_cannot_answer_raises(wablas: FakeWablas, provider: WablasProvider) -> None:
    with pytest.raises(RuntimeError, match="token invalid"):
        await provider.lookup("b:1:+56912345678", device(secret="guess"))


async def test_device_state_connected_disconnected_expired_and_quota(
    wablas: FakeWablas, provider: WablasProvider
) -> None:
    assert await provider.device_state(device()) == DeviceState("connected", quota_left=100)
    phone = wablas.device()
    phone.quota = "unlimited"
    assert await provider.device_state(device()) == DeviceState("connected", quota_left=-1)
    phone.quota = 0
    exhausted = await provider.device_state(device())
    assert (exhausted.connection, exhausted.quota_left) == ("disconnected", 0) and "quota exhausted" in exhausted.reason
    phone.quota, phone.connected = 7, False
    state = await provider.device_state(device())
    assert (state.connection, state.quota_left) == ("disconnected", 7) and "scan the QR" in state.reason
    phone.active = False
    state = await provider.device_state(device())
    assert state.connection == "disconnected" and "expired 2027-12-31" in state.reason
    wrong = await provider.device_state(device(token="nope"))
    assert wrong.connection == "disconnected" and "token invalid" in wrong.reason
    down = WablasProvider(base_url=f"http://127.0.0.1:{free_port()}", timeout_s=1.0)
    try:
        assert (await down.device_state(device())).connection == "unknown"
    finally:
        await down.close()


async def test_each_device_is_given_its_own_tracking_url(wablas: FakeWablas, provider: WablasProvider) -> None:
    url = tracking_url("https://api.example.cl/webhooks/wablas", "operator-secret", 9)
    await provider.set_tracking_url(device(), url)
    assert wablas.tracking_urls == {TOKEN: url}
    assert url.startswith("https://api.example.cl/webhooks/wablas?device=9&key=")
    assert device_key("operator-secret", 9) != device_key("operator-secret", 10)  # one device's key only
    with pytest.raises(WablasRefused, match="token invalid"):
        await provider.set_tracking_url(device(secret="guess"), url)


@pytest.mark.parametrize(
    ("code", "reason", "status", "marker"),
    [
        (200, "Device is not connected", "rate_limited", "device unavailable"),
        (200, "Your quota has run out", "rate_limited", "quota exhausted"),
        (403, "access denied", "rate_limited", "wrong token or secret key"),
        (400, "invalid phone number", "failed", "invalid number"),
        (400, "something else", "failed", "wablas 400: something else"),
    ],
)
def test_refusals_are_classified_by_their_words(code: int, reason: str, status: str, marker: str) -> None:
    result = classify_refusal(code, reason, None)
    assert result.status == status and marker in result.error


@pytest.mark.parametrize("config", [{"base_url": "http://169.254.169.254"}, {"server": "texas"}, {"token": "t"}])
def test_a_device_names_no_endpoint_and_no_other_config(config: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="unknown wablas config keys"):
        check_config(config)
    check_config({})


async def test_a_wablas_device_is_created_with_token_and_secret_and_no_endpoint(infra: Stack) -> None:
    # What POST /devices reaches (the route passes provider and provider_config through).
    pool = await service_pool(infra.database_url, "dispatcher")
    try:
        senders = Senders(SendersRepo(pool), SecretBox("k"))
        caller = Caller(role=MEMBER, account_id=f"wb-{uuid.uuid4().hex[:10]}", user_id="u1")
        row = await senders.create(caller, token=TOKEN, secret=SECRET, provider="wablas", device_name="Ventas")
        (loaded,) = (await senders.load_for_dispatch([row["id"]])).values()
        assert (loaded.provider, loaded.token, loaded.secret, loaded.config) == ("wablas", TOKEN, SECRET, {})
        for config in ('{"base_url": "http://169.254.169.254"}', '{"server": "texas"}'):
            with pytest.raises(InvalidArgument, match="base_url|unknown wablas config keys"):
                await senders.create(caller, token=TOKEN, secret=SECRET, provider="wablas", provider_config_json=config)
        with pytest.raises(InvalidArgument, match="secret is required"):
            await senders.create(caller, token=TOKEN, secret="", provider="wablas")
        unset = Senders(SendersRepo(pool), SecretBox("k"), unconfigured={"wablas": "wablas is not configured"})
        with pytest.raises(InvalidArgument, match="not configured"):
            await unset.create(caller, token=TOKEN, secret=SECRET, provider="wablas")
    finally:
        await pool.close()
