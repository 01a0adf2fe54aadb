"""SpeechAI accounts as the dashboard meets them, through Envoy: shapes, lists as plain arrays
with X-Total-Count, who may do what, error bodies, and the idempotent top-up."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, MEMBER_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}  # account acme
# What the dashboard reads (API_COMPAT.md) and the rest of the object.
DASHBOARD_FIELDS = {
    "_id",
    "account_id",
    "account_name",
    "status",
    "plan_type",
    "minutes_purchased",
    "minutes_used",
    "credit_balance",
    "credit_used",
    "cost_per_minute",
    "max_concurrent_calls",
    "contact_phone",
    "created_at",
    "updated_at",
}
BALANCE_FIELDS = {
    "account_id",
    "plan_type",
    "credit_balance",
    "credit_available",
    "credit_reserved",
    "credit_used",
    "minutes_purchased",
    "minutes_available",
    "minutes_remaining",
    "minutes_reserved",
    "minutes_used",
}


def url(base_url: str, *parts: str) -> str:
    return "/".join([f"{base_url}/api/v1/accounts", *parts]).rstrip("/")


def new_id() -> str:
    return f"e2e-acc-{uuid.uuid4().hex[:8]}"


def create(base_url: str, **body: Any) -> dict[str, Any]:
    r = httpx.post(url(base_url), headers=ADMIN, json={"account_id": new_id(), "account_name": "E2E", **body})
    assert r.status_code == 200, r.text
    return r.json()["account"]


def assert_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"detail", "message", "code"}, body
    assert isinstance(body["message"], str) and body["message"] == body["detail"]
    for word in words:
        assert word in body["message"], body


@pytest.fixture(scope="module")
def acme(base_url: str) -> str:
    """The member token's account exists (another module may have made it already)."""
    r = httpx.post(url(base_url), headers=ADMIN, json={"account_id": "acme", "account_name": "Acme"})
    assert r.status_code in (200, 409), r.text
    return "acme"


def test_create_reply_and_account_shape(base_url: str) -> None:
    account_id = new_id()
    r = httpx.post(
        url(base_url),
        headers=ADMIN,
        json={
            "account_id": account_id,
            "account_name": "Retail Express Corp",
            "contact_name": "Juan Pérez",
            "contact_email": "juan@empresa.com",
            "contact_phone": "+56912345678",
            "plan_type": "credit_based",
            "country": "AR",
            "features": {"max_concurrent_calls": 7, "voice": "es-AR"},
            "settings": {"timezone": "America/Argentina/Cordoba"},
            "initial_credits": 100.5,
        },
    )
    assert r.status_code == 200, r.text
    reply = r.json()
    assert reply["success"] is True and reply["account_id"] == account_id and reply["message"]
    account = reply["account"]
    assert set(account) >= DASHBOARD_FIELDS
    assert re.fullmatch(r"[0-9a-f]{24}", account["_id"])
    assert account["account_name"] == "Retail Express Corp" and account["status"] == "active"
    assert account["is_active"] is True and account["plan_type"] == "credit_based"
    assert account["country"] == "AR" and account["timezone"] == "America/Argentina/Cordoba"
    assert account["max_concurrent_calls"] == 7 and account["features"]["voice"] == "es-AR"
    assert account["credit_balance"] == 100.5 and account["credit_used"] == 0
    assert account["credit_available"] == 100.5 and account["credit_reserved"] == 0
    assert account["minutes_purchased"] == 0 and account["minutes_used"] == 0
    assert (account["cost_per_minute"], account["cost_per_call_setup"], account["cost_per_whatsapp_message"]) == (
        0.15,
        0.02,
        0.01,
    )
    assert account["created_at"].endswith("Z") and account["updated_at"].endswith("Z")
    assert httpx.get(url(base_url, account_id), headers=ADMIN).json() == account

    generated = httpx.post(url(base_url), headers=ADMIN, json={"plan_type": "minutes_based", "initial_minutes": 30})
    assert generated.status_code == 200, generated.text
    assert re.fullmatch(r"acc-[0-9a-f]{12}", generated.json()["account_id"])
    assert generated.json()["account"]["minutes_purchased"] == 30
    assert generated.json()["account"]["timezone"] == "America/Santiago"


def test_create_errors(base_url: str) -> None:
    taken = create(base_url)["account_id"]
    assert_error(httpx.post(url(base_url), headers=ADMIN, json={"account_id": taken}), 409, taken)
    assert_error(httpx.post(url(base_url), json={"account_name": "x"}), 401)
    assert_error(httpx.post(url(base_url), headers=MEMBER, json={"account_name": "x"}), 403)
    assert_error(httpx.post(url(base_url), headers=ADMIN, json={"plan_type": "prepaid"}), 422, "plan_type")
    assert_error(httpx.post(url(base_url), headers=ADMIN, json={"initial_credits": -1}), 422, "initial_credits")
    assert_error(httpx.post(url(base_url), headers=ADMIN, json={"account_id": "bad id!"}), 422, "account_id")
    assert_error(httpx.post(url(base_url), headers=ADMIN, json={"timezone": "Mars/Olympus"}), 400, "timezone")


def test_list_is_a_plain_array_with_a_total(base_url: str, acme: str) -> None:
    for _ in range(3):
        create(base_url)
    r = httpx.get(url(base_url), headers=ADMIN, params={"limit": 2})
    assert r.status_code == 200 and isinstance(r.json(), list) and len(r.json()) == 2
    total = int(r.headers["X-Total-Count"])
    assert total >= 4
    everyone = httpx.get(url(base_url), headers=ADMIN, params={"limit": 500}).json()
    assert len(everyone) == total and set(everyone[0]) >= DASHBOARD_FIELDS
    page = httpx.get(url(base_url), headers=ADMIN, params={"limit": 2, "skip": 1}).json()
    assert [a["account_id"] for a in page] == [a["account_id"] for a in everyone[1:3]]
    mine = httpx.get(url(base_url), headers=MEMBER)
    assert [a["account_id"] for a in mine.json()] == ["acme"] and mine.headers["X-Total-Count"] == "1"
    assert_error(httpx.get(url(base_url), headers=ADMIN, params={"limit": 0}), 422, "limit")


def test_members_reach_only_their_own_account(base_url: str, acme: str) -> None:
    other = create(base_url, initial_credits=5)["account_id"]
    assert httpx.get(url(base_url, "acme"), headers=MEMBER).json()["account_id"] == "acme"
    for path in ("", "balance", "transactions", "batches"):
        assert_error(httpx.get(url(base_url, other, path), headers=MEMBER), 404, other)
    assert_error(httpx.patch(url(base_url, other), headers=MEMBER, json={"account_name": "mine"}), 404)
    assert_error(httpx.post(url(base_url, other, "topup"), headers=MEMBER, json={"credits": 5}), 404)
    assert_error(httpx.get(url(base_url, "no-such-account"), headers=ADMIN), 404)
    assert_error(httpx.get(url(base_url, other)), 401)
    # On its own account a member reads, and changes what is its to change.
    r = httpx.patch(url(base_url, "acme"), headers=MEMBER, json={"contact_name": "Ana"})
    assert r.status_code == 200 and r.json()["contact_name"] == "Ana"
    for body in ({"status": "active"}, {"plan_type": "unlimited"}, {"cost_per_minute": 0}):
        assert_error(httpx.patch(url(base_url, "acme"), headers=MEMBER, json=body), 403)
    assert_error(httpx.post(url(base_url, "acme", "topup"), headers=MEMBER, json={"credits": 5}), 403)
    assert_error(httpx.put(url(base_url, "acme", "suspend"), headers=MEMBER), 403)
    assert_error(httpx.post(url(base_url, "acme", "refund"), headers=MEMBER, json={"credits": 1}), 403)


def test_patch_suspend_activate(base_url: str) -> None:
    account = create(base_url, features={"max_concurrent_calls": 3, "tts": "a"}, settings={"lang": "es"})
    account_id = account["account_id"]
    r = httpx.patch(
        url(base_url, account_id),
        headers=ADMIN,
        json={
            "account_name": "Renamed",
            "contact_email": "ops@example.com",
            "plan_type": "minutes_based",
            "features": {"max_concurrent_calls": 10},
            "settings": {"timezone": "America/Argentina/Buenos_Aires"},
            "cost_per_minute": 0.2,
            "_id": "ignored",
            "credit_balance": 1e9,  # balances change only through the ledger
        },
    )
    assert r.status_code == 200, r.text
    patched = r.json()
    assert patched["account_name"] == "Renamed" and patched["contact_email"] == "ops@example.com"
    assert patched["plan_type"] == "minutes_based" and patched["cost_per_minute"] == 0.2
    assert patched["features"] == {"max_concurrent_calls": 10, "tts": "a"} and patched["max_concurrent_calls"] == 10
    assert patched["settings"] == {"lang": "es", "timezone": "America/Argentina/Buenos_Aires"}
    assert patched["timezone"] == "America/Argentina/Buenos_Aires"
    assert patched["credit_balance"] == 0 and patched["_id"] == account["_id"]

    r = httpx.put(url(base_url, account_id, "suspend"), headers=ADMIN, json={"reason": "impago"})
    assert r.status_code == 200 and r.json()["success"] is True
    assert r.json()["account"]["status"] == "suspended" and r.json()["account"]["suspension_reason"] == "impago"
    assert r.json()["account"]["is_active"] is False
    r = httpx.put(url(base_url, account_id, "activate"), headers=ADMIN)
    assert r.json()["account"]["status"] == "active" and r.json()["account"]["suspension_reason"] == ""
    r = httpx.patch(url(base_url, account_id), headers=ADMIN, json={"is_active": False})
    assert r.json()["status"] == "suspended" and r.json()["is_active"] is False
    assert_error(httpx.patch(url(base_url, account_id), headers=ADMIN, json={"status": "gone"}), 422, "status")
    bad = {"features": {"max_concurrent_calls": -1}}
    assert_error(httpx.patch(url(base_url, account_id), headers=ADMIN, json=bad), 422, "max_concurrent_calls")
    bad = {"features": {"voice_caller_id": "2299988"}}
    assert_error(httpx.patch(url(base_url, account_id), headers=ADMIN, json=bad), 400, "E.164")
    own = {"features": {"voice_agent_id": "agent_acme", "voice_caller_id": "+56229998877"}}
    r = httpx.patch(url(base_url, account_id), headers=ADMIN, json=own)
    assert r.status_code == 200 and r.json()["features"]["voice_caller_id"] == "+56229998877"


def test_topup_is_idempotent_per_key(base_url: str) -> None:
    account_id = create(base_url, initial_credits=10)["account_id"]
    topup = url(base_url, account_id, "topup")
    key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}", **ADMIN}
    first = httpx.post(topup, headers=key, json={"credits": 100.0})
    assert first.status_code == 200, first.text
    assert first.json()["success"] is True and first.json()["new_balance"] == 110
    assert first.json()["amount_added"] == 100 and first.json()["unit"] == "credits"
    again = httpx.post(topup, headers=key, json={"credits": 100})  # the same body, written otherwise
    assert again.status_code == 200 and again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert_error(httpx.post(topup, headers=key, json={"credits": 50}), 409, "idempotency key")
    assert_error(httpx.post(topup, headers=key, json={"credits": 100, "reason": "other"}), 409)
    # Without a key every request is a top-up of its own.
    for _ in range(2):
        assert httpx.post(topup, headers=ADMIN, json={"credits": 1}).status_code == 200
    balance = httpx.get(url(base_url, account_id, "balance"), headers=ADMIN).json()
    assert set(balance) == BALANCE_FIELDS
    assert balance["credit_balance"] == 112 and balance["credit_available"] == 112 and balance["credit_reserved"] == 0
    minutes = httpx.post(topup, headers=ADMIN, json={"minutes": 30})
    assert minutes.json()["unit"] == "minutes" and minutes.json()["new_balance"] == 30
    for body in ({}, {"credits": 1, "minutes": 1}, {"credits": 0}, {"credits": "x"}, {"credits": 0.00001}):
        assert_error(httpx.post(topup, headers=ADMIN, json=body), 422)
    assert_error(httpx.post(url(base_url, "no-such-account", "topup"), headers=ADMIN, json={"credits": 1}), 404)


def test_transactions_refund_adjust(base_url: str) -> None:
    account_id = create(base_url, initial_credits=20)["account_id"]
    httpx.post(url(base_url, account_id, "topup"), headers=ADMIN, json={"credits": 5, "reason": "Recarga web"})
    assert_error(httpx.post(url(base_url, account_id, "refund"), headers=ADMIN, json={"credits": 1}), 409, "exceeds")
    r = httpx.post(url(base_url, account_id, "adjust"), headers=ADMIN, json={"credits": -2.5, "reason": "error"})
    assert r.status_code == 200 and r.json()["new_balance"] == 22.5 and r.json()["amount"] == -2.5
    too_much = {"credits": -100, "reason": "x"}
    assert_error(httpx.post(url(base_url, account_id, "adjust"), headers=ADMIN, json=too_much), 409, "exceeds")
    assert_error(httpx.post(url(base_url, account_id, "adjust"), headers=ADMIN, json={"credits": 1}), 422, "reason")

    r = httpx.get(url(base_url, account_id, "transactions"), headers=ADMIN)
    assert r.status_code == 200 and r.headers["X-Total-Count"] == "3"
    entries = r.json()
    assert isinstance(entries, list)
    assert [e["type"] for e in entries] == ["adjustment", "topup_credits", "topup_credits"]  # newest first
    adjustment, topup, initial = entries
    assert topup["amount"] == 5 and topup["balance_after"] == 25 and topup["description"] == "Recarga web"
    assert initial["cause"] == "initial" and initial["balance_after"] == 20
    assert adjustment["amount"] == -2.5 and adjustment["balance_after"] == 22.5
    assert set(topup) >= {"transaction_id", "type", "amount", "cost", "description", "created_at"}
    assert topup["cost"] == 0 and adjustment["cost"] == 0  # neither charges anything
    assert topup["created_at"].endswith("Z")
    page = httpx.get(url(base_url, account_id, "transactions"), headers=ADMIN, params={"limit": 1, "skip": 1})
    assert page.json() == [topup] and page.headers["X-Total-Count"] == "3"

    r = httpx.get(url(base_url, account_id, "batches"), headers=ADMIN)
    assert r.status_code == 200 and r.json() == [] and r.headers["X-Total-Count"] == "0"


def test_account_batches_lists_its_campaigns_of_every_channel(base_url: str) -> None:
    from tests.e2e.test_bulk import add_device, make_file, phones, send_file, wait_job

    device = add_device(base_url, rate_per_minute=0)
    try:
        job_id = send_file(base_url, make_file(phones(40, 3))).json()["job"]["id"]
        wait_job(base_url, job_id)
    finally:
        httpx.put(f"{base_url}/devices/{device}", headers=ADMIN, json={"status": "inactive"})
    r = httpx.get(url(base_url, "default", "batches"), headers=ADMIN, params={"limit": 500})
    assert r.status_code == 200 and int(r.headers["X-Total-Count"]) >= 1
    mine = [b for b in r.json() if b["batch_id"] == job_id]
    assert len(mine) == 1
    batch = mine[0]
    assert re.fullmatch(r"[0-9a-f]{24}", batch["_id"]) and batch["account_id"] == "default"
    assert batch["total_jobs"] == 3 and batch["completed_jobs"] == 3 and batch["failed_jobs"] == 0
    assert all(b["account_id"] == "default" for b in r.json())
    # Another tenant's batches stay invisible to a member.
    member = {"Authorization": f"Bearer {MEMBER_TOKEN}"}
    assert httpx.get(url(base_url, "default", "batches"), headers=member).status_code == 404
