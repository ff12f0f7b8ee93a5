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


class HelloResponse(msgspec.Struct):
    """``GET /hello``: the trivial answer (the floor of a request's cost through the stack)."""

    hello: str


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


# -- /stats: the farm's summary, from every worker's metrics --------------------------------
class LatencySummary(msgspec.Struct):
    """Quantiles estimated from a histogram's buckets (linear within a bucket, as PromQL's
    ``histogram_quantile``); None without observations."""

    count: int
    mean_ms: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None


class WindowSummary(msgspec.Struct):
    #: Seconds of traffic counted: ``stats_window_s`` (less in the farm's first minute).
    seconds: float
    requests: int
    throughput_rps: float
    #: Answers within the SLA per second.
    goodput_rps: float
    #: within / (within + over + failed); None without such requests.
    sla_compliance: float | None = None


class EndpointStats(msgspec.Struct):
    sla_ms: float
    #: Since the farm started (every worker, dead ones included).
    requests: int
    #: ``within``, ``over`` (2xx within / beyond the SLA), ``failed`` (5xx), ``invalid`` (4xx).
    outcomes: dict[str, int]
    sla_compliance: float | None
    #: Time in the app (``ctr_farm_request_duration_seconds``), since the start.
    latency: LatencySummary
    #: The last ``stats_window_s`` seconds.
    window: WindowSummary


class RequestLogStats(msgspec.Struct):
    enabled: bool
    written: int = 0
    #: Rows not logged because the worker's queue was full (never a delayed request).
    dropped: int = 0
    #: Rows lost to a SQLite error (see the worker log).
    failed: int = 0


class FeatureDrift(msgspec.Struct):
    #: Window vs card; None when the window is empty.
    psi: float | None
    #: Fields only: share of ids mapped to OOV, and of ids among the card's top ids.
    oov_rate: float | None = None
    card_oov_rate: float | None = None
    top_share: float | None = None
    card_top_share: float | None = None


class ModelDrift(msgspec.Struct):
    #: ``ok``, ``warn``, ``alert`` (worst feature PSI against the thresholds) or
    #: ``insufficient_data`` (fewer sampled rows than ``drift_min_rows``).
    state: str
    #: Sampled rows in the window (every worker).
    rows: int
    window_s: int
    ctr_mean: float | None
    card_ctr_mean: float | None
    #: The feature with the highest PSI.
    worst: str | None
    #: Per field, and ``ctr`` for the predicted CTR.
    features: dict[str, FeatureDrift]


class StatsResponse(msgspec.Struct):
    """``GET /stats``: the whole farm (all workers' metrics), whichever worker answers."""

    #: The worker that answered.
    pid: int
    #: Live workers, and seconds since the oldest of them became ready.
    workers: int
    uptime_s: float | None
    #: ``/rank`` and ``/predict``: SLA, outcomes, latency, recent throughput and goodput.
    endpoints: dict[str, EndpointStats]
    #: Stage (``stage1``, ...) -> model (``name/version``) -> its time per request.
    stages: dict[str, dict[str, LatencySummary]]
    in_flight: int
    queue_waiting: int
    #: Waits for an inference thread (admission queue), and per model for a free session.
    queue_wait: LatencySummary
    session_wait: dict[str, LatencySummary]
    #: 503s by code (``overloaded``, ``deadline_exceeded``, ...).
    shed: dict[str, int]
    #: Degraded rankings by ``<answered_by>/<reason>``.
    degraded: dict[str, int]
    #: Ids mapped to the OOV bucket, per field.
    oov_ids: dict[str, int]
    #: Worst breaker state of each model across the workers.
    breakers: dict[str, str]
    request_log: RequestLogStats
    #: Per model version (``name/version``); see README "Monitoring".
    drift: dict[str, ModelDrift]


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
