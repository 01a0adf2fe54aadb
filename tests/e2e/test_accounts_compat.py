"""The SpeechAI dashboard's account flows through Envoy, with its own requests
(API_COMPAT.md): the is_active toggle suspends and reactivates, and balances read as the
original data model keeps them (added, charged, held), so `credit_balance - credit_used` is
what is left."""

from __future__ import annotations

import time
from collections import Counter
from decimal import Decimal
from typing import Any

import httpx

from services.runtime.devstack import Stack
from tests.conftest import wait_for
from tests.e2e.test_bulk import phones, sends_to
from tests.e2e.test_credit import ADMIN, job, new_account, upload


def account(base_url: str, account_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base_url}/api/v1/accounts/{account_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    return dict(r.json())


def listed(base_url: str, account_id: str) -> dict[str, Any]:
    """The account as the accounts page lists it."""
    r = httpx.get(f"{base_url}/api/v1/accounts", headers=ADMIN, params={"limit": 500})
    assert r.status_code == 200, r.text
    return next(a for a in r.json() if a["account_id"] == account_id)


def patch(base_url: str, account_id: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.patch(f"{base_url}/api/v1/accounts/{account_id}", headers=ADMIN, json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


def amounts(body: dict[str, Any], *keys: str) -> tuple[Decimal, ...]:
    return tuple(Decimal(str(body[k])) for k in keys)


def test_is_active_false_suspends_running_batches_and_true_reactivates(base_url: str, suite: Stack) -> None:
    account_id, key = new_account(base_url, credits="100")
    # A slow device, so the suspension lands mid-campaign.
    device_id = httpx.get(f"{base_url}/devices", headers=key).json()["devices"][0]["id"]
    r = httpx.put(f"{base_url}/devices/{device_id}", headers=key, json={"rate_per_minute": 1200})
    assert r.status_code == 200, r.text
    numbers = phones(81, 200)
    job_id = upload(base_url, key, numbers)
    wait_for("sending starts", lambda: job(base_url, key, job_id)["progress"]["sent"] >= 10)

    # The accounts page's "suspend" button.
    suspended = patch(base_url, account_id, {"is_active": False})
    assert suspended["status"] == "suspended" and suspended["is_active"] is False
    assert suspended["suspension_reason"]
    # What the page reloads: it offers reactivation only to a `suspended` account.
    assert account(base_url, account_id)["status"] == "suspended"
    assert listed(base_url, account_id)["status"] == "suspended"
    # The running batch stops as with PUT /suspend.
    stopped = wait_for(
        "the batch stops",
        lambda: (j := job(base_url, key, job_id))["status"] == "suspended" and j["progress"]["in_flight"] == 0 and j,
    )
    assert "suspended" in stopped["suspension_reason"] and stopped["progress"]["sent"] < 200
    before = len(sends_to(suite, numbers))
    time.sleep(1.5)
    assert len(sends_to(suite, numbers)) == before, "a suspended account's batch went on sending"

    # The page's "reactivate" button: the account and its batch go on.
    active = patch(base_url, account_id, {"is_active": True})
    assert active["status"] == "active" and active["is_active"] is True and active["suspension_reason"] == ""
    assert listed(base_url, account_id)["status"] == "active"
    done = wait_for("reactivation resumes", lambda: (j := job(base_url, key, job_id))["status"] == "completed" and j)
    assert done["progress"]["sent"] == 200
    sent = Counter(e[2] for e in sends_to(suite, numbers))
    assert len(sent) == 200 and set(sent.values()) == {1}


def test_the_dashboard_balance_is_what_was_added_minus_what_was_charged(base_url: str) -> None:
    account_id, key = new_account(base_url, credits="0", price="1")
    r = httpx.post(f"{base_url}/api/v1/accounts/{account_id}/topup", headers=ADMIN, json={"credits": 100})
    assert r.status_code == 200, r.text
    job_id = upload(base_url, key, phones(82, 30))  # 30 messages at 1 credit
    wait_for("the campaign ends", lambda: job(base_url, key, job_id)["status"] == "completed")

    def settled() -> dict[str, Any] | None:
        r = httpx.get(f"{base_url}/api/v1/accounts/{account_id}/balance", headers=ADMIN)
        assert r.status_code == 200, r.text
        return r.json() if r.json()["credit_reserved"] == 0 else None

    balance = wait_for("holds released", settled)
    fields = ("credit_balance", "credit_used", "credit_reserved", "credit_available")
    assert amounts(balance, *fields) == (100, 30, 0, 70)
    # The accounts page, the account page and the dashboard's account block show the same.
    overview = httpx.get(f"{base_url}/api/v1/dashboard/overview", headers=ADMIN, params={"account_id": account_id})
    assert overview.status_code == 200, overview.text
    for shown in (account(base_url, account_id), listed(base_url, account_id), overview.json()["account"]):
        added, charged = amounts(shown, "credit_balance", "credit_used")
        assert added - charged == 70, shown
        assert amounts(shown, *fields) == (100, 30, 0, 70)
    assert overview.json()["account"]["balance"] == 70

    # A refund gives credit back; the charge it compensates stays charged.
    r = httpx.post(f"{base_url}/api/v1/accounts/{account_id}/refund", headers=ADMIN, json={"credits": 5})
    assert r.status_code == 200, r.text
    shown = account(base_url, account_id)
    assert amounts(shown, *fields) == (105, 30, 0, 75)

    # Each charge carries its cost; top-ups and refunds cost nothing.
    r = httpx.get(f"{base_url}/api/v1/accounts/{account_id}/transactions", headers=ADMIN, params={"limit": 500})
    assert r.status_code == 200, r.text
    entries = r.json()
    assert sum(Decimal(str(e["cost"])) for e in entries) == 30
    assert all(e["cost"] > 0 for e in entries if e["kind"] == "capture")
    assert all(e["cost"] == 0 for e in entries if e["kind"] in ("topup", "refund", "hold", "release"))


def test_minutes_read_as_purchased_used_reserved_remaining(base_url: str) -> None:
    r = httpx.post(
        f"{base_url}/api/v1/accounts",
        headers=ADMIN,
        json={"account_name": "Minutos", "plan_type": "minutes_based", "initial_minutes": 30},
    )
    assert r.status_code == 200, r.text
    account_id = r.json()["account_id"]
    r = httpx.post(f"{base_url}/api/v1/accounts/{account_id}/topup", headers=ADMIN, json={"minutes": 15})
    assert r.status_code == 200, r.text
    fields = ("minutes_purchased", "minutes_used", "minutes_reserved", "minutes_remaining")
    balance = httpx.get(f"{base_url}/api/v1/accounts/{account_id}/balance", headers=ADMIN).json()
    overview = httpx.get(f"{base_url}/api/v1/dashboard/overview", headers=ADMIN, params={"account_id": account_id})
    for shown in (balance, account(base_url, account_id), overview.json()["account"]):
        assert amounts(shown, *fields) == (45, 0, 0, 45), shown
    assert overview.json()["account"]["balance"] == 45 and overview.json()["account"]["billing_type"] == "minutes"
