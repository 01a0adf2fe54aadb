"""Opted-out numbers are never reached by a bulk file or a voice batch of their account (the
simulated provider's record and the dispatcher's calls are the proof), other accounts'
opt-outs change nothing, and the batch's counters still add up to the file. A WhatsApp reply
saying STOP, BAJA or NO puts its sender on the list of the account that owns the number."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterable
from typing import Any

import asyncpg
import httpx
import pytest

from services.runtime.devstack import Stack
from tests.conftest import ADMIN_TOKEN, MEMBER_TOKEN, wait_for
from tests.e2e.test_bulk import deactivate_all, make_file, send_file, sends_to, wait_job
from tests.e2e.test_calls import ALL_DAY, dispatcher_calls, get_batch, new_account, upload_campaign
from tests.e2e.test_whatsapp_cloud import signed

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MEMBER = {"Authorization": f"Bearer {MEMBER_TOKEN}"}  # account acme

pytestmark = pytest.mark.timeout(90)


async def _sql(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def sql(suite: Stack, query: str, *args: Any) -> list[asyncpg.Record]:
    return asyncio.run(_sql(suite.database_url, query, *args))


def opt_out(suite: Stack, account_id: str, phones: Iterable[str]) -> None:
    # Straight into the table the address book keeps: what is under test is the sends.
    sql(
        suite,
        "INSERT INTO campaigns.opt_outs (account_id, phone) SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
        account_id,
        list(phones),
    )


def unique_phones(n: int) -> list[str]:
    """Chilean mobiles the numbering library takes as valid (+5698…: some +5697… ranges are
    unassigned, and a STOP from such a number is skipped as no phone at all)."""
    base = uuid.uuid4().int % 10**6
    return [f"+5698{(base + i) % 10**6:06d}{i % 10}" for i in range(n)]


@pytest.fixture
def device(base_url: str) -> Iterable[int]:
    """The account's only active device, one that never fails (earlier tests leave others)."""
    deactivate_all(base_url)
    r = httpx.post(
        f"{base_url}/devices",
        headers=ADMIN,
        json={"token": f"oo-{uuid.uuid4().hex[:8]}", "secret": "s3cret-123", "rate_per_minute": 0},
    )
    assert r.status_code == 200, r.text
    device_id = int(r.json()["device"]["id"])
    yield device_id
    httpx.put(f"{base_url}/devices/{device_id}", headers=ADMIN, json={"status": "inactive"})


def test_bulk_file_skips_the_accounts_opted_out_numbers(base_url: str, suite: Stack, device: int) -> None:
    numbers = unique_phones(6)
    stopped, elsewhere = numbers[1], numbers[4]
    opt_out(suite, "default", [stopped])
    opt_out(suite, "acme", [elsewhere])  # another account's list: not this send's business

    r = send_file(base_url, make_file(numbers), devices_limit=1)
    assert r.status_code == 200, r.text
    job = r.json()["job"]
    assert job["total_numbers"] == 6
    assert job["progress"]["cancelled"] == 1 and job["progress"]["pending"] == 5

    done = wait_job(base_url, job["id"], timeout=60)
    progress = done["progress"]
    assert (progress["sent"], progress["failed"], progress["cancelled"]) == (5, 0, 1)
    assert progress["sent"] + progress["failed"] + progress["cancelled"] == progress["total"] == 6
    sent_to = sorted(e[2] for e in sends_to(suite, numbers))
    assert sent_to == sorted(set(numbers) - {stopped})  # each once, the opted-out one never
    rows = sql(
        suite,
        "SELECT phone, status, error FROM campaigns.jobs WHERE batch_id = $1 AND status = 'cancelled'",
        uuid.UUID(job["id"]),
    )
    assert [tuple(r) for r in rows] == [(stopped, "cancelled", "opted out")]


def test_a_file_of_opted_out_numbers_only_is_400_and_writes_nothing(base_url: str, suite: Stack, device: int) -> None:
    numbers = unique_phones(3)
    opt_out(suite, "default", numbers)
    before = sql(suite, "SELECT count(*) FROM campaigns.batches")[0][0]
    r = send_file(base_url, make_file(numbers), devices_limit=1)
    assert r.status_code == 400, r.text
    assert "opted out" in r.json()["message"]
    assert sql(suite, "SELECT count(*) FROM campaigns.batches")[0][0] == before


def test_voice_batch_never_calls_an_opted_out_number(base_url: str, suite: Stack) -> None:
    account_id, key = new_account(base_url)
    # Debtor i: mobile +569<71000000+i>, landline +5622<3000000+i> (tests.e2e.test_calls.workbook).
    mobile = [f"+569{71000000 + i}" for i in range(4)]
    landline = [f"+5622{3000000 + i}" for i in range(4)]
    # Debtor 0 keeps its landline only; debtor 1 has nothing left; 2 and 3 are untouched.
    opt_out(suite, account_id, [mobile[0], mobile[1], landline[1]])
    opt_out(suite, "default", [mobile[2]])  # another account's

    created = upload_campaign(base_url, key, account_id, 4, {**ALL_DAY, "max_attempts": 1}, batch_name="OO")
    batch_id = created["batch_id"]
    assert created["jobs_created"] == 4
    batch = wait_for(
        "the batch ends",
        lambda: (b := get_batch(base_url, key, batch_id))["status"] == "completed" and b,
        timeout=60,
    )
    assert batch["cancelled_jobs"] == 1
    assert batch["completed_jobs"] + batch["failed_jobs"] + batch["cancelled_jobs"] == batch["total_jobs"] == 4

    jobs = httpx.get(f"{base_url}/api/v1/batches/{batch_id}/jobs", headers=key, params={"limit": 10}).json()
    by_name = {j["contact"]["name"]: j for j in jobs}
    assert by_name["Deudor 0"]["contact"]["phones"] == [landline[0]]
    assert by_name["Deudor 1"]["status"] == "cancelled"
    assert by_name["Deudor 2"]["contact"]["phones"] == [mobile[2], landline[2]]

    calls = asyncio.run(dispatcher_calls(suite.database_url, batch_id))
    called = {
        r["to"]
        for r in sql(
            suite,
            "SELECT result->'summary'->>'to_number' AS to FROM dispatcher.attempts WHERE batch_id = $1",
            uuid.UUID(batch_id),
        )
    }
    assert len(calls) >= 3 and called
    assert not called & {mobile[0], mobile[1], landline[1]}
    assert landline[0] in called and mobile[2] in called and mobile[3] in called


def inbound(phone_number_id: str, *messages: dict[str, Any]) -> bytes:
    """A Graph webhook of messages written to the business number `phone_number_id`."""
    value = {"messaging_product": "whatsapp", "metadata": {"phone_number_id": phone_number_id}, "messages": messages}
    body = {"object": "whatsapp_business_account", "entry": [{"id": "WABA", "changes": [{"value": value}]}]}
    return json.dumps(body).encode()


def text(sender: str, body: str, kind: str = "text") -> dict[str, Any]:
    return {
        "from": sender.lstrip("+"),
        "id": f"wamid.{uuid.uuid4().hex}",
        "timestamp": "1795000000",
        "type": kind,
        "text": {"body": body},
    }


def cloud_device(base_url: str, headers: dict[str, str], phone_number_id: str) -> int:
    config = {"phone_number_id": phone_number_id}
    body = {"token": "cloud", "secret": "graph-token", "provider": "whatsapp_cloud", "provider_config": config}
    r = httpx.post(f"{base_url}/devices", headers=headers, json={**body, "status": "inactive"})
    assert r.status_code == 200, r.text
    return int(r.json()["device"]["id"])


def test_a_stop_reply_opts_its_sender_out_of_the_account_owning_the_number(base_url: str, suite: Stack) -> None:
    ours, theirs = (str(uuid.uuid4().int % 10**15) for _ in range(2))
    acme_device = cloud_device(base_url, MEMBER, ours)
    default_device = cloud_device(base_url, ADMIN, theirs)
    stop, baja, no, chatty, picture, elsewhere, forged = unique_phones(7)
    try:
        body = inbound(
            ours,
            text(stop, " Stop "),
            text(baja, "BAJA"),
            text(no, "no\n"),
            text(stop, "STOP"),  # said twice: once on the list
            text(chatty, "no gracias, mañana"),
            text(picture, "STOP", kind="image"),
        )
        unsigned = httpx.post(f"{base_url}/webhooks/whatsapp", content=inbound(ours, text(forged, "STOP")))
        assert unsigned.status_code == 401
        r = httpx.post(f"{base_url}/webhooks/whatsapp", content=body, headers=signed(body))
        assert r.status_code == 200 and r.json() == {"received": 0, "opted_out": 3}, r.text
        # Meta delivers again what it got no 200 for: the list stays as it is.
        r = httpx.post(f"{base_url}/webhooks/whatsapp", content=body, headers=signed(body))
        assert r.status_code == 200 and r.json() == {"received": 0, "opted_out": 0}
        other = inbound(theirs, text(elsewhere, "stop"))
        assert httpx.post(f"{base_url}/webhooks/whatsapp", content=other, headers=signed(other)).status_code == 200
        nobody = inbound("1" + ours, text(forged, "STOP"))  # a number no device uses
        r = httpx.post(f"{base_url}/webhooks/whatsapp", content=nobody, headers=signed(nobody))
        assert r.status_code == 200 and r.json()["opted_out"] == 0

        rows = sql(
            suite,
            "SELECT account_id, phone, source FROM campaigns.opt_outs WHERE phone = ANY($1::text[]) ORDER BY phone",
            [stop, baja, no, chatty, picture, elsewhere, forged],
        )
        assert sorted(tuple(r) for r in rows) == sorted(
            [
                ("acme", stop, "inbound"),
                ("acme", baja, "inbound"),
                ("acme", no, "inbound"),
                ("default", elsewhere, "inbound"),
            ]
        )
    finally:
        httpx.delete(f"{base_url}/devices/{acme_device}", headers=MEMBER)
        httpx.delete(f"{base_url}/devices/{default_device}", headers=ADMIN)
