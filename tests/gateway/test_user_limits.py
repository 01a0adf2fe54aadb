"""Per-user rate limits: a sliding window per user and limit name, 429 with Retry-After and
the error body, bounded memory."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import Depends, FastAPI

from services.gateway import errors
from services.gateway.auth import Authenticator
from services.gateway.config import GatewaySettings
from services.gateway.errors import ApiError
from services.gateway.user_limits import SlidingWindow, per_user

pytestmark = pytest.mark.timeout(10)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_at_most_the_limit_in_any_window_and_the_wait_is_until_the_oldest_leaves() -> None:
    clock = Clock()
    window = SlidingWindow(3, window=60, clock=clock)
    for step in (0, 10, 20):
        clock.now += step
        assert window.hit("u") == 0
    assert window.hit("u") == pytest.approx(30)  # the first hit (t=1000) leaves at t=1060
    clock.now = 1059.9
    assert window.hit("u") > 0  # refused hits are not counted: the wait does not grow
    clock.now = 1060
    assert window.hit("u") == 0
    assert window.hit("u") == pytest.approx(10)  # the second (t=1010) is the oldest now
    assert window.hit("other") == 0  # users do not share


def test_no_burst_of_twice_the_limit_around_a_minutes_edge() -> None:
    clock = Clock()
    window = SlidingWindow(10, clock=clock)
    clock.now = 1059
    allowed = sum(window.hit("u") == 0 for _ in range(30))
    clock.now = 1061
    allowed += sum(window.hit("u") == 0 for _ in range(30))
    assert allowed == 10


def test_memory_is_bounded_by_forgetting_the_least_recently_seen() -> None:
    clock = Clock()
    window = SlidingWindow(1, max_keys=2, clock=clock)
    window.hit("a")
    window.hit("b")
    assert window.hit("a") > 0  # "a" is seen again: now "b" is the oldest
    window.hit("c")
    assert len(window) == 2
    assert window.hit("b") == 0  # forgotten, so allowed again
    assert window.hit("a") == 0  # ... which pushed out "a" in turn


@pytest.mark.parametrize("kwargs", [{"limit": 0}, {"limit": 1, "window": 0}, {"limit": 1, "max_keys": 0}])
def test_nonsense_limits_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        SlidingWindow(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        per_user("x", 0)


def test_one_name_is_one_figure() -> None:
    per_user("test.same", 3)
    per_user("test.same", 3)
    with pytest.raises(ValueError, match="3 a minute elsewhere"):
        per_user("test.same", 4)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = GatewaySettings(
        database_url="postgresql://x/y", pregonero_static_tokens="ana=account:acme,bob=account:globex,op=admin"
    )
    app = FastAPI()
    app.state.auth = Authenticator(settings)
    errors.install(app)

    @app.post("/send", dependencies=[Depends(per_user("test.send", 2))])
    async def send() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/schedule", dependencies=[Depends(per_user("test.send", 2))])
    async def schedule() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/groups", dependencies=[Depends(per_user("test.groups", 1))])
    async def create_group(fail: bool = False) -> dict[str, bool]:
        if fail:
            raise ApiError(409, "a group with that name exists")
        return {"ok": True}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


def as_(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_routes_answer_429_with_retry_after_per_user_and_per_name(client: httpx.AsyncClient) -> None:
    assert (await client.post("/send", headers=as_("ana"))).status_code == 200
    # Routes under one name share the allowance.
    assert (await client.post("/schedule", headers=as_("ana"))).status_code == 200
    r = await client.post("/send", headers=as_("ana"))
    assert r.status_code == 429
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    body = r.json()
    assert body["code"] == "too_many_requests" and "2 a minute" in body["message"] and body["detail"]
    # Another user, and another limit of the same user, are untouched.
    assert (await client.post("/send", headers=as_("bob"))).status_code == 200
    assert (await client.post("/groups", headers=as_("ana"))).status_code == 200
    assert (await client.post("/groups", headers=as_("ana"))).status_code == 429


async def test_the_caller_is_authenticated_first(client: httpx.AsyncClient) -> None:
    assert (await client.post("/send")).status_code == 401
    assert (await client.post("/send", headers=as_("nobody"))).status_code == 401


async def test_a_refused_call_gives_its_place_back(client: httpx.AsyncClient) -> None:
    # The route said no (nothing was created): the user may correct and try again at once.
    for _ in range(3):
        assert (await client.post("/groups", params={"fail": True}, headers=as_("bob"))).status_code == 409
    assert (await client.post("/groups", headers=as_("bob"))).status_code == 200
    assert (await client.post("/groups", headers=as_("bob"))).status_code == 429


async def test_operators_are_not_limited(client: httpx.AsyncClient) -> None:
    for _ in range(5):
        assert (await client.post("/groups", headers=as_("op"))).status_code == 200
