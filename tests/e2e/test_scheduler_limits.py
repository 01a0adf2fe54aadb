"""The scheduler guide's per-user limits through Envoy: creating groups 5 a minute, scheduling
or resuming messages 10 a minute, answered 429 with Retry-After; a refused call creates nothing."""

from __future__ import annotations

import uuid

import httpx

from tests.conftest import new_member
from tests.e2e.test_bulk import phones
from tests.e2e.test_scheduled_messages import account, group, local_in


def user_headers(base_url: str, account_id: str) -> dict[str, str]:
    """A member of the account, of this test's own, so no other test's calls count against it."""
    return {"Authorization": f"Bearer {new_member(base_url, account_id)['access_token']}"}


def test_a_user_creates_at_most_five_groups_a_minute(base_url: str) -> None:
    account_id, _ = account(base_url, device_rate=None)
    headers = user_headers(base_url, account_id)
    prefix = f"lim-{uuid.uuid4().hex[:8]}"
    # A refused create (a name already taken) does not use up the allowance.
    r = httpx.post(f"{base_url}/api/groups", headers=headers, json={"name": f"{prefix}-0"})
    assert r.status_code == 201, r.text
    r = httpx.post(f"{base_url}/api/groups", headers=headers, json={"name": f"{prefix}-0"})
    assert r.status_code == 409, r.text
    for i in range(1, 5):
        r = httpx.post(f"{base_url}/api/groups", headers=headers, json={"name": f"{prefix}-{i}"})
        assert r.status_code == 201, r.text

    r = httpx.post(f"{base_url}/api/groups", headers=headers, json={"name": f"{prefix}-5"})
    assert r.status_code == 429, r.text
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert "5 a minute" in r.json()["message"]
    names = {g["name"] for g in httpx.get(f"{base_url}/api/groups", headers=headers, params={"limit": 500}).json()}
    assert {f"{prefix}-{i}" for i in range(5)} <= names and f"{prefix}-5" not in names

    # Another user of the same account has an allowance of its own.
    other = user_headers(base_url, account_id)
    r = httpx.post(f"{base_url}/api/groups", headers=other, json={"name": f"{prefix}-other"})
    assert r.status_code == 201, r.text


def test_a_user_schedules_at_most_ten_messages_a_minute(base_url: str) -> None:
    _, key = account(base_url)
    group_id = group(base_url, key, f"lim-{uuid.uuid4().hex[:8]}", phones(95, 1))
    r = httpx.post(f"{base_url}/api/messages", headers=key, json={"content": "Hola {{name}}", "group_ids": [group_id]})
    assert r.status_code == 201, r.text
    message_id = r.json()["id"]
    later = {"scheduled_for": local_in(24 * 3600), "timezone": "America/Santiago"}
    # A refused schedule (already scheduled: 409) gives its place back.
    for i in range(10):
        r = httpx.post(f"{base_url}/api/messages/{message_id}/schedule", headers=key, json=later)
        assert r.status_code == 200, r.text
        if i < 9:  # the tenth fills the window: from then on even a refused call is not let through
            r = httpx.post(f"{base_url}/api/messages/{message_id}/schedule", headers=key, json=later)
            assert r.status_code == 409, r.text
        r = httpx.put(f"{base_url}/api/messages/{message_id}", headers=key, json={"status": "draft"})
        assert r.status_code == 200, r.text

    r = httpx.post(f"{base_url}/api/messages/{message_id}/schedule", headers=key, json=later)
    assert r.status_code == 429, r.text
    assert 1 <= int(r.headers["Retry-After"]) <= 60 and "10 a minute" in r.json()["message"]
    assert httpx.get(f"{base_url}/api/messages/{message_id}", headers=key).json()["status"] == "draft"
