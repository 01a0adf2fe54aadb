"""A device's connection and daily cap through Envoy: GET /devices shows what the provider last
said beside the user's active/inactive `status`; `daily_limit` is set on POST and PUT; a
device cannot name the endpoint its provider is reached at (the operator's settings do)."""

from __future__ import annotations

import httpx

from tests.e2e.test_devices import ADMIN, MEMBER, add, assert_error, devices


def test_devices_show_their_connection_and_daily_cap(base_url: str) -> None:
    device = add(base_url, MEMBER, daily_limit=250, status="inactive")
    assert (device["status"], device["connection"], device["connection_reason"]) == ("inactive", "unknown", "")
    assert (device["daily_limit"], device["sent_today"], device["quota_left"]) == (250, 0, -1)
    listed = {d["id"]: d for d in devices(base_url, MEMBER)["devices"]}
    assert listed[device["id"]]["connection"] == "unknown" and listed[device["id"]]["daily_limit"] == 250

    r = httpx.put(f"{base_url}/devices/{device['id']}", headers=MEMBER, json={"daily_limit": 0})
    assert r.status_code == 200 and r.json()["device"]["daily_limit"] == 0, r.text
    one = httpx.get(f"{base_url}/devices/{device['id']}", headers=MEMBER).json()
    assert (one["daily_limit"], one["connection"], one["sent_today"]) == (0, "unknown", 0)


def test_a_bad_daily_cap_or_timezone_is_a_client_error(base_url: str) -> None:
    body = {"token": "tok", "secret": "secret-0001"}
    for extra, word in (
        ({"daily_limit": -1}, "daily_limit"),
        ({"daily_limit": 100_001}, "daily_limit"),
        ({"provider_config": {"timezone": "Chile/Nowhere"}}, "timezone"),
    ):
        assert_error(httpx.post(f"{base_url}/devices", headers=ADMIN, json={**body, **extra}), 400, word)
    device = add(base_url, ADMIN, status="inactive", provider_config={"timezone": "America/Argentina/Cordoba"})
    r = httpx.put(f"{base_url}/devices/{device['id']}", headers=ADMIN, json={"daily_limit": "many"})
    assert r.status_code in (400, 422), r.text


def test_a_device_cannot_name_where_its_provider_is(base_url: str) -> None:
    body = {
        "token": "cloud",
        "secret": "graph-token",
        "provider": "whatsapp_cloud",
        "provider_config": {"phone_number_id": "1065403522", "base_url": "http://attacker.example"},
    }
    assert_error(httpx.post(f"{base_url}/devices", headers=ADMIN, json=body), 400, "base_url is set by the operator")
    device = add(base_url, ADMIN, status="inactive")
    r = httpx.put(
        f"{base_url}/devices/{device['id']}", headers=ADMIN, json={"provider_config": {"base_url": "http://x.example"}}
    )
    assert_error(r, 400, "base_url is set by the operator")
