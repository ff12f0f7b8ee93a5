"""The Grafana dashboard against a real scrape of ``/metrics`` through nginx.

A one-worker farm (nginx + gunicorn, prometheus_client in multiprocess mode) whose
stage 2 model fails on request (tests/fake_models.py ``poisoned``), so that every
metric has samples: rankings and predictions that succeed, rankings that degrade to
stage 1, model failures that open the breaker, and 503s shed on the open breaker.
Every query of deploy/grafana/ctr-farm.json must then select series and labels that
the scrape holds, and the scrape must hold exactly what app.metrics declares.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app import metrics
from tests.dashboard_check import problems, registry_catalog, scrape_catalog
from tests.faults.test_degrade import FIELDS, ids_matrix, rank, start
from tests.test_dashboard import QUERIES

pytestmark = pytest.mark.integration


#: A canary and a shadow of the same versions (they share the lineup's sessions), so the
#: traffic metrics have samples too: per-variant guardrails, agreement, canary state;
#: with the result cache on, its metrics too.
TRAFFIC = {
    "canary": {"steps": [0.5, 1.0], "step_s": 600, "compare_share": 1.0},
    "shadow": {"share": 1.0},
    "cache_entries": 1000,  # and the result cache's
}


@pytest.fixture(scope="module")
def scraped() -> Iterator[dict[str, frozenset[str]]]:
    with (
        tempfile.TemporaryDirectory(prefix="fdash-") as tmp,
        start(Path(tmp), deepfm="ok", autoint="poisoned", **TRAFFIC) as stack,
        httpx.Client(base_url=stack.url, timeout=30) as client,
    ):
        good, poisoned = ids_matrix(100, 1), ids_matrix(100, 2, poison=True)
        for _ in range(2):
            assert rank(client, good)["answered_by"] == "stage2"
            resp = client.post("/predict", json={"candidates": good[:3].tolist()})
            assert resp.status_code == 200, resp.text
            # One candidate: the micro-batched path (its batch-size histogram).
            one = dict(zip((name for name, _ in FIELDS), good[0].tolist(), strict=True))
            resp = client.post("/predict", json={"candidate": one})
            assert resp.status_code == 200, resp.text
        for _ in range(3):  # breaker_failures: the third failure opens autoint's breaker
            assert rank(client, poisoned)["reason"] == "stage_error"
        resp = client.post("/predict", json={"candidates": good[:3].tolist()})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "model_unavailable"
        time.sleep(0.5)  # the comparator thread records the last comparisons
        scrape = client.get("/metrics")
        assert scrape.status_code == 200
        yield scrape_catalog(scrape.text)


def test_the_scrape_holds_exactly_what_app_metrics_declares(scraped) -> None:
    farm = {name: labels for name, labels in scraped.items() if name.startswith("ctr_farm_")}
    assert farm == registry_catalog(metrics)


@pytest.mark.parametrize("query", QUERIES, ids=[q.where for q in QUERIES])
def test_query_matches_the_real_scrape(scraped, query) -> None:
    assert problems(query, scraped) == []
