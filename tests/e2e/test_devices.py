"""WhatsApp devices as the bulk-sender client meets them: through Envoy, gateway and dispatcher."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, MEMBER_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}  # account acme
DEVICE_KEYS = {
    "id",
    "token",
    "secret_masked",
    "device_name",
    "status",
    "is_receiver",
    "phone",
    "rate_per_minute",
    "jitter_ms",
    "provider",
    "created_at",
    "updated_at",
    "connection",
    "connection_reason",
    "quota_left",
    "daily_limit",
    "sent_today",
}


def devices(base_url: str, headers: dict[str, str] = ADMIN) -> dict[str, Any]:
    r = httpx.get(f"{base_url}/devices", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def add(base_url: str, headers: dict[str, str] = ADMIN, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{base_url}/devices", headers=headers, json={"token": "tok", "secret": "secret-0001", **body})
    assert r.status_code == 200, r.text
    return r.json()["device"]


def assert_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"detail", "message", "code"}
    assert isinstance(body["detail"], str) and body["message"] == body["detail"]
    for word in words:
        assert word in body["message"], body


def test_device_crud_round_trip(base_url: str) -> None:
    r = httpx.post(
        f"{base_url}/devices",
        headers=ADMIN,
        json={"token": "inst-42", "secret": "very-secret-key-7788", "device_name": "Ventas", "phone": "+56981234567"},
    )
    assert r.status_code == 200, r.text
    created = r.json()
    assert created["status"] == "success" and created["message"]
    device = created["device"]
    assert set(device) == DEVICE_KEYS
    assert isinstance(device["id"], int)
    assert device["token"] == "inst-42" and device["secret_masked"] == "••••••7788"
    assert device["device_name"] == "Ventas" and device["status"] == "active"
    assert device["is_receiver"] is False and device["phone"] == "+56981234567"
    assert device["rate_per_minute"] == 60 and device["jitter_ms"] == 0 and device["provider"] == "simulated"
    assert device["created_at"].endswith("Z") and device["updated_at"].endswith("Z")
    assert "very-secret-key" not in r.text

    listed = devices(base_url)
    assert listed["total"] == len(listed["devices"])
    assert device in listed["devices"]
    one = httpx.get(f"{base_url}/devices/{device['id']}", headers=ADMIN)
    assert one.status_code == 200 and one.json() == device

    r = httpx.put(
        f"{base_url}/devices/{device['id']}",
        headers=ADMIN,
        json={"status": "inactive", "is_receiver": True, "rate_per_minute": 0, "secret": "rotated-secret-1234"},
    )
    assert r.status_code == 200, r.text
    updated = r.json()
    assert updated["status"] == "success" and updated["message"]
    changed = updated["device"]
    assert changed["status"] == "inactive" and changed["is_receiver"] is True and changed["rate_per_minute"] == 0
    assert changed["secret_masked"] == "••••••1234" and changed["device_name"] == "Ventas"

    # The client may echo the whole object back with an empty secret: read-only fields are
    # ignored and the secret is kept.
    r = httpx.put(f"{base_url}/devices/{device['id']}", headers=ADMIN, json={**changed, "secret": "", "phone": ""})
    assert r.status_code == 200, r.text
    assert r.json()["device"]["secret_masked"] == "••••••1234" and r.json()["device"]["phone"] == ""

    r = httpx.delete(f"{base_url}/devices/{device['id']}", headers=ADMIN)
    assert r.status_code == 200
    assert r.json() == {"status": "success", "message": r.json()["message"], "device": None}
    assert_error(httpx.get(f"{base_url}/devices/{device['id']}", headers=ADMIN), 404)
    assert_error(httpx.delete(f"{base_url}/devices/{device['id']}", headers=ADMIN), 404)
    assert device["id"] not in [d["id"] for d in devices(base_url)["devices"]]


def test_unnamed_device_gets_a_name_and_explicit_zero_rate_means_unlimited(base_url: str) -> None:
    device = add(base_url, rate_per_minute=0, jitter_ms=1500, is_receiver=True)
    assert device["device_name"].startswith("Device ")
    assert device["rate_per_minute"] == 0 and device["jitter_ms"] == 1500 and device["is_receiver"] is True


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/devices"), ("GET", "/devices/1"), ("POST", "/devices"), ("PUT", "/devices/1"), ("DELETE", "/devices/1")],
)
def test_devices_need_a_token(base_url: str, method: str, path: str) -> None:
    r = httpx.request(method, f"{base_url}{path}", json={"token": "t", "secret": "s"})
    assert_error(r, 401)
    assert r.json()["code"] == "unauthorized"


def test_another_accounts_device_is_not_found(base_url: str) -> None:
    theirs = add(base_url, device_name="default's")
    url = f"{base_url}/devices/{theirs['id']}"
    assert_error(httpx.get(url, headers=MEMBER), 404, "not found")
    assert_error(httpx.put(url, headers=MEMBER, json={"device_name": "stolen"}), 404)
    assert_error(httpx.delete(url, headers=MEMBER), 404)
    assert theirs["id"] not in [d["id"] for d in devices(base_url, MEMBER)["devices"]]
    mine = add(base_url, MEMBER)
    assert mine["id"] in [d["id"] for d in devices(base_url, MEMBER)["devices"]]
    assert mine["id"] not in [d["id"] for d in devices(base_url)["devices"]]
    assert httpx.get(url, headers=ADMIN).json() == theirs  # untouched


BAD_CREATES = [
    ({"secret": "s-1"}, 422, "token"),
    ({"token": "t"}, 422, "secret"),
    ({"token": "", "secret": "s-1"}, 400, "token"),
    ({"token": "t", "secret": "s-1", "status": "paused"}, 400, "status"),
    ({"token": "t", "secret": "s-1", "rate_per_minute": 100_001}, 400, "rate_per_minute"),
    ({"token": "t", "secret": "s-1", "rate_per_minute": "fast"}, 422, "rate_per_minute"),
    ({"token": "t", "secret": "s-1", "rate_per_minute": 10**12}, 422, "rate_per_minute"),
    ({"token": "t", "secret": "s-1", "provider": "twilio"}, 400, "simulated"),
    ({"token": "t", "secret": "s-1", "provider_config": [1]}, 422, "provider_config"),
    ({"token": "t", "secret": "s-1", "provider_config": {"failure_ratio": 3}}, 400, "failure_ratio"),
]


@pytest.mark.parametrize(("body", "status", "word"), BAD_CREATES)
def test_bad_create_is_refused_and_changes_nothing(base_url: str, body: dict[str, Any], status: int, word: str) -> None:
    before = devices(base_url)
    assert_error(httpx.post(f"{base_url}/devices", headers=ADMIN, json=body), status, word)
    assert devices(base_url) == before


def test_non_json_bodies_are_refused(base_url: str) -> None:
    before = devices(base_url)
    for content, ctype in (
        ("token=t&secret=s", "application/json"),
        ("[1, 2]", "application/json"),
        ("{", "text/plain"),
    ):
        r = httpx.post(f"{base_url}/devices", headers={**ADMIN, "content-type": ctype}, content=content)
        assert_error(r, 422)
    assert devices(base_url) == before


@pytest.mark.parametrize(
    ("body", "status", "word"),
    [
        ({"status": "on"}, 400, "status"),
        ({"concurrency": 0}, 400, "concurrency"),
        ({"jitter_ms": 600_000}, 400, "jitter_ms"),
        ({"rate_per_minute": "x"}, 422, "rate_per_minute"),
        ({"device_name": "ok", "rate_per_minute": -1}, 400, "rate_per_minute"),
    ],
)
def test_bad_update_is_refused_and_changes_nothing(base_url: str, body: dict[str, Any], status: int, word: str) -> None:
    device = add(base_url)
    assert_error(httpx.put(f"{base_url}/devices/{device['id']}", headers=ADMIN, json=body), status, word)
    assert httpx.get(f"{base_url}/devices/{device['id']}", headers=ADMIN).json() == device


@pytest.mark.parametrize("device_id", ["abc", "1.5", str(2**64), "0", "-3"])
def test_ids_that_are_not_device_ids_are_client_errors(base_url: str, device_id: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        r = httpx.request(method, f"{base_url}/devices/{device_id}", headers=ADMIN, json={})
        assert r.status_code in (404, 422), (method, r.status_code, r.text)
        assert set(r.json()) >= {"detail", "message", "code"}


def test_unknown_device_is_not_found(base_url: str) -> None:
    assert_error(httpx.get(f"{base_url}/devices/987654321", headers=ADMIN), 404)
    assert_error(httpx.put(f"{base_url}/devices/987654321", headers=ADMIN, json={"status": "active"}), 404)
