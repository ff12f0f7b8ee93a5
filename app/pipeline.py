"""The ranking cascade: stages from config, ``rank(ids, top_k, stage1_k)`` -> result.

Knows nothing of HTTP. Each stage scores the candidates that survived the previous
one and keeps its ``keep_k`` best (the first stage keeps the request's ``stage1_k``,
the last keeps ``top_k``). Order is by score descending, ties by the request's
candidate index ascending. Survivors are passed on in index order, so a stage's batch
is a deterministic function of the request (the brute-force tests rely on it).

With a :class:`~app.deadlines.Deadline` the cascade never answers late and never
answers silently partial: a stage that would not finish in time (estimated from its
measured cost), whose circuit breaker is open, that fails, or that is stopped at the
deadline is skipped, and the answer is the previous stage's order, marked
``degraded`` with ``answered_by`` and ``reason``. Without any stage, the fallback
(popular items) answers, marked as such; without a fallback the request fails.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import onnxruntime as ort

from app.breaker import Breaker
from app.config import DEFAULT_STAGE1_K
from app.deadlines import Deadline
from app.errors import (
    DeadlineExceeded,
    InvalidRequest,
    ModelError,
    ModelUnavailable,
    StageTimeout,
)

if TYPE_CHECKING:
    from app.tracing import Tracer

#: Field whose training popularity orders the fallback ranking.
POPULAR_FIELD = "creative"


class Scorer(Protocol):
    """What a stage needs from a model: a name and ``[n, k] int64 -> [n] float32``."""

    @property
    def key(self) -> str: ...

    def run(self, ids: np.ndarray, run_options: ort.RunOptions | None = None) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class Stage:
    scorer: Scorer
    keep_k: int | None = None


@dataclass(frozen=True, slots=True)
class RankResult:
    #: Candidate indices (into the request) of the answer, best first.
    indices: np.ndarray
    #: The answering stage's CTR (or the fallback's score) for each of ``indices``.
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
    #: ``stage1``, ``stage2``, ... or ``fallback``.
    answered_by: str = ""
    #: None, or why the answer is not the full cascade's (see module docstring).
    reason: str | None = None
    #: The fallback ranking used (``popular``), when ``answered_by`` is ``fallback``.
    fallback: str | None = None
    #: Candidate indices stage 1 kept (request order), when a later stage ran on them.
    stage1_kept: np.ndarray | None = None
    #: The first stage's scores of every candidate (its batch is the whole request),
    #: when it ran: what model monitoring counts (app/drift.py). Never sent.
    stage1_scores: np.ndarray | None = None
    #: The A/B variant (or ``stable`` / ``canary``) that answered; set by the Farm.
    variant: str = ""

    @property
    def degraded(self) -> bool:
        return self.reason is not None


def top_indices(scores: np.ndarray, positions: np.ndarray, k: int) -> np.ndarray:
    """Indices into ``scores`` of the ``k`` best, by score desc then position asc."""
    # lexsort sorts by the last key first: -score, then the candidate's request index.
    order = np.lexsort((positions, -scores))
    return order[:k]


def failure_kind(exc: ModelError) -> str:
    """``stage_timeout`` (stopped at the deadline) or ``stage_error``: the reason and
    metric label of a failed model run, wherever it ran."""
    return "stage_timeout" if isinstance(exc, StageTimeout) else "stage_error"


class CostModel:
    """A scorer's run time as ``fixed_ms + per_row_ms * n``, tracked by a moving average.

    Calibrated at warm-up (:meth:`calibrate`) and updated by every real run, so the
    deadline checks and the admission queue see what the model costs on this machine now.
    """

    __slots__ = ("alpha", "fixed_ms", "per_row_ms")

    def __init__(self, fixed_ms: float = 0.1, per_row_ms: float = 0.01, alpha: float = 0.05):
        self.fixed_ms, self.per_row_ms, self.alpha = fixed_ms, per_row_ms, alpha

    def estimate(self, n: int) -> float:
        return self.fixed_ms + self.per_row_ms * n

    def observe(self, n: int, ms: float) -> None:
        if n < 32:  # small batches say little about the per-row cost
            return
        per_row = max(ms - self.fixed_ms, 0.0) / n
        self.per_row_ms += self.alpha * (per_row - self.per_row_ms)

    def calibrate(self, one_row_ms: float, n: int, n_rows_ms: float) -> None:
        self.fixed_ms = one_row_ms
        self.per_row_ms = max(n_rows_ms - one_row_ms, 0.0) / max(n, 1)


class Popularity:
    """Fallback scorer: a candidate's score is its creative's share of training traffic.

    Built from the model card's ``distribution`` (top ids and their shares); unseen
    creatives score 0 and keep request order. Costs microseconds, needs no session.
    """

    key = "fallback/popular"

    def __init__(self, field_names: Sequence[str], distribution: Mapping[str, Any]) -> None:
        stats = distribution["fields"][POPULAR_FIELD]
        self.column = list(field_names).index(POPULAR_FIELD)
        ids = np.asarray(stats["top_ids"], dtype=np.int64)
        self.table = np.zeros(int(ids.max()) + 2, dtype=np.float32)
        self.table[ids] = np.asarray(stats["top_shares"], dtype=np.float32)

    def run(self, ids: np.ndarray, run_options: ort.RunOptions | None = None) -> np.ndarray:
        col = np.minimum(ids[:, self.column], len(self.table) - 1)
        return self.table[col]


class _Skipped(Exception):
    """A stage did not answer; ``reason`` says why (internal to the pipeline)."""

    def __init__(self, reason: str, cause: Exception | None = None) -> None:
        super().__init__(reason)
        self.reason, self.cause = reason, cause


class Pipeline:
    def __init__(
        self,
        stages: Sequence[Stage],
        baseline: Scorer,
        max_candidates: int,
        breakers: Mapping[str, Breaker] | None = None,
        fallback: Scorer | None = None,
        on_failure: Callable[[str, str], None] | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.stages = tuple(stages)
        self.baseline = baseline
        self.max_candidates = max_candidates
        self.default_stage1_k = stages[0].keep_k or DEFAULT_STAGE1_K
        self.fallback = fallback
        scorers = [s.scorer for s in self.stages] + [baseline]
        #: Per scorer key: run-time estimate and circuit breaker (shared by every stage
        #: that runs the same model, e.g. stage 2 and the single-stage baseline).
        self.costs = {s.key: CostModel() for s in scorers}
        self.breakers = dict(breakers or {})
        #: (scorer key, ``stage_error`` | ``stage_timeout``) -> count, for /stats and metrics.
        self.failures: Counter[tuple[str, str]] = Counter()
        self.on_failure = on_failure
        #: A span per stage (``Config.tracing``), a child of the current request's span.
        self.tracer = tracer

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

    def estimate_ms(self, n: int, stage1_k: int | None, multi_stage: bool = True) -> float:
        """Expected model time of a request (the admission queue orders by it)."""
        if not multi_stage:
            return self.costs[self.baseline.key].estimate(n)
        total, alive = 0.0, n
        for i, stage in enumerate(self.stages):
            total += self.costs[stage.scorer.key].estimate(alive)
            keep = (stage1_k or self.default_stage1_k) if i == 0 else stage.keep_k
            alive = min(alive, keep or alive)
        return total

    def _run(self, scorer: Scorer, batch: np.ndarray, deadline: Deadline | None) -> np.ndarray:
        """One stage's model run, guarded by its breaker and the deadline."""
        breaker = self.breakers.get(scorer.key)
        if breaker is not None and not breaker.allow():
            raise _Skipped("breaker_open")
        cost = self.costs[scorer.key]
        if deadline is not None and cost.estimate(len(batch)) > deadline.remaining_ms():
            if breaker is not None:
                breaker.release()
            raise _Skipped("deadline")
        t0 = time.perf_counter()
        try:
            scores = scorer.run(batch, None if deadline is None else deadline.run_options)
        except ModelError as exc:
            reason = failure_kind(exc)
            self.failures[scorer.key, reason] += 1
            if self.on_failure is not None:
                self.on_failure(scorer.key, reason)
            if breaker is not None:
                breaker.failure()
            raise _Skipped(reason, exc) from exc
        if breaker is not None:
            breaker.success()
        cost.observe(len(batch), (time.perf_counter() - t0) * 1e3)
        return scores

    def rank(
        self,
        ids: np.ndarray,
        top_k: int,
        stage1_k: int | None = None,
        multi_stage: bool = True,
        deadline: Deadline | None = None,
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
        answered, reason = None, None
        stage1_kept = stage1_scores = None
        for i, stage in enumerate(stages):
            t0 = time.perf_counter()
            span = None
            if self.tracer is not None:
                span = self.tracer.start_stage(i + 1 + offset, stage.scorer.key, len(alive))
            last = i == len(stages) - 1
            keep = top_k if last else (stage1_k if i == 0 else (stage.keep_k or len(alive)))
            batch = ids if len(alive) == n else ids[alive]
            t_model = time.perf_counter()
            try:
                stage_scores = self._run(stage.scorer, batch, deadline)
            except _Skipped as skip:
                if span is not None:
                    span.skip(skip.reason)
                if skip.reason == "stage_error" and self.fallback is None and answered is None:
                    raise skip.cause from skip  # nothing else can answer: the model error
                reason = skip.reason
                break
            model_s = time.perf_counter() - t_model
            best = top_indices(stage_scores, alive, keep)
            if last:
                alive, scores = alive[best], stage_scores[best]
            else:
                # PERF: the next stage gets survivors in request order (deterministic batch).
                best.sort()
                alive, scores = alive[best], stage_scores[best]
            if i == 0:
                after_stage1 = len(alive) if not last else n
                stage1_kept = None if last else alive
                stage1_scores = stage_scores
            stage_s = time.perf_counter() - t0
            slot = i + 1 + offset
            latency[f"stage{slot}_ms"] = stage_s * 1e3
            timings[f"stage{slot}_model_ms"] = model_s * 1e3
            timings[f"stage{slot}_cut_ms"] = (stage_s - model_s) * 1e3
            models.append(stage.scorer.key)
            answered = slot
            if span is not None:
                span.end(len(alive))
        fallback = None
        if reason is not None:
            alive, scores, fallback = self._degrade(ids, alive, scores, answered, top_k, reason)
            if answered is None:
                after_stage1 = n
        latency["total_ms"] = (time.perf_counter() - t_start) * 1e3
        return RankResult(
            alive,
            scores,
            latency,
            n,
            after_stage1,
            models,
            timings,
            answered_by="fallback" if answered is None else f"stage{answered}",
            reason=reason,
            fallback=fallback,
            stage1_kept=stage1_kept,
            stage1_scores=stage1_scores,
        )

    def _degrade(
        self,
        ids: np.ndarray,
        alive: np.ndarray,
        scores: np.ndarray,
        answered: int | None,
        top_k: int,
        reason: str,
    ) -> tuple[np.ndarray, np.ndarray, str | None]:
        """The best answer without the stage that could not run: the previous stage's
        order (its survivors, by its scores), or the fallback's, or an error."""
        if answered is None:
            if self.fallback is None:
                if reason == "breaker_open":
                    raise ModelUnavailable("the first stage's model is unavailable (breaker open)")
                raise DeadlineExceeded("no stage can answer within the request's deadline")
            scores, alive = self.fallback.run(ids), np.arange(len(ids))
            best = top_indices(scores, alive, top_k)
            return alive[best], scores[best], self.fallback.key.rpartition("/")[2]
        best = top_indices(scores, alive, top_k)
        return alive[best], scores[best], None
