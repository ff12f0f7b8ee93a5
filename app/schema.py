"""The wire contract: msgspec Structs for requests, responses and model cards.

Candidates are decoded lazily (``msgspec.Raw``) because their form (objects keyed by
field name, rows of ids, or columns) is only known once the body is seen, and their
field names come from the model card; :mod:`app.features` owns that decoding.
Limits that do not depend on configuration are ``Meta`` constraints here; the
configured ones (``max_candidates``) are checked in :mod:`app.features`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
#: A request's time budget in ms (``timeout_ms`` or the ``X-Request-Timeout-Ms`` header).
TimeoutMs = Annotated[int, msgspec.Meta(ge=1, le=600_000)]
#: Request ids are echoed into a header: keep them short and printable.
REQUEST_ID_MAX = 128


# -- requests ------------------------------------------------------------------------------
#: A/B split key (a user or session id): the same key always lands on the same variant.
UserKey = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class RankRequest(msgspec.Struct, forbid_unknown_fields=True):
    candidates: msgspec.Raw
    top_k: PositiveInt | None = None
    stage1_k: PositiveInt | None = None
    multi_stage: bool = True
    #: Budget for the whole request, counted from when nginx received it.
    timeout_ms: TimeoutMs | None = None
    #: A/B key (or the ``X-User-Key`` header); without one, the request id decides.
    user_key: UserKey | None = None


class PredictRequest(msgspec.Struct, forbid_unknown_fields=True):
    #: Any of the three candidate forms, or ``candidate`` for exactly one object.
    #: An empty ``Raw`` means "absent" (msgspec does not allow ``Raw | None``).
    candidates: msgspec.Raw = msgspec.Raw()
    candidate: msgspec.Raw = msgspec.Raw()
    model: str | None = None
    timeout_ms: TimeoutMs | None = None
    user_key: UserKey | None = None


# -- responses -----------------------------------------------------------------------------
class Ranking(msgspec.Struct):
    index: int
    ctr: float
    rank: int


class RankStats(msgspec.Struct):
    input: int
    after_stage1: int
    output: int


class RankResponse(msgspec.Struct):
    rankings: list[Ranking]
    #: ``stage1_ms``, ``stage2_ms`` (one key per stage), ``total_ms``.
    latency: dict[str, float]
    stats: RankStats
    #: ``name/version`` of the model behind each stage that ran, in order.
    models: list[str]
    #: True when the answer is not the full cascade's: see ``answered_by`` and ``reason``.
    degraded: bool = False
    #: Which stage's order this is (``stage1``, ``stage2``, ...) or ``fallback``.
    answered_by: str = ""
    #: Why a degraded answer: ``deadline``, ``breaker_open``, ``stage_error`` or
    #: ``stage_timeout``; None when not degraded.
    reason: str | None = None
    #: The fallback ranking used (``popular``), when ``answered_by`` is ``fallback``.
    fallback: str | None = None
    #: The variant that answered (``stable`` without A/B; ``canary`` during a rollout).
    variant: str = ""


class PredictResponse(msgspec.Struct):
    ctr: list[float]
    model: str
    version: str
    variant: str = ""


class ErrorDetail(msgspec.Struct):
    code: str
    message: str
    field: str | None = None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail
    request_id: str | None = None


class HealthResponse(msgspec.Struct):
    status: str
    pid: int


class BreakerState(msgspec.Struct):
    state: str
    failures: int
    opened_for_s: float | None = None


class ReadyResponse(msgspec.Struct):
    ready: bool
    pid: int
    models: list[str]
    #: Circuit breaker per model (``closed``, ``open``, ``half_open``).
    breakers: dict[str, BreakerState] = {}
    draining: bool = False


# -- model cards ---------------------------------------------------------------------------
class CardField(msgspec.Struct, frozen=True):
    name: str
    vocab_size: PositiveInt
    oov_index: Annotated[int, msgspec.Meta(ge=0)]


class CardTensor(msgspec.Struct, frozen=True):
    name: str
    dtype: str
    shape: list[str | int]


class CardMetrics(msgspec.Struct, frozen=True):
    valid_auc: float
    test_auc: float
    test_logloss: float


class ModelCard(msgspec.Struct, frozen=True):
    """``models/<name>/<version>/card.json``: what a model expects and how good it is."""

    name: str
    version: str
    architecture: str
    fields: list[CardField]
    input: CardTensor
    output: CardTensor
    opset: int
    sha256: str
    size_bytes: int
    metrics: CardMetrics
    hyperparameters: dict[str, Any] = {}
    training: dict[str, Any] = {}
    distribution: dict[str, Any] | None = None

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)


class ModelSummary(msgspec.Struct):
    name: str
    version: str
    architecture: str
    fields: list[str]
    sha256: str
    size_bytes: int
    metrics: CardMetrics
    pool_size: int
    stages: list[int]


class RejectedVersion(msgspec.Struct):
    """A model version that failed validation (at boot or reload) and does not serve."""

    name: str
    version: str
    reason: str


class ReloadStatus(msgspec.Struct):
    """The outcome of this worker's last reload."""

    #: Unix time the reload finished.
    at: float
    #: The lineup serving after it (1 at boot, +1 per reload that changed a version).
    generation: int
    #: ``name/version`` of the versions it brought in (empty: nothing new).
    changed: list[str]
    rejected: list[RejectedVersion]
    seconds: float


class CanaryStatus(msgspec.Struct):
    """Where the canary rollout is (the leading worker's view, shared by all)."""

    status: str
    step: int
    weight: float
    reason: str | None = None
    figures: dict[str, Any] = {}


class TrafficStatus(msgspec.Struct):
    #: Share of keys per variant now.
    weights: dict[str, float]
    #: ``name/version`` of the models behind each variant.
    lineups: dict[str, list[str]]
    #: The shadow lineup's models (compared off the request path), if any.
    shadow: list[str] | None = None
    canary: CanaryStatus | None = None


class ModelsResponse(msgspec.Struct):
    models: list[ModelSummary]
    #: This worker's lineup generation (see ReloadStatus).
    generation: int = 0
    rejected: list[RejectedVersion] = []
    last_reload: ReloadStatus | None = None
    pid: int = 0
    traffic: TrafficStatus | None = None
