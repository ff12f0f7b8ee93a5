"""The inference core of one worker process (knows nothing of HTTP).

``Farm`` has an explicit lifecycle: ``load()`` after fork (sessions, warm-up, the
executor), then ``rank()`` / ``predict()`` from any thread, then ``close()``. The
Falcon layer in :mod:`app.api` only decodes, calls this, and encodes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np

from app import metrics
from app.admission import Admission
from app.breaker import Breaker
from app.config import Config
from app.deadlines import Deadline
from app.drift import DriftMonitor
from app.errors import (
    DeadlineExceeded,
    InvalidRequest,
    ModelError,
    ModelLoadError,
    ModelUnavailable,
    NotReady,
)
from app.features import ContentKind, FeatureSpace
from app.pipeline import Pipeline, Popularity, RankResult, Scorer, Stage, failure_kind
from app.schema import BreakerState, ModelSummary, PredictRequest, RankRequest
from app.sessions import LoadedModel

log = logging.getLogger(__name__)
T = TypeVar("T")
ModelFactory = Callable[[str, Config], LoadedModel]


def load_model(name: str, config: Config) -> LoadedModel:
    return LoadedModel(
        config.model_dirs()[name],
        pool_size=config.pool_size,
        intra_threads=config.intra_threads,
        inter_threads=config.inter_threads,
        verify_sha256=config.verify_sha256,
        share_weights=config.share_weights,
        shared_arena=config.shared_arena,
        profile_dir=config.ort_profile_path if config.ort_profiling else None,
    )


class Farm:
    def __init__(self, config: Config, model_factory: ModelFactory = load_model) -> None:
        self.config = config
        self._factory = model_factory
        self.models: dict[str, LoadedModel] = {}
        self.features: FeatureSpace | None = None
        self.pipeline: Pipeline | None = None
        self.breakers: dict[str, Breaker] = {}
        #: Inference threads and their queue (``load()``; none when ``inline``).
        self.admission: Admission | None = None
        #: Bytes of request body per candidate, by wire format: estimates a request's
        #: size (hence its cost) before its candidates are decoded.
        self._bytes_per_candidate: dict[ContentKind, float] = {"json": 250.0, "msgpack": 60.0}
        #: Model monitoring: inputs and CTRs of whole-request batches vs the cards.
        self.drift = DriftMonitor(config)
        self.ready = False

    # -- lifecycle -----------------------------------------------------------------------
    def load(self) -> None:
        """Load every configured model, check they agree on fields, warm up, go ready."""
        t0 = time.perf_counter()
        names = dict.fromkeys([s.model for s in self.config.stages] + [self.config.predict_model])
        for name in names:
            model = self._factory(name, self.config)
            if model.name != name:
                raise ModelLoadError(f"model dir for {name!r} holds a card named {model.name!r}")
            self.models[name] = model
        layouts = {m.card.field_names for m in self.models.values()}
        if len(layouts) != 1:
            raise ModelLoadError(f"models disagree on their input fields: {sorted(layouts)}")
        first = next(iter(self.models.values()))
        self.features = FeatureSpace(first.card.fields, self.config.max_candidates)
        stages = [Stage(self.models[s.model], s.keep_k) for s in self.config.stages]
        self.breakers = {
            m.key: Breaker(
                m.key,
                self.config.breaker_failures,
                self.config.breaker_reset_s,
                on_change=_log_breaker,
            )
            for m in self.models.values()
        }
        self.pipeline = Pipeline(
            stages,
            self.models[self.config.predict_model],
            self.config.max_candidates,
            breakers=self.breakers,
            fallback=self._fallback(first),
            on_failure=_count_failure,
            on_scores=self.drift.record,
        )
        for model in self.models.values():
            if not self.drift.add(model.key, model.card):
                log.warning(
                    "no drift monitoring: the card has no distribution", extra={"model": model.key}
                )
        for key in self.breakers:
            metrics.set_breaker(key, "closed")
        if self.config.inference != "inline":
            self.admission = Admission(
                slots=self.config.pool_size,
                max_queue=self.config.max_queue,
                max_wait_ms=self.config.max_queue_wait_ms,
                aging_ms=self.config.queue_aging_ms,
                retry_after_s=self.config.retry_after_s,
                on_start=metrics.QUEUE_WAIT.observe,
            )
        for model in self.models.values():
            model.warm_up(self.config.warmup_runs)
            self._calibrate(model)
        self.ready = True
        metrics.WORKERS.set(1)
        metrics.STARTED.set(time.time())
        log.info(
            "farm ready",
            extra={
                "pid": os.getpid(),
                "models": [m.key for m in self.models.values()],
                "pool_size": self.config.pool_size,
                "load_s": round(time.perf_counter() - t0, 3),
            },
        )

    def close(self) -> None:
        self.ready = False
        metrics.WORKERS.set(0)
        if self.admission is not None:
            self.admission.close()
            # Later calls run inline and meet NotReady (503), not a closed queue (500).
            self.admission = None
        for model in self.models.values():
            model.close()

    def _fallback(self, model: LoadedModel) -> Scorer | None:
        if self.config.fallback == "none":
            return None
        if not model.card.distribution or "creative" not in model.card.field_names:
            log.warning("no fallback ranking: the model card has no creative distribution")
            return None
        return Popularity(model.card.field_names, model.card.distribution)

    def _calibrate(self, model: LoadedModel, n: int = 1000) -> None:
        """Seed the model's cost estimate with two timed runs (1 row, ``n`` rows)."""
        assert self.pipeline is not None
        ids = np.zeros((n, len(model.card.fields)), dtype=np.int64)
        times = []
        for rows in (1, n):
            t0 = time.perf_counter()
            try:
                model.run(ids[:rows])
            except ModelError as exc:  # serve anyway: the breaker deals with a failing model
                log.warning("cannot time %s: %s", model.key, exc.message)
                return
            times.append((time.perf_counter() - t0) * 1e3)
        self.pipeline.costs[model.key].calibrate(times[0], n, times[1])

    # -- inference -----------------------------------------------------------------------
    def _require(self) -> tuple[FeatureSpace, Pipeline]:
        if not self.ready or self.features is None or self.pipeline is None:
            raise NotReady("models are not loaded yet", retry_after_s=self.config.retry_after_s)
        return self.features, self.pipeline

    def deadline(self, field_ms: int | None, header_ms: int | None, start: str | None) -> Deadline:
        """The request's deadline; 503 at once if it has already passed (queued too long)."""
        deadline = Deadline.from_request(field_ms, header_ms, self.config.default_timeout_ms, start)
        if deadline.remaining_ms() <= 0:
            raise DeadlineExceeded(
                f"the request waited {deadline.elapsed_ms():.0f} ms before reaching a worker;"
                f" its budget was {deadline.budget_ms:.0f} ms",
                retry_after_s=self.config.retry_after_s,
            )
        return deadline

    async def call(
        self,
        fn: Callable[..., T],
        *args: object,
        cost_ms: float = 0.0,
        body_bytes: int = 0,
        deadline: Deadline | None = None,
    ) -> T:
        """Run ``fn(*args)`` where inference runs: inline, or on an inference thread
        behind admission control, with a watchdog that stops its model runs at the
        deadline.

        ``body_bytes`` decides in ``auto`` mode; ``cost_ms`` orders the admission queue.
        """
        admission = self.admission
        if admission is None or (
            self.config.inference == "auto" and body_bytes <= self.config.inline_max_body_bytes
        ):
            # PERF: inline, /predict did 3855 vs 3217 RPS (+20%) and 386 vs 468 us of worker
            # CPU per request (docs/ARCHITECTURE.md, "Measured choices"). Inline work
            # blocks the loop, so it needs no slot: it cannot overlap another inline one.
            return fn(*args)
        if deadline is None:
            deadline = Deadline(self.config.default_timeout_ms)
        loop = asyncio.get_running_loop()
        watchdog = loop.call_later(max(deadline.remaining_ms(), 0.0) / 1e3, deadline.expire)
        try:
            return await admission.run(cost_ms, deadline, fn, *args)
        except asyncio.CancelledError:
            deadline.expire()  # the client is gone: stop its model runs now
            raise
        finally:
            watchdog.cancel()

    def estimate_rank_ms(self, request: RankRequest, kind: ContentKind) -> float:
        """Model time of a ranking, from its body size, before decoding the candidates."""
        _, pipeline = self._require()
        n = max(1, int(len(request.candidates) / self._bytes_per_candidate[kind]))
        n = min(n, self.config.max_candidates)
        return pipeline.estimate_ms(n, request.stage1_k, request.multi_stage)

    def rank(
        self, request: RankRequest, kind: ContentKind, deadline: Deadline | None = None
    ) -> RankResult:
        features, pipeline = self._require()
        ids, _ = features.decode(request.candidates, kind)
        if len(ids):
            bpc = self._bytes_per_candidate
            bpc[kind] += 0.1 * (len(request.candidates) / len(ids) - bpc[kind])
        top_k = request.top_k
        if top_k is None:  # the default never contradicts an explicit, smaller stage1_k
            top_k = min(self.config.default_top_k, request.stage1_k or self.config.default_top_k)
        return pipeline.rank(ids, top_k, request.stage1_k, request.multi_stage, deadline)

    def predict(self, request: PredictRequest, kind: ContentKind) -> tuple[np.ndarray, Scorer]:
        features, _ = self._require()
        name = self.config.predict_model if request.model is None else request.model
        model = self.models.get(name)
        if model is None:
            raise InvalidRequest(f"unknown model; loaded: {sorted(self.models)}", field="model")
        if bool(request.candidate) == bool(request.candidates):
            raise InvalidRequest("send exactly one of 'candidate' or 'candidates'", field=None)
        if request.candidate:
            ids = features.decode_one(request.candidate, kind)
        else:
            ids, _ = features.decode(request.candidates, kind)
            if len(ids) > self.config.max_predict_candidates:
                raise InvalidRequest(
                    f"at most {self.config.max_predict_candidates} candidates per /predict;"
                    " use /rank for more",
                    field="candidates",
                )
        breaker = self.breakers[model.key]
        if not breaker.allow():
            raise ModelUnavailable(
                f"model {model.key} is failing; its circuit breaker is open",
                field="model",
                retry_after_s=max(1, round(breaker.retry_after_s())),
            )
        try:
            scores = model.run(ids)
        except ModelError as exc:
            _count_failure(model.key, failure_kind(exc))
            breaker.failure()
            raise
        breaker.success()
        self.drift.record(model.key, ids, scores)
        return scores, model

    def breaker_states(self) -> dict[str, BreakerState]:
        return {
            key: BreakerState(state=b.state, failures=b.failures, opened_for_s=b.opened_for_s())
            for key, b in self.breakers.items()
        }

    # -- introspection -------------------------------------------------------------------
    def summaries(self) -> list[ModelSummary]:
        stage_of: Mapping[str, list[int]] = {
            name: [i + 1 for i, s in enumerate(self.config.stages) if s.model == name]
            for name in self.models
        }
        return [
            ModelSummary(
                name=m.name,
                version=m.version,
                architecture=m.card.architecture,
                fields=list(m.card.field_names),
                sha256=m.card.sha256,
                size_bytes=m.card.size_bytes,
                metrics=m.card.metrics,
                pool_size=m.pool_size,
                stages=stage_of[name],
            )
            for name, m in self.models.items()
        ]


def _log_breaker(name: str, state: str) -> None:
    log.warning("circuit breaker changed", extra={"model": name, "state": state})
    metrics.set_breaker(name, state)


def _count_failure(model: str, kind: str) -> None:
    metrics.MODEL_FAILURES.labels(model, kind).inc()
