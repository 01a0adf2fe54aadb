"""Static operator tokens: parsing and resolution."""

from __future__ import annotations

import pytest

from services.gateway.auth import Authenticator, parse_static_tokens
from services.gateway.config import GatewaySettings
from services.gateway.errors import ApiError


def settings(**kw: str) -> GatewaySettings:
    return GatewaySettings(database_url="postgresql://x/y", **kw)


def test_tokens_map_to_admin_or_one_account() -> None:
    tokens = parse_static_tokens("a1=admin, m1=account:acme", default_account="default")
    assert tokens["a1"].is_admin and tokens["a1"].account_id == "default"
    assert not tokens["m1"].is_admin and tokens["m1"].account_id == "acme"


@pytest.mark.parametrize("spec", ["justatoken", "t=", "t=root", "t=account:", "=admin"])
def test_malformed_token_lists_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_static_tokens(spec, default_account="default")


def test_unknown_missing_and_malformed_headers_are_401() -> None:
    auth = Authenticator(settings(pregonero_static_tokens="good=admin"))
    assert auth.resolve("Bearer good").is_admin
    for header in (None, "", "Bearer", "Bearer bad", "Basic good", "good"):
        with pytest.raises(ApiError) as info:
            auth.resolve(header)
        assert info.value.status == 401


def test_anonymous_callers_only_where_the_operator_allows() -> None:
    closed = Authenticator(settings())
    with pytest.raises(ApiError):
        closed.resolve(None, allow_anonymous=True)
    opened = Authenticator(settings(pregonero_anonymous_account="lan"))
    assert opened.resolve(None, allow_anonymous=True).account_id == "lan"
    with pytest.raises(ApiError):
        opened.resolve(None)  # the dashboards' routes never accept anonymous callers
