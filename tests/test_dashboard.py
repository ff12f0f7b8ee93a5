"""deploy/grafana/ctr-farm.json: a Grafana dashboard whose every query selects series and
labels that app.metrics exports (tests/integration/test_dashboard.py checks the same
against a real scrape through nginx)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app import metrics
from app.config import REPO_ROOT
from tests.dashboard_check import (
    Query,
    groupings,
    metric_names,
    panels,
    problems,
    queries,
    registry_catalog,
)

DASHBOARD_PATH = REPO_ROOT / "deploy" / "grafana" / "ctr-farm.json"
DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_PATH.read_text())
CATALOG = registry_catalog(metrics)
QUERIES = list(queries(DASHBOARD))
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
GRAPHS = [p for p in panels(DASHBOARD) if p["type"] != "row"]


# -- the dashboard as Grafana reads it -----------------------------------------------------
def test_dashboard_header() -> None:
    assert DASHBOARD["schemaVersion"] >= 39
    assert (DASHBOARD["uid"], DASHBOARD["title"]) == ("ctr-farm", "ctr-farm")
    assert DASHBOARD["id"] is None  # so an import creates it, never overwrites another
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    for name in ("job", "instance"):
        assert variables[name]["datasource"] == DATASOURCE
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"


def test_every_panel_reads_the_chosen_prometheus() -> None:
    assert len(GRAPHS) >= 12
    ids = [p["id"] for p in panels(DASHBOARD)]
    assert len(ids) == len(set(ids))
    for panel in GRAPHS:
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["title"] and panel["description"], panel["id"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip()


def test_panels_fit_the_grid_without_overlapping() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(DASHBOARD):
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["w"] >= 1 and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[x, y]!r}"
                cells[x, y] = panel["title"]


# -- every query against what app.metrics exports -----------------------------------------
@pytest.mark.parametrize("query", QUERIES, ids=[q.where for q in QUERIES])
def test_query_selects_exported_series_and_labels(query: Query) -> None:
    assert problems(query, CATALOG) == []


def family(sample: str) -> str:
    """``ctr_farm_x_bucket`` -> ``ctr_farm_x``: the metric a sample name belongs to."""
    for suffix in ("_bucket", "_sum", "_count", "_total"):
        if sample.endswith(suffix):
            return sample.removesuffix(suffix)
    return sample


def test_every_exported_metric_has_a_panel() -> None:
    used = set().union(*(metric_names(q.expr) for q in QUERIES if q.expr))
    assert used <= set(CATALOG)
    assert {family(n) for n in used} == {family(n) for n in CATALOG}


@pytest.mark.parametrize(
    ("series", "by"),
    [
        ("ctr_farm_requests_total", {"endpoint", "status"}),  # QPS by endpoint and status
        ("ctr_farm_request_duration_seconds_bucket", {"le", "endpoint"}),  # p50/p95/p99
        ("ctr_farm_stage_duration_seconds_bucket", {"le", "stage", "model"}),
        ("ctr_farm_shed_total", {"reason"}),
        ("ctr_farm_degraded_total", {"answered_by", "reason"}),
        ("ctr_farm_breaker_state", {"model"}),
        ("ctr_farm_model_failures_total", {"model", "kind"}),
        ("ctr_farm_candidates_bucket", {"le"}),
    ],
)
def test_the_panels_break_down_by(series: str, by: set[str]) -> None:
    found = set().union(*(groupings(q.expr) for q in QUERIES if q.expr))
    assert (series, frozenset(by)) in found


def test_latency_quantiles_per_endpoint() -> None:
    exprs = [q.expr for q in QUERIES if "ctr_farm_request_duration_seconds_bucket" in q.expr]
    quantiles = {e.split("histogram_quantile(", 1)[1].split(",", 1)[0] for e in exprs}
    assert quantiles == {"0.5", "0.95", "0.99"}


# -- the checker itself: it must catch what a dashboard can get wrong ----------------------
@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(ctr_farm_request_total[5m])", "'ctr_farm_request_total' is not exported"),
        ("rate(ctr_farm_requests[5m])", "'ctr_farm_requests' is not exported"),  # no _total
        ("ctr_farm_in_flight_total", "'ctr_farm_in_flight_total' is not exported"),
        (
            "histogram_quantile(0.9, rate(ctr_farm_request_duration_seconds[$__rate_interval]))",
            "'ctr_farm_request_duration_seconds' is not exported",  # no _bucket
        ),
        (
            "histogram_quantile(0.9, sum by (endpoint)"
            " (rate(ctr_farm_request_duration_seconds_bucket[5m])))",
            "histogram_quantile: no label ['le']",
        ),
        (
            "sum by (stage) (rate(ctr_farm_request_duration_seconds_count[5m]))",
            "no label ['stage']",
        ),
        ('ctr_farm_in_flight{endpoint="/rank"}', "no label ['endpoint']"),
        (
            "sum by (model) (sum by (endpoint) (rate(ctr_farm_requests_total[5m])))",
            "no label ['model']",  # the inner sum dropped it
        ),
        (
            "sum by (endpoint) (rate(ctr_farm_requests_total[5m]))"
            " / sum by (endpoint, status) (rate(ctr_farm_requests_total[5m]))",
            "no match",
        ),
        (
            "sum without (status) (rate(ctr_farm_requests_total[5m]))"
            " / ignoring (model) sum by (endpoint) (rate(ctr_farm_requests_total[5m]))",
            "the sides still differ",  # the right side lost job and instance
        ),
        (
            "rate(ctr_farm_requests_total[5m])"
            " / ignoring (modle) rate(ctr_farm_requests_total[5m])",
            "no label ['modle']",
        ),
        (
            "sum by (endpoint) (rate(ctr_farm_request_duration_seconds_sum[5m]))"
            " / on (stage) sum by (endpoint) (rate(ctr_farm_request_duration_seconds_count[5m]))",
            "no label ['stage']",
        ),
        ("sum(rate(ctr_farm_requests_total[5m]) by (", "does not parse"),
    ],
)
def test_checker_catches(expr: str, problem: str) -> None:
    found = problems(Query("test", expr), CATALOG)
    assert len(found) == 1 and problem in found[0], found


@pytest.mark.parametrize(
    "expr",
    [
        'sum by (endpoint) (rate(ctr_farm_requests_total{job=~"$job"}[$__rate_interval]))',
        "histogram_quantile(0.99, sum by (le, stage, model)"
        " (rate(ctr_farm_stage_duration_seconds_bucket[${__rate_interval}])))",
        "sum by (endpoint, status) (rate(ctr_farm_requests_total[5m]))"
        " / on (endpoint) group_left sum by (endpoint) (rate(ctr_farm_requests_total[5m]))",
        "sum without (status) (rate(ctr_farm_requests_total[5m]))"
        " / ignoring (model) sum without (status, model) (rate(ctr_farm_requests_total[5m]))",
        "topk(3, sum by (model) (ctr_farm_breaker_state)) > bool 1",
        "count(ctr_farm_breaker_state == 2) or vector(0)",
    ],
)
def test_checker_accepts(expr: str) -> None:
    assert problems(Query("test", expr), CATALOG) == []


@pytest.mark.parametrize(
    ("query", "ok"),
    [
        (Query("v", 'ctr_farm_requests_total{job=~"$job"}', "instance"), True),
        (Query("v", "ctr_farm_in_flight", "model"), False),
        (Query("v", "", "endpoint"), True),
        (Query("v", "", "nope"), False),
    ],
)
def test_checker_label_values(query: Query, ok: bool) -> None:
    assert (problems(query, CATALOG) == []) is ok
