"""What the farm answers, as msgspec Structs the client decodes into.

These mirror the response Structs of :mod:`app.schema` (a test checks that every field
the server sends is here with the same schema) but are defined on their own: importing
``app`` pulls in the server's modules, and a client must not load ONNX Runtime.
Unknown fields are ignored and the newer fields have defaults, so a client and a farm
of neighbouring versions still understand each other.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Ranking(msgspec.Struct):
    #: Position of the candidate in the request.
    index: int
    ctr: float
    #: 1 for the best.
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
    #: True when the answer is not the full cascade's (see ``answered_by``, ``reason``).
    degraded: bool = False
    answered_by: str = ""
    reason: str | None = None
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
    breakers: dict[str, BreakerState] = {}
    draining: bool = False


class CardMetrics(msgspec.Struct):
    valid_auc: float
    test_auc: float
    test_logloss: float


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
    """The outcome of a worker's last reload."""

    at: float
    generation: int
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
    weights: dict[str, float]
    lineups: dict[str, list[str]]
    shadow: list[str] | None = None
    canary: CanaryStatus | None = None


class ModelsResponse(msgspec.Struct):
    models: list[ModelSummary]
    generation: int = 0
    rejected: list[RejectedVersion] = []
    last_reload: ReloadStatus | None = None
    pid: int = 0
    traffic: TrafficStatus | None = None
