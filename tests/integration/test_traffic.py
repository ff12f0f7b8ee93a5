"""A/B split, canary rollback and shadow traffic through the real nginx + gunicorn + 2
workers, each test on its own stack.

- A/B: 10k ``/predict`` requests with 10k user keys; the variant counts summed over
  both workers in ``/metrics`` equal what the hash gives client-side, within +-2 points
  of the configured weights, and every answer names its variant.
- Canary: a version whose model returns NaN (fault-injected) as the canary; the
  controller rolls it back on its error rate, and stable answers everything after.
- Shadow: ranking p50 with every request shadowed vs the same stack shape without,
  and the shadow's agreement with the served answer recorded.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import numpy as np
import pytest

from app.config import Config
from app.sessions import read_card
from app.stack import Stack
from app.traffic import CANARY, STABLE, Router
from benchmarks.openloop import run_closed_loop
from benchmarks.ranking import candidates
from benchmarks.soak import OpenLoad
from tests.fake_models import copy_as_version, write_model
from tests.integration.conftest import metric_sum_at, start_stack

pytestmark = pytest.mark.integration

KEYS = [f"user-{i}" for i in range(10_000)]


def copy_version(models: Path, name: str, version: str) -> Path:
    """``name`` version 1's weights as another version (a different model key)."""
    return copy_as_version(models / name / "1", models / name / version, version)


def one_candidate(config: Config, rng: np.random.Generator) -> dict[str, int]:
    return candidates(read_card(config.model_dirs()["autoint"]), 1, rng)[0]


# -- A/B -----------------------------------------------------------------------------------
WEIGHTS = {"control": 0.7, "treatment": 0.3}


@pytest.fixture(scope="module")
def ab_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    def settings(models: Path) -> dict[str, object]:
        copy_version(models, "autoint", "2")
        return {
            "autoint_model": str(models / "autoint" / "1"),
            "variants": [
                {"name": "control", "weight": WEIGHTS["control"]},
                {
                    "name": "treatment",
                    "weight": WEIGHTS["treatment"],
                    "autoint_model": str(models / "autoint" / "2"),
                },
            ],
        }

    yield from start_stack(request, prefix="farm-ab-", settings=settings)


def test_ab_split_over_10k_keys_matches_the_weights(ab_stack: Stack) -> None:
    config = ab_stack.config
    rng = np.random.default_rng(0)
    candidate = one_candidate(config, rng)
    mix = [("/predict", msgspec.json.encode({"candidate": candidate, "user_key": k})) for k in KEYS]
    shots = OpenLoad(ab_stack.url, mix, rate=1000.0, duration_s=len(KEYS) / 1000.0).start().join()
    assert Counter(s.status for s in shots) == {200: len(KEYS)}

    expected = Counter(Router(list(WEIGHTS.items()), config.split_salt).choose(k) for k in KEYS)
    served = {
        v: metric_sum_at(
            ab_stack.url, "ctr_farm_variant_requests_total", variant=v, endpoint="/predict"
        )
        for v in WEIGHTS
    }
    print({"expected": dict(expected), "served (metrics, both workers)": served})
    assert served == {v: float(expected[v]) for v in WEIGHTS}
    for variant, weight in WEIGHTS.items():
        assert abs(served[variant] / len(KEYS) - weight) <= 0.02
    # Each answer names its variant, the same for the header and the body field.
    router = Router(list(WEIGHTS.items()), config.split_salt)
    body = {"candidates": [candidate] * 30, "stage1_k": 10}
    with httpx.Client(base_url=ab_stack.url, timeout=30) as client:
        for key in KEYS[:20]:
            want = router.choose(key)
            resp = client.post("/rank", json=body, headers={"X-User-Key": key})
            body_out = resp.json()
            assert resp.headers["X-Variant"] == body_out["variant"] == want
            assert body_out["models"][-1] == ("autoint/2" if want == "treatment" else "autoint/1")


# -- canary --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def canary_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    def settings(models: Path) -> dict[str, object]:
        card = read_card(models / "autoint" / "1")
        fields = tuple((f.name, f.vocab_size) for f in card.fields)
        bad = write_model(models, "autoint", version="2", fields=fields, kind="nan")
        return {
            "autoint_model": str(models / "autoint" / "1"),
            "canary": {
                "autoint_model": str(bad),
                "steps": [0.5, 1.0],
                "step_s": 60,
                "min_requests": 20,
            },
        }

    yield from start_stack(request, prefix="farm-can-", settings=settings)


def canary_state(stack: Stack) -> dict[str, object]:
    return httpx.get(f"{stack.url}/models", timeout=10).json()["traffic"]["canary"]


def test_a_failing_canary_is_rolled_back(canary_stack: Stack) -> None:
    config = canary_stack.config
    rng = np.random.default_rng(1)
    card = read_card(config.model_dirs()["autoint"])
    mix = [
        (
            "/rank",
            msgspec.json.encode(
                {"candidates": candidates(card, 200, rng), "stage1_k": 50, "user_key": k}
            ),
        )
        for k in KEYS[:200]
    ]
    assert canary_state(canary_stack)["status"] == "running"
    load = OpenLoad(canary_stack.url, mix, rate=40.0, duration_s=5.0).start()
    deadline = time.monotonic() + 30
    while canary_state(canary_stack)["status"] != "rolled_back":
        assert time.monotonic() < deadline, canary_state(canary_stack)
        time.sleep(0.2)
    shots = load.join()
    state = canary_state(canary_stack)
    print({"canary": state, "statuses": Counter(s.status for s in shots)})
    assert "error rate" in state["reason"] and state["weight"] == 0.0
    # The canary's rankings were degraded (stage 2 NaN), never errors to the client.
    assert {s.status for s in shots} == {200}
    assert metric_sum_at(canary_stack.url, "ctr_farm_canary_status") == 2.0
    # From now on stable answers every key, with both stages.
    time.sleep(1.5)  # both workers have read the rollback
    with httpx.Client(base_url=canary_stack.url, timeout=30) as client:
        for path, body in mix[:30]:
            answer = client.post(path, content=body).json()
            assert answer["variant"] == STABLE and not answer["degraded"], answer
            assert answer["models"] == ["deepfm/1", "autoint/1"]
    assert metric_sum_at(canary_stack.url, "ctr_farm_variant_requests_total", variant=CANARY) > 0


# -- shadow --------------------------------------------------------------------------------
def shadowed(models: Path) -> dict[str, object]:
    copy_version(models, "autoint", "2")
    return {
        "autoint_model": str(models / "autoint" / "1"),
        "shadow": {"autoint_model": str(models / "autoint" / "2"), "share": 1.0},
    }


def plain(models: Path) -> dict[str, object]:
    return {"autoint_model": str(models / "autoint" / "1")}


def rank_p50(stack: Stack) -> tuple[float, int]:
    card = read_card(stack.config.model_dirs()["autoint"])
    rng = np.random.default_rng(2)
    bodies = [msgspec.json.encode({"candidates": candidates(card, 1000, rng)}) for _ in range(8)]
    run_closed_loop(f"{stack.url}/rank", bodies, 1, 1.0)  # warm up
    result = run_closed_loop(f"{stack.url}/rank", bodies, 1, 4.0)
    assert {status for status, _ in result.samples} == {200}
    return float(np.percentile([ms for _, ms in result.samples], 50)), len(result.samples)


def test_shadow_does_not_slow_the_reply(request: pytest.FixtureRequest) -> None:
    p50 = {}
    for name, settings in (("plain", plain), ("shadow", shadowed)):
        stacks = start_stack(request, prefix=f"farm-{name[:2]}-", settings=settings)
        stack = next(stacks)
        try:
            p50[name], sent = rank_p50(stack)
            if name == "shadow":
                time.sleep(0.5)  # the last comparisons finish
                url, topk = stack.url, {"comparison": "shadow", "what": "topk"}
                compared = metric_sum_at(url, "ctr_farm_agreement_count", **topk)
                dropped = metric_sum_at(url, "ctr_farm_compare_dropped_total", comparison="shadow")
                agreement = metric_sum_at(url, "ctr_farm_agreement_sum", **topk)
                traffic = httpx.get(f"{url}/models", timeout=10).json()["traffic"]
        finally:
            for _ in stacks:
                pass
    print({"p50_ms": p50, "compared": compared, "dropped": dropped, "sent": sent})
    assert traffic["shadow"] == ["deepfm/1", "autoint/2"]
    assert compared >= 0.5 * sent and compared + dropped >= sent
    assert agreement == pytest.approx(compared)  # same weights: full agreement
    # The shadow re-ranks every request on a niced thread of the same 2 cores: it may cost
    # some latency (1.10x and 1.34x seen with the version 2 models), never a second ranking.
    assert p50["shadow"] <= 1.6 * p50["plain"], p50
