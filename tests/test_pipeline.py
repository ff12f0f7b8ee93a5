"""app.pipeline: the cascade against a brute-force reference, with deterministic scorers."""

from __future__ import annotations

import time

import numpy as np
import pytest

from app.breaker import Breaker
from app.deadlines import Deadline
from app.errors import DeadlineExceeded, InvalidRequest, ModelError, StageTimeout
from app.pipeline import CostModel, Pipeline, Popularity, Stage, top_indices


class FakeScorer:
    """A deterministic scorer: a hash of each row into a few levels (ties are common).

    ``levels`` bounds the distinct scores, so ties happen and the index tie-break is
    exercised. Every batch it sees is recorded.
    """

    def __init__(self, key: str, seed: int, levels: int = 7) -> None:
        self.key = key
        self.weights = np.random.default_rng(seed).integers(1, 1000, size=4)
        self.levels = levels
        self.batches: list[np.ndarray] = []

    def run(self, ids: np.ndarray, run_options: object = None) -> np.ndarray:
        self.batches.append(ids.copy())
        return (((ids @ self.weights) % self.levels) / self.levels).astype(np.float32)


class ColumnScorer:
    """Score = one column of the ids (as float32): the caller builds the ties it wants."""

    def __init__(self, key: str, column: int = 0) -> None:
        self.key, self.column = key, column
        self.batches: list[np.ndarray] = []

    def run(self, ids: np.ndarray, run_options: object = None) -> np.ndarray:
        self.batches.append(ids.copy())
        return ids[:, self.column].astype(np.float32)


def reference(
    ids: np.ndarray, scorers: list, keeps: list[int | None], top_k: int, stage1_k: int
) -> tuple[list[int], list[float]]:
    """The cascade by brute force: score, sort by (-score, index), cut, pass on in order."""
    alive = list(range(len(ids)))
    for i, scorer in enumerate(scorers):
        scores = [float(s) for s in scorer.run(ids[alive])]
        order = sorted(range(len(alive)), key=lambda j: (-scores[j], alive[j]))
        if i == len(scorers) - 1:
            best = order[:top_k]
            return [alive[j] for j in best], [scores[j] for j in best]
        keep = stage1_k if i == 0 else (keeps[i] or len(alive))
        alive = sorted(alive[j] for j in order[:keep])
    raise AssertionError("unreachable")


def random_ids(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, [7, 24, 35, 400], size=(n, 4)).astype(np.int64)


def two_stage(stage1_keep: int | None = 100, max_candidates: int = 5000, levels: int = 7):
    s1, s2 = FakeScorer("deepfm/1", 1, levels), FakeScorer("autoint/1", 2, levels)
    return Pipeline([Stage(s1, stage1_keep), Stage(s2)], s2, max_candidates), s1, s2


# -- against the reference -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "top_k", "stage1_k"),
    [
        (1, 1, 1),
        (5, 1, 5),
        (10, 3, 5),
        (50, 10, 20),
        (200, 10, 100),
        (200, 1, 2),
        (200, 50, 50),
        (1000, 10, 100),
        (1000, 100, 999),
        (30, 5, 40),  # stage1_k > n
        (30, 40, 40),  # top_k > n
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("levels", [3, 1000])
def test_two_stage_matches_brute_force(
    n: int, top_k: int, stage1_k: int, seed: int, levels: int
) -> None:
    ids = random_ids(n, seed)
    pipe, s1, s2 = two_stage(levels=levels)
    result = pipe.rank(ids, top_k, stage1_k)
    ref_s1, ref_s2 = FakeScorer("r1", 1, levels), FakeScorer("r2", 2, levels)
    want_idx, want_scores = reference(ids, [ref_s1, ref_s2], [None, None], top_k, stage1_k)
    assert result.indices.tolist() == want_idx
    assert result.scores.tolist() == want_scores
    assert result.scores.dtype == np.float32
    assert result.n_input == n
    assert result.after_stage1 == min(stage1_k, n)
    # Stage 1 saw the whole request; stage 2 exactly the survivors, in request order.
    np.testing.assert_array_equal(s1.batches[0], ids)
    np.testing.assert_array_equal(s2.batches[0], ref_s2.batches[0])


@pytest.mark.parametrize(
    ("n", "top_k", "stage1_k", "middle"),
    [(300, 10, 100, 30), (300, 10, 100, None), (300, 5, 50, 200), (40, 3, 100, 20)],
)
@pytest.mark.parametrize("seed", [3, 4])
def test_three_stage_matches_brute_force(
    n: int, top_k: int, stage1_k: int, middle: int | None, seed: int
) -> None:
    ids = random_ids(n, seed)
    scorers = [FakeScorer(f"m{i}/1", 10 + i, levels=11) for i in range(3)]
    pipe = Pipeline(
        [Stage(scorers[0], 100), Stage(scorers[1], middle), Stage(scorers[2])], scorers[2], 5000
    )
    result = pipe.rank(ids, top_k, stage1_k)
    refs = [FakeScorer("r", 10 + i, levels=11) for i in range(3)]
    want_idx, want_scores = reference(ids, refs, [None, middle, None], top_k, stage1_k)
    assert result.indices.tolist() == want_idx
    assert result.scores.tolist() == want_scores
    for got, ref in zip(scorers, refs, strict=True):
        assert len(got.batches) == 1
        np.testing.assert_array_equal(got.batches[0], ref.batches[0])
    after1 = min(stage1_k, n)
    assert [len(s.batches[0]) for s in scorers] == [n, after1, min(middle or after1, after1)]
    assert result.after_stage1 == after1
    assert set(result.latency) == {"stage1_ms", "stage2_ms", "stage3_ms", "total_ms"}
    assert result.models == ["m0/1", "m1/1", "m2/1"]


# -- ties, cuts and clamps -----------------------------------------------------------------
def test_ties_are_broken_by_request_index() -> None:
    # Column 0 is the score: 5 appears at indices 1, 3, 4 and 6; 9 at 2 and 5.
    col = [1, 5, 9, 5, 5, 9, 5, 0]
    ids = np.array([[c, 0, 0, 0] for c in col], dtype=np.int64)
    s1, s2 = ColumnScorer("a/1"), ColumnScorer("b/1")
    pipe = Pipeline([Stage(s1, 5), Stage(s2)], s2, 100)
    result = pipe.rank(ids, top_k=4, stage1_k=5)
    assert result.indices.tolist() == [2, 5, 1, 3]
    assert result.scores.tolist() == [9.0, 9.0, 5.0, 5.0]
    # Stage 1 kept 9, 9, 5, 5, 5 (indices 2, 5, 1, 3, 4): index 6 lost its tie to 4.
    np.testing.assert_array_equal(s2.batches[0][:, 0], [5, 9, 5, 5, 9])


def test_all_equal_scores_keep_request_order() -> None:
    ids = np.zeros((50, 4), dtype=np.int64)
    s1, s2 = ColumnScorer("a/1"), ColumnScorer("b/1")
    result = Pipeline([Stage(s1, 20), Stage(s2)], s2, 100).rank(ids, 10, 20)
    assert result.indices.tolist() == list(range(10))


def test_second_stage_reorders_the_survivors() -> None:
    # Stage 1 ranks by column 0, stage 2 by column 1 (reversed preference).
    ids = np.array([[i, 10 - i, 0, 0] for i in range(10)], dtype=np.int64)
    s1, s2 = ColumnScorer("a/1", 0), ColumnScorer("b/1", 1)
    result = Pipeline([Stage(s1, 4), Stage(s2)], s2, 100).rank(ids, 2, 4)
    assert result.after_stage1 == 4
    np.testing.assert_array_equal(s2.batches[0][:, 0], [6, 7, 8, 9])  # index order
    assert result.indices.tolist() == [6, 7]
    assert result.scores.tolist() == [4.0, 3.0]


@pytest.mark.parametrize("stage1_k", [30, 31, 5000])
def test_stage1_k_at_or_above_n_skips_the_cut(stage1_k: int) -> None:
    ids = random_ids(30, 0)
    pipe, s1, s2 = two_stage()
    result = pipe.rank(ids, 10, stage1_k)
    assert result.after_stage1 == 30
    assert len(s1.batches) == len(s2.batches) == 1
    np.testing.assert_array_equal(s2.batches[0], ids)


@pytest.mark.parametrize(("n", "top_k", "expected"), [(3, 10, 3), (10, 10, 10), (11, 10, 10)])
def test_top_k_above_n_clamps(n: int, top_k: int, expected: int) -> None:
    pipe, _, _ = two_stage()
    result = pipe.rank(random_ids(n, 1), top_k, 50)
    assert len(result.indices) == len(result.scores) == expected
    assert sorted(result.indices.tolist()) == sorted(set(result.indices.tolist()))


@pytest.mark.parametrize(("top_k", "stage1_k"), [(11, 10), (101, None), (2, 1)])
def test_top_k_above_stage1_k_is_invalid(top_k: int, stage1_k: int | None) -> None:
    pipe, s1, _ = two_stage(stage1_keep=100)
    with pytest.raises(InvalidRequest) as info:
        pipe.rank(random_ids(500, 0), top_k, stage1_k)
    assert info.value.field == "top_k"
    assert not s1.batches  # nothing was scored


def test_stage1_k_above_max_candidates_is_invalid() -> None:
    pipe, _, _ = two_stage(max_candidates=50)
    with pytest.raises(InvalidRequest) as info:
        pipe.rank(random_ids(10, 0), 5, 51)
    assert info.value.field == "stage1_k"
    assert pipe.rank(random_ids(10, 0), 5, 50).after_stage1 == 10


@pytest.mark.parametrize(("keep", "expected"), [(7, 7), (None, 100)])
def test_default_stage1_k_comes_from_the_first_stage(keep: int | None, expected: int) -> None:
    pipe, _, _ = two_stage(stage1_keep=keep)
    assert pipe.default_stage1_k == expected
    assert pipe.rank(random_ids(500, 0), 5).after_stage1 == expected


@pytest.mark.parametrize(("n", "top_k", "stage1_k"), [(1, 1, 1), (40, 5, 10), (40, 10, 60)])
def test_resolve_ks(n: int, top_k: int, stage1_k: int) -> None:
    pipe, _, _ = two_stage()
    assert pipe.resolve_ks(n, top_k, stage1_k) == (min(top_k, n), min(stage1_k, n))


# -- single stage --------------------------------------------------------------------------
def test_multi_stage_false_uses_the_baseline_only() -> None:
    s1, s2 = FakeScorer("deepfm/1", 1), FakeScorer("autoint/1", 2)
    base = FakeScorer("base/1", 3)
    pipe = Pipeline([Stage(s1, 20), Stage(s2)], base, 5000)
    ids = random_ids(100, 5)
    result = pipe.rank(ids, 10, 20, multi_stage=False)
    assert not s1.batches
    assert not s2.batches
    assert len(base.batches) == 1
    np.testing.assert_array_equal(base.batches[0], ids)  # scores everything, no cut
    want, want_scores = reference(ids, [FakeScorer("r", 3)], [None], 10, 20)
    assert result.indices.tolist() == want
    assert result.scores.tolist() == want_scores
    assert result.after_stage1 == 100
    assert result.models == ["base/1"]
    assert set(result.latency) == {"stage1_ms", "stage2_ms", "total_ms"}
    assert result.latency["stage1_ms"] == 0.0
    assert 0.0 < result.latency["stage2_ms"] <= result.latency["total_ms"]


def test_multi_stage_latency_and_models() -> None:
    pipe, _, _ = two_stage()
    result = pipe.rank(random_ids(100, 0), 10, 50)
    assert result.models == ["deepfm/1", "autoint/1"]
    assert set(result.latency) == {"stage1_ms", "stage2_ms", "total_ms"}
    assert result.latency["stage1_ms"] > 0.0
    assert result.latency["stage2_ms"] > 0.0
    total = result.latency["total_ms"]
    assert result.latency["stage1_ms"] + result.latency["stage2_ms"] <= total


def test_a_one_stage_pipeline() -> None:
    s = FakeScorer("only/1", 4)
    ids = random_ids(60, 2)
    result = Pipeline([Stage(s, 30)], s, 5000).rank(ids, 5, 30)
    want, _ = reference(ids, [FakeScorer("r", 4)], [None], 5, 30)
    assert result.indices.tolist() == want
    assert result.after_stage1 == 60  # the only stage is also the last: no stage-1 cut
    assert set(result.latency) == {"stage1_ms", "total_ms"}


def test_a_pipeline_needs_a_stage() -> None:
    with pytest.raises(ValueError, match="at least one stage"):
        Pipeline([], FakeScorer("x/1", 0), 10)


# -- top_indices ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("scores", "positions", "k", "expected"),
    [
        ([0.1, 0.9, 0.5], [0, 1, 2], 2, [1, 2]),
        ([0.5, 0.5, 0.5], [2, 0, 1], 2, [1, 2]),  # tie: smallest position first
        ([0.5, 0.9, 0.5], [9, 4, 3], 3, [1, 2, 0]),
        ([0.2, 0.1], [0, 1], 5, [0, 1]),
        ([-1.0, 0.0, 1.0], [0, 1, 2], 1, [2]),
    ],
)
def test_top_indices(scores: list[float], positions: list[int], k: int, expected: list[int]):
    got = top_indices(np.array(scores, dtype=np.float32), np.array(positions), k)
    assert got.tolist() == expected


# -- deadlines, breakers, fallback -------------------------------------------------------------
class FailingScorer(FakeScorer):
    """Raises like a model whose run fails (ORT error or non-finite scores)."""

    def __init__(self, key: str, seed: int, error: type[Exception] = ModelError) -> None:
        super().__init__(key, seed)
        self.error, self.calls = error, 0

    def run(self, ids: np.ndarray, run_options: object = None) -> np.ndarray:
        self.calls += 1
        raise self.error(f"model {self.key} failed to score the batch")


def guarded(s1, s2, fallback=None, failures: int = 2, clock=None):
    breakers = {s.key: Breaker(s.key, failures, 5.0, clock or time.monotonic) for s in {s1, s2}}
    return Pipeline([Stage(s1, 20), Stage(s2)], s2, 5000, breakers, fallback)


POPULAR = {"fields": {"creative": {"top_ids": [7, 3, 11], "top_shares": [0.5, 0.3, 0.1]}}}


def test_stage2_failure_answers_with_stage1_order_marked_degraded() -> None:
    s1, s2 = FakeScorer("deepfm/1", 1), FailingScorer("autoint/1", 2)
    ids = random_ids(200, 3)
    result = guarded(s1, s2).rank(ids, 10, 20)
    want, want_scores = reference(ids, [s1], [None], 10, 10)
    assert result.indices.tolist() == want
    assert result.scores.tolist() == pytest.approx(want_scores)
    assert (result.degraded, result.answered_by, result.reason) == (True, "stage1", "stage_error")
    assert result.after_stage1 == 20 and result.latency["stage2_ms"] == 0.0
    assert result.models == ["deepfm/1"]


def test_breaker_opens_and_stops_calling_the_failing_stage() -> None:
    s1, s2 = FakeScorer("deepfm/1", 1), FailingScorer("autoint/1", 2)
    pipe = guarded(s1, s2, failures=2)
    ids = random_ids(100, 4)
    reasons = [pipe.rank(ids, 10, 20).reason for _ in range(4)]
    assert reasons == ["stage_error", "stage_error", "breaker_open", "breaker_open"]
    assert s2.calls == 2
    assert pipe.failures["autoint/1", "stage_error"] == 2


def test_breaker_trial_closes_it_when_the_model_recovers() -> None:
    clock = [0.0]
    s1, s2 = FakeScorer("deepfm/1", 1), FailingScorer("autoint/1", 2)
    pipe = guarded(s1, s2, failures=1, clock=lambda: clock[0])
    ids = random_ids(100, 5)
    assert pipe.rank(ids, 10, 20).reason == "stage_error"
    assert pipe.rank(ids, 10, 20).reason == "breaker_open"
    healthy = FakeScorer("autoint/1", 2)
    pipe.stages = (pipe.stages[0], Stage(healthy))  # the model recovers
    clock[0] += 5.0
    result = pipe.rank(ids, 10, 20)
    assert not result.degraded and result.answered_by == "stage2"
    assert pipe.breakers["autoint/1"].state == "closed"


def test_stage_that_does_not_fit_the_deadline_is_skipped_without_running() -> None:
    s1, s2 = FakeScorer("deepfm/1", 1), FakeScorer("autoint/1", 2)
    pipe = guarded(s1, s2)
    pipe.costs["autoint/1"].calibrate(1.0, 1000, 10_000.0)  # ~10 ms per row: never fits
    result = pipe.rank(random_ids(100, 6), 10, 20, deadline=Deadline(200))
    assert (result.answered_by, result.reason) == ("stage1", "deadline")
    assert len(s2.batches) == 0


def test_stopped_run_counts_as_a_timeout() -> None:
    s1, s2 = FakeScorer("deepfm/1", 1), FailingScorer("autoint/1", 2, StageTimeout)
    pipe = guarded(s1, s2)
    result = pipe.rank(random_ids(100, 7), 10, 20, deadline=Deadline(1000))
    assert result.reason == "stage_timeout" and result.answered_by == "stage1"
    assert pipe.failures["autoint/1", "stage_timeout"] == 1


def test_first_stage_failure_falls_back_to_popular_items() -> None:
    s1, s2 = FailingScorer("deepfm/1", 1), FakeScorer("autoint/1", 2)
    popular = Popularity(["weekday", "creative"], POPULAR)
    ids = np.array([[0, 3], [1, 99], [2, 7], [3, 11], [4, 7], [5, 0]], dtype=np.int64)
    result = guarded(s1, s2, fallback=popular).rank(ids, 4, 6)
    # creative 7 (0.5) at rows 2 and 4, then 3 (0.3) at row 0, then 11 (0.1) at row 3.
    assert result.indices.tolist() == [2, 4, 0, 3]
    assert result.scores.tolist() == pytest.approx([0.5, 0.5, 0.3, 0.1])
    assert (result.answered_by, result.fallback, result.reason) == (
        "fallback",
        "popular",
        "stage_error",
    )
    assert result.models == [] and len(s2.batches) == 0


def test_without_fallback_errors_surface() -> None:
    ids = random_ids(50, 8)
    s1, s2 = FailingScorer("deepfm/1", 1), FakeScorer("autoint/1", 2)
    with pytest.raises(ModelError):
        guarded(s1, s2).rank(ids, 5, 10)
    s1, s2 = FakeScorer("deepfm/1", 1), FakeScorer("autoint/1", 2)
    pipe = guarded(s1, s2)
    pipe.costs["deepfm/1"].calibrate(1.0, 1000, 10_000.0)
    with pytest.raises(DeadlineExceeded):
        pipe.rank(ids, 5, 10, deadline=Deadline(50))


def test_single_stage_degrades_straight_to_the_fallback() -> None:
    s1, s2 = FakeScorer("deepfm/1", 1), FailingScorer("autoint/1", 2)
    popular = Popularity(["weekday", "creative"], POPULAR)
    ids = np.array([[0, 11], [1, 7]], dtype=np.int64)
    result = guarded(s1, s2, fallback=popular).rank(ids, 2, None, multi_stage=False)
    assert result.indices.tolist() == [1, 0] and result.answered_by == "fallback"


def test_cost_model_learns_from_runs() -> None:
    cost = CostModel()
    cost.calibrate(0.5, 1000, 10.5)
    assert cost.estimate(1000) == pytest.approx(10.5)
    for _ in range(200):
        cost.observe(1000, 20.5)
    assert cost.estimate(1000) == pytest.approx(20.5, rel=0.01)
    cost.observe(5, 1000.0)  # tiny batches do not move the per-row cost
    assert cost.estimate(1000) == pytest.approx(20.5, rel=0.01)
