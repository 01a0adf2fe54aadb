"""Credit in the campaign path, end to end: an account with less credit than its campaign,
its API key, its device, the simulated provider's record of what was really sent, and the
ledger as the accounts API shows it."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from decimal import Decimal
from typing import Any

import httpx

from services.runtime.devstack import Stack
from tests.conftest import ADMIN_TOKEN, wait_for
from tests.e2e.test_bulk import make_file, phones, sends_to

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def new_account(base_url: str, *, credits: str, price: str = "0.01") -> tuple[str, dict[str, str]]:
    """An account with `credits`, a message price, an API key and one unthrottled device."""
    account_id = f"credit-{uuid.uuid4().hex[:8]}"
    body = {"account_id": account_id, "account_name": "Credit", "initial_credits": credits}
    r = httpx.post(f"{base_url}/api/v1/accounts", headers=ADMIN, json={**body, "cost_per_whatsapp_message": price})
    assert r.status_code in (200, 201), r.text
    r = httpx.post(f"{base_url}/api/auth/api-keys", headers=ADMIN, json={"name": "crm", "account_id": account_id})
    assert r.status_code == 201, r.text
    key = {"Authorization": f"Bearer {r.json()['key']}"}
    device = {"token": f"tok-{uuid.uuid4().hex[:8]}", "secret": "s3cret-value", "rate_per_minute": 0}
    r = httpx.post(f"{base_url}/devices", headers=key, json=device)
    assert r.status_code == 200, r.text
    return account_id, key


def upload(base_url: str, headers: dict[str, str], numbers: list[str]) -> str:
    r = httpx.post(
        f"{base_url}/messages/send-bulk-file",
        headers=headers,
        files={"file": ("contacts.csv", make_file(numbers), "text/csv")},
        data={"message": "Hola @valor1", "devices_limit": "1"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["job"]["id"])


def job(base_url: str, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{base_url}/jobs/{job_id}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def balance(base_url: str, account_id: str) -> dict[str, Decimal]:
    r = httpx.get(f"{base_url}/api/v1/accounts/{account_id}/balance", headers=ADMIN)
    assert r.status_code == 200, r.text
    return {k: Decimal(str(v)) for k, v in r.json().items() if k.startswith("credit_")}


def test_a_campaign_larger_than_the_balance_waits_for_a_top_up_and_sends_each_once(base_url: str, suite: Stack) -> None:
    account_id, key = new_account(base_url, credits="3")  # 300 messages at 0.01
    numbers = phones(71, 500)
    job_id = upload(base_url, key, numbers)

    suspended = wait_for(
        "the batch stops where the credit ends",
        lambda: (j := job(base_url, key, job_id))["status"] == "suspended" and j["progress"]["in_flight"] == 0 and j,
    )
    assert suspended["progress"]["sent"] == 300 and suspended["progress"]["suspended"] == 200
    assert "credit" in suspended["suspension_reason"]
    assert Decimal(str(suspended["total_cost"])) == Decimal("3.00")
    # Jobs beyond the credit are listed as suspended, one per recipient never sent.
    r = httpx.get(f"{base_url}/jobs/{job_id}/results", headers=key, params={"status": "suspended", "limit": 1000})
    assert r.status_code == 200, r.text
    waiting = {row["phone"] for row in r.json()["results"]}
    assert len(waiting) == 200 and not waiting & {e[2] for e in sends_to(suite, numbers)}
    # Every hold is settled: nothing reserved, nothing below zero.
    settled = wait_for("holds released", lambda: (b := balance(base_url, account_id))["credit_reserved"] == 0 and b)
    # Served as added and charged: all 3 added, all 3 charged, nothing left.
    assert settled["credit_balance"] == Decimal("3") and settled["credit_used"] == Decimal("3")
    assert settled["credit_balance"] - settled["credit_used"] == 0 == settled["credit_available"]

    # The account hears of it, and of its credit running out.
    kinds = wait_for(
        "notifications",
        lambda: (
            {"batch_suspended", "credit_exhausted"}
            <= (k := {n["kind"] for n in httpx.get(f"{base_url}/api/notifications", headers=key).json()})
            and k
        ),
    )
    assert "batch_completed" not in kinds

    r = httpx.post(
        f"{base_url}/api/v1/accounts/{account_id}/topup",
        headers={**ADMIN, "Idempotency-Key": f"topup-{job_id}"},
        json={"credits": 2.5},
    )
    assert r.status_code in (200, 201), r.text

    done = wait_for(
        "the top-up finishes the campaign", lambda: (j := job(base_url, key, job_id))["status"] == "completed" and j
    )
    assert done["progress"]["sent"] == 500 and done["progress"]["suspended"] == 0
    assert Decimal(str(done["total_cost"])) == Decimal("5.00")
    sent = Counter(e[2] for e in sends_to(suite, numbers))
    assert len(sent) == 500 and set(sent.values()) == {1}, "a recipient was sent twice"
    final = wait_for("holds released", lambda: (b := balance(base_url, account_id))["credit_reserved"] == 0 and b)
    assert final["credit_balance"] == Decimal("5.5") and final["credit_used"] == Decimal("5")
    assert final["credit_available"] == final["credit_balance"] - final["credit_used"] - final["credit_reserved"]
    assert final["credit_available"] == Decimal("0.5")


def test_a_suspended_account_releases_nothing_until_it_is_activated(base_url: str, suite: Stack) -> None:
    account_id, key = new_account(base_url, credits="100")
    # A slow device, so the suspension lands mid-campaign.
    device_id = httpx.get(f"{base_url}/devices", headers=key).json()["devices"][0]["id"]
    r = httpx.put(f"{base_url}/devices/{device_id}", headers=key, json={"rate_per_minute": 1200})
    assert r.status_code == 200, r.text
    numbers = phones(72, 200)
    job_id = upload(base_url, key, numbers)
    wait_for("sending starts", lambda: job(base_url, key, job_id)["progress"]["sent"] >= 10)

    r = httpx.put(f"{base_url}/api/v1/accounts/{account_id}/suspend", headers=ADMIN, json={"reason": "unpaid"})
    assert r.status_code == 200, r.text
    stopped = wait_for(
        "the batch stops",
        lambda: (j := job(base_url, key, job_id))["status"] == "suspended" and j["progress"]["in_flight"] == 0 and j,
    )
    assert "suspended" in stopped["suspension_reason"] and stopped["progress"]["sent"] < 200
    before = len(sends_to(suite, numbers))
    time.sleep(1.5)
    assert len(sends_to(suite, numbers)) == before, "a suspended account's batch went on sending"

    r = httpx.put(f"{base_url}/api/v1/accounts/{account_id}/activate", headers=ADMIN)
    assert r.status_code == 200, r.text
    done = wait_for("activation resumes", lambda: (j := job(base_url, key, job_id))["status"] == "completed" and j)
    assert done["progress"]["sent"] == 200
    sent = Counter(e[2] for e in sends_to(suite, numbers))
    assert len(sent) == 200 and set(sent.values()) == {1}
    final = wait_for("holds released", lambda: (b := balance(base_url, account_id))["credit_reserved"] == 0 and b)
    assert final["credit_used"] == Decimal("2") and final["credit_balance"] == Decimal("100")
    assert final["credit_available"] == Decimal("98")


def test_a_cancellation_is_audited_with_who_cancelled_and_its_holds_released(base_url: str) -> None:
    account_id, key = new_account(base_url, credits="10")
    device_id = httpx.get(f"{base_url}/devices", headers=key).json()["devices"][0]["id"]
    httpx.put(f"{base_url}/devices/{device_id}", headers=key, json={"rate_per_minute": 60}).raise_for_status()
    job_id = upload(base_url, key, phones(73, 50))
    wait_for("sending starts", lambda: job(base_url, key, job_id)["progress"]["sent"] >= 1)

    r = httpx.post(f"{base_url}/jobs/{job_id}/cancel", headers=key)
    assert r.status_code == 200, r.text
    entry = wait_for(
        "the audit entry",
        lambda: next(
            (
                e
                for e in httpx.get(
                    f"{base_url}/api/v1/audit",
                    headers=ADMIN,
                    params={"action": "batch.cancelled", "account_id": account_id},
                ).json()
                if e["target"] == job_id
            ),
            None,
        ),
    )
    assert entry["actor"]["role"] == "member" and entry["actor"]["account_id"] == account_id
    done = wait_for("cancelled", lambda: (j := job(base_url, key, job_id))["status"] == "cancelled" and j)
    # Only what was sent is paid; the rest of the hold comes back.
    final = wait_for("holds released", lambda: (b := balance(base_url, account_id))["credit_reserved"] == 0 and b)
    sent = done["progress"]["sent"]
    assert final["credit_used"] == Decimal(sent) / 100 and final["credit_balance"] == 10
    assert final["credit_available"] == 10 - Decimal(sent) / 100
