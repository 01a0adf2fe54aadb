"""The suite as a user meets it: through Envoy, with the real services behind."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, MEMBER_TOKEN

PUBLIC = ["/health", "/docs", "/redoc", "/openapi.json"]


def test_health_through_envoy_reports_every_component(base_url: str) -> None:
    r = httpx.get(f"{base_url}/health", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status_code == 200
    assert r.headers["server"] == "envoy"
    body = r.json()
    assert body["status"] == "healthy" and body["database"] == "connected" and body["nats"] == "connected"
    assert body["services"] == {"accounts": "SERVING", "campaigns": "SERVING", "dispatcher": "SERVING"}
    assert body["timestamp"]


@pytest.mark.parametrize("path", PUBLIC)
def test_public_routes_need_no_token(base_url: str, path: str) -> None:
    assert httpx.get(f"{base_url}{path}").status_code == 200


@pytest.mark.parametrize("header", [None, "Bearer nope", "Token " + ADMIN_TOKEN])
def test_protected_routes_refuse_unknown_callers(base_url: str, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    r = httpx.get(f"{base_url}/api/auth/me", headers=headers)
    assert r.status_code == 401
    body = r.json()
    assert set(body) >= {"detail", "message", "code"} and body["code"] == "unauthorized"


def test_static_tokens_resolve_to_their_caller(base_url: str) -> None:
    admin = httpx.get(f"{base_url}/api/auth/me", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    member = httpx.get(f"{base_url}/api/auth/me", headers={"Authorization": f"Bearer {MEMBER_TOKEN}"})
    assert admin.json()["role"] == "admin"
    assert member.json() == {"role": "member", "account_id": "acme", "user_id": "operator"}


def test_unknown_route_has_the_error_body(base_url: str) -> None:
    r = httpx.get(f"{base_url}/no/such/route")
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_cors_preflight_is_answered(base_url: str) -> None:
    r = httpx.options(
        f"{base_url}/api/auth/me",
        headers={"Origin": "http://dashboard.example", "Access-Control-Request-Method": "GET"},
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] in ("*", "http://dashboard.example")


def test_request_id_is_returned(base_url: str) -> None:
    r = httpx.get(f"{base_url}/health", headers={"x-request-id": "trace-me-1"})
    assert r.headers["x-request-id"] == "trace-me-1"
