"""Analytics agree with the jobs' own results, over one account's mixed activity: a bulk file
and a scheduled group message through a WhatsApp Cloud API device (some recipients refused,
then status webhooks for delivered, read and failed, some out of order) and a voice campaign
on the simulated line (answered, no answer, busy, voicemail, promises to pay). What the
analytics say is compared with what each job says of itself, and, for calls, with the
dispatcher's record of every call placed."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from services.runtime.devstack import Stack
from tests.conftest import ADMIN_TOKEN, MEMBER_TOKEN
from tests.dispatcher.fake_graph import ACCESS_TOKEN, PHONE_NUMBER_ID, FakeGraph, Refusal
from tests.e2e.test_bulk import make_file, phones, send_file, wait_job
from tests.e2e.test_calls import ALL_DAY, completed, new_account, upload_campaign
from tests.e2e.test_scheduled_messages import create, group, in_state, local_in
from tests.e2e.test_whatsapp_cloud import signed, status, webhook

pytestmark = pytest.mark.timeout(240)

DEBTORS = 40
REENGAGEMENT = {"code": 131047, "title": "Re-engagement message"}


def report(base_url: str, key: dict[str, str], path: str, **params: str) -> dict[str, Any]:
    r = httpx.get(f"{base_url}{path}", headers=key, params=params, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def results(base_url: str, key: dict[str, str], job_id: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{base_url}/jobs/{job_id}/results", headers=key, params={"limit": 1000})
    assert r.status_code == 200, r.text
    return list(r.json()["results"])


def tally(rows: list[dict[str, Any]]) -> dict[str, int]:
    """What the jobs say of themselves, in the analytics' terms."""
    sent = [r for r in rows if r["status"] == "sent"]
    return {
        "sent": len(sent),
        "failed": sum(r["status"] == "failed" for r in rows),
        "delivered": sum(r["delivery"] in ("delivered", "read") for r in sent),
        "read": sum(r["delivery"] == "read" for r in sent),
        "undelivered": sum(r["delivery"] == "failed" for r in sent),
    }


def figures(entry: dict[str, Any]) -> dict[str, int]:
    return {k: entry[k] for k in ("sent", "failed", "delivered", "read", "undelivered")}


async def calls_placed(database_url: str, batch_id: str) -> Counter[str]:
    """The dispatcher's record of every call of the batch, by how it ended."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT status FROM dispatcher.attempts WHERE batch_id = $1", uuid.UUID(batch_id))
    finally:
        await conn.close()
    return Counter(r["status"] for r in rows)


def post_statuses(base_url: str, statuses: list[dict[str, Any]]) -> None:
    body = webhook(statuses)
    r = httpx.post(f"{base_url}/webhooks/whatsapp", content=body, headers=signed(body))
    assert r.status_code == 200, r.text


def test_analytics_agree_with_the_jobs_over_a_mixed_campaign(
    base_url: str, suite: Stack, session_graph: FakeGraph
) -> None:
    graph = session_graph
    account_id, key = new_account(base_url)
    r = httpx.post(
        f"{base_url}/devices",
        headers=key,
        json={
            "token": f"tok-{uuid.uuid4().hex[:8]}",
            "secret": ACCESS_TOKEN,
            "provider": "whatsapp_cloud",
            "rate_per_minute": 0,
            "provider_config": {"phone_number_id": PHONE_NUMBER_ID},
        },
    )
    assert r.status_code == 200, r.text

    # A bulk file of 30: Graph refuses 3.
    numbers = phones(54, 30)
    for refused in numbers[:3]:
        graph.refusals[refused.lstrip("+")] = Refusal(400, 131026, "Message undeliverable")
    r = send_file(base_url, make_file(numbers), message="Hola @valor1", headers=key)
    assert r.status_code == 200, r.text
    bulk_id = r.json()["job"]["id"]
    wait_job(base_url, bulk_id)

    # A scheduled message to a group of 8.
    members = phones(55, 8)
    group_id = group(base_url, key, "morosos", members)
    r = create(base_url, key, content="Hola {{name}}", scheduled_for=local_in(3), group_ids=[group_id])
    assert r.status_code == 201, r.text
    message_id = r.json()["id"]
    assert httpx.post(f"{base_url}/api/messages/{message_id}/schedule", headers=key).status_code == 200
    in_state(base_url, key, message_id, "sent")

    # The voice campaign runs meanwhile.
    created = upload_campaign(base_url, key, account_id, DEBTORS, {**ALL_DAY, "max_call_duration": 120})
    voice_id = created["batch_id"]

    # Graph's reports: delivered, read (one before its delivered report), failed after all.
    t = int(time.time())
    post_statuses(
        base_url,
        [status(graph, n, "delivered", t) for n in numbers[3:15]]
        + [status(graph, n, "read", t + 5) for n in numbers[3:8]]
        + [status(graph, numbers[20], "read", t + 7)]
        + [
            status(graph, n, "failed", t + 2, errors=[{"code": 131047, "title": "Re-engagement"}])
            for n in numbers[25:27]
        ]
        + [status(graph, n, "delivered", t + 1) for n in members[:6]]
        + [status(graph, n, "read", t + 9) for n in members[:2]],
    )
    post_statuses(base_url, [status(graph, numbers[20], "delivered", t + 3)])  # the late delivered report

    bulk_expected = {"sent": 27, "failed": 3, "delivered": 13, "read": 6, "undelivered": 2}
    scheduled_expected = {"sent": 8, "failed": 0, "delivered": 6, "read": 2, "undelivered": 0}

    def applied() -> bool:
        return tally(results(base_url, key, bulk_id)) == bulk_expected

    deadline = time.monotonic() + 20
    while not applied() and time.monotonic() < deadline:
        time.sleep(0.2)
    bulk_rows = results(base_url, key, bulk_id)
    assert tally(bulk_rows) == bulk_expected
    scheduled = in_state(base_url, key, message_id, "sent")
    deadline = time.monotonic() + 20
    while scheduled["read_count"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        scheduled = in_state(base_url, key, message_id, "sent")
    assert (scheduled["sent_count"], scheduled["delivered_count"], scheduled["read_count"]) == (8, 6, 2)

    batch = completed(base_url, key, voice_id, timeout=180)
    jobs = httpx.get(f"{base_url}/api/v1/batches/{voice_id}/jobs", headers=key, params={"limit": 1000}).json()
    placed = asyncio.run(calls_placed(suite.database_url, voice_id))

    today = datetime.now(UTC).date()
    span = {"from": (today - timedelta(days=1)).isoformat(), "to": (today + timedelta(days=1)).isoformat()}

    # --- WhatsApp: totals, channels, messages, series ---
    messages = report(base_url, key, "/api/analytics/messages", bucket="hour", timezone="UTC", **span)
    assert messages["account_id"] == account_id and messages["bucket"] == "hour"
    assert figures(messages["by_channel"]["bulk"]) == bulk_expected
    assert figures(messages["by_channel"]["scheduled"]) == scheduled_expected
    assert figures(messages["totals"]) == {k: bulk_expected[k] + scheduled_expected[k] for k in bulk_expected}
    assert messages["totals"]["delivery_rate"] == round(100 * 19 / 35, 1)
    by_message = {(m["channel"], m["job_id"] or m["message_id"]): m for m in messages["by_message"]}
    assert figures(by_message[("bulk", bulk_id)]) == bulk_expected
    assert figures(by_message[("scheduled", message_id)]) == scheduled_expected
    # Every hour of the three days is there, in order, and the hours add up to the totals.
    assert len(messages["series"]) == 72
    starts = [datetime.fromisoformat(p["bucket"]) for p in messages["series"]]
    assert all(b - a == timedelta(hours=1) for a, b in zip(starts, starts[1:], strict=False))
    for field in ("sent", "failed", "delivered", "read"):
        assert sum(p[field] for p in messages["series"]) == messages["totals"][field]
        for channel, expected in (("bulk", bulk_expected), ("scheduled", scheduled_expected)):
            assert sum(p["by_channel"][channel][field] for p in messages["series"]) == expected[field]

    groups = report(base_url, key, "/api/analytics/groups", **span)
    (morosos,) = [g for g in groups["groups"] if g["id"] == group_id]
    assert morosos["contacts"] == 8 and morosos["messages"] == 1
    assert (morosos["sent"], morosos["delivered"], morosos["read"]) == (8, 6, 2)
    assert morosos["delivery_rate"] == 75.0 and morosos["read_rate"] == 25.0

    # --- voice: every call the dispatcher placed, by outcome; cost, minutes and promises as the jobs say ---
    voice = report(base_url, key, "/api/v1/reports/analytics", timezone="America/Santiago", **span)
    totals = voice["totals"]
    assert placed["completed"] > 0 and placed["no_answer"] + placed["busy"] + placed["voicemail"] > 0, placed
    assert totals["calls"] == sum(placed.values())
    assert totals["answered"] == placed["completed"] == batch["completed_jobs"]
    for outcome in ("no_answer", "busy", "voicemail"):
        assert totals[outcome] == placed[outcome], outcome
    assert totals["failed"] == placed["failed"] + placed["unknown"]
    promised = [j for j in jobs if j["fecha_pago_cliente"] or j["monto_pago_cliente"] is not None]
    assert totals["promises"] == len(promised) > 0
    assert Decimal(str(totals["promised_amount"])) == sum(
        (Decimal(str(j["monto_pago_cliente"] or 0)) for j in promised), Decimal(0)
    )
    assert abs(totals["cost"] - float(batch["total_cost"])) < 0.01
    assert {o["outcome"]: o["calls"] for o in voice["outcomes"]} == {
        "answered": placed["completed"],
        **{o: placed[o] for o in ("no_answer", "busy", "voicemail", "failed")},
    }
    assert sum(h["calls"] for h in voice["answer_rate_by_hour"]) == totals["calls"]
    assert len(voice["series"]) == 3 and sum(p["calls"] for p in voice["series"]) == totals["calls"]

    dashboard = report(base_url, key, "/api/analytics/dashboard", **span)
    assert figures(dashboard["whatsapp"]) == figures(messages["totals"])
    assert dashboard["voice"]["calls"] == totals["calls"] and dashboard["groups"] == 1
    assert dashboard["scheduled_messages"] == {"sent": 1}

    # An admin naming the account sees the same; a member naming another sees nothing of it.
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    as_admin = report(base_url, admin, "/api/analytics/messages", account_id=account_id, bucket="hour", **span)
    assert as_admin["totals"] == messages["totals"]
    _, other_key = new_account(base_url)
    r = httpx.get(f"{base_url}/api/analytics/messages", headers=other_key, params={"account_id": account_id})
    assert r.status_code == 404
    assert report(base_url, other_key, "/api/analytics/messages", **span)["totals"]["sent"] == 0


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"bucket": "minute"}, "bucket must be one of hour, day, week"),
        ({"timezone": "Mars/Olympus"}, "timezone: unknown timezone"),
        ({"from": "2026-12-10", "to": "2026-12-01"}, "from must be before to"),
        ({"from": "yesterday"}, "from must be a date"),
        ({"from": "2020-01-01", "to": "2026-12-01"}, "at most 1098 days"),
        ({"from": "2026-01-01", "to": "2026-12-01", "bucket": "hour"}, "at most 2000 buckets"),
    ],
)
def test_a_bad_range_is_400_with_its_reason(base_url: str, params: dict[str, str], words: str) -> None:
    for path in ("/api/v1/reports/analytics", "/api/analytics/messages"):
        r = httpx.get(f"{base_url}{path}", headers={"Authorization": f"Bearer {MEMBER_TOKEN}"}, params=params)
        assert r.status_code == 400, r.text
        assert words in r.json()["message"]
