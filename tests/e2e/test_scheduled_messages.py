"""Scheduled WhatsApp messages end to end, as the scheduler's frontend meets them: through
Envoy, real services, the address book's API, and the simulated provider as its own server
(its record is what was really sent). Each test has an account of its own (credit, API key,
device), so what it counts is its own."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from services.runtime.devstack import Stack
from tests.conftest import ADMIN_TOKEN, MEMBER_TOKEN, wait_for
from tests.e2e.test_bulk import phones, record, sends_to
from tests.e2e.test_credit import balance

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}
SANTIAGO = ZoneInfo("America/Santiago")


def account(base_url: str, *, credits: str = "10", device_rate: int | None = 0) -> tuple[str, dict[str, str]]:
    """A Chilean account with credit at 0.01 a message, an API key, and one device sending
    `device_rate` a minute (0 = unthrottled; None = no device)."""
    account_id = f"sched-{uuid.uuid4().hex[:8]}"
    body = {"account_id": account_id, "account_name": "Sched", "initial_credits": credits}
    r = httpx.post(f"{base_url}/api/v1/accounts", headers=ADMIN, json={**body, "cost_per_whatsapp_message": "0.01"})
    assert r.status_code in (200, 201), r.text
    r = httpx.post(f"{base_url}/api/auth/api-keys", headers=ADMIN, json={"name": "app", "account_id": account_id})
    assert r.status_code == 201, r.text
    key = {"Authorization": f"Bearer {r.json()['key']}"}
    if device_rate is not None:
        device = {"token": f"tok-{uuid.uuid4().hex[:8]}", "secret": "s3cret-value", "rate_per_minute": device_rate}
        r = httpx.post(f"{base_url}/devices", headers=key, json=device)
        assert r.status_code == 200, r.text
    return account_id, key


def group(
    base_url: str, key: dict[str, str], name: str, members: list[str], *, inactive: frozenset[str] = frozenset()
) -> str:
    """A group of new contacts (named after the end of their phone)."""
    r = httpx.post(f"{base_url}/api/groups", headers=key, json={"name": name})
    assert r.status_code == 201, r.text
    group_id = str(r.json()["id"])
    ids = []
    for phone in members:
        r = httpx.post(
            f"{base_url}/api/contacts",
            headers=key,
            json={"name": f"Ana {phone[-3:]}", "phone": phone, "is_active": phone not in inactive},
        )
        if r.status_code == 409:  # in another group already
            found = httpx.get(f"{base_url}/api/contacts", headers=key, params={"search": phone}).json()
            ids.append(str(found[0]["id"]))
        else:
            assert r.status_code == 201, r.text
            ids.append(str(r.json()["id"]))
    r = httpx.post(f"{base_url}/api/groups/{group_id}/contacts", headers=key, json={"contact_ids": ids})
    assert r.status_code == 200, r.text
    return group_id


def local_in(seconds: float) -> str:
    """A Santiago wall-clock time `seconds` from now, written without an offset."""
    return (datetime.now(SANTIAGO) + timedelta(seconds=seconds)).replace(tzinfo=None).isoformat(timespec="seconds")


def create(base_url: str, key: dict[str, str], **body: Any) -> httpx.Response:
    return httpx.post(f"{base_url}/api/messages", headers=key, json=body)


def message(base_url: str, key: dict[str, str], message_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base_url}/api/messages/{message_id}", headers=key)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def in_state(base_url: str, key: dict[str, str], message_id: str, state: str, timeout: float = 30) -> dict[str, Any]:
    return wait_for(  # type: ignore[no-any-return]
        f"message {message_id} {state}",
        lambda: (m := message(base_url, key, message_id))["status"] == state and m,
        timeout,
        every=0.1,
    )


def parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def assert_error(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    assert words in r.json()["message"], r.json()


def test_a_message_to_two_overlapping_groups_goes_out_on_time_once_per_phone(base_url: str, suite: Stack) -> None:
    account_id, key = account(base_url)
    numbers = phones(91, 6)
    first = group(base_url, key, "clientes", numbers[:4], inactive=frozenset({numbers[1]}))
    second = group(base_url, key, "vip", numbers[2:])
    r = httpx.post(f"{base_url}/api/opt-outs", headers=key, json={"phone": numbers[5]})
    assert r.status_code == 201, r.text
    expected = {numbers[0], numbers[2], numbers[3], numbers[4]}

    r = create(
        base_url,
        key,
        content="Hola {{name}}, te escribimos al {{phone}}",
        scheduled_for=local_in(4),
        group_ids=[first, second],
    )
    assert r.status_code == 201, r.text
    created = r.json()
    message_id = created["id"]
    assert created["status"] == "draft" and created["recipient_count"] == 4
    assert {g["id"] for g in created["groups"]} == {first, second}
    # Read in Santiago's time, as the account's zone says.
    assert abs((parse(created["scheduled_for"]) - datetime.now(SANTIAGO)).total_seconds() - 4) < 2

    preview = httpx.get(f"{base_url}/api/messages/{message_id}/preview", headers=key).json()
    assert preview["recipient_count"] == 4 and Decimal(str(preview["estimated_cost"])) == Decimal("0.04")
    assert {s["phone"] for s in preview["samples"]} == expected
    sample = preview["samples"][0]
    assert sample["text"] == f"Hola {sample['name']}, te escribimos al {sample['phone']}"

    r = httpx.post(f"{base_url}/api/messages/{message_id}/schedule", headers=key)
    assert r.status_code == 200 and r.json()["status"] == "scheduled", r.text
    sent = in_state(base_url, key, message_id, "sent")
    # Started within 5 s of its time, not late; each phone of the union got exactly one message.
    started = parse(sent["started_at"]) - parse(sent["scheduled_for"])
    assert timedelta(0) <= started < timedelta(seconds=5) and sent["late"] is False
    by_phone = Counter(e[2] for e in sends_to(suite, numbers))
    assert by_phone == Counter(expected)
    entry = next(e for e in record(suite) if e[2] == numbers[0])
    text = httpx.get(f"{suite.simulator_url}/v1/messages/{entry[0]}").json()["text"]
    assert text == f"Hola Ana {numbers[0][-3:]}, te escribimos al {numbers[0]}"

    assert (sent["recipient_count"], sent["sent_count"], sent["failed_count"]) == (4, 4, 0)
    assert sent["sent_at"] is not None
    stats = httpx.get(f"{base_url}/api/messages/{message_id}/stats", headers=key).json()
    assert stats == {
        "recipient_count": 4,
        "sent": 4,
        "delivered": 0,
        "read": 0,
        "failed": 0,
        "pending": 0,
        "delivery_rate": 100.0,
    }
    # Charged once per message sent.
    settled = wait_for("holds released", lambda: (b := balance(base_url, account_id))["credit_reserved"] == 0 and b)
    assert settled["credit_used"] == Decimal("0.04")

    dashboard = httpx.get(f"{base_url}/api/messages/dashboard", headers=key).json()
    assert dashboard["by_status"] == {"sent": 1} and dashboard["total_messages"] == 1
    assert dashboard["messages_sent_today"] == 1 and dashboard["recipients_sent_today"] == 4
    assert dashboard["delivery_rate"] == 100.0 and dashboard["next_24h"] == []
    assert dashboard["active_groups"] == 2 and dashboard["active_contacts"] == 5

    listed = httpx.get(f"{base_url}/api/messages", headers=key, params={"status": "sent", "limit": 10})
    assert listed.status_code == 200 and [m["id"] for m in listed.json()] == [message_id]
    assert listed.headers["X-Total-Count"] == "1"

    # A sent message can only be duplicated or deleted.
    for action in ("schedule", "pause", "resume", "cancel"):
        assert_error(httpx.post(f"{base_url}/api/messages/{message_id}/{action}", headers=key), 409, "is sent")
    assert_error(httpx.put(f"{base_url}/api/messages/{message_id}", headers=key, json={"content": "x"}), 409, "is sent")
    # Another account's message does not exist for it.
    assert_error(httpx.get(f"{base_url}/api/messages/{message_id}", headers=MEMBER), 404, "not found")
    assert_error(httpx.delete(f"{base_url}/api/messages/{message_id}", headers=MEMBER), 404, "not found")
    copy = httpx.post(f"{base_url}/api/messages/{message_id}/duplicate", headers=key)
    assert copy.status_code == 201 and copy.json()["status"] == "draft" and copy.json()["scheduled_for"] is None
    assert httpx.delete(f"{base_url}/api/messages/{message_id}", headers=key).status_code == 204
    assert httpx.get(f"{base_url}/api/messages/{message_id}", headers=key).status_code == 404


def test_pause_holds_the_rest_and_resume_sends_each_once(base_url: str, suite: Stack) -> None:
    _, key = account(base_url, device_rate=240)  # 4 a second
    numbers = phones(92, 12)
    group_id = group(base_url, key, "todos", numbers)
    r = create(base_url, key, content="Aviso para {{name}}", scheduled_for=local_in(3), group_ids=[group_id])
    message_id = r.json()["id"]
    assert httpx.post(f"{base_url}/api/messages/{message_id}/schedule", headers=key).status_code == 200
    wait_for("sending starts", lambda: len(sends_to(suite, numbers)) >= 2, 30, every=0.05)
    r = httpx.post(f"{base_url}/api/messages/{message_id}/pause", headers=key)
    paused_at = time.time()
    assert r.status_code == 200 and r.json()["status"] == "paused", r.text
    time.sleep(1.5)
    held = sends_to(suite, numbers)
    assert max(e[3] for e in held) <= paused_at + 1.0 and len(held) < 12
    assert_error(httpx.post(f"{base_url}/api/messages/{message_id}/pause", headers=key), 409, "is paused")
    r = httpx.post(f"{base_url}/api/messages/{message_id}/resume", headers=key)
    assert r.status_code == 200 and r.json()["status"] == "sending", r.text
    in_state(base_url, key, message_id, "sent")
    assert Counter(e[2] for e in sends_to(suite, numbers)) == Counter(numbers)

    # Taken back to draft, scheduled again, then cancelled before its time: it never sends.
    r = create(base_url, key, content="Otro aviso", scheduled_for=local_in(3), group_ids=[group_id])
    other = r.json()["id"]
    assert httpx.post(f"{base_url}/api/messages/{other}/schedule", headers=key).status_code == 200
    r = httpx.put(f"{base_url}/api/messages/{other}", headers=key, json={"status": "draft"})
    assert r.status_code == 200 and r.json()["status"] == "draft", r.text
    assert httpx.post(f"{base_url}/api/messages/{other}/schedule", headers=key).json()["status"] == "scheduled"
    r = httpx.post(f"{base_url}/api/messages/{other}/cancel", headers=key)
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    time.sleep(4)
    assert message(base_url, key, other)["status"] == "cancelled"
    assert Counter(e[2] for e in sends_to(suite, numbers)) == Counter(numbers)


def test_every_invalid_input_is_refused_with_its_reason_and_changes_nothing(base_url: str, suite: Stack) -> None:
    _, key = account(base_url, device_rate=None)
    group_id = group(base_url, key, "uno", phones(93, 1))
    empty = httpx.post(f"{base_url}/api/groups", headers=key, json={"name": "vacio"}).json()["id"]
    ahead = local_in(3600)
    refused = [
        ({"content": "x" * 4097}, 400, "4097 characters"),
        ({"content": ""}, 400, "empty"),
        ({"content": "Hola <b>amigo</b>"}, 400, "HTML or script"),
        ({"content": "<script>alert(1)</script>"}, 400, "HTML or script"),
        ({"content": "Hola {{apellido}}"}, 400, "unknown variable {{apellido}}"),
        ({"content": "Hola", "scheduled_for": local_in(-60)}, 400, "in the past"),
        ({"content": "Hola", "scheduled_for": local_in(400 * 86400)}, 400, "more than a year ahead"),
        ({"content": "Hola", "scheduled_for": "mañana"}, 400, "not an ISO 8601"),
        ({"content": "Hola", "scheduled_for": ahead, "timezone": "America/Nowhere"}, 400, "unknown timezone"),
        ({"content": "Hola", "group_ids": ["424242"]}, 400, "group 424242 does not exist"),
        ({"content": "Hola", "groups": []}, 422, "groups"),
    ]
    for body, status, words in refused:
        assert_error(create(base_url, key, **body), status, words)
    listed = httpx.get(f"{base_url}/api/messages", headers=key)
    assert listed.json() == [] and listed.headers["X-Total-Count"] == "0"

    # Scheduling names what is missing: recipients, a device, a time.
    draft = create(base_url, key, content="Hola {{name}}", scheduled_for=ahead, group_ids=[empty]).json()
    url = f"{base_url}/api/messages/{draft['id']}"
    assert_error(httpx.post(f"{url}/schedule", headers=key), 409, "a group with active contacts")
    assert_error(httpx.post(f"{url}/schedule", headers=key), 409, "an active WhatsApp device")
    assert httpx.put(url, headers=key, json={"group_ids": []}).status_code == 200
    assert_error(httpx.post(f"{url}/schedule", headers=key), 409, "at least one group")
    assert httpx.put(url, headers=key, json={"group_ids": [group_id], "scheduled_for": None}).status_code == 200
    assert_error(httpx.post(f"{url}/schedule", headers=key), 400, "scheduled_for is required")
    for action in ("pause", "resume"):
        assert_error(httpx.post(f"{url}/{action}", headers=key), 409, "is draft")
    assert_error(httpx.put(url, headers=key, json={"content": "<i>x</i>"}), 400, "HTML or script")
    after = message(base_url, key, draft["id"])
    assert after["status"] == "draft" and after["content"] == "Hola {{name}}"
    assert_error(httpx.get(f"{base_url}/api/messages/99999999", headers=key), 404, "not found")
    assert_error(httpx.get(f"{base_url}/api/messages", headers=key, params={"status": "lost"}), 400, "status must be")


def test_two_campaigns_replicas_start_each_due_message_once(base_url: str, suite: Stack) -> None:
    # A second campaigns process on the same database and bus: both run the due loop.
    replica = suite.start_service("campaigns")
    try:
        _, key = account(base_url)
        numbers = phones(94, 3)
        group_id = group(base_url, key, "todos", numbers)
        at = local_in(6)  # the same second for all five
        ids = []
        for n in range(5):
            r = create(base_url, key, content=f"Mensaje {n} para {{{{name}}}}", scheduled_for=at, group_ids=[group_id])
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
            assert httpx.post(f"{base_url}/api/messages/{ids[-1]}/schedule", headers=key).status_code == 200
        for message_id in ids:
            in_state(base_url, key, message_id, "sent")
    finally:
        replica.stop()
    sent = sends_to(suite, numbers)
    # Five batches, each recipient once in each.
    assert len({e[0].split(":")[0] for e in sent}) == 5
    assert Counter(e[2] for e in sent) == Counter({p: 5 for p in numbers})
