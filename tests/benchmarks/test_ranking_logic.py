"""The ranking study's logic without models or servers: metrics, ratios, bodies, timings."""

from __future__ import annotations

from types import SimpleNamespace

import msgspec
import numpy as np
import pytest

from app.offline import logs as logs_mod
from app.pipeline import Pipeline, Stage
from app.schema import RankRequest
from benchmarks import fidelity
from benchmarks.ranking import Grid, Table, rank_body, ratio_ci, scaling, summary


class Oracle:
    """Scores rows of the log generator's fields by their hidden true CTR."""

    key = "oracle/1"

    def run(self, ids: np.ndarray, run_options: object = None) -> np.ndarray:
        columns = {name: ids[:, i] for i, name in enumerate(logs_mod.FIELD_NAMES)}
        return logs_mod.true_ctr(columns).astype(np.float32)


class Hashed:
    """A deterministic scorer unrelated to the truth (few levels: ties happen)."""

    def __init__(self, key: str, seed: int, levels: int = 50) -> None:
        self.key = key
        self.weights = np.random.default_rng(seed).integers(1, 1000, size=16)
        self.levels = levels

    def run(self, ids: np.ndarray, run_options: object = None) -> np.ndarray:
        return (((ids @ self.weights) % self.levels) / self.levels).astype(np.float32)


def card(**training: object) -> SimpleNamespace:
    return SimpleNamespace(name="m", field_names=logs_mod.FIELD_NAMES, training=training)


# -- metrics -------------------------------------------------------------------------------
def test_recall_at_k() -> None:
    ref = np.arange(10)
    assert fidelity.recall_at_k(ref[::-1], ref) == 1.0  # order does not matter
    assert fidelity.recall_at_k(np.arange(5, 15), ref) == 0.5
    assert fidelity.recall_at_k(np.arange(20, 30), ref) == 0.0
    assert fidelity.recall_at_k(np.array([2, 0, 1]), np.array([0, 1, 2]), k=10) == 1.0  # n < k


def test_ndcg_at_k() -> None:
    rel = np.array([0.0, 3.0, 2.0, 1.0])
    assert fidelity.ndcg_at_k(np.array([1, 2, 3]), rel, k=3) == pytest.approx(1.0)
    # [2, 1, 3]: (2/1 + 3/log2(3) + 1/2) / (3/1 + 2/log2(3) + 1/2)
    want = (2 + 3 / np.log2(3) + 0.5) / (3 + 2 / np.log2(3) + 0.5)
    assert fidelity.ndcg_at_k(np.array([2, 1, 3]), rel, k=3) == pytest.approx(want)
    assert fidelity.ndcg_at_k(np.array([0]), rel, k=1) == 0.0
    assert fidelity.ndcg_at_k(np.array([0, 1]), np.zeros(4), k=2) == 1.0  # nothing to gain
    np.testing.assert_allclose(fidelity.minmax(np.array([2.0, 4.0, 3.0])), [0, 1, 0.5])


def test_held_out_refuses_a_training_seed() -> None:
    cards = [card(seed_train=1, seed_valid=2, seed_test=3), card(seed_train=9)]
    assert fidelity.training_seeds(cards) == {1, 2, 3, 9}
    with pytest.raises(ValueError, match="not held out"):
        fidelity.held_out_requests(cards, 10, 2, seed=9)
    held = fidelity.held_out_requests(cards, 10, 3, seed=4)
    assert held.ids.shape == (3, 10, len(logs_mod.FIELD_NAMES))
    assert held.true_ctr.shape == (3, 10)


def test_evaluate_on_known_scorers() -> None:
    held = fidelity.held_out_requests([card(seed_train=1)], 60, 3, seed=5)
    oracle, other = Oracle(), Hashed("h/1", 0)
    # The same scorer in both stages: the cascade is exact for any stage1_k >= 10.
    same = Pipeline([Stage(oracle, 20), Stage(oracle)], oracle, 5000)
    result = fidelity.evaluate(same, held, [10, 20, 60])
    for name in ("single", "deepfm_only", "cascade@10", "cascade@20", "cascade@60"):
        metrics = result["systems"][name]
        assert metrics["recall_vs_single"]["min"] == 1.0
        assert metrics["recall_vs_truth"]["min"] == 1.0  # the oracle is the truth
        assert metrics["ndcg_vs_truth"]["min"] == pytest.approx(1.0)
    # An unrelated first stage: exact only when it keeps everything.
    mixed = Pipeline([Stage(other, 20), Stage(oracle)], oracle, 5000)
    result = fidelity.evaluate(mixed, held, [10, 60])
    assert result["systems"]["cascade@60"]["recall_vs_single"]["min"] == 1.0
    assert result["systems"]["cascade@10"]["recall_vs_single"]["mean"] < 1.0
    assert result["systems"]["cascade@10"]["ndcg_vs_single"]["mean"] < 1.0
    for metrics in result["systems"].values():
        for m in metrics.values():
            assert 0.0 <= m["min"] <= m["mean"] <= m["max"] <= 1.0 + 1e-9


# -- latency helpers -----------------------------------------------------------------------
def test_ratio_ci_is_paired() -> None:
    rng = np.random.default_rng(0)
    a = [10.0, 20.0, 30.0, 40.0]
    same = ratio_ci(a, a, rng)
    assert same["point"] == 1.0
    assert same["ci95"] == [1.0, 1.0]  # resampled jointly: every bootstrap ratio is 1
    double = ratio_ci([2 * x for x in a], a, rng)
    assert double["point"] == 2.0
    with pytest.raises(ValueError):
        ratio_ci([1.0], [1.0, 2.0], rng)


def test_summary() -> None:
    s = summary([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["min"] == 1.0 and s["max"] == 100.0 and s["p50"] == 3.0 and s["count"] == 5
    assert s["p50"] <= s["p95"] <= s["p99"] <= s["max"]


@pytest.mark.parametrize(("variant", "stage1_k"), [(("single", None), None), (("multi", 50), 50)])
def test_rank_body_is_a_rank_request(variant: tuple, stage1_k: int | None) -> None:
    fragment = msgspec.json.encode([{"a": 1}, {"a": 2}])
    body = rank_body(fragment, 10, variant)
    request = msgspec.json.decode(body, type=RankRequest)
    assert bytes(request.candidates) == fragment
    assert request.top_k == 10
    assert request.stage1_k == stage1_k
    assert request.multi_stage is (variant[0] == "multi")


def test_grid_check() -> None:
    config = SimpleNamespace(max_candidates=5000)
    Grid(ns=(100,), stage1_ks=(50,), intras=(1,)).check(config)
    with pytest.raises(ValueError, match="top_k"):
        Grid(ns=(100,), stage1_ks=(5,), intras=(1,)).check(config)
    with pytest.raises(ValueError, match="max_candidates"):
        Grid(ns=(6000,), stage1_ks=(50,), intras=(1,)).check(config)
    assert Grid(stage1_ks=(50, 100)).variants() == [("single", None), ("multi", 50), ("multi", 100)]


def test_scaling_slope() -> None:
    raw = {("in-process", 1, n, ("single", None)): {"total": [n / 10.0] * 3} for n in (100, 1000)}
    (row,) = scaling(raw)
    assert row["n"] == [100, 1000]
    assert row["loglog_slope"] == pytest.approx(1.0)
    assert row["loglog_slope_top"] == pytest.approx(1.0)


def test_table_renders() -> None:
    table = Table("T", ["name", "x"], [["a", "1.00"], ["bbb", "22.00"]])
    assert table.text().splitlines() == ["T", "name      x", "a      1.00", "bbb   22.00"]
    assert table.markdown().splitlines()[2:4] == ["| name | x |", "|:--|--:|"]


# -- the pipeline's internal timings (RankResult.timings) ---------------------------------
def test_pipeline_timings_split_each_stage() -> None:
    ids = np.random.default_rng(0).integers(0, 7, size=(300, 16)).astype(np.int64)
    s1, s2 = Hashed("a/1", 1), Hashed("b/1", 2)
    pipe = Pipeline([Stage(s1, 100), Stage(s2)], s2, 5000)
    multi = pipe.rank(ids, 10, 100)
    assert set(multi.timings) == {
        "stage1_model_ms",
        "stage1_cut_ms",
        "stage2_model_ms",
        "stage2_cut_ms",
    }
    for stage in ("stage1", "stage2"):
        model, cut = multi.timings[f"{stage}_model_ms"], multi.timings[f"{stage}_cut_ms"]
        assert model > 0 and cut >= 0
        assert model + cut == pytest.approx(multi.latency[f"{stage}_ms"])
    single = pipe.rank(ids, 10, multi_stage=False)
    assert single.timings["stage1_model_ms"] == single.timings["stage1_cut_ms"] == 0.0
    assert single.timings["stage2_model_ms"] > 0
    # The wire keys are unchanged.
    assert set(single.latency) == set(multi.latency) == {"stage1_ms", "stage2_ms", "total_ms"}
