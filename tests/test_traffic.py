"""app.traffic: the A/B router, comparisons, the canary controller; and the Farm's use
of them over fake models (variants, shadow, canary)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
from prometheus_client import REGISTRY

from app.config import CanaryConfig, load
from app.schema import RankRequest
from app.service import Farm
from app.traffic import (
    CANARY,
    STABLE,
    CanaryController,
    Comparator,
    Comparison,
    Router,
    breached,
    key_point,
    overlap,
    quantile,
    step_figures,
)
from tests.fake_models import FIELDS, write_model

KEYS = [f"user-{i}" for i in range(10_000)]


# -- router --------------------------------------------------------------------------------
def test_split_follows_the_weights_within_two_points_over_10k_keys() -> None:
    weights = [("a", 0.7), ("b", 0.2), ("c", 0.1)]
    router = Router(weights, "salt")
    counts = Counter(router.choose(k) for k in KEYS)
    for name, weight in weights:
        assert abs(counts[name] / len(KEYS) - weight) <= 0.02, counts


def test_a_key_always_lands_on_the_same_variant_and_the_salt_reshuffles() -> None:
    one, two = Router([("a", 0.5), ("b", 0.5)], "s1"), Router([("a", 0.5), ("b", 0.5)], "s1")
    assert [one.choose(k) for k in KEYS[:500]] == [two.choose(k) for k in KEYS[:500]]
    other = Router([("a", 0.5), ("b", 0.5)], "s2")
    moved = sum(one.choose(k) != other.choose(k) for k in KEYS[:1000])
    assert 350 < moved < 650  # independent hashes: about half move
    assert 0.0 <= key_point("x", "s1") < 1.0


def test_a_growing_canary_keeps_its_keys() -> None:
    router = Router([(CANARY, 0.05), (STABLE, 0.95)], "s")
    early = {k for k in KEYS if router.choose(k) == CANARY}
    router.set_weights([(CANARY, 0.25), (STABLE, 0.75)])
    later = {k for k in KEYS if router.choose(k) == CANARY}
    assert early < later
    router.set_weights([(CANARY, 0.0), (STABLE, 1.0)])
    assert all(router.choose(k) == STABLE for k in KEYS[:1000])


# -- helpers -------------------------------------------------------------------------------
def test_overlap() -> None:
    assert overlap(np.array([1, 2, 3, 4]), np.array([4, 3, 9, 8])) == 0.5
    assert overlap(np.array([], dtype=int), np.array([1])) is None
    assert overlap(None, np.array([1])) is None


def test_quantile_interpolates_like_prometheus() -> None:
    samples = np.random.default_rng(0).exponential(0.02, 20_000)
    les = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "+Inf"]
    cumulative = [(le, float((samples <= float(le)).sum())) for le in les]
    got = quantile(cumulative, 0.99)
    assert got is not None and abs(got - np.quantile(samples, 0.99)) < 0.015
    assert quantile([("0.1", 0.0), ("+Inf", 0.0)], 0.99) is None


# -- comparator ----------------------------------------------------------------------------
class Ranked:
    def __init__(self, indices: list[int], kept: list[int] | None) -> None:
        self.indices = np.array(indices)
        self.stage1_kept = None if kept is None else np.array(kept)


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_comparator_records_agreement_and_drops_when_busy() -> None:
    labels = {"comparison": "shadow", "what": "topk"}
    count0 = sample("ctr_farm_agreement_count", labels)
    sum0 = sample("ctr_farm_agreement_sum", labels)
    dropped0 = sample("ctr_farm_compare_dropped_total", {"comparison": "shadow"})
    comparator = Comparator(max_queue=1)
    release = threading.Event()
    reference = Ranked([1, 2, 3, 4], [1, 2, 3, 4, 5, 6])

    def blocked() -> Ranked:
        release.wait(5)
        return Ranked([1, 2, 9, 8], [1, 2, 3, 4, 5, 7])

    try:
        comparator.submit(Comparison("shadow", blocked, reference))  # running
        deadline = threading.Event()
        while comparator._queue.qsize() and not deadline.wait(0.005):
            pass
        assert comparator.submit(Comparison("shadow", blocked, reference))  # queued
        assert not comparator.submit(Comparison("shadow", blocked, reference))  # full
        release.set()
        comparator.drain()
    finally:
        comparator.close()
    assert comparator.done == 2
    assert sample("ctr_farm_agreement_count", labels) - count0 == 2
    assert sample("ctr_farm_agreement_sum", labels) - sum0 == pytest.approx(1.0)  # 0.5 twice
    assert sample("ctr_farm_compare_dropped_total", {"comparison": "shadow"}) - dropped0 == 1
    stage1 = sample("ctr_farm_agreement_sum", {"comparison": "shadow", "what": "stage1"})
    assert stage1 >= 2 * 5 / 6 - 1e-9


# -- canary controller ---------------------------------------------------------------------
class FakeMetrics:
    """A farm-wide snapshot that tests move forward by hand."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {
            v: {"requests": 0.0, "errors": 0.0, "buckets": {"0.01": 0.0, "0.05": 0.0, "+Inf": 0.0}}
            for v in (CANARY, STABLE)
        }
        self.data["agreement"] = {w: {"sum": 0.0, "count": 0.0} for w in ("topk", "stage1")}

    def add(self, variant: str, n: int, errors: int = 0, slow: bool = False) -> None:
        row = self.data[variant]
        row["requests"] += n
        row["errors"] += errors
        for le in row["buckets"]:
            if le == "+Inf" or (float(le) >= 0.05 if slow else float(le) >= 0.01):
                row["buckets"][le] += n

    def agree(self, what: str, value: float, n: int) -> None:
        self.data["agreement"][what]["sum"] += value * n
        self.data["agreement"][what]["count"] += n

    def __call__(self) -> dict[str, Any]:
        import copy

        return copy.deepcopy(self.data)


PLAN = CanaryConfig(steps=(0.1, 0.5, 1.0), step_s=10, min_requests=20)


def controller(tmp_path: Path, fake: FakeMetrics, now: list[float]) -> CanaryController:
    return CanaryController(PLAN, tmp_path, Router([], "s"), fake, clock=lambda: now[0])


def test_canary_walks_the_plan_and_is_promoted(tmp_path: Path) -> None:
    fake, now = FakeMetrics(), [1000.0]
    ctl = controller(tmp_path, fake, now)
    try:
        assert ctl.tick().weight == 0.1 and ctl.router.weights[CANARY] == 0.1
        now[0] += 11
        assert ctl.tick().step == 0  # time is up, but too few canary requests
        fake.add(CANARY, 30)
        fake.add(STABLE, 300)
        state = ctl.tick()
        assert (state.step, state.weight, state.status) == (1, 0.5, "running")
        fake.add(CANARY, 30)
        fake.add(STABLE, 30)
        assert ctl.tick().step == 1  # the new step's clock starts now
        now[0] += 11
        ctl.tick()
        now[0] += 11
        fake.add(CANARY, 25)
        state = ctl.tick()
        assert (state.status, state.weight) == ("promoted", 1.0)
        assert ctl.router.weights == {CANARY: 1.0, STABLE: 0.0}
    finally:
        ctl.close()


@pytest.mark.parametrize("fault", ["errors", "slow", "topk", "stage1"])
def test_canary_rolls_back_on_a_breach(tmp_path: Path, fault: str) -> None:
    fake, now = FakeMetrics(), [0.0]
    ctl = controller(tmp_path, fake, now)
    try:
        ctl.tick()
        fake.add(STABLE, 100, errors=1)
        fake.add(CANARY, 40, errors=4 if fault == "errors" else 0, slow=fault == "slow")
        if fault in ("topk", "stage1"):
            fake.agree(fault, 0.3, 12)
        state = ctl.tick()
        assert state.status == "rolled_back" and state.weight == 0.0
        assert ctl.router.weights[CANARY] == 0.0
        assert state.reason
        now[0] += 100
        assert ctl.tick().status == "rolled_back"  # and stays there
    finally:
        ctl.close()


def test_within_bounds_is_not_a_breach() -> None:
    fake = FakeMetrics()
    before = fake()
    fake.add(STABLE, 100, errors=1)
    fake.add(CANARY, 50)
    fake.agree("topk", 0.9, 20)
    fake.agree("stage1", 0.95, 20)
    assert breached(PLAN, step_figures(before, fake())) is None


def test_one_worker_leads_the_others_follow_and_take_over(tmp_path: Path) -> None:
    fake, now = FakeMetrics(), [0.0]
    leader, follower = controller(tmp_path, fake, now), controller(tmp_path, fake, now)
    try:
        leader.tick()
        follower.tick()
        assert leader.leading and not follower.leading
        fake.add(CANARY, 30)
        fake.add(STABLE, 30)
        now[0] += 11
        assert leader.tick().weight == 0.5
        assert follower.tick().weight == 0.5 and follower.router.weights[CANARY] == 0.5
        leader.close()  # the leading worker exits: its flock goes with it
        assert follower.tick().step == 1 and follower.leading
    finally:
        leader.close()
        follower.close()


# -- the Farm with variants, shadow, canary ------------------------------------------------
@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_model(tmp_path, "deepfm", seed=1)
    write_model(tmp_path, "autoint", seed=2)
    write_model(tmp_path, "autoint", version="2", seed=9)
    return tmp_path


def farm_for(root: Path, **traffic: Any) -> Farm:
    config = load(
        overrides={
            "deepfm_model": str(root / "deepfm"),
            "autoint_model": str(root / "autoint" / "1"),
            "warmup_runs": 0,
            "inference": "inline",
            "run_dir": str(root / "run"),
            **traffic,
        },
        env={},
    )
    config.run_path.mkdir(parents=True, exist_ok=True)
    farm = Farm(config)
    farm.load()
    return farm


@pytest.fixture
def ab(root: Path) -> Iterator[Farm]:
    farm = farm_for(
        root,
        variants=[
            {"name": "control", "weight": 0.8},
            {"name": "treatment", "weight": 0.2, "autoint_model": str(root / "autoint" / "2")},
        ],
    )
    yield farm
    farm.close()


def batch(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, [v for _, v in FIELDS], size=(n, len(FIELDS))).astype(np.int64)


def test_variants_get_their_own_models_and_share_the_rest(ab: Farm) -> None:
    lineups = ab.lineups
    assert list(lineups) == ["control", "treatment"]
    assert [m.key for m in lineups["control"].models.values()] == ["deepfm/1", "autoint/1"]
    assert [m.key for m in lineups["treatment"].models.values()] == ["deepfm/1", "autoint/2"]
    # One session pool per version, shared by the variants that use it.
    assert lineups["control"].models["deepfm"] is lineups["treatment"].models["deepfm"]
    counts = Counter(ab.route(k) for k in KEYS)
    assert abs(counts["treatment"] / len(KEYS) - 0.2) <= 0.02
    status = ab.traffic_status()
    assert status.weights == {"control": 0.8, "treatment": 0.2}
    assert status.lineups["treatment"] == ["deepfm/1", "autoint/2"]


def rank_request(n: int, seed: int = 0, **fields: Any) -> RankRequest:
    return RankRequest(
        candidates=msgspec.Raw(msgspec.json.encode(batch(n, seed).tolist())), **fields
    )


def test_shadow_compares_off_the_request_path(root: Path) -> None:
    farm = farm_for(root, shadow={"autoint_model": str(root / "autoint" / "2"), "share": 1.0})
    labels = {"comparison": "shadow", "what": "topk"}
    before = sample("ctr_farm_agreement_count", labels)
    try:
        assert farm.traffic_status().shadow == ["deepfm/1", "autoint/2"]
        served = farm.rank(rank_request(60, top_k=5, stage1_k=20), "json")
        assert served.variant == STABLE and served.models == ["deepfm/1", "autoint/1"]
        assert farm.comparator is not None
        farm.comparator.drain()
        assert sample("ctr_farm_agreement_count", labels) - before == 1
    finally:
        farm.close()


def test_a_ranking_is_served_by_its_variant(ab: Farm) -> None:
    for variant, version in (("control", "1"), ("treatment", "2")):
        result = ab.rank(rank_request(50, top_k=3, stage1_k=10), "json", variant=variant)
        assert result.variant == variant
        assert result.models == ["deepfm/1", f"autoint/{version}"]


def test_a_canary_farm_starts_on_the_first_step(root: Path) -> None:
    canary = {"autoint_model": str(root / "autoint" / "2"), "steps": [0.3, 1.0]}
    farm = farm_for(root, canary=canary)
    try:
        status = farm.traffic_status()
        assert status.weights == {CANARY: 0.3, STABLE: 0.7}
        assert status.canary is not None and status.canary.status == "running"
        assert status.lineups[CANARY] == ["deepfm/1", "autoint/2"]
        on_canary = next(k for k in KEYS if farm.route(k) == CANARY)
        result = farm.rank(
            rank_request(40, top_k=3, stage1_k=10), "json", variant=on_canary and CANARY
        )
        assert result.models[-1] == "autoint/2"
    finally:
        farm.close()
