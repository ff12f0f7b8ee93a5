"""app.drift: PSI, the card's bins, sampling, the farm-wide report and its states."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from app import metrics
from app.config import load
from app.drift import EPSILON, DriftMonitor, ModelMonitor, Reference, psi
from app.metrics import Samples
from app.schema import ModelCard, PredictRequest, RankRequest
from app.service import Farm
from tests.conftest import config_for
from tests.fake_models import FIELDS, write_model

#: A training distribution for the fake models' fields (tests/fake_models.py).
DISTRIBUTION: dict[str, Any] = {
    "fields": {
        "weekday": {"top_ids": list(range(7)), "top_shares": [1 / 7] * 7, "oov_rate": 0.0},
        "hour": {"top_ids": [5, 6, 7], "top_shares": [0.2, 0.1, 0.1], "oov_rate": 0.0},
        "region": {"top_ids": [0], "top_shares": [0.5], "oov_rate": 0.0},
        "city": {"top_ids": [10, 20], "top_shares": [0.3, 0.2], "oov_rate": 0.01},
    },
    "ctr_histogram": {"edges": [0.0, 0.01, 0.1, 1.0], "shares": [0.5, 0.4, 0.1]},
    "ctr_mean": 0.03,
}
VOCAB = np.array([v for _, v in FIELDS])


def card(distribution: dict[str, Any] | None = DISTRIBUTION) -> ModelCard:
    value = {
        "name": "fake",
        "version": "1",
        "architecture": "FakeLinear",
        "fields": [{"name": f, "vocab_size": v, "oov_index": v} for f, v in FIELDS],
        "input": {"name": "ids", "dtype": "int64", "shape": ["batch", len(FIELDS)]},
        "output": {"name": "ctr", "dtype": "float32", "shape": ["batch"]},
        "opset": 17,
        "sha256": "0" * 64,
        "size_bytes": 1,
        "metrics": {"valid_auc": 0.5, "test_auc": 0.5, "test_logloss": 0.7},
        "distribution": distribution,
    }
    return msgspec.convert(value, ModelCard)


def sample_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows and CTRs drawn from DISTRIBUTION itself (an "other" draw is an id that
    is no top id; an "oov" draw the OOV index)."""
    rng = np.random.default_rng(seed)
    cols = []
    for name, vocab in FIELDS:
        stats = DISTRIBUTION["fields"][name]
        top = stats["top_ids"]
        others = [i for i in range(vocab) if i not in top]
        p = [*stats["top_shares"], 1 - sum(stats["top_shares"]) - stats["oov_rate"]]
        p.append(stats["oov_rate"])
        pick = rng.choice(len(p), size=n, p=np.array(p) / sum(p))
        col = np.where(pick < len(top), np.array([*top, 0, 0])[pick], vocab)
        other = pick == len(top)
        col[other] = rng.choice(others, size=int(other.sum())) if others else 0
        cols.append(col)
    hist = DISTRIBUTION["ctr_histogram"]
    b = rng.choice(3, size=n, p=hist["shares"])
    lo, hi = np.array(hist["edges"][:-1])[b], np.array(hist["edges"][1:])[b]
    return np.stack(cols, axis=1).astype(np.int64), (lo + (hi - lo) * rng.random(n)).astype(
        np.float32
    )


def monitor_config(**overrides: Any):
    base = {"drift_sample_every": 1, "drift_min_rows": 500}
    return load(env={}, overrides={**base, **overrides})


# -- psi --------------------------------------------------------------------------------------
def test_psi_of_the_expected_distribution_is_zero() -> None:
    assert psi(np.array([20.0, 30.0, 50.0]), np.array([0.2, 0.3, 0.5])) == pytest.approx(0.0)


def test_psi_known_value() -> None:
    # (0.5 - 0.25) ln(0.5 / 0.25) + (0.5 - 0.75) ln(0.5 / 0.75)
    expected = 0.25 * math.log(2) - 0.25 * math.log(2 / 3)
    assert psi(np.array([1.0, 1.0]), np.array([0.25, 0.75])) == pytest.approx(expected)


def test_psi_empty_bins_count_as_epsilon() -> None:
    # A bin the card never saw (share 0) holding 10% of the window: a bounded term.
    value = psi(np.array([9.0, 1.0]), np.array([1.0, 0.0]))
    expected = (0.9 - 1.0) * math.log(0.9) + (0.1 - EPSILON) * math.log(0.1 / EPSILON)
    assert value == pytest.approx(expected)
    assert math.isfinite(psi(np.array([10.0, 0.0]), np.array([0.0, 1.0])))


def test_psi_of_nothing_is_nan() -> None:
    assert math.isnan(psi(np.zeros(3), np.array([0.2, 0.3, 0.5])))


# -- the card's bins ----------------------------------------------------------------------------
def test_reference_bins_top_ids_other_and_oov() -> None:
    ref = Reference.from_card(card())
    assert ref is not None
    hour = next(f for f in ref.features if f.name == "hour")
    assert hour.bins == ("5", "6", "7", "other", "oov")
    assert hour.expected.tolist() == pytest.approx([0.2, 0.1, 0.1, 0.6, 0.0])
    city = next(f for f in ref.features if f.name == "city")
    assert city.expected.tolist() == pytest.approx([0.3, 0.2, 0.49, 0.01])
    rows = np.array([[0, 5, 0, 10], [6, 8, 3, 400], [6, 24, 35, 399]], dtype=np.int64)
    counts = ref.bin_fields(rows)
    assert counts[hour.start : hour.stop].tolist() == [1, 0, 0, 1, 1]
    assert counts[city.start : city.stop].tolist() == [1, 0, 1, 1]
    region = next(f for f in ref.features if f.name == "region")
    assert counts[region.start : region.stop].tolist() == [1, 1, 1]  # 0, other, oov
    assert counts.sum() == 3 * len(FIELDS)


def test_reference_ctr_bins_follow_numpy_histogram() -> None:
    ref = Reference.from_card(card())
    assert ref is not None
    scores = np.array([0.0, 0.005, 0.01, 0.05, 0.1, 0.99, 1.0], dtype=np.float32)
    edges = np.array(DISTRIBUTION["ctr_histogram"]["edges"])
    assert ref.bin_ctr(scores).tolist() == np.histogram(scores, bins=edges)[0].tolist()
    assert ref.ctr.bins == ("0", "0.01", "0.1")


@pytest.mark.parametrize(
    "distribution",
    [None, {"fields": DISTRIBUTION["fields"]}, {**DISTRIBUTION, "fields": {}}],
)
def test_no_reference_without_a_complete_distribution(distribution) -> None:
    assert Reference.from_card(card(distribution)) is None
    monitor = DriftMonitor(monitor_config())
    assert monitor.add("nodist/1", card(distribution)) is False
    monitor.record("nodist/1", np.zeros((3, 4), dtype=np.int64), np.zeros(3))  # a no-op
    assert monitor.models == {}


# -- sampling ---------------------------------------------------------------------------------
def test_sampling_is_systematic_across_requests() -> None:
    ref = Reference.from_card(card())
    assert ref is not None
    monitor = ModelMonitor("sample/1", ref, window_s=60, sample_every=4)
    ids = np.zeros((12, 4), dtype=np.int64)
    scores = np.arange(12, dtype=np.float32) / 100  # row r scores r / 100
    for start in range(0, 12, 3):  # four requests of three rows: rows 0, 4 and 8 sampled
        monitor.record(ids[start : start + 3], scores[start : start + 3])
    totals = monitor.window.counts.totals()
    assert totals[ref.ctr.start : ref.ctr.stop].sum() == 3
    assert totals[ref.ctr.stop] == pytest.approx(0.12)  # 0.00 + 0.04 + 0.08
    monitor.record(ids[:1], scores[:1])  # row 12: sampled too
    assert monitor.window.counts.totals()[ref.ctr.start : ref.ctr.stop].sum() == 4


# -- the report -------------------------------------------------------------------------------
def report_for(monitor: DriftMonitor, key: str):
    monitor.publish()
    return monitor.report(Samples(metrics.collect()))[key]


def test_in_distribution_traffic_is_ok_and_shifted_traffic_alerts() -> None:
    monitor = DriftMonitor(monitor_config())
    assert monitor.add("indist/1", card())
    ids, scores = sample_rows(4000, seed=1)
    for i in range(0, 4000, 500):
        monitor.record("indist/1", ids[i : i + 500], scores[i : i + 500])
    report = report_for(monitor, "indist/1")
    assert report.rows == 4000
    assert report.state == "ok"
    assert max(f.psi for f in report.features.values()) < 0.1
    assert report.ctr_mean == pytest.approx(float(scores.sum(dtype=np.float64)) / 4000)
    assert report.card_ctr_mean == 0.03
    city = report.features["city"]
    assert city.card_oov_rate == 0.01 and city.oov_rate == pytest.approx(0.01, abs=0.005)
    assert city.card_top_share == pytest.approx(0.5)

    shifted = DriftMonitor(monitor_config())
    assert shifted.add("shifted/1", card())
    ids = ids.copy()
    ids[:, 1] = 8  # every hour an "other" id: the card has 60% there
    shifted.record("shifted/1", ids, np.full(4000, 0.5, dtype=np.float32))
    report = report_for(shifted, "shifted/1")
    assert report.state == "alert"
    assert report.features["hour"].psi > 0.25
    assert report.features["ctr"].psi > 0.25
    assert report.features["weekday"].psi < 0.1  # the untouched field stays put
    assert report.worst in {"hour", "ctr"}


@pytest.mark.parametrize(
    ("rows", "psi_value", "expected"),
    [
        (499, 5.0, "insufficient_data"),
        (500, 0.0999, "ok"),
        (500, 0.1, "warn"),
        (10**6, 0.2499, "warn"),
        (500, 0.25, "alert"),
        (500, None, "insufficient_data"),
    ],
)
def test_state_thresholds(rows: int, psi_value: float | None, expected: str) -> None:
    monitor = DriftMonitor(monitor_config(drift_psi_warn=0.1, drift_psi_alert=0.25))
    assert monitor.state(rows, psi_value) == expected


def test_families_export_psi_state_and_mean() -> None:
    monitor = DriftMonitor(monitor_config())
    monitor.add("exported/1", card())
    ids, scores = sample_rows(1000, seed=3)
    monitor.record("exported/1", ids, scores)
    report = report_for(monitor, "exported/1")
    text = metrics.render(DriftMonitor.families({"exported/1": report})).decode()
    assert 'ctr_farm_drift_psi{feature="hour",model="exported/1"}' in text
    assert 'ctr_farm_drift_state{model="exported/1"} 0.0' in text
    mean = f'ctr_farm_predicted_ctr_mean{{model="exported/1"}} {report.ctr_mean}'
    assert mean in text


# -- in the farm: which batches are monitored ---------------------------------------------------
@pytest.fixture
def monitored_models(tmp_path: Path) -> Path:
    write_model(tmp_path, "deepfm", seed=1, distribution=DISTRIBUTION)
    write_model(tmp_path, "autoint", seed=2, distribution=DISTRIBUTION)
    return tmp_path


def window_rows(farm: Farm, key: str) -> int:
    monitor = farm.drift.models[key]
    ref = monitor.reference
    return int(monitor.window.counts.totals()[ref.ctr.start : ref.ctr.stop].sum())


def test_the_farm_monitors_whole_request_batches_only(monitored_models: Path, make_farm) -> None:
    farm = make_farm(config_for(monitored_models, drift_sample_every=1))
    ids, _ = sample_rows(300, seed=4)
    body = msgspec.json.encode({"candidates": ids.tolist(), "stage1_k": 50, "top_k": 5})
    farm.rank(msgspec.json.decode(body, type=RankRequest), "json")
    assert window_rows(farm, "deepfm/1") == 300  # stage 1: the whole request
    assert window_rows(farm, "autoint/1") == 0  # stage 2 scores survivors: not counted
    body = msgspec.json.encode({"candidates": ids[:40].tolist(), "multi_stage": False})
    farm.rank(msgspec.json.decode(body, type=RankRequest), "json")
    assert window_rows(farm, "autoint/1") == 40  # the single stage: the whole request
    body = msgspec.json.encode({"candidates": ids[:7].tolist(), "model": "deepfm"})
    farm.predict(msgspec.json.decode(body, type=PredictRequest), "json")
    assert window_rows(farm, "deepfm/1") == 307  # /predict: its batch is the request


def test_a_card_without_distribution_is_served_unmonitored(make_farm, config) -> None:
    farm = make_farm(config)  # the shared fake models carry no distribution
    assert farm.ready and farm.drift.models == {}
    report = farm.drift.report(Samples(metrics.collect()))
    assert report == {}


def test_a_reload_moves_monitoring_to_the_new_version(tmp_path: Path, make_farm) -> None:
    """A version retired by a reload leaves /stats and its window gauges go to zero."""
    write_model(tmp_path, "deepfm", seed=1, distribution=DISTRIBUTION)
    write_model(tmp_path, "autoint", seed=2, distribution=DISTRIBUTION)
    config = load(
        overrides={
            "deepfm_model": str(tmp_path / "deepfm"),  # repositories: the newest serves
            "autoint_model": str(tmp_path / "autoint"),
            "warmup_runs": 0,
            "drift_sample_every": 1,
        },
        env={},
    )
    farm = make_farm(config)
    ids, _ = sample_rows(50, seed=5)
    request = msgspec.json.decode(
        msgspec.json.encode({"candidates": ids.tolist()}), type=RankRequest
    )
    farm.rank(request, "json")
    old = farm.drift.models["deepfm/1"]
    assert window_rows(farm, "deepfm/1") == 50
    write_model(tmp_path, "deepfm", version="2", seed=3, distribution=DISTRIBUTION)
    assert farm.reload().changed == ["deepfm/2"]
    assert set(farm.drift.models) == {"deepfm/2", "autoint/1"}
    assert old.window.counts.totals().sum() == 0  # published as zeros: it leaves the sums
    farm.rank(request, "json")
    assert window_rows(farm, "deepfm/2") == 50
    report = farm.drift.report(Samples(metrics.collect()))
    assert "deepfm/1" not in report
