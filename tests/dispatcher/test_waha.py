"""The `waha` adapter over HTTP against a local server speaking WAHA's sessions, QR and
sendText API (tests/dispatcher/fake_waha.py), including its failure modes."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest

from services.dispatcher.providers import waha
from services.dispatcher.providers.base import DeviceState, SenderConfig, SendRequest
from services.dispatcher.providers.waha import (
    DEVICE_DOWN,
    LookupUnsupported,
    WahaProvider,
    WahaUnavailable,
    device_unavailable,
)
from services.dispatcher.waha_sessions import WahaSessions
from services.runtime.identity import ADMIN, Caller
from tests.dispatcher.fake_waha import API_KEY, HMAC_KEY, QR_PNG, FakeWaha
from tests.http_server import running

pytestmark = pytest.mark.timeout(20)

SENDER = SenderConfig(id=41, account_id="acc-1", provider="waha")
SESSION = "pregonero-41"
HOOK = "https://pregonero.example/webhooks/waha"


@pytest.fixture
async def fake() -> AsyncIterator[FakeWaha]:
    async with running(FakeWaha()) as f:
        yield f


@pytest.fixture
async def provider(fake: FakeWaha) -> AsyncIterator[WahaProvider]:
    p = WahaProvider(base_url=fake.url, api_key=API_KEY, webhook_url=HOOK, webhook_hmac_key=HMAC_KEY, timeout_s=1)
    yield p
    await p.close()


def message(to: str = "+56912345678", text: str = "Hola María, su cuota vence hoy.") -> SendRequest:
    return SendRequest(attempt_id=f"b:1:{to}", sender=SENDER, to=to, text=text)


async def linked(fake: FakeWaha, provider: WahaProvider) -> None:
    await provider.create_session(SENDER.id)
    fake.link(SESSION)


async def test_a_device_session_is_created_with_its_signed_webhooks_and_shows_a_qr(
    fake: FakeWaha, provider: WahaProvider
) -> None:
    session = await provider.create_session(SENDER.id)
    assert session.name == SESSION
    created = fake.sessions[SESSION]
    assert created.status == "SCAN_QR_CODE"
    (hook,) = created.config["webhooks"]
    assert hook["url"] == HOOK and hook["hmac"] == {"key": HMAC_KEY}
    assert hook["events"] == ["session.status", "message.ack"]
    assert created.config["metadata"] == {"pregonero.sender_id": "41"}

    assert await provider.qr_png(SENDER.id) == QR_PNG
    state = await provider.device_state(SENDER)
    assert state.connection == "qr_needed" and state.reason == "SCAN_QR_CODE"
    assert base64.b64decode(state.qr_code) == QR_PNG

    # Created again (a retry after a timeout): the same session, its config renewed, no error.
    await provider.create_session(SENDER.id)
    assert list(fake.sessions) == [SESSION]
    assert "PUT /api/sessions/pregonero-41" in fake.calls


async def test_states_map_to_connections(fake: FakeWaha, provider: WahaProvider) -> None:
    assert (await provider.device_state(SENDER)).connection == "disconnected"  # no session yet
    await linked(fake, provider)
    state = await provider.device_state(SENDER)
    assert (state.connection, state.qr_code) == ("connected", "")
    assert await provider.qr_png(SENDER.id) == b""  # nothing to scan
    fake.fail(SESSION)
    assert (await provider.device_state(SENDER)).connection == "disconnected"
    assert [waha.connection_of(s) for s in ("STOPPED", "STARTING", "PASSKEY_REQUIRED")] == ["disconnected"] * 3


async def test_a_text_goes_to_the_chat_of_the_number_and_its_id_is_kept(fake: FakeWaha, provider: WahaProvider) -> None:
    await linked(fake, provider)
    result = await provider.send(message())
    assert result.status == "sent"
    (sent,) = fake.sent
    assert sent["session"] == SESSION and sent["chatId"] == "56912345678@c.us"
    assert sent["text"] == "Hola María, su cuota vence hoy."
    assert result.provider_message_id == sent["id"] and sent["id"].startswith("true_56912345678@c.us_")


async def test_a_session_that_fails_mid_run_refuses_without_sending_and_hands_the_work_back(
    fake: FakeWaha, provider: WahaProvider
) -> None:
    await linked(fake, provider)
    fake.sessions[SESSION].fail_after = 2
    first, second, third = [await provider.send(message(f"+5691234567{i}")) for i in range(3)]
    assert first.status == second.status == "sent"
    assert device_unavailable(third) and "FAILED" in third.error
    assert third.retry_after > 0
    assert len(fake.sent) == 2  # the third never went out

    # Logged out, and then deleted at WAHA: still the device, not the recipient.
    await provider.logout(SENDER.id)
    assert (await provider.send(message())).error.endswith("is SCAN_QR_CODE")
    await provider.delete_session(SENDER.id)
    gone = await provider.send(message())
    assert gone.status == "rate_limited" and gone.error.startswith(DEVICE_DOWN) and gone.device_unavailable


async def test_throttling_waits_and_a_reply_that_never_comes_is_unknown(fake: FakeWaha, provider: WahaProvider) -> None:
    await linked(fake, provider)
    fake.throttled = 1
    throttled = await provider.send(message())
    assert throttled.status == "rate_limited" and throttled.retry_after == pytest.approx(0.05)
    assert not device_unavailable(throttled)  # the device is fine: it waits, it is not replaced
    fake.hang_s = 1.5  # the client gives up after 1 s
    lost = await provider.send(message())  # the request went out; the answer did not come back
    assert lost.status == "unknown" and "Timeout" in lost.error


async def test_a_malformed_number_fails_and_an_unreachable_waha_loses_nothing(
    fake: FakeWaha, provider: WahaProvider
) -> None:
    await linked(fake, provider)
    bad = await provider.send(message(to="+56 9 1234"))
    assert bad.status == "failed" and "waha 400" in bad.error
    down = WahaProvider(base_url="http://127.0.0.1:9", api_key=API_KEY, timeout_s=1)
    try:
        result = await down.send(message())
        assert result.status == "rate_limited" and result.error.startswith(DEVICE_DOWN) and result.device_unavailable
        with pytest.raises(WahaUnavailable):
            await down.create_session(SENDER.id)
        assert (await down.device_state(SENDER)).connection == "unknown"
    finally:
        await down.close()


async def test_the_api_key_is_sent_and_a_wrong_one_is_refused(fake: FakeWaha) -> None:
    wrong = WahaProvider(base_url=fake.url, api_key="not-the-key", timeout_s=1)
    try:
        with pytest.raises(WahaUnavailable, match="401"):
            await wrong.create_session(SENDER.id)
    finally:
        await wrong.close()


async def test_restart_and_logout_act_on_the_session(fake: FakeWaha, provider: WahaProvider) -> None:
    await linked(fake, provider)
    assert (await provider.restart(SENDER.id)).name == SESSION
    assert fake.sessions[SESSION].status == "SCAN_QR_CODE"
    fake.link(SESSION)
    await provider.logout(SENDER.id)
    assert fake.calls[-1] == "POST /api/sessions/pregonero-41/logout"
    # A session WAHA lost (its storage was wiped) is created again by a restart.
    del fake.sessions[SESSION]
    await provider.restart(SENDER.id)
    assert fake.sessions[SESSION].status == "SCAN_QR_CODE"


async def test_lookup_cannot_resolve_a_lost_send(provider: WahaProvider) -> None:
    with pytest.raises(LookupUnsupported):
        await provider.lookup("b:1:1", SENDER)


def test_names_config_and_message_ids() -> None:
    assert waha.sender_of("pregonero-41") == 41
    assert [waha.sender_of(s) for s in ("default", "pregonero-0", "pregonero-x", "pregonero-99999999999999999999")] == [
        None
    ] * 4
    waha.check_config({})
    with pytest.raises(ValueError, match="base_url"):
        waha.check_config({"base_url": "http://evil.example"})
    assert waha.message_id_of({"id": "true_1@c.us_AB"}, "1@c.us") == "true_1@c.us_AB"
    assert waha.message_id_of({"key": {"id": "AB"}}, "1@c.us") == "true_1@c.us_AB"
    assert waha.message_id_of({}, "1@c.us") == ""


async def test_an_accepted_message_id_is_kept_with_its_attempt(fake: FakeWaha) -> None:
    kept: list[tuple[str, int, str]] = []

    async def remember(message_id: str, sender_id: int, attempt_id: str) -> None:
        kept.append((message_id, sender_id, attempt_id))

    async def broken(message_id: str, sender_id: int, attempt_id: str) -> None:
        raise OSError("database away")

    for keep in (remember, broken):
        p = WahaProvider(base_url=fake.url, api_key=API_KEY, timeout_s=1, remember=keep)
        try:
            await linked(fake, p)
            result = await p.send(message())
        finally:
            await p.close()
        # Kept or not, the message went out: the send's outcome does not depend on it.
        assert result.status == "sent"
    assert kept == [(fake.sent[0]["id"], 41, "b:1:+56912345678")]


async def test_a_late_webhook_cannot_set_back_a_newer_state(fake: FakeWaha, provider: WahaProvider) -> None:
    sessions = WahaSessions(provider, senders=None, messages=None)  # type: ignore[arg-type]
    internal = Caller(role=ADMIN, account_id="", user_id="waha-webhook")
    await linked(fake, provider)
    late = DeviceState("qr_needed", "SCAN_QR_CODE")  # posted before the scan, arriving after it
    assert await sessions.confirm(internal, "waha", SESSION, late) == DeviceState("connected", "WORKING")
    await provider.logout(SENDER.id)
    asked = await sessions.confirm(internal, "waha", SESSION, DeviceState("qr_needed", "SCAN_QR_CODE"))
    assert asked.connection == "qr_needed" and base64.b64decode(asked.qr_code) == QR_PNG  # with the image
    # Not a session of ours, or not the suite asking: the report is left as it came.
    assert await sessions.confirm(internal, "waha", "default", late) is late
    member = Caller(role=ADMIN, account_id="acc-1", user_id="u")
    assert await sessions.confirm(member, "waha", SESSION, late) is late
