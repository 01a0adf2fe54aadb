"""/docs and /redoc work on a network without the internet: every script, style and icon
they load is served by the suite itself."""

from __future__ import annotations

import re

import httpx
import pytest

ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""")


@pytest.mark.parametrize(("page", "kinds"), [("/docs", {"js", "css", "png"}), ("/redoc", {"js", "png"})])
def test_api_docs_load_their_assets_from_the_suite(base_url: str, page: str, kinds: set[str]) -> None:
    r = httpx.get(f"{base_url}{page}", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), r.text[:200]
    html = r.text
    assert "://" not in html, [line for line in html.splitlines() if "://" in line]  # nothing from elsewhere
    links = {a or b for a, b in ASSET.findall(html)} - {"/openapi.json"}
    assert {link.rsplit(".", 1)[-1] for link in links} == kinds, links
    for link in links:
        assert link.startswith("/docs-assets/"), link
        asset = httpx.get(f"{base_url}{link}", timeout=30)
        assert asset.status_code == 200, (link, asset.status_code)
        assert len(asset.content) > 1000, (link, len(asset.content))
    assert httpx.get(f"{base_url}/openapi.json", timeout=30).json()["info"]["title"] == "Pregonero API"


def test_nothing_outside_the_assets_is_served_from_there(base_url: str) -> None:
    for path in ("/docs-assets/../../etc/passwd", "/docs-assets/%2e%2e/core.py", "/docs-assets/missing.js"):
        assert httpx.get(f"{base_url}{path}", timeout=30).status_code == 404, path
