"""Micro-batching of concurrent one-candidate /predict calls (app/batching.py), through
the ASGI app with real (fake-model) ONNX sessions: each caller gets its own row."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import falcon.testing
import msgspec
import numpy as np
import pytest

from app.api import create_app
from app.batching import PredictBatcher
from app.config import Config
from app.service import Farm
from tests.conftest import FIELD_NAMES, VOCAB, candidate_objects

N = 12


def rows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vocab = np.array([VOCAB[name] for name in FIELD_NAMES])
    return (rng.random((n, len(vocab))) * vocab).astype(np.int64)


async def post_all(farm: Farm, bodies: list[Any]) -> list[falcon.testing.Result]:
    """Every body as a concurrent POST /predict (one turn of the event loop)."""
    app = create_app(farm.config, farm, manage_lifecycle=False)
    async with falcon.testing.ASGIConductor(app) as conductor:
        return await asyncio.gather(
            *(
                conductor.simulate_post(
                    "/predict",
                    body=msgspec.json.encode(b),
                    headers={"Content-Type": "application/json"},
                )
                for b in bodies
            )
        )


def unbatched_scores(farm: Farm, ids: np.ndarray) -> np.ndarray:
    """Each row scored alone, as /predict does without batching."""
    return np.array([farm.score(ids[i : i + 1])[0] for i in range(len(ids))])


@pytest.fixture
def batching_farm(make_config: Callable[..., Config], make_farm) -> Farm:
    return make_farm(make_config(predict_batch_max=64))


def test_concurrent_predictions_share_a_run_each_caller_gets_its_own_row(
    batching_farm: Farm,
) -> None:
    ids = rows(N)
    bodies = [{"candidate": c} for c in candidate_objects(ids)]
    results = asyncio.run(post_all(batching_farm, bodies))
    assert [r.status_code for r in results] == [200] * N
    got = np.array([msgspec.json.decode(r.content)["ctr"][0] for r in results])
    # ONNX Runtime's one-row batches can round differently in the last bit.
    np.testing.assert_allclose(got, unbatched_scores(batching_farm, ids), rtol=1e-5, atol=1e-7)
    assert len(set(got.tolist())) > 1  # distinct rows, distinct scores: no mix-up possible
    assert batching_farm.batcher is not None
    assert batching_farm.batcher.rows == N
    assert batching_farm.batcher.runs < N  # they did share runs


def test_each_run_is_observed_in_the_batch_size_histogram(batching_farm: Farm) -> None:
    from app import metrics

    def observed() -> tuple[float, float]:
        samples = metrics.PREDICT_BATCH_ROWS.collect()[0].samples
        count = sum(s.value for s in samples if s.name.endswith("_count"))
        total = sum(s.value for s in samples if s.name.endswith("_sum"))
        return count, total

    count0, sum0 = observed()
    asyncio.run(post_all(batching_farm, [{"candidate": c} for c in candidate_objects(rows(N))]))
    count, total = observed()
    assert total - sum0 == N  # every row counted once
    assert count - count0 == batching_farm.batcher.runs  # one observation per run


def test_bad_input_in_one_request_does_not_affect_the_others(batching_farm: Farm) -> None:
    ids = rows(N, seed=1)
    bodies: list[Any] = [{"candidate": c} for c in candidate_objects(ids)]
    bad = dict(bodies[3]["candidate"])
    bad["not_a_field"] = 1
    bodies[3] = {"candidate": bad}
    bodies[7] = {"candidate": {**bodies[7]["candidate"], FIELD_NAMES[0]: "x"}}
    results = asyncio.run(post_all(batching_farm, bodies))
    codes = [r.status_code for r in results]
    assert codes[3] == 400 and codes[7] == 400
    for i in (3, 7):
        error = msgspec.json.decode(results[i].content)["error"]
        assert set(error) == {"code", "message", "field"}
    good = [i for i in range(N) if i not in (3, 7)]
    assert all(codes[i] == 200 for i in good)
    got = np.array([msgspec.json.decode(results[i].content)["ctr"][0] for i in good])
    want = unbatched_scores(batching_farm, ids[good])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_a_request_past_its_deadline_while_waiting_is_refused_alone(
    make_config: Callable[..., Config], make_farm
) -> None:
    farm = make_farm(make_config(predict_batch_max=64, predict_batch_wait_us=60_000))
    ids = rows(3, seed=2)
    bodies: list[Any] = [{"candidate": c} for c in candidate_objects(ids)]
    bodies[1]["timeout_ms"] = 20  # the batch waits 60 ms for more rows
    results = asyncio.run(post_all(farm, bodies))
    assert [r.status_code for r in results] == [200, 503, 200]
    assert msgspec.json.decode(results[1].content)["error"]["code"] == "deadline_exceeded"
    got = [msgspec.json.decode(results[i].content)["ctr"][0] for i in (0, 2)]
    np.testing.assert_allclose(got, unbatched_scores(farm, ids[[0, 2]]), rtol=1e-5, atol=1e-7)


def test_other_predictions_are_not_batched(batching_farm: Farm) -> None:
    """A list of candidates keeps its own run (the batcher only takes one candidate)."""
    ids = rows(3, seed=3)
    results = asyncio.run(post_all(batching_farm, [{"candidates": candidate_objects(ids)}]))
    assert results[0].status_code == 200
    assert batching_farm.batcher is not None and batching_farm.batcher.rows == 0


def test_batch_max_1_is_off(make_config: Callable[..., Config], make_farm) -> None:
    farm = make_farm(make_config(predict_batch_max=1))
    ids = rows(4, seed=4)
    results = asyncio.run(post_all(farm, [{"candidate": c} for c in candidate_objects(ids)]))
    assert [r.status_code for r in results] == [200] * 4
    assert farm.batcher is None


def test_a_cancelled_caller_is_dropped_and_a_failed_run_fails_every_caller() -> None:
    seen: list[int] = []

    def run(key: str, ids: np.ndarray) -> np.ndarray:
        seen.append(len(ids))
        return ids[:, 0].astype(np.float32)

    def failing(key: str, ids: np.ndarray) -> np.ndarray:
        raise RuntimeError("boom")

    async def scenario() -> None:
        batcher = PredictBatcher(max_rows=8, wait_us=0)
        a = batcher.submit("m/1", np.array([[1, 0]]), run)
        b = batcher.submit("m/1", np.array([[2, 0]]), run)
        c = batcher.submit("m/1", np.array([[3, 0]]), run)
        b.cancel()
        assert (await a).tolist() == [1.0] and (await c).tolist() == [3.0]
        assert seen == [2]
        d = batcher.submit("m/1", np.array([[4, 0]]), failing)
        e = batcher.submit("m/1", np.array([[5, 0]]), failing)
        for waiter in (d, e):
            with pytest.raises(RuntimeError, match="boom"):
                await waiter
        full = [batcher.submit("m/2", np.array([[i, 0]]), run) for i in range(8)]
        assert all(w.done() for w in full)  # max_rows reached: run at once
        assert seen == [2, 8]

    asyncio.run(scenario())
