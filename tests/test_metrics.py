"""app.metrics: reading merged metrics back (quantiles, samples), and multiprocess mode:
several processes' samples summed, a dead process's live gauges dropped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from app import metrics
from app.config import PROMETHEUS_ENV
from app.metrics import Samples, quantile
from tests.benchmarks.scripts import run_proc

BUCKETS = [(0.01, 10.0), (0.05, 60.0), (0.1, 90.0), (float("inf"), 100.0)]


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0.05, 0.005),  # 5 of the first bucket's 10: halfway from 0 to 0.01
        (0.1, 0.01),
        (0.5, 0.01 + 0.04 * 40 / 50),
        (0.9, 0.1),
        (0.95, 0.1),  # in +Inf: the highest finite bound
        (0.99, 0.1),
    ],
)
def test_quantile_interpolates_like_promql(q: float, expected: float) -> None:
    assert quantile(q, BUCKETS) == pytest.approx(expected)


@pytest.mark.parametrize("buckets", [[], [(0.1, 0.0), (float("inf"), 0.0)]])
def test_quantile_without_observations(buckets) -> None:
    assert quantile(0.5, buckets) is None


def test_quantile_agrees_with_the_histogram_it_reads() -> None:
    registry = CollectorRegistry()
    hist = Histogram("t_seconds", "t", ["e"], buckets=(0.01, 0.02, 0.05), registry=registry)
    for value in [0.005] * 50 + [0.015] * 45 + [0.04] * 5:
        hist.labels("a").observe(value)
    samples = Samples(registry.collect())
    buckets = samples.buckets("t_seconds", e="a")
    assert buckets[-1] == (float("inf"), 100.0)
    assert quantile(0.5, buckets) == pytest.approx(0.01)
    assert 0.02 < quantile(0.99, buckets) <= 0.05


def test_samples_select_total_and_by_label() -> None:
    registry = CollectorRegistry()
    counter = Counter("c", "c", ["a", "b"], registry=registry)
    counter.labels("x", "1").inc(2)
    counter.labels("x", "2").inc(3)
    counter.labels("y", "1").inc(5)
    samples = Samples(registry.collect())
    assert samples.total("c_total") == 10
    assert samples.total("c_total", a="x") == 5
    assert samples.by_label("c_total", "b") == {"1": 7, "2": 3}
    assert samples.select("c_total", a="y") == [({"a": "y", "b": "1"}, 5.0)]
    assert samples.total("missing_total") == 0


# -- multiprocess mode --------------------------------------------------------------------------
WORKER = """
import os
import sys
from app import metrics
from app.goodput import Goodput
from app.config import load
n = int(sys.argv[1])
for _ in range(n):
    metrics.requests_child("/rank", "200", "deepfm/1").inc()
    metrics.oov_child("hour").inc(2)
goodput = Goodput(load(env={}))
for _ in range(n):
    goodput.record("/rank", 200, 1.0)
goodput.publish()
metrics.WORKERS.set(1)
print(os.getpid())
"""


def run_worker(env: dict[str, str], n: int) -> int:
    """One "worker" process recording ``n`` requests; its pid."""
    return int(run_proc("-c", WORKER, str(n), env=env, timeout_s=60).stdout.split()[-1])


def test_processes_sum_and_a_dead_one_leaves_the_live_gauges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTR_FARM_")}
    env[PROMETHEUS_ENV] = str(tmp_path)
    pids = [run_worker(env, 3), run_worker(env, 4)]
    monkeypatch.setenv(PROMETHEUS_ENV, str(tmp_path))
    samples = Samples(metrics.collect())
    assert samples.total("ctr_farm_requests_total", endpoint="/rank") == 7
    assert samples.by_label("ctr_farm_oov_ids_total", "field") == {"hour": 14}
    window = samples.by_label("ctr_farm_window_requests", "outcome", endpoint="/rank")
    assert window["within"] == 7
    assert samples.total("ctr_farm_workers") == 2
    text = metrics.render().decode()
    assert 'ctr_farm_requests_total{endpoint="/rank",model="deepfm/1",status="200"} 7.0' in text

    metrics.mark_dead(pids[0])  # what gunicorn's child_exit does
    samples = Samples(metrics.collect())
    # Counters keep the dead worker's counts (totals never go back) ...
    assert samples.total("ctr_farm_requests_total", endpoint="/rank") == 7
    # ... its live gauges (window, workers) leave with it.
    window = samples.by_label("ctr_farm_window_requests", "outcome", endpoint="/rank")
    assert window["within"] == 4
    assert samples.total("ctr_farm_workers") == 1


def test_computed_families_replace_their_declarations() -> None:
    """/metrics declares the drift gauges once: the computed family, not an empty twin."""
    extra = [metrics.computed(metrics.DRIFT_STATE, [(("m/1",), 2)])]
    text = metrics.render(metrics.with_computed(metrics.collect(), extra)).decode()
    assert text.count("# HELP ctr_farm_drift_state ") == 1
    assert 'ctr_farm_drift_state{model="m/1"} 2.0' in text
