"""An ASGI app served over real HTTP inside the test's event loop (fake provider APIs, a
bare WebSocket hub): the code under test talks to it as to any server."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol, TypeVar

import uvicorn


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the test process keeps its own signal handlers
        yield


@contextlib.asynccontextmanager
async def serving(app: Any, *, lifespan: str = "off") -> AsyncIterator[str]:
    """Yields the app's base URL without a scheme: "127.0.0.1:<port>"."""
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan=lifespan))
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(5):
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
                if task.done():
                    await task  # it failed to start: say why
                await asyncio.sleep(0.01)
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        yield f"{host}:{port}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(5):
            await task


@contextlib.contextmanager
def serving_in_thread(app: Any, config: uvicorn.Config | None = None) -> Iterator[str]:
    """As `serving`, on a thread with its own event loop: for synchronous tests, whose
    blocking calls would otherwise stall a server on their loop. `config`: a process's own
    (its app and address are replaced by these)."""
    if config is None:
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
    config.app, config.host, config.port = app, "127.0.0.1", 0
    server = _Server(config)
    thread = threading.Thread(target=server.run, name="fake-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the fake HTTP server did not start")
        time.sleep(0.01)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(5)


class Fake(Protocol):
    """A fake provider: an ASGI app, and the URL it is reached at once served."""

    url: str

    def app(self) -> Any: ...


F = TypeVar("F", bound=Fake)


@contextlib.asynccontextmanager
async def running(fake: F) -> AsyncIterator[F]:
    async with serving(fake.app()) as address:
        fake.url = f"http://{address}"
        yield fake


@contextlib.contextmanager
def running_in_thread(fake: F) -> Iterator[F]:
    with serving_in_thread(fake.app()) as address:
        fake.url = f"http://{address}"
        yield fake
