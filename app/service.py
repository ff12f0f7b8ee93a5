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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np

from app import metrics, registry, tracing
from app.admission import Admission
from app.batching import PredictBatcher
from app.breaker import Breaker
from app.cache import CachedScorer, ScoreCache
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
from app.pipeline import (
    CostModel,
    Pipeline,
    Popularity,
    RankResult,
    Scorer,
    Stage,
    failure_kind,
)
from app.schema import (
    BreakerState,
    CanaryStatus,
    ModelSummary,
    PredictRequest,
    RankRequest,
    RejectedVersion,
    ReloadStatus,
    TrafficStatus,
)
from app.sessions import LoadedModel
from app.traffic import (
    CANARY,
    SHADOW,
    STABLE,
    CanaryController,
    Comparator,
    Comparison,
    Router,
    sampled,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
#: ``(model name, version dir, config) -> LoadedModel``; tests inject failing models.
ModelFactory = Callable[[str, Path, Config], LoadedModel]


def validate_version(
    name: str,
    version_dir: Path,
    config: Config,
    factory: ModelFactory | None = None,
    fields: tuple[str, ...] | None = None,
) -> LoadedModel:
    """Load one version and prove it works: hash, signature (in the factory), warm-up,
    the golden request, and (``fields``) the same fields as the version it would replace.
    What a worker checks before a version serves (``ctr-farm models validate`` too)."""
    model = (factory or load_model)(name, version_dir, config)
    if model.name != name:
        raise ModelLoadError(f"model dir for {name!r} holds a card named {model.name!r}")
    if version_dir.name.isdigit() and version_dir.name != model.version:
        raise ModelLoadError(
            f"{name}/{version_dir.name} holds a card for version {model.version!r}"
        )
    if fields is not None and model.card.field_names != fields:
        raise ModelLoadError(
            f"{model.key} takes fields {list(model.card.field_names)}; the farm serves"
            f" {list(fields)}"
        )
    model.warm_up(config.warmup_runs)
    registry.check_golden(model)
    return model


def load_model(name: str, model_dir: Path, config: Config) -> LoadedModel:
    return LoadedModel(
        model_dir,
        pool_size=config.pool_size,
        intra_threads=config.intra_threads,
        inter_threads=config.inter_threads,
        verify_sha256=config.verify_sha256,
        share_weights=config.share_weights,
        shared_arena=config.shared_arena,
        mem_pattern=config.mem_pattern,
        prepack=config.prepack_weights,
        profile_dir=config.ort_profile_path if config.ort_profiling else None,
    )


@dataclass(frozen=True, slots=True)
class Lineup:
    """The model versions one variant serves and the cascade over them.

    A reload builds new ones and swaps them in with one assignment: a request reads its
    lineup once and finishes on it, so it never mixes versions; an old lineup's
    sessions are freed when its last request lets go of it.
    """

    variant: str
    models: dict[str, LoadedModel]
    pipeline: Pipeline
    breakers: dict[str, Breaker]


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
        #: Variant name -> its lineup; the first is the default (``stable`` without A/B).
        self._lineups: dict[str, Lineup] = {}
        #: Lineup compared off the request path on a share of ``/rank`` (``shadow``).
        self._shadow: Lineup | None = None
        #: Bumped by every reload that changes a version (1 after boot).
        self.generation = 0
        self.features: FeatureSpace | None = None
        #: Versions the last boot or reload refused (``name/version`` -> reason).
        self.rejected: dict[str, str] = {}
        self.last_reload: ReloadStatus | None = None
        self._reload_lock = threading.Lock()
        #: One breaker and one cost estimate per model version, whichever lineups use it.
        self._breakers: dict[str, Breaker] = {}
        self._costs: dict[str, CostModel] = {}
        self.router = Router(
            [(v.name, v.weight) for v in config.variants] or [(STABLE, 1.0)], config.split_salt
        )
        self.comparator: Comparator | None = None
        self.canary: CanaryController | None = None
        #: The first stage's score cache, by model key (``cache_entries`` > 0; app/cache.py).
        self.caches: dict[str, ScoreCache] = {}
        #: Inference threads and their queue (``load()``; none when ``inline``).
        self.admission: Admission | None = None
        #: Pending one-candidate /predict batches (``predict_batch_max`` > 1).
        self.batcher: PredictBatcher | None = None
        #: Bytes of request body per candidate, by wire format: estimates a request's
        #: size (hence its cost) before its candidates are decoded.
        self._bytes_per_candidate: dict[ContentKind, float] = {"json": 250.0, "msgpack": 60.0}
        #: Model monitoring: inputs and CTRs of whole-request batches vs the cards, per
        #: served version (not the shadow's: it scores the same requests again).
        self.drift = DriftMonitor(config)
        self.ready = False

    @property
    def _lineup(self) -> Lineup | None:
        return next(iter(self._lineups.values()), None)

    @property
    def models(self) -> dict[str, LoadedModel]:
        return self._lineup.models if self._lineup else {}

    @property
    def pipeline(self) -> Pipeline | None:
        return self._lineup.pipeline if self._lineup else None

    @property
    def breakers(self) -> dict[str, Breaker]:
        return dict(self._breakers)

    @property
    def lineups(self) -> dict[str, Lineup]:
        return dict(self._lineups)

    # -- lifecycle -----------------------------------------------------------------------
    def load(self) -> None:
        """Load every configured model, check they agree on fields, warm up, go ready."""
        t0 = time.perf_counter()
        found, self.rejected = self._resolve_all({})
        layouts = {m.card.field_names for ms in found.values() for m in ms.values()}
        if len(layouts) != 1:
            raise ModelLoadError(f"models disagree on their input fields: {sorted(layouts)}")
        first = next(iter(next(iter(found.values())).values()))
        self.features = FeatureSpace(first.card.fields, self.config.max_candidates)
        if self.tracer is None:
            self.tracer = tracing.from_config(self.config)  # after fork: this worker's own
        lineups = {variant: self._build(variant, models) for variant, models in found.items()}
        self._shadow = lineups.pop(SHADOW, None)
        self._lineups, self.generation = lineups, 1
        if self._shadow is not None or self.config.canary is not None:
            self.comparator = Comparator()
            if self._shadow is not None:
                metrics.touch_comparison(SHADOW)
            if self.config.canary is not None:
                metrics.touch_comparison(CANARY)
        if self.config.canary is not None:
            self.canary = CanaryController(self.config.canary, self.config.run_path, self.router)
            self.canary.start()
        if self.config.inference != "inline":
            self.admission = Admission(
                slots=self.config.pool_size,
                max_queue=self.config.max_queue,
                max_wait_ms=self.config.max_queue_wait_ms,
                aging_ms=self.config.queue_aging_ms,
                retry_after_s=self.config.retry_after_s,
                on_start=metrics.QUEUE_WAIT.observe,
            )
        if self.config.predict_batch_max > 1:
            self.batcher = PredictBatcher(
                self.config.predict_batch_max,
                self.config.predict_batch_wait_us,
                self.config.retry_after_s,
                on_run=lambda key, rows: metrics.PREDICT_BATCH_ROWS.labels(key).observe(rows),
            )
        self.ready = True
        metrics.WORKERS.set(1)
        metrics.STARTED.set(time.time())
        log.info(
            "farm ready",
            extra={
                "pid": os.getpid(),
                "lineups": {v: [m.key for m in ln.models.values()] for v, ln in lineups.items()},
                "shadow": [m.key for m in self._shadow.models.values()] if self._shadow else None,
                "rejected": self.rejected,
                "pool_size": self.config.pool_size,
                "load_s": round(time.perf_counter() - t0, 3),
            },
        )

    def _names(self) -> list[str]:
        return list(
            dict.fromkeys([s.model for s in self.config.stages] + [self.config.predict_model])
        )

    def _settings(self) -> dict[str, Any]:
        """Variant -> its model-settings override (None: the farm's own), shadow last."""
        config = self.config
        out: dict[str, Any]
        if config.variants:
            out = {v.name: v for v in config.variants}
        elif config.canary is not None:
            out = {STABLE: None, CANARY: config.canary}
        else:
            out = {STABLE: None}
        if config.shadow is not None:
            out[SHADOW] = config.shadow
        return out

    def _resolve_all(
        self, current: Mapping[str, Lineup]
    ) -> tuple[dict[str, dict[str, LoadedModel]], dict[str, str]]:
        """Per variant, the newest valid version of every model (one load per version
        dir, shared by the variants that resolve to it), and the versions rejected."""
        loaded = {m.dir: m for ln in current.values() for m in ln.models.values()}
        rejected: dict[str, str] = {}
        found = {}
        for variant, override in self._settings().items():
            serving = current[variant].models if variant in current else {}
            found[variant] = self._resolve(
                self.config.model_dirs(override), serving, loaded, rejected
            )
        return found, rejected

    def _resolve(
        self,
        settings: Mapping[str, Path],
        serving: Mapping[str, LoadedModel],
        loaded: dict[Path, LoadedModel],
        rejected: dict[str, str],
    ) -> dict[str, LoadedModel]:
        """The newest valid version of every model named by ``settings``; the serving
        one stays when no newer version validates (it was validated when it came in)."""
        out: dict[str, LoadedModel] = {}
        for name in self._names():
            current = serving.get(name)
            for version_dir in registry.candidates(settings[name]):
                if current is not None and version_dir == current.dir:
                    break
                if version_dir in loaded and loaded[version_dir].name == name:
                    out[name] = loaded[version_dir]
                    break
                key = f"{name}/{version_dir.name}"
                if key in rejected:
                    continue
                try:
                    out[name] = loaded[version_dir] = self._validated(name, version_dir)
                    break
                except ModelLoadError as exc:
                    rejected[key] = exc.message
                    log.error(
                        "model version rejected",
                        extra={"model": name, "version": version_dir.name, "reason": exc.message},
                    )
            if name not in out:
                if current is None:
                    reasons = "; ".join(rejected.values())
                    raise ModelLoadError(f"no valid version of model {name!r}: {reasons}")
                out[name] = current
        return out

    def _validated(self, name: str, version_dir: Path) -> LoadedModel:
        fields = self.features.names if self.features is not None else None
        return validate_version(name, version_dir, self.config, self._factory, fields)

    def _build(self, variant: str, models: dict[str, LoadedModel]) -> Lineup:
        """A lineup over ``models``; a version keeps its breaker and cost estimate across
        reloads and lineups, a new version gets fresh ones (calibrated here)."""
        for model in models.values():
            if model.key not in self._breakers:
                self._breakers[model.key] = Breaker(
                    model.key,
                    self.config.breaker_failures,
                    self.config.breaker_reset_s,
                    on_change=_log_breaker,
                )
                metrics.set_breaker(model.key, "closed")
        breakers = {m.key: self._breakers[m.key] for m in models.values()}
        if variant != SHADOW:
            self._monitor(models.values())
        first = next(iter(models.values()))
        stages = [Stage(models[s.model], s.keep_k) for s in self.config.stages]
        stages[0] = self._cached(stages[0], width=len(first.card.fields))
        pipeline = Pipeline(
            stages,
            models[self.config.predict_model],
            self.config.max_candidates,
            breakers=breakers,
            fallback=self._fallback(first),
            on_failure=_count_failure,
            tracer=self.tracer,
        )
        for model in models.values():
            if model.key not in self._costs:
                self._calibrate(pipeline, model)
                self._costs[model.key] = pipeline.costs[model.key]
            pipeline.costs[model.key] = self._costs[model.key]
        return Lineup(variant, dict(models), pipeline, breakers)

    def reload(self) -> ReloadStatus:
        """Serve the newest valid version of every model, without dropping a request.

        New versions are loaded and validated while the current lineups serve; the
        switch is one assignment. A version that fails validation is rejected (logged,
        listed at ``/models``) and the current one goes on serving. Reloads run one at
        a time; a reload with nothing new is a no-op.
        """
        with self._reload_lock:
            if not self._lineups or not self.ready:
                raise NotReady("models are not loaded yet")
            t0 = time.perf_counter()
            current = dict(self._lineups)
            if self._shadow is not None:
                current[SHADOW] = self._shadow
            try:
                found, rejected = self._resolve_all(current)
            except ModelLoadError as exc:  # a repository emptied under us: keep serving
                found = {v: dict(ln.models) for v, ln in current.items()}
                rejected = {"*": exc.message}
            changed: set[str] = set()
            lineups: dict[str, Lineup] = {}
            for variant, models in found.items():
                old = current[variant]
                new = {m.key for n, m in models.items() if m is not old.models.get(n)}
                lineups[variant] = self._build(variant, models) if new else old
                changed |= new
            if changed:
                self._shadow = lineups.pop(SHADOW, None)
                self._lineups = lineups  # the switch: one assignment
                self.generation += 1
                served = {key for ln in lineups.values() for key in ln.breakers}
                used = served | (set(self._shadow.breakers) if self._shadow else set())
                self._breakers = {k: b for k, b in self._breakers.items() if k in used}
                self._costs = {k: c for k, c in self._costs.items() if k in used}
                self.clear_cache()  # invalidated on every reload that changes a version
                self.caches = {k: c for k, c in self.caches.items() if k in used}
                self.drift.retain(served)  # the shadow's reruns are not monitored
            self.rejected = rejected
            status = ReloadStatus(
                at=time.time(),
                generation=self.generation,
                changed=sorted(changed),
                rejected=_rejected_list(rejected),
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
        metrics.WORKERS.set(0)
        if self.canary is not None:
            self.canary.close()
        if self.comparator is not None:
            self.comparator.close()
        if self.admission is not None:
            self.admission.close()
            # Later calls run inline and meet NotReady (503), not a closed queue (500).
            self.admission = None
        lineups = [*self._lineups.values(), *([self._shadow] if self._shadow else [])]
        for model in {id(m): m for ln in lineups for m in ln.models.values()}.values():
            model.close()
        if self.tracer is not None:
            self.tracer.shutdown()  # exports the spans still buffered

    def models_status(self) -> tuple[list[RejectedVersion], ReloadStatus | None]:
        return _rejected_list(self.rejected), self.last_reload

    @property
    def split(self) -> bool:
        """Traffic is split between lineups (A/B variants or a canary)."""
        return bool(self.config.variants) or self.config.canary is not None

    def traffic_status(self) -> TrafficStatus:
        canary = None
        if self.canary is not None:
            state = self.canary.state
            canary = CanaryStatus(
                status=state.status,
                step=state.step,
                weight=state.weight,
                reason=state.reason,
                figures=state.figures,
            )
        return TrafficStatus(
            weights=dict(self.router.weights),
            lineups={v: [m.key for m in ln.models.values()] for v, ln in self._lineups.items()},
            shadow=[m.key for m in self._shadow.models.values()] if self._shadow else None,
            canary=canary,
        )

    def _cached(self, stage: Stage, width: int) -> Stage:
        """The first stage behind a score cache, when ``cache_entries`` asks for one."""
        if not self.config.cache_entries:
            return stage
        key = stage.scorer.key
        cache = self.caches.get(key)  # one per version, shared by the lineups using it
        if cache is None:
            cache = ScoreCache(key, self.config.cache_entries, self.config.cache_ttl_s, width)
            self.caches[key] = cache
        return Stage(CachedScorer(stage.scorer, cache), stage.keep_k)

    def clear_cache(self) -> int:
        """Drop every cached score; returns how many rows were dropped. A model reload
        must call this once the new sessions serve (entries are per model version, but a
        version's weights could change in place)."""
        return sum(cache.clear() for cache in self.caches.values())

    def _monitor(self, models: Iterable[LoadedModel]) -> None:
        """Drift monitoring for served versions not monitored yet."""
        for model in models:
            if model.key not in self.drift.models and not self.drift.add(model.key, model.card):
                log.warning(
                    "no drift monitoring: the card has no distribution", extra={"model": model.key}
                )

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
    def _require(self, variant: str = "") -> tuple[FeatureSpace, Lineup]:
        """The feature space and the variant's lineup (the default one for ``""``)."""
        lineups = self._lineups
        if not self.ready or self.features is None or not lineups:
            raise NotReady("models are not loaded yet", retry_after_s=self.config.retry_after_s)
        return self.features, lineups.get(variant) or next(iter(lineups.values()))

    def route(self, key: str) -> str:
        """The variant that serves a request key (stable hash; see app/traffic.py)."""
        return self.router.choose(key)

    def deadline(self, field_ms: int | None, header_ms: int | None, waited_s: float) -> Deadline:
        """The request's deadline; 503 at once if it has already passed (queued too long).
        ``waited_s``: the time since nginx received it (``parse_start``)."""
        deadline = Deadline.from_request(
            field_ms, header_ms, self.config.default_timeout_ms, waited_s
        )
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
        if admission is None or self._inline(body_bytes):
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

    def _inline(self, body_bytes: int) -> bool:
        """Does a request of this size run on the event loop (no admission, no hop)?"""
        if self.admission is None:
            return True
        return self.config.inference == "auto" and body_bytes <= self.config.inline_max_body_bytes

    async def serve_predict(
        self,
        request: PredictRequest,
        kind: ContentKind,
        variant: str = "",
        body_bytes: int = 0,
        deadline: Deadline | None = None,
    ) -> tuple[np.ndarray, LoadedModel]:
        """``/predict``: one candidate that runs inline joins its model's micro-batch
        (``predict_batch_max`` > 1); anything else runs as :meth:`predict` via :meth:`call`."""
        batcher = self.batcher
        if (
            batcher is not None
            and request.candidate
            and not request.candidates
            and self._inline(body_bytes)
        ):
            features, lineup = self._require(variant)
            model = self._model(lineup, request.model)
            ids = features.decode_one(request.candidate, kind)
            run = partial(self._run_batch, lineup, model)
            return await batcher.submit(model.key, ids, run, deadline), model
        return await self.call(
            self.predict,
            request,
            kind,
            variant,
            cost_ms=0.0,
            body_bytes=body_bytes,
            deadline=deadline,
        )

    def _run_batch(
        self, lineup: Lineup, model: LoadedModel, key: str, ids: np.ndarray
    ) -> np.ndarray:
        """Score decoded ids and sample them for drift: :meth:`predict` after decoding,
        and one run of a micro-batch."""
        scores = _score(lineup, model, ids)
        self.drift.record(key, ids, scores)
        return scores

    def estimate_rank_ms(self, request: RankRequest, kind: ContentKind) -> float:
        """Model time of a ranking, from its body size, before decoding the candidates."""
        _, lineup = self._require()
        pipeline = lineup.pipeline
        n = max(1, int(len(request.candidates) / self._bytes_per_candidate[kind]))
        n = min(n, self.config.max_candidates)
        return pipeline.estimate_ms(n, request.stage1_k, request.multi_stage)

    def rank(
        self,
        request: RankRequest,
        kind: ContentKind,
        deadline: Deadline | None = None,
        variant: str = "",
    ) -> RankResult:
        features, lineup = self._require(variant)
        ids, _ = features.decode(request.candidates, kind)
        if len(ids):
            bpc = self._bytes_per_candidate
            bpc[kind] += 0.1 * (len(request.candidates) / len(ids) - bpc[kind])
        top_k = self._top_k(request.top_k, request.stage1_k)
        result = _rank(lineup, ids, top_k, request.stage1_k, request.multi_stage, deadline)
        if result.stage1_scores is not None:  # served requests only: not shadow reruns
            self.drift.record(result.models[0], ids, result.stage1_scores)
        if self.comparator is not None and not result.degraded:
            self._compare(
                lineup,
                partial(
                    Pipeline.rank,
                    ids=ids,
                    top_k=top_k,
                    stage1_k=request.stage1_k,
                    multi_stage=request.multi_stage,
                ),
                result,
            )
        return result

    def _top_k(self, top_k: int | None, stage1_k: int | None) -> int:
        if top_k is None:  # the default never contradicts an explicit, smaller stage1_k
            top_k = min(self.config.default_top_k, stage1_k or self.config.default_top_k)
        return top_k

    def rank_ids(
        self,
        ids: np.ndarray,
        top_k: int | None = None,
        stage1_k: int | None = None,
        multi_stage: bool = True,
        variant: str = "",
    ) -> RankResult:
        """Rank a decoded, OOV-mapped id matrix with the variant's cascade: what ``/rank``
        runs after decoding, without a deadline or shadow comparison (offline scoring)."""
        _, lineup = self._require(variant)
        return _rank(lineup, ids, self._top_k(top_k, stage1_k), stage1_k, multi_stage)

    def _compare(self, lineup: Lineup, rank: Callable[..., RankResult], result: RankResult) -> None:
        """Hand a served ranking to the comparator: against the shadow lineup (a sampled
        share of all), and a canary's against stable (a sampled share of the canary's)."""
        assert self.comparator is not None
        shadow, config = self._shadow, self.config
        if shadow is not None and config.shadow is not None and sampled(config.shadow.share):
            self.comparator.submit(Comparison(SHADOW, partial(rank, shadow.pipeline), result))
        stable, canary = self._lineups.get(STABLE), config.canary
        on_canary = lineup.variant == CANARY and stable is not None and canary is not None
        if on_canary and sampled(canary.compare_share):
            self.comparator.submit(Comparison(CANARY, partial(rank, stable.pipeline), result))

    def predict(
        self, request: PredictRequest, kind: ContentKind, variant: str = ""
    ) -> tuple[np.ndarray, LoadedModel]:
        features, lineup = self._require(variant)
        model = self._model(lineup, request.model)
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
        return self._run_batch(lineup, model, model.key, ids), model

    def _model(self, lineup: Lineup, name: str | None) -> LoadedModel:
        model = lineup.models.get(self.config.predict_model if name is None else name)
        if model is None:
            raise InvalidRequest(f"unknown model; loaded: {sorted(lineup.models)}", field="model")
        return model

    def model(self, name: str | None = None, variant: str = "") -> LoadedModel:
        """A served model by name (None: ``predict_model``); unknown: 400 naming ``model``."""
        return self._model(self._require(variant)[1], name)

    def score(self, ids: np.ndarray, name: str | None = None, variant: str = "") -> np.ndarray:
        """One model's run (None: ``predict_model``) on a decoded, OOV-mapped id matrix,
        behind its breaker: what ``/predict`` runs after decoding (offline scoring)."""
        _, lineup = self._require(variant)
        return _score(lineup, self._model(lineup, name), ids)

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


def _rank(
    lineup: Lineup,
    ids: np.ndarray,
    top_k: int,
    stage1_k: int | None,
    multi_stage: bool,
    deadline: Deadline | None = None,
) -> RankResult:
    """``lineup``'s cascade on ``ids``, the answer marked with its variant."""
    result = lineup.pipeline.rank(ids, top_k, stage1_k, multi_stage, deadline)
    return replace(result, variant=lineup.variant)


def _score(lineup: Lineup, model: LoadedModel, ids: np.ndarray) -> np.ndarray:
    """``model`` scores ``ids``, guarded by its breaker in ``lineup``, failures counted."""
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
    return scores


def _log_breaker(name: str, state: str) -> None:
    log.warning("circuit breaker changed", extra={"model": name, "state": state})
    metrics.set_breaker(name, state)


def _count_failure(model: str, kind: str) -> None:
    metrics.MODEL_FAILURES.labels(model, kind).inc()
