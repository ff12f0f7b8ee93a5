"""GET /status in headless Chromium against the real stack (nginx + 2 workers + the real
models), with a canary rollout: the page draws what /stats and /models say.

The browser (tests/browser.py, Debian's chromium-headless-shell) loads the page through
nginx and runs its script in real time; the test reads back the figures the script left
in the DOM (legends' data-value, the canary and drift panels' data-* attributes) and
compares them with /stats and /models fetched around it. Chromium missing is a failure
naming the install command, never a skip.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import httpx
import pytest

from app.stack import Stack
from app.status import CSP
from benchmarks.soak import OpenLoad, mixed_bodies
from tests import browser
from tests.integration.conftest import TIMEOUT, start_stack

pytestmark = pytest.mark.integration
CANARY = {"steps": [0.5, 1.0], "step_s": 600}  # the same versions as a canary: step 0 for 10 min


class Dom(HTMLParser):
    """The rendered page: each chart's legend (series -> data-value) and every element's
    data-* attributes by id and by kind (drift rows, PSI chips, variants)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.legends: dict[str, dict[str, str]] = defaultdict(dict)
        self.paths: dict[str, list[str]] = defaultdict(list)
        self.empty: set[str] = set()
        self.by_id: dict[str, dict[str, str]] = {}
        self.rows: dict[str, dict[str, str]] = {}
        self.chips: dict[str, dict[str, dict[str, str]]] = defaultdict(dict)
        self.variants: dict[str, dict[str, str]] = {}
        self.summary: dict[str, str] = {}
        self._chart: str | None = None
        self._model: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if "id" in a:
            self.by_id[a["id"]] = a
        if tag == "figure":
            self._chart = a.get("id")
        elif tag == "li" and self._chart and "data-series" in a:
            self.legends[self._chart][a["data-series"]] = a["data-value"]
        elif tag == "path" and self._chart:
            self.paths[self._chart].append(a.get("d", ""))
        elif tag == "p" and self._chart and a.get("class") == "empty":
            self.empty.add(self._chart)
        elif tag == "tr" and "data-model" in a:
            self._model = a["data-model"]
            self.rows[self._model] = a
        elif tag == "span" and "data-feature" in a and self._model:
            self.chips[self._model][a["data-feature"]] = a
        elif tag == "tr" and "data-variant" in a:
            self.variants[a["data-variant"]] = a
        elif tag == "div" and "data-name" in a:
            self.summary[a["data-name"]] = a["data-value"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._chart = None


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    if browser.find() is None:  # before the stack: fail fast, and say how to fix it
        pytest.fail(browser.INSTALL_HINT)
    yield from start_stack(request, prefix="farm-st-", settings={"canary": CANARY})


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=TIMEOUT) as c:
        yield c


def render(stack: Stack, polls: int = 3) -> tuple[Dom, list[str]]:
    """The page after ``polls`` polls (real time), and the errors the browser saw."""
    with browser.Chromium(timeout_s=30.0) as chromium:
        chromium.open(f"{stack.url}/status")
        chromium.wait_for(f"Number(document.body.dataset.polls) >= {polls}", timeout_s=60.0)
        html = chromium.html()
        return Dom(html), chromium.errors


def between(shown: str, *values: float | None, tol: float = 1e-6) -> bool:
    """The page's figure lies within the /stats values taken before and after it."""
    nums = [v for v in values if v is not None]
    return bool(nums) and min(nums) - tol <= float(shown) <= max(nums) + tol


def test_the_page_is_served_through_nginx_with_its_headers(client: httpx.Client) -> None:
    page = client.get("/status")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"] == CSP
    again = client.get("/status", headers={"If-None-Match": page.headers["etag"]})
    assert (again.status_code, again.content) == (304, b"")
    script = client.get("/status/status.js")
    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert "/status" in client.get("/openapi.json").json()["paths"]


def test_before_any_traffic_the_page_says_what_is_missing(
    stack: Stack, client: httpx.Client
) -> None:
    dom, errors = render(stack, polls=2)
    stats = client.get("/stats").json()
    assert errors == []
    assert dom.by_id["problem"].get("hidden") is not None, "the problem banner shows"
    assert dom.summary["workers"] == "2"
    if not stats["stages"]:
        assert "chart-stages" in dom.empty
    if not stats["drift"]:
        assert "no drift data yet" in str(dom.by_id.get("drift"))
    # Nothing answered yet: latency quantiles are None, so no line is drawn for them.
    if stats["endpoints"]["/rank"]["latency"]["count"] == 0:
        assert dom.legends["chart-latency-rank"].get("p99", "") == ""
    assert dom.by_id["canary-state"]["data-status"] == "running"


def test_the_charts_show_the_farm_figures(stack: Stack, client: httpx.Client) -> None:
    load = OpenLoad(stack.url, mixed_bodies(stack.config, seed=7), rate=50.0, duration_s=2.5)
    shots = load.start().join()
    assert shots and all(s.status == 200 for s in shots), {s.status for s in shots}
    before = client.get("/stats").json()
    dom, errors = render(stack, polls=3)
    after = client.get("/stats").json()
    print({"requests": len(shots), "legends": dict(dom.legends)})
    assert errors == [], errors

    for path, name in (("/rank", "rank"), ("/predict", "predict")):
        b, a = before["endpoints"][path], after["endpoints"][path]
        # Since-start figures do not move without traffic: equal to /stats.
        assert b["latency"] == a["latency"] and b["requests"] == a["requests"] > 0
        legend = dom.legends[f"chart-latency-{name}"]
        assert float(legend["p50"]) == pytest.approx(a["latency"]["p50_ms"], rel=1e-12)
        assert float(legend["p99"]) == pytest.approx(a["latency"]["p99_ms"], rel=1e-12)
        assert legend["mean now"] == ""  # nothing answered between the page's polls
        assert any("L" in d for d in dom.paths[f"chart-latency-{name}"]), "no line drawn"
        # The window's figures slide with time: within the values around the page's.
        assert between(
            dom.legends["chart-qps"][path],
            b["window"]["throughput_rps"],
            a["window"]["throughput_rps"],
        )
        assert float(dom.legends["chart-qps"][path]) > 0
        assert float(dom.legends["chart-qps"][f"{path} now"]) == 0.0
        assert between(
            dom.legends["chart-goodput"][path],
            b["window"]["goodput_rps"],
            a["window"]["goodput_rps"],
        )
        assert between(
            dom.legends["chart-sla"][path],
            b["window"]["sla_compliance"],
            a["window"]["sla_compliance"],
        )

    stages = dom.legends["chart-stages"]
    want = {
        f"{stage} {model} {q}": lat[f"{q}_ms"]
        for stage, per_model in after["stages"].items()
        for model, lat in per_model.items()
        for q in ("p50", "p99")
    }
    assert {"stage1 deepfm/1 p99", "stage2 autoint/1 p99"} <= set(want)
    assert {k: float(v) for k, v in stages.items()} == pytest.approx(want, rel=1e-12)


def test_the_canary_and_drift_panels(stack: Stack, client: httpx.Client) -> None:
    """After the traffic above: the split, the canary's state and the drift per model."""
    dom, errors = render(stack, polls=2)
    stats = client.get("/stats").json()
    traffic = client.get("/models").json()["traffic"]
    assert errors == []

    canary = traffic["canary"]
    assert canary["status"] == "running" and canary["weight"] == 0.5
    state = dom.by_id["canary-state"]
    assert (state["data-status"], int(state["data-step"]), float(state["data-weight"])) == (
        canary["status"],
        canary["step"],
        canary["weight"],
    )
    assert {v: float(a["data-weight"]) for v, a in dom.variants.items()} == traffic["weights"]
    assert {k: float(v) for k, v in dom.legends["chart-split"].items()} == traffic["weights"]
    assert set(traffic["weights"]) == {"stable", "canary"}

    warn, alert = stack.config.drift_psi_warn, stack.config.drift_psi_alert
    assert stats["drift"], "no drift figures after the traffic"
    assert set(dom.rows) == set(stats["drift"])
    judged = 0
    for model, drift in stats["drift"].items():
        assert dom.rows[model]["data-state"] == drift["state"]
        judged += drift["state"] != "insufficient_data"
        for feature, figures in drift["features"].items():
            chip = dom.chips[model][feature]
            psi: Any = figures["psi"]
            if psi is None:
                assert chip["data-psi"] == "" and "level-none" in chip["class"]
                continue
            assert float(chip["data-psi"]) == pytest.approx(psi, rel=1e-12)
            level = "alert" if psi >= alert else "warn" if psi >= warn else "ok"
            assert f"level-{level}" in chip["class"], (model, feature, psi)
        if drift["worst"] is not None:
            worst = drift["features"][drift["worst"]]["psi"]
            assert float(dom.legends["chart-drift"][model]) == pytest.approx(worst, rel=1e-12)
    assert judged, "every model still insufficient_data: send more traffic"
