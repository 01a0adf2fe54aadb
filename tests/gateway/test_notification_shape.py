"""A notification as REST and the socket give it: the dashboards' fields and, beside them,
the scheduler guide's (`is_read`, `created_at`, `related_entity_type`/`_id`)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pregonero.accounts.v1 import notifications_pb2

from services.gateway.user_socket import notification_json
from services.runtime.protos import to_timestamp


def note(kind: str, data: Any, *, read: bool = False) -> notifications_pb2.Notification:
    return notifications_pb2.Notification(
        id="7",
        account_id="acme",
        kind=kind,
        level="success",
        title="t",
        data_json=json.dumps(data),
        read=read,
        created_at=to_timestamp(datetime(2026, 1, 27, 10, 0, tzinfo=UTC)),
    )


@pytest.mark.parametrize(
    ("kind", "data", "entity"),
    [
        ("batch_completed", {"job_id": "j-1", "channel": "whatsapp"}, ("job", "j-1")),
        ("batch_failed", {"job_id": "j-2"}, ("job", "j-2")),
        ("batch_completed", {"job_id": "b-1", "channel": "voice"}, ("batch", "b-1")),
        ("batch_completed", {"job_id": "b-2", "message_id": "m-1"}, ("message", "m-1")),
        ("group_created", {"group_id": 12}, ("group", "12")),
        ("contacts_imported", {"contact_id": "c-1"}, ("contact", "c-1")),
        ("credit_low", {"available": "3"}, ("account", "acme")),
        ("account_suspended", {"reason": "x"}, ("account", "acme")),
        ("something_new", {}, (None, None)),
        ("batch_completed", ["not", "an", "object"], (None, None)),
    ],
)
def test_related_entity_comes_from_kind_and_data(kind: str, data: Any, entity: tuple[str | None, str | None]) -> None:
    body = notification_json(note(kind, data))
    assert (body["related_entity_type"], body["related_entity_id"]) == entity


def test_guide_fields_sit_beside_the_dashboards_own() -> None:
    body = notification_json(note("batch_completed", {"job_id": "j-1"}, read=True))
    assert body["is_read"] is body["read"] is True
    assert body["created_at"] == body["timestamp"] == "2026-01-27T10:00:00Z"
    assert {"id", "type", "kind", "title", "message", "account_id", "data", "read_at"} <= set(body)
