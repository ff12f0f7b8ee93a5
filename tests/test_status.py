"""app.status: GET /status and its two assets, read once, with their types, cache headers
and CSP; rendered with the settings the script needs; shipped as package data.

The page's behaviour in a browser against the real farm: tests/integration/test_status_page.py.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

import falcon.testing
import msgspec
import pytest

from app.config import REPO_ROOT, Config
from app.service import Farm
from app.status import ASSETS, CSP, POLL_MS, STATIC, render
from tests.conftest import client_for

SVG_NS = "http://www.w3.org/2000/svg"


def asset_links(html: str) -> dict[str, str]:
    """asset -> the URL the page loads it from."""
    return {m[1]: m[0] for m in re.findall(r'(?:href|src)="(status/([\w.]+)\?v=\w+)"', html)}


def test_the_page_is_html_rendered_with_the_settings_and_revalidated(
    make_config: Callable[..., Config], make_farm: Callable[[Config], Farm]
) -> None:
    config = make_config(drift_psi_warn=0.05, drift_psi_alert=0.2)
    client = client_for(make_farm(config))
    resp = client.simulate_get("/status")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/html; charset=utf-8"
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["content-security-policy"] == CSP
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert re.fullmatch(r'"[0-9a-f]{16}"', resp.headers["etag"])
    html = resp.text
    assert html.startswith("<!DOCTYPE html>")
    assert 'data-psi-warn="0.05"' in html and 'data-psi-alert="0.2"' in html
    assert f'data-poll-ms="{POLL_MS}"' in html
    assert "{{" not in html
    for chart in ("qps", "goodput", "sla", "latency-rank", "latency-predict", "stages", "split"):
        assert f'id="chart-{chart}"' in html


def test_the_page_links_each_asset_by_its_content_hash(client: falcon.testing.TestClient) -> None:
    html = client.simulate_get("/status").text
    links = asset_links(html)
    assert set(links) == set(ASSETS)
    for name, url in links.items():
        resp = client.simulate_get("/" + url.split("?")[0])
        assert resp.status_code == 200, name
        assert resp.headers["content-type"] == ASSETS[name]
        assert resp.headers["cache-control"] == "public, max-age=86400"
        assert resp.content == (STATIC / name).read_bytes()
        assert url.endswith("?v=" + resp.headers["etag"].strip('"'))


@pytest.mark.parametrize("path", ["/status", "/status/status.js", "/status/status.css"])
def test_if_none_match_answers_304_without_a_body(
    client: falcon.testing.TestClient, path: str
) -> None:
    etag = client.simulate_get(path).headers["etag"]
    for sent in (etag, f'"other", {etag}', "*"):
        resp = client.simulate_get(path, headers={"If-None-Match": sent})
        assert (resp.status_code, resp.content) == (304, b""), sent
        assert resp.headers["etag"] == etag
    stale = client.simulate_get(path, headers={"If-None-Match": '"0000000000000000"'})
    assert stale.status_code == 200 and stale.content


@pytest.mark.parametrize("asset", ["status.html", "nope.js", "..%2Fapi.py", "STATUS.JS"])
def test_only_the_two_assets_are_served(client: falcon.testing.TestClient, asset: str) -> None:
    resp = client.simulate_get(f"/status/{asset}")
    assert resp.status_code == 404
    assert resp.headers["content-type"] == "application/json"
    assert msgspec.json.decode(resp.content)["error"]["code"] == "not_found"


@pytest.mark.parametrize("name", ["status.html", *ASSETS])
def test_nothing_is_loaded_from_elsewhere(name: str) -> None:
    """No CDN, no web font: the only absolute URL is the SVG namespace (not fetched)."""
    text = (STATIC / name).read_text(encoding="utf-8")
    assert set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"')]*", text)) <= {SVG_NS}
    assert "@import" not in text and "url(" not in text


def test_the_static_files_are_package_data() -> None:
    """Every file of app/static/ matches a package-data glob (else a wheel lacks it)."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["app"]
    files = sorted(p.relative_to(STATIC.parent).as_posix() for p in STATIC.iterdir())
    assert files == ["static/status.css", "static/status.html", "static/status.js"]
    for file in files:
        assert any(fnmatch.fnmatch(file, g) for g in globs), file


def test_an_unrendered_placeholder_stops_the_build(config: Config, tmp_path: Path) -> None:
    for name in (*ASSETS, "status.html"):
        (tmp_path / name).write_bytes((STATIC / name).read_bytes())
    (tmp_path / "status.html").write_text("<p>{{nope}}</p>")
    with pytest.raises(ValueError, match="placeholder"):
        render(config, tmp_path)
