"""The ranking cascade: stages from config, ``rank(ids, top_k, stage1_k)`` -> result.

Knows nothing of HTTP. Each stage scores the candidates that survived the previous
one and keeps its ``keep_k`` best (the first stage keeps the request's ``stage1_k``,
the last keeps ``top_k``). Order is by score descending, ties by the request's
candidate index ascending. Survivors are passed on in index order, so a stage's batch
is a deterministic function of the request (the brute-force tests rely on it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from app.errors import InvalidRequest

#: ``stage1_k`` when neither the request nor the first stage's ``keep_k`` sets it.
DEFAULT_STAGE1_K = 100


class Scorer(Protocol):
    """What a stage needs from a model: a name and ``[n, k] int64 -> [n] float32``."""

    @property
    def key(self) -> str: ...

    def run(self, ids: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class Stage:
    scorer: Scorer
    keep_k: int | None = None


@dataclass(frozen=True, slots=True)
class RankResult:
    #: Candidate indices (into the request) of the answer, best first.
    indices: np.ndarray
    #: The final stage's CTR for each of ``indices``.
    scores: np.ndarray
    #: ``stage1_ms``, ``stage2_ms``, ... (0.0 for a stage that did not run), ``total_ms``.
    latency: dict[str, float]
    n_input: int
    after_stage1: int
    models: list[str]
    #: Internal split of each ``stageN_ms`` (never sent on the wire): ``stageN_model_ms``
    #: (the scorer's run) and ``stageN_cut_ms`` (the rest of the stage: gathering its batch,
    #: the top-k cut, passing survivors on); 0.0 for a stage that did not run.
    timings: dict[str, float] = field(default_factory=dict)


def top_indices(scores: np.ndarray, positions: np.ndarray, k: int) -> np.ndarray:
    """Indices into ``scores`` of the ``k`` best, by score desc then position asc."""
    # lexsort sorts by the last key first: -score, then the candidate's request index.
    order = np.lexsort((positions, -scores))
    return order[:k]


class Pipeline:
    def __init__(self, stages: Sequence[Stage], baseline: Scorer, max_candidates: int) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.stages = tuple(stages)
        self.baseline = baseline
        self.max_candidates = max_candidates
        self.default_stage1_k = stages[0].keep_k or DEFAULT_STAGE1_K

    def resolve_ks(
        self, n: int, top_k: int, stage1_k: int | None, multi_stage: bool = True
    ) -> tuple[int, int]:
        """Validate ``top_k``/``stage1_k`` against ``n``; values above ``n`` clamp to ``n``.

        Without the cascade (``multi_stage`` false) ``stage1_k`` plays no part."""
        stage1_k = self.default_stage1_k if stage1_k is None else stage1_k
        if not multi_stage:
            stage1_k = max(top_k, stage1_k)
        if top_k > stage1_k:
            raise InvalidRequest(
                f"top_k ({top_k}) must not exceed stage1_k ({stage1_k})", field="top_k"
            )
        if stage1_k > self.max_candidates:
            raise InvalidRequest(
                f"stage1_k must be at most max_candidates ({self.max_candidates})",
                field="stage1_k",
            )
        return min(top_k, n), min(stage1_k, n)

    def rank(
        self, ids: np.ndarray, top_k: int, stage1_k: int | None = None, multi_stage: bool = True
    ) -> RankResult:
        t_start = time.perf_counter()
        n = ids.shape[0]
        top_k, stage1_k = self.resolve_ks(n, top_k, stage1_k, multi_stage)
        stages = self.stages if multi_stage else (Stage(self.baseline),)
        # A single-stage run fills the last slot, so the latency keys never change.
        offset = len(self.stages) - len(stages)
        latency = {f"stage{i + 1}_ms": 0.0 for i in range(len(self.stages))}
        timings = {
            f"stage{i + 1}_{part}_ms": 0.0
            for i in range(len(self.stages))
            for part in ("model", "cut")
        }
        alive = np.arange(n)
        scores = np.empty(0, dtype=np.float32)
        after_stage1 = n
        models: list[str] = []
        for i, stage in enumerate(stages):
            t0 = time.perf_counter()
            last = i == len(stages) - 1
            keep = top_k if last else (stage1_k if i == 0 else (stage.keep_k or len(alive)))
            batch = ids if len(alive) == n else ids[alive]
            t_model = time.perf_counter()
            scores = stage.scorer.run(batch)
            model_s = time.perf_counter() - t_model
            best = top_indices(scores, alive, keep)
            if last:
                alive, scores = alive[best], scores[best]
            else:
                # PERF: the next stage gets survivors in request order (deterministic batch).
                best.sort()
                alive = alive[best]
            if i == 0:
                after_stage1 = len(alive) if not last else n
            stage_s = time.perf_counter() - t0
            slot = i + 1 + offset
            latency[f"stage{slot}_ms"] = stage_s * 1e3
            timings[f"stage{slot}_model_ms"] = model_s * 1e3
            timings[f"stage{slot}_cut_ms"] = (stage_s - model_s) * 1e3
            models.append(stage.scorer.key)
        latency["total_ms"] = (time.perf_counter() - t_start) * 1e3
        return RankResult(alive, scores, latency, n, after_stage1, models, timings)
