"""The inference core of one worker process (knows nothing of HTTP).

``Farm`` has an explicit lifecycle: ``load()`` after fork (sessions, warm-up, the
executor), then ``rank()`` / ``predict()`` from any thread, then ``close()``. The
Falcon layer in :mod:`app.api` only decodes, calls this, and encodes.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import msgspec
import numpy as np

from app import metrics, registry, tracing
from app.admission import Admission
from app.breaker import Breaker
from app.config import Config
from app.deadlines import Deadline
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
from app.schema import (
    BreakerState,
    ModelSummary,
    PredictRequest,
    RankRequest,
    RejectedVersion,
    ReloadStatus,
)
from app.sessions import LoadedModel

log = logging.getLogger(__name__)
T = TypeVar("T")
#: ``(model name, version dir, config) -> LoadedModel``; tests inject failing models.
ModelFactory = Callable[[str, Path, Config], LoadedModel]


def load_model(name: str, model_dir: Path, config: Config) -> LoadedModel:
    return LoadedModel(
        model_dir,
        pool_size=config.pool_size,
        intra_threads=config.intra_threads,
        inter_threads=config.inter_threads,
        verify_sha256=config.verify_sha256,
        share_weights=config.share_weights,
        shared_arena=config.shared_arena,
        profile_dir=config.ort_profile_path if config.ort_profiling else None,
    )


@dataclass(frozen=True, slots=True)
class Lineup:
    """The model versions a worker serves and the cascade over them.

    A reload builds a new one and swaps it in with one assignment: a request reads the
    lineup once and finishes on it, so it never mixes versions; the old lineup's
    sessions are freed when its last request lets go of it.
    """

    generation: int
    models: dict[str, LoadedModel]
    pipeline: Pipeline
    breakers: dict[str, Breaker]


@dataclass(slots=True)
class _Versions:
    """What the model settings resolved to: one validated model per name, and the
    versions rejected on the way (key ``name/version`` -> reason)."""

    models: dict[str, LoadedModel] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)


class Farm:
    def __init__(
        self,
        config: Config,
        model_factory: ModelFactory = load_model,
        tracer: tracing.Tracer | None = None,
    ) -> None:
        self.config = config
        self._factory = model_factory
        #: Request and stage spans (``Config.tracing``; built by ``load()`` unless given).
        self.tracer = tracer
        self._lineup: Lineup | None = None
        self.features: FeatureSpace | None = None
        #: Versions the last boot or reload refused (``name/version`` -> reason).
        self.rejected: dict[str, str] = {}
        self.last_reload: ReloadStatus | None = None
        self._reload_lock = threading.Lock()
        #: Inference threads and their queue (``load()``; none when ``inline``).
        self.admission: Admission | None = None
        #: Bytes of request body per candidate, by wire format: estimates a request's
        #: size (hence its cost) before its candidates are decoded.
        self._bytes_per_candidate: dict[ContentKind, float] = {"json": 250.0, "msgpack": 60.0}
        self.ready = False

    @property
    def models(self) -> dict[str, LoadedModel]:
        return self._lineup.models if self._lineup else {}

    @property
    def pipeline(self) -> Pipeline | None:
        return self._lineup.pipeline if self._lineup else None

    @property
    def breakers(self) -> dict[str, Breaker]:
        return self._lineup.breakers if self._lineup else {}

    @property
    def generation(self) -> int:
        return self._lineup.generation if self._lineup else 0

    # -- lifecycle -----------------------------------------------------------------------
    def load(self) -> None:
        """Load every configured model, check they agree on fields, warm up, go ready."""
        t0 = time.perf_counter()
        found = self._resolve(current={})
        self.rejected = found.rejected
        layouts = {m.card.field_names for m in found.models.values()}
        if len(layouts) != 1:
            raise ModelLoadError(f"models disagree on their input fields: {sorted(layouts)}")
        first = next(iter(found.models.values()))
        self.features = FeatureSpace(first.card.fields, self.config.max_candidates)
        if self.tracer is None:
            self.tracer = tracing.from_config(self.config)  # after fork: this worker's own
        self._lineup = self._build(found.models, previous=None)
        if self.config.inference != "inline":
            self.admission = Admission(
                slots=self.config.pool_size,
                max_queue=self.config.max_queue,
                max_wait_ms=self.config.max_queue_wait_ms,
                aging_ms=self.config.queue_aging_ms,
                retry_after_s=self.config.retry_after_s,
            )
        self.ready = True
        log.info(
            "farm ready",
            extra={
                "pid": os.getpid(),
                "models": [m.key for m in self.models.values()],
                "rejected": self.rejected,
                "pool_size": self.config.pool_size,
                "load_s": round(time.perf_counter() - t0, 3),
            },
        )

    def _names(self) -> list[str]:
        return list(
            dict.fromkeys([s.model for s in self.config.stages] + [self.config.predict_model])
        )

    def _resolve(self, current: Mapping[str, LoadedModel]) -> _Versions:
        """The newest valid version of every model; the ``current`` one stays when no
        newer version validates (it was validated when it came in)."""
        out = _Versions()
        for name in self._names():
            setting = self.config.model_dirs()[name]
            serving = current.get(name)
            for version_dir in registry.candidates(setting):
                if serving is not None and version_dir == serving.dir:
                    break
                try:
                    out.models[name] = self._validated(name, version_dir)
                    break
                except ModelLoadError as exc:
                    out.rejected[f"{name}/{version_dir.name}"] = exc.message
                    log.error(
                        "model version rejected",
                        extra={"model": name, "version": version_dir.name, "reason": exc.message},
                    )
            if name not in out.models:
                if serving is None:
                    reasons = "; ".join(out.rejected.values())
                    raise ModelLoadError(f"no valid version of model {name!r}: {reasons}")
                out.models[name] = serving
        return out

    def _validated(self, name: str, version_dir: Path) -> LoadedModel:
        """Load one version and prove it works: hash, signature (in the factory), warm-up,
        the golden request, and the same fields as the version it would replace."""
        model = self._factory(name, version_dir, self.config)
        if model.name != name:
            raise ModelLoadError(f"model dir for {name!r} holds a card named {model.name!r}")
        if version_dir.name.isdigit() and version_dir.name != model.version:
            raise ModelLoadError(
                f"{name}/{version_dir.name} holds a card for version {model.version!r}"
            )
        if self.features is not None and model.card.field_names != self.features.names:
            raise ModelLoadError(
                f"{model.key} takes fields {list(model.card.field_names)}; the farm serves"
                f" {list(self.features.names)}"
            )
        model.warm_up(self.config.warmup_runs)
        registry.check_golden(model)
        return model

    def _build(self, models: dict[str, LoadedModel], previous: Lineup | None) -> Lineup:
        """A lineup over ``models``; breakers and cost estimates of versions that stay
        carry over, new versions get fresh ones (calibrated here)."""
        old_breakers = previous.breakers if previous else {}
        breakers = {
            m.key: old_breakers.get(m.key)
            or Breaker(
                m.key,
                self.config.breaker_failures,
                self.config.breaker_reset_s,
                on_change=_log_breaker,
            )
            for m in models.values()
        }
        first = next(iter(models.values()))
        pipeline = Pipeline(
            [Stage(models[s.model], s.keep_k) for s in self.config.stages],
            models[self.config.predict_model],
            self.config.max_candidates,
            breakers=breakers,
            fallback=self._fallback(first),
            on_failure=_count_failure,
            tracer=self.tracer,
        )
        for key in breakers.keys() - old_breakers.keys():
            metrics.set_breaker(key, "closed")
        for model in models.values():
            if previous is not None and model.key in previous.pipeline.costs:
                pipeline.costs[model.key] = previous.pipeline.costs[model.key]
            else:
                self._calibrate(pipeline, model)
        generation = previous.generation + 1 if previous else 1
        return Lineup(generation, dict(models), pipeline, breakers)

    def reload(self) -> ReloadStatus:
        """Serve the newest valid version of every model, without dropping a request.

        New versions are loaded and validated while the current lineup serves; the
        switch is one assignment. A version that fails validation is rejected (logged,
        listed at ``/models``) and the current one goes on serving. Reloads run one at
        a time; a reload with nothing new is a no-op.
        """
        with self._reload_lock:
            current = self._lineup
            if current is None or not self.ready:
                raise NotReady("models are not loaded yet")
            t0 = time.perf_counter()
            try:
                found = self._resolve(current.models)
            except ModelLoadError as exc:  # a repository emptied under us: keep serving
                found = _Versions(models=dict(current.models), rejected={"*": exc.message})
            changed = sorted(
                m.key for n, m in found.models.items() if m is not current.models.get(n)
            )
            if changed:
                self._lineup = self._build(found.models, previous=current)
            self.rejected = found.rejected
            status = ReloadStatus(
                at=time.time(),
                generation=self.generation,
                changed=changed,
                rejected=_rejected_list(found.rejected),
                seconds=round(time.perf_counter() - t0, 3),
            )
            self.last_reload = status
        log.info(
            "models reloaded" if changed else "reload: nothing new",
            extra={"pid": os.getpid(), **msgspec.structs.asdict(status)},
        )
        return status

    def close(self) -> None:
        self.ready = False
        if self.admission is not None:
            self.admission.close()
            # Later calls run inline and meet NotReady (503), not a closed queue (500).
            self.admission = None
        for model in self.models.values():
            model.close()
        if self.tracer is not None:
            self.tracer.shutdown()  # exports the spans still buffered

    def models_status(self) -> tuple[list[RejectedVersion], ReloadStatus | None]:
        return _rejected_list(self.rejected), self.last_reload

    def _fallback(self, model: LoadedModel) -> Scorer | None:
        if self.config.fallback == "none":
            return None
        if not model.card.distribution or "creative" not in model.card.field_names:
            log.warning("no fallback ranking: the model card has no creative distribution")
            return None
        return Popularity(model.card.field_names, model.card.distribution)

    def _calibrate(self, pipeline: Pipeline, model: LoadedModel, n: int = 1000) -> None:
        """Seed the model's cost estimate with two timed runs (1 row, ``n`` rows)."""
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
        pipeline.costs[model.key].calibrate(times[0], n, times[1])

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
        if self.tracer is not None:
            # The inference thread runs the job in the request's context: its stage spans
            # are children of the request's span.
            fn = functools.partial(contextvars.copy_context().run, fn)
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
        lineup = self._lineup
        assert lineup is not None  # _require() checked
        name = self.config.predict_model if request.model is None else request.model
        model = lineup.models.get(name)
        if model is None:
            raise InvalidRequest(f"unknown model; loaded: {sorted(lineup.models)}", field="model")
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
        breaker = lineup.breakers[model.key]
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


#: An absolute path in a reason: shown by its last three parts (``name/version/file``).
_ABS_PATH = re.compile(r"(?<![\w.])/[^\s:'\"]+")


def _short_path(match: re.Match[str]) -> str:
    return "/".join(match.group(0).rstrip("/").split("/")[-3:])


def _rejected_list(rejected: Mapping[str, str]) -> list[RejectedVersion]:
    out = []
    for key, reason in sorted(rejected.items()):
        name, _, version = key.partition("/")
        public = _ABS_PATH.sub(_short_path, reason)
        out.append(RejectedVersion(name=name, version=version, reason=public))
    return out


def _log_breaker(name: str, state: str) -> None:
    log.warning("circuit breaker changed", extra={"model": name, "state": state})
    metrics.set_breaker(name, state)


def _count_failure(model: str, kind: str) -> None:
    metrics.MODEL_FAILURES.labels(model, kind).inc()
