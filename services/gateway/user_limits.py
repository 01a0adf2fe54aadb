"""Per-user rate limits for routes (the scheduler guide's: sending or scheduling messages 10 a
minute per user, creating groups 5 a minute per user), answered with 429 and `Retry-After`.

Attach one to a route as a dependency; it authenticates the caller itself (FastAPI runs
`require_caller` once per request however many dependencies name it)::

    from ..user_limits import per_user

    @router.post("/api/messages/{message_id}/schedule", dependencies=[Depends(per_user("messages.send", 10))])
    async def schedule(...): ...

    @router.post("/api/groups", status_code=201, dependencies=[Depends(per_user("groups.create", 5))])
    async def create_group(...): ...

Routes that share a name share one allowance (schedule and send-now both under
"messages.send"). A call the route refuses (4xx, 5xx) gives its place back: it scheduled or
created nothing, and a user correcting a form is not punished for it. A user is its account and
user id. Operators (the admin role) are not limited: the limits keep one user from flooding
their account's contacts, while the operator's tools act for every account.

The window slides: at most `per_minute` calls in any 60 seconds, never a burst of twice that
around a minute's edge, and `Retry-After` is when the oldest call of the window leaves it.
The counts live in this gateway process: with N replicas behind a balancer a user may get up
to N times the limit. Memory is bounded: at most `max_users` users are tracked per limit (the
least recently seen forgotten first), each holding at most `per_minute` timestamps.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from services.runtime.identity import Caller

from .auth import require_caller

WINDOW_S = 60.0
MAX_USERS = 100_000
_DECLARED: dict[str, int] = {}


class SlidingWindow:
    """At most `limit` hits per key in any `window` seconds."""

    def __init__(
        self,
        limit: int,
        *,
        window: float = WINDOW_S,
        max_keys: int = MAX_USERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1 or window <= 0 or max_keys < 1:
            raise ValueError("a limit needs limit >= 1, window > 0 and max_keys >= 1")
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()

    def hit(self, key: str) -> float:
        """Counts a hit and returns 0; or, over the limit, counts nothing and returns the
        seconds until the next hit would be allowed."""
        now = self.clock()
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = deque(maxlen=self.limit)
            while len(self._hits) > self.max_keys:
                self._hits.popitem(last=False)
        else:
            self._hits.move_to_end(key)
        while hits and hits[0] <= now - self.window:
            hits.popleft()
        if len(hits) >= self.limit:
            return max(hits[0] + self.window - now, 0.001)
        hits.append(now)
        return 0.0

    def forget(self, key: str) -> None:
        """Gives back the latest hit of `key` (its call was refused and did nothing)."""
        hits = self._hits.get(key)
        if hits:
            hits.pop()

    def __len__(self) -> int:
        return len(self._hits)


def _limits(request: Request) -> dict[str, SlidingWindow]:
    # One set per app (so per process, and tests' apps do not share counts).
    limits: dict[str, SlidingWindow] | None = getattr(request.app.state, "user_limits", None)
    if limits is None:
        limits = request.app.state.user_limits = {}
    return limits


def per_user(name: str, per_minute: int) -> Callable[..., AsyncIterator[None]]:
    """A dependency allowing each user `per_minute` calls a minute to the routes named `name`."""
    if per_minute < 1:
        raise ValueError(f"limit {name}: per_minute must be 1 or more")
    # A name is one allowance: declaring it again with another figure is a mistake, found at import.
    if _DECLARED.setdefault(name, per_minute) != per_minute:
        raise ValueError(f"limit {name} is {_DECLARED[name]} a minute elsewhere, not {per_minute}")

    async def limit(request: Request, caller: Annotated[Caller, Depends(require_caller)]) -> AsyncIterator[None]:
        if caller.is_admin:
            yield
            return
        limits = _limits(request)
        window = limits.get(name)
        if window is None:
            window = limits[name] = SlidingWindow(per_minute)
        key = f"{caller.account_id}\x00{caller.user_id}"
        wait = window.hit(key)
        if wait:
            seconds = math.ceil(wait)
            raise HTTPException(
                429,
                f"too many requests: at most {per_minute} a minute per user here; try again in {seconds} s",
                headers={"Retry-After": str(seconds)},
            )
        try:
            yield
        except Exception:
            # Refused by the route (an error raised through here): nothing was done.
            window.forget(key)
            raise

    limit.__name__ = f"per_user_{name.replace('.', '_')}"
    return limit
