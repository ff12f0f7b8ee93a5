"""app.goodput: SLA outcomes, compliance, and what a request records."""

from __future__ import annotations

import pytest

from app import metrics
from app.config import load
from app.goodput import OUTCOMES, Goodput, compliance, outcome
from app.metrics import Samples


@pytest.mark.parametrize(
    ("status", "latency_ms", "expected"),
    [
        (200, 10.0, "within"),
        (200, 50.0, "within"),  # at the objective is within it
        (200, 50.001, "over"),
        (201, 1.0, "within"),
        (400, 1.0, "invalid"),
        (413, 500.0, "invalid"),
        (500, 1.0, "failed"),
        (503, 1.0, "failed"),
    ],
)
def test_outcome(status: int, latency_ms: float, expected: str) -> None:
    assert outcome(status, latency_ms, sla_ms=50.0) == expected


@pytest.mark.parametrize(
    ("within", "over", "failed", "expected"),
    [(9, 1, 0, 0.9), (3, 0, 1, 0.75), (0, 0, 0, None), (0, 2, 2, 0.0)],
)
def test_compliance(within: int, over: int, failed: int, expected: float | None) -> None:
    assert compliance(within, over, failed) == expected


def sla_counts(endpoint: str) -> dict[str, float]:
    samples = Samples(metrics.collect())
    return samples.by_label("ctr_farm_sla_requests_total", "outcome", endpoint=endpoint)


def test_record_counts_outcomes_per_endpoint_and_in_the_window() -> None:
    goodput = Goodput(load(env={}, overrides={"sla_rank_ms": 30, "sla_predict_ms": 5}))
    before = sla_counts("/rank")
    assert goodput.record("/rank", 200, 29.0) == "within"
    assert goodput.record("/rank", 200, 31.0) == "over"
    assert goodput.record("/rank", 503, 1.0) == "failed"
    assert goodput.record("/predict", 200, 6.0) == "over"  # its own objective
    assert goodput.record("/health", 200, 1.0) is None  # no SLA, not counted
    after = sla_counts("/rank")
    assert {o: after.get(o, 0) - before.get(o, 0) for o in OUTCOMES} == {
        "within": 1,
        "over": 1,
        "failed": 1,
        "invalid": 0,
    }
    window = goodput.window.counts.totals()
    assert window.sum() == 4  # this instance's window: only its own requests
    goodput.publish()
    samples = Samples(metrics.collect())
    recent = samples.by_label("ctr_farm_window_requests", "outcome", endpoint="/predict")
    assert recent["over"] == 1 and recent["within"] == 0
