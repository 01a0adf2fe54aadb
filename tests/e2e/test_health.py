"""The scheduler guide's health routes through Envoy: overall, database, queue (NATS
JetStream, also behind `/redis`), and the caller's WhatsApp devices by state."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.conftest import MEMBER_TOKEN

MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}  # account acme

pytestmark = pytest.mark.timeout(60)


def test_overall_health_covers_database_queue_and_services(base_url: str) -> None:
    r = httpx.get(f"{base_url}/api/health")  # no token: it tells no account's data
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "healthy" and body["timestamp"].endswith("Z")
    assert body["database"]["status"] == "connected"
    assert body["services"] == {"accounts": "SERVING", "campaigns": "SERVING", "dispatcher": "SERVING"}
    assert body["queue"]["connected"] and set(body["queue"]["streams"]) == {"DISPATCH", "EVENTS"}
    assert "detail" not in body


def test_db_health_names_the_services_that_own_schemas(base_url: str) -> None:
    body = httpx.get(f"{base_url}/api/health/db").json()
    assert body["status"] == "healthy" and body["database"]["latency_ms"] >= 0
    assert set(body["services"]) == {"accounts", "campaigns", "dispatcher"}


def test_queue_health_and_redis_say_the_queue_is_nats_jetstream(base_url: str) -> None:
    queue = httpx.get(f"{base_url}/api/health/queue").json()["queue"]
    assert queue["backend"] == "nats_jetstream" and queue["dead_letters"] >= 0
    dispatch = queue["streams"]["DISPATCH"]
    assert dispatch["messages"] >= 0 and all(
        set(c) == {"pending", "ack_pending", "redelivered"} for c in dispatch["consumers"].values()
    )
    assert queue["streams"]["EVENTS"]["consumers"], "the services read EVENTS through durable consumers"
    redis = httpx.get(f"{base_url}/api/health/redis")
    assert redis.status_code == 200
    assert redis.json()["redis"] is None and "NATS JetStream" in redis.json()["note"]
    assert redis.json()["queue"]["backend"] == "nats_jetstream"


def test_whatsapp_health_counts_the_callers_devices_by_state(base_url: str) -> None:
    assert httpx.get(f"{base_url}/api/health/whatsapp").status_code == 401
    before = httpx.get(f"{base_url}/api/health/whatsapp", headers=MEMBER).json()["whatsapp"]
    made = []
    for status in ("active", "inactive"):
        r = httpx.post(
            f"{base_url}/devices",
            headers=MEMBER,
            json={"token": f"h-{uuid.uuid4().hex[:8]}", "secret": "secret-0001", "status": status},
        )
        assert r.status_code == 200, r.text
        made.append(r.json()["device"]["id"])
    try:
        r = httpx.get(f"{base_url}/api/health/whatsapp", headers=MEMBER)
        assert r.status_code == 200, r.text
        now = r.json()["whatsapp"]
        assert now["account_id"] == "acme" and now["status"] == "connected"
        assert now["by_state"]["connected"] == before["by_state"]["connected"] + 1
        assert now["by_state"]["disconnected"] == before["by_state"]["disconnected"] + 1
        assert {d["id"]: d["connection"] for d in now["devices"] if d["id"] in made} == {
            made[0]: "connected",
            made[1]: "disconnected",
        }
    finally:
        for device_id in made:
            httpx.delete(f"{base_url}/devices/{device_id}", headers=MEMBER)
