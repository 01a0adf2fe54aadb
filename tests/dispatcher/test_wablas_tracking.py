"""Each wablas device's Tracking URL, set by the dispatcher against a local Wablas: in the
background on creation, once more at the first poll, again only with new credentials; a
refusal or an unreachable Wablas never raises."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from services.dispatcher.providers.base import SenderConfig
from services.dispatcher.providers.wablas import WablasProvider, tracking_url
from services.dispatcher.wablas_tracking import TrackingUrls
from tests.dispatcher.fake_wablas import SECRET, TOKEN, FakeWablas
from tests.http_server import running

pytestmark = pytest.mark.timeout(20)

HOOK = "https://api.example.cl/webhooks/wablas"
KEY = "operator-webhook-secret"


@pytest.fixture
async def wablas() -> AsyncIterator[FakeWablas]:
    async with running(FakeWablas()) as fake:
        yield fake


@pytest.fixture
async def tracking(wablas: FakeWablas) -> AsyncIterator[TrackingUrls]:
    provider = WablasProvider(base_url=wablas.url, timeout_s=1.0)
    urls = TrackingUrls(provider, webhook_url=HOOK, secret=KEY)
    yield urls
    await urls.close()
    await provider.close()


def device(**fields: object) -> SenderConfig:
    return dataclasses.replace(
        SenderConfig(id=7, account_id="acc-1", provider="wablas", token=TOKEN, secret=SECRET), **fields
    )


async def test_a_created_device_gets_its_url_in_the_background(wablas: FakeWablas, tracking: TrackingUrls) -> None:
    tracking.created(device())
    await asyncio.gather(*tracking.tasks)
    assert wablas.tracking_urls == {TOKEN: tracking_url(HOOK, KEY, 7)}
    wablas.tracking_urls.clear()
    await tracking.polled(device())  # set already: not asked again
    assert wablas.tracking_urls == {}


async def test_the_first_poll_sets_it_and_new_credentials_set_it_again(
    wablas: FakeWablas, tracking: TrackingUrls
) -> None:
    await tracking.polled(device(provider="simulated"))
    await tracking.polled(device(secret="wrong"))  # refused by Wablas: logged, not retried
    await tracking.polled(device(secret="wrong"))
    assert wablas.tracking_urls == {}
    await tracking.polled(device())
    assert wablas.tracking_urls == {TOKEN: tracking_url(HOOK, KEY, 7)}


async def test_an_unreachable_wablas_is_asked_again_at_the_next_poll(wablas: FakeWablas) -> None:
    provider = WablasProvider(base_url="http://127.0.0.1:9", timeout_s=1.0)  # nothing listens there
    urls = TrackingUrls(provider, webhook_url=HOOK, secret=KEY)
    await urls.polled(device())  # does not raise
    assert 7 not in urls.given
    provider.base_url = wablas.url
    await urls.polled(device())
    assert wablas.tracking_urls == {TOKEN: tracking_url(HOOK, KEY, 7)}
    await provider.close()
