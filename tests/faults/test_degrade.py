"""Fault 6: a stage that raises or is too slow, through the real nginx + gunicorn.

Fault-injected fake ONNX models (tests/fake_models.py) stand in for the stages:
``poisoned`` raises inside ONNX Runtime for any batch holding a row whose first id is
>= POISON_ID (the request switches the fault on and off), ``slow`` spends ~0.2 ms per
row in matmuls. One worker, so the breaker seen at /ready is the one that served.
Every answer is checked against a brute-force ranking by the same ONNX files.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from app.config import parse_stages
from app.stack import Stack, running
from tests.fake_models import POISON_ID, write_model

pytestmark = pytest.mark.integration

FIELDS = (("weekday", 7), ("hour", 24), ("creative", 50))
#: The cards' training distribution: creative's popularity orders the fallback; with
#: every field and a CTR histogram, drift monitoring runs too (its metrics have samples).
POPULAR = {
    "fields": {
        "weekday": {"top_ids": list(range(7)), "top_shares": [1 / 7] * 7},
        "hour": {"top_ids": list(range(20)), "top_shares": [1 / 24] * 20},
        "creative": {"top_ids": [9, 4, 17], "top_shares": [0.4, 0.2, 0.1]},
    },
    "ctr_histogram": {"edges": [0.0, 0.01, 0.1, 1.0], "shares": [0.2, 0.5, 0.3]},
    "ctr_mean": 0.05,
}
RESET_S = 2.0


def make_models(root: Path, deepfm: str, autoint: str) -> dict[str, str]:
    dirs = {
        "deepfm": write_model(root, "deepfm", fields=FIELDS, seed=1, kind=deepfm,
                              distribution=POPULAR),
        "autoint": write_model(root, "autoint", fields=FIELDS, seed=2, kind=autoint,
                               distribution=POPULAR),
    }  # fmt: skip
    return {f"{name}_model": str(path) for name, path in dirs.items()}


@pytest.fixture(scope="module")
def farm_dirs() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fdeg-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def start(root: Path, deepfm: str, autoint: str, **overrides) -> Iterator[Stack]:
    models = make_models(root / "models", deepfm, autoint)
    settings = {
        "workers": 1,
        "breaker_failures": 3,
        "breaker_reset_s": RESET_S,
        "stages": parse_stages("deepfm:20,autoint"),
        "default_top_k": 5,
        "verify_sha256": True,
        **models,
        **overrides,
    }
    with running(root / "run", settings) as stack:
        yield stack


def ids_matrix(n: int, seed: int, poison: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = np.stack(
        [rng.integers(0, POISON_ID, n), rng.integers(0, 24, n), rng.integers(0, 50, n)], axis=1
    ).astype(np.int64)
    if poison:
        ids[:, 0] = 99  # unknown weekday -> OOV bucket 7 in every row: the poisoned model fails
    return ids


def rank(client: httpx.Client, ids: np.ndarray, **extra) -> dict:
    body = {"candidates": ids.tolist(), "top_k": 5, "stage1_k": 20, **extra}
    resp = client.post("/rank", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def onnx_scores(model_dir: str, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(f"{model_dir}/model.onnx", providers=["CPUExecutionProvider"])
    return sess.run(None, {"ids": ids})[0]


def best(scores: np.ndarray, positions: np.ndarray, k: int) -> list[int]:
    order = sorted(range(len(positions)), key=lambda j: (-float(scores[j]), int(positions[j])))
    return [int(positions[j]) for j in order[:k]]


def mapped(ids: np.ndarray) -> np.ndarray:
    """The farm's OOV mapping: an id outside a field's vocabulary becomes its size."""
    vocab = np.array([v for _, v in FIELDS])
    return np.where((ids < 0) | (ids >= vocab), vocab, ids)


def stage1_answer(stack: Stack, ids: np.ndarray) -> list[int]:
    """What a degraded answer must be: DeepFM's top 20, re-cut to top 5 by DeepFM."""
    scores = onnx_scores(stack.config.deepfm_model, mapped(ids))
    keep = sorted(best(scores, np.arange(len(ids)), 20))
    return best(scores[keep], np.array(keep), 5)


def breaker(client: httpx.Client, key: str) -> dict:
    return client.get("/ready").json()["breakers"][key]


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{{{want}}}")


def test_stage2_errors_degrade_open_the_breaker_and_a_trial_closes_it(farm_dirs: Path) -> None:
    with (
        start(farm_dirs / "a", deepfm="ok", autoint="poisoned") as stack,
        httpx.Client(base_url=stack.url, timeout=30) as client,
    ):
        good = ids_matrix(200, 1)
        answer = rank(client, good)
        assert (answer["degraded"], answer["answered_by"]) == (False, "stage2")

        poisoned = ids_matrix(200, 2, poison=True)
        for _ in range(3):
            answer = rank(client, poisoned)
            assert answer["degraded"] and answer["answered_by"] == "stage1"
            assert answer["reason"] == "stage_error"
            assert [r["index"] for r in answer["rankings"]] == stage1_answer(stack, poisoned)
            assert answer["models"] == ["deepfm/1"] and answer["latency"]["stage2_ms"] == 0
        assert breaker(client, "autoint/1")["state"] == "open"
        assert metric(client, "ctr_farm_breaker_state", model="autoint/1") == 2

        # Open: even a healthy request degrades at once, without running stage 2.
        t0 = time.monotonic()
        answer = rank(client, good)
        assert answer["reason"] == "breaker_open" and answer["answered_by"] == "stage1"
        assert [r["index"] for r in answer["rankings"]] == stage1_answer(stack, good)
        opened_for = time.monotonic() - t0

        time.sleep(RESET_S + 0.2 - opened_for)
        answer = rank(client, good)  # the trial: succeeds, closes
        assert (answer["degraded"], answer["answered_by"]) == (False, "stage2")
        assert breaker(client, "autoint/1") == {
            "state": "closed", "failures": 0, "opened_for_s": None
        }  # fmt: skip
        assert metric(client, "ctr_farm_breaker_state", model="autoint/1") == 0
        assert (
            metric(client, "ctr_farm_model_failures_total", model="autoint/1", kind="stage_error")
            == 3
        )
        assert (
            metric(client, "ctr_farm_degraded_total", answered_by="stage1", reason="breaker_open")
            == 1
        )
        # /predict on the failing model: a 500 with a stable code, and the worker lives.
        resp = client.post("/predict", json={"candidates": poisoned[:60].tolist()})
        assert resp.status_code == 500 and resp.json()["error"]["code"] == "model_error"
        assert "Traceback" not in resp.text and "model.onnx" not in resp.text
        assert len(stack.worker_pids()) == 1
        assert rank(client, good)["answered_by"] == "stage2"


def test_stage1_failure_falls_back_to_popular_items(farm_dirs: Path) -> None:
    with (
        start(farm_dirs / "b", deepfm="poisoned", autoint="ok") as stack,
        httpx.Client(base_url=stack.url, timeout=30) as client,
    ):
        ids = ids_matrix(300, 3, poison=True)
        answer = rank(client, ids)
        assert answer["degraded"] and answer["answered_by"] == "fallback"
        assert (answer["fallback"], answer["reason"]) == ("popular", "stage_error")
        share = {9: 0.4, 4: 0.2, 17: 0.1}
        popularity = np.array([share.get(int(c), 0.0) for c in ids[:, 2]], dtype=np.float32)
        want = best(popularity, np.arange(len(ids)), 5)
        assert [r["index"] for r in answer["rankings"]] == want
        assert answer["stats"] == {"input": 300, "after_stage1": 300, "output": 5}


def test_slow_stage2_misses_the_deadline_and_stage1_answers(farm_dirs: Path) -> None:
    # autoint "slow": ~0.2 ms per row here, so its 20 survivors take a few ms and the
    # single-stage baseline on 2000 candidates takes ~0.4 s.
    with (
        start(farm_dirs / "c", deepfm="ok", autoint="slow") as stack,
        httpx.Client(base_url=stack.url, timeout=30) as client,
    ):
        ids = ids_matrix(2000, 4)
        full = rank(client, ids, multi_stage=False, timeout_ms=20_000)
        assert not full["degraded"] and full["latency"]["stage2_ms"] > 50
        # The same ranking with a budget that cannot hold the baseline: not late,
        # not silently partial, but the popular fallback, marked.
        t0 = time.monotonic()
        answer = rank(client, ids, multi_stage=False, timeout_ms=40)
        elapsed_ms = (time.monotonic() - t0) * 1e3
        assert answer["degraded"] and answer["answered_by"] == "fallback"
        assert answer["reason"] in {"deadline", "stage_timeout"}
        assert elapsed_ms < full["latency"]["total_ms"] / 2
        # A header budget works the same way; a generous one gets the full answer.
        resp = client.post(
            "/rank",
            json={"candidates": ids.tolist(), "top_k": 5, "multi_stage": False},
            headers={"X-Request-Timeout-Ms": "20000"},
        )
        assert resp.json()["answered_by"] == "stage2"
        bad = client.post("/rank", json={"candidates": ids[:5].tolist()},
                          headers={"X-Request-Timeout-Ms": "soon"})  # fmt: skip
        assert bad.status_code == 400
        assert bad.json()["error"]["field"] == "X-Request-Timeout-Ms"
