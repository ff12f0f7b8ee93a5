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
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from app.config import Config
from app.errors import InvalidRequest, ModelLoadError, NotReady
from app.features import ContentKind, FeatureSpace
from app.pipeline import Pipeline, RankResult, Scorer, Stage
from app.schema import ModelSummary, PredictRequest, RankRequest
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
    )


class Farm:
    def __init__(self, config: Config, model_factory: ModelFactory = load_model) -> None:
        self.config = config
        self._factory = model_factory
        self.models: dict[str, LoadedModel] = {}
        self.features: FeatureSpace | None = None
        self.pipeline: Pipeline | None = None
        self._executor: ThreadPoolExecutor | None = None
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
        self.pipeline = Pipeline(
            stages, self.models[self.config.predict_model], self.config.max_candidates
        )
        if self.config.inference != "inline":
            self._executor = ThreadPoolExecutor(
                max_workers=self.config.pool_size, thread_name_prefix="infer"
            )
        for model in self.models.values():
            model.warm_up(self.config.warmup_runs)
        self.ready = True
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
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            # Later calls run inline and meet NotReady (503), not a closed executor (500).
            self._executor = None
        for model in self.models.values():
            model.close()

    async def call(self, fn: Callable[..., T], *args: object, cost: int = 0) -> T:
        """Run ``fn`` where inference runs: the bounded executor, or inline.

        ``cost`` (the body size in bytes) decides in ``auto`` mode.
        """
        executor = self._executor
        if executor is None or (
            self.config.inference == "auto" and cost <= self.config.inline_max_body_bytes
        ):
            # PERF: inline, /predict did 3855 vs 3217 RPS (+20%) and 386 vs 468 us of worker
            # CPU per request (docs/ARCHITECTURE.md, "Measured choices").
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    # -- inference -----------------------------------------------------------------------
    def _require(self) -> tuple[FeatureSpace, Pipeline]:
        if not self.ready or self.features is None or self.pipeline is None:
            raise NotReady("models are not loaded yet")
        return self.features, self.pipeline

    def rank(self, request: RankRequest, kind: ContentKind) -> RankResult:
        features, pipeline = self._require()
        ids, _ = features.decode(request.candidates, kind)
        top_k = request.top_k
        if top_k is None:  # the default never contradicts an explicit, smaller stage1_k
            top_k = min(self.config.default_top_k, request.stage1_k or self.config.default_top_k)
        return pipeline.rank(ids, top_k, request.stage1_k, request.multi_stage)

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
        return model.run(ids), model

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
