"""The first stage's score cache through the real stack (nginx, 2 workers, the real
DeepFM, ``cache_entries`` on): repeated rankings hit the cache, are counted in /metrics, and
carry bit for bit the scores of a plain ONNX Runtime session, a lone new row among cached
ones too.

The stack's cascade is DeepFM alone, so the answer's CTRs are the cached scores
themselves (in the default cascade AutoInt re-scores the survivors, and stage 1's
scores are seen only through which candidates survive); with ``top_k`` = n every
candidate's score is compared.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from app.sessions import read_card
from app.stack import Stack
from tests.integration.conftest import (
    TIMEOUT,
    Candidates,
    Reference,
    metric_sum,
    start_stack,
)
from tests.integration.test_rank import assert_matches_reference, rank

pytestmark = pytest.mark.integration

N = 1000
#: Through nginx, requests alternate between the 2 workers, each with its own cache, and a
#: row is stored at its second miss in a worker (the doorkeeper): the 3rd and later sends
#: of a body to a worker hit.
SENDS = 8


@pytest.fixture(scope="module")
def cache_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    settings = {"cache_entries": 100_000, "stages": [{"model": "deepfm"}]}
    yield from start_stack(request, prefix="farm-c-", settings=settings)


@pytest.fixture(scope="module")
def farm(cache_stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cache_stack.url, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def cached_reference(cache_stack: Stack) -> tuple[Reference, Candidates]:
    """Plain ORT sessions and candidates, over the very models this stack serves."""
    cards = {name: read_card(path) for name, path in cache_stack.config.model_dirs().items()}
    return Reference(cache_stack.config, cards), Candidates(cards["deepfm"].fields)


def expected(reference: Reference, candidates: Candidates, ids: np.ndarray):
    """Every candidate, best first, with DeepFM's score from one batch of all the rows."""
    scores = reference.score("deepfm", candidates.mapped(ids))
    best = reference.best(scores, range(len(ids)), len(ids))
    return best, scores[best]


def cache_counters(client: httpx.Client) -> dict[str, float]:
    """ctr_farm_cache_* summed over the workers, from the farm's /metrics."""
    return {
        "hits": metric_sum(client, "ctr_farm_cache_hits_total"),
        "misses": metric_sum(client, "ctr_farm_cache_misses_total"),
        "entries": metric_sum(client, "ctr_farm_cache_entries"),
    }


def test_repeated_rankings_hit_the_cache_and_keep_the_exact_scores(
    farm: httpx.Client, cached_reference: tuple[Reference, Candidates]
) -> None:
    reference, candidates = cached_reference
    ids = candidates.ids(N, seed=101)
    want = expected(reference, candidates, ids)
    before = cache_counters(farm)
    answers: list[dict[str, Any]] = []
    for _ in range(SENDS):
        answer = rank(farm, candidates, ids, "rows", top_k=N, stage1_k=N)
        assert_matches_reference(answer, want)
        answers.append(answer)
    assert all(a["rankings"] == answers[0]["rankings"] for a in answers)
    after = cache_counters(farm)
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    assert hits + misses == SENDS * N  # every candidate of every request was looked up once
    assert hits >= N  # at least one request was answered from a cache, whole
    assert after["entries"] > 0


def rows_ort_scores_differently_alone(
    reference: Reference, candidates: Candidates, count: int
) -> list[np.ndarray]:
    """Rows whose DeepFM score from a one-row batch differs from a batched one (~4% with
    deepfm/1, none with deepfm/2)."""
    rng = np.random.default_rng(7)
    found = []
    for _ in range(5000):
        row = (rng.random((1, candidates.width)) * candidates.vocab).astype(np.int64)
        alone = reference.score("deepfm", row)
        batched = reference.score("deepfm", np.repeat(row, 2, axis=0))[:1]
        if alone.tobytes() != batched.tobytes():
            found.append(row)
            if len(found) == count:
                return found
    if not found:
        # deepfm/2 (app/offline/rewrite.py, fm-gemm) scores a one-row batch bit for bit
        # like a larger one: no row to mis-score alone. tests/test_cache.py still checks
        # that a lone miss is scored in a batch of two and a one-row batch bypasses.
        pytest.skip("the served DeepFM scores one-row batches like larger ones")
    pytest.fail(f"only {len(found)} of 5000 rows score differently alone")


def test_a_single_new_row_among_cached_ones_is_scored_exactly(
    farm: httpx.Client, cached_reference: tuple[Reference, Candidates]
) -> None:
    """The cached rows hit and the new row is the batch's only miss. It is one whose
    score ORT computes differently in a one-row batch: the farm must not score it alone."""
    reference, candidates = cached_reference
    ids = candidates.ids(N, seed=202)
    for _ in range(SENDS):  # warm both workers' caches with these rows
        rank(farm, candidates, ids, "columns", top_k=N, stage1_k=N)
    for extra in rows_ort_scores_differently_alone(reference, candidates, 4):
        more = np.vstack([ids, extra])
        before = cache_counters(farm)
        answer = rank(farm, candidates, more, "rows", top_k=N + 1, stage1_k=N + 1)
        after = cache_counters(farm)
        assert (after["misses"] - before["misses"], after["hits"] - before["hits"]) == (1, N)
        assert_matches_reference(answer, expected(reference, candidates, more))
