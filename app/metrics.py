"""Prometheus metrics, correct across gunicorn's worker processes.

prometheus_client's multiprocess mode: every worker writes its samples to memory-mapped
files under ``PROMETHEUS_MULTIPROC_DIR`` (set by ``deploy/gunicorn.conf.py`` from
``Config.metrics_dir`` before any worker starts; the master empties the directory at
start and marks a dead worker's gauges dead, ``child_exit``), and ``GET /metrics`` on
any worker merges all of them. Without that variable (unit tests, one process) the
same metrics live in this process's default registry.

Recording is on the hot path, so label children are bound once per label set.

Reading back: :func:`collect` returns the merged metric families (what ``/metrics``
renders); :class:`Samples` indexes them for ``/stats`` (totals, histogram quantiles),
so any worker answers for the whole farm.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from app.config import prometheus_multiproc_dir

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _Pid:
    """This process's pid, read once and again after a fork (``os.register_at_fork``).

    PERF: prometheus_client's multiprocess values call their ``process_identifier`` on
    every write to notice a fork; ``os.getpid`` is a system call (glibc caches nothing),
    ~0.6-2 us, 7 writes per /predict. The cached value is the same pid, fork included.
    """

    value = os.getpid()

    @classmethod
    def refresh(cls) -> None:
        cls.value = os.getpid()

    @classmethod
    def get(cls) -> int:
        return cls.value


os.register_at_fork(after_in_child=_Pid.refresh)
if prometheus_multiproc_dir():
    # Read by every metric below as it is built (prometheus_client picks its value class
    # at import, from the same variable): the same mmap files, named by the same pid.
    values.ValueClass = values.MultiProcessValue(process_identifier=_Pid.get)

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
)  # fmt: skip
_CANDIDATE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2000, 3000, 5000)

REQUESTS = Counter(
    "ctr_farm_requests", "Requests answered by the app", ["endpoint", "status", "model"]
)
LATENCY = Histogram(
    "ctr_farm_request_duration_seconds",
    "Time in the app per request (decode, queue, inference, encode)",
    ["endpoint"],
    buckets=_LATENCY_BUCKETS,
)
STAGE_LATENCY = Histogram(
    "ctr_farm_stage_duration_seconds",
    "Time per cascade stage that ran",
    ["stage", "model"],
    buckets=_LATENCY_BUCKETS,
)
CANDIDATES = Histogram(
    "ctr_farm_candidates", "Candidates per /rank request", buckets=_CANDIDATE_BUCKETS
)
PREDICT_BATCH_ROWS = Histogram(
    "ctr_farm_predict_batch_rows",
    "Rows per micro-batched /predict model run (predict_batch_max > 1; 1 = ran alone)",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
IN_FLIGHT = Gauge("ctr_farm_in_flight", "Requests inside the app now", multiprocess_mode="livesum")
QUEUED = Gauge(
    "ctr_farm_queue_waiting",
    "Requests waiting for an inference slot now",
    multiprocess_mode="livesum",
)
SHED = Counter("ctr_farm_shed", "Requests refused with 503 to protect latency", ["reason"])
DEGRADED = Counter(
    "ctr_farm_degraded",
    "Rankings answered by an earlier stage or the fallback",
    ["answered_by", "reason"],
)
BREAKER = Gauge(
    "ctr_farm_breaker_state",
    "Circuit breaker per model: 0 closed, 1 half-open, 2 open (worst worker)",
    ["model"],
    multiprocess_mode="livemax",
)
MODEL_FAILURES = Counter("ctr_farm_model_failures", "Model runs that failed", ["model", "kind"])
# The first stage's score cache (app/cache.py; only with cache_entries > 0). Hit rate:
# hits / (hits + misses), e.g. the recording rule in deploy/prometheus.rules.yml.
CACHE_HITS = Counter("ctr_farm_cache_hits", "Candidate rows scored from the cache", ["model"])
CACHE_MISSES = Counter(
    "ctr_farm_cache_misses", "Candidate rows looked up and not cached", ["model"]
)
CACHE_EVICTIONS = Counter(
    "ctr_farm_cache_evictions", "Cached rows dropped: size, ttl or clear", ["model", "reason"]
)
CACHE_ENTRIES = Gauge(
    "ctr_farm_cache_entries", "Rows in the score caches now", ["model"], multiprocess_mode="livesum"
)
OOV_IDS = Counter(
    "ctr_farm_oov_ids", "Ids mapped to their field's out-of-vocabulary bucket", ["field"]
)
SESSION_WAIT = Histogram(
    "ctr_farm_session_wait_seconds",
    "Time a model run waited for a free session of its pool (only runs that had to wait)",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "ctr_farm_queue_wait_seconds",
    "Time a request waited in its worker's admission queue for an inference thread",
    buckets=_LATENCY_BUCKETS,
)
SLA_REQUESTS = Counter(
    "ctr_farm_sla_requests",
    "Requests of an endpoint with a latency objective, by outcome: within / over (2xx"
    " answered within / beyond it), failed (5xx), invalid (4xx)",
    ["endpoint", "outcome"],
)
WINDOW_REQUESTS = Gauge(
    "ctr_farm_window_requests",
    "Requests by endpoint and SLA outcome over the last stats_window_s seconds",
    ["endpoint", "outcome"],
    multiprocess_mode="livesum",
)
REQUEST_LOG_ROWS = Counter(
    "ctr_farm_request_log_rows",
    "Request log rows: written, dropped (queue full) or failed (SQLite error)",
    ["result"],
)
DRIFT_ROWS = Gauge(
    "ctr_farm_drift_window_rows",
    "Sampled candidate rows scored by a model over the last drift_window_s seconds, by"
    " feature (a field, or ctr: the predicted CTR) and bin (a card top id, other, oov; or"
    " the CTR bin's lower edge)",
    ["model", "feature", "bin"],
    multiprocess_mode="livesum",
)
DRIFT_CTR_SUM = Gauge(
    "ctr_farm_drift_window_ctr_sum",
    "Sum of the sampled predicted CTRs over the last drift_window_s seconds",
    ["model"],
    multiprocess_mode="livesum",
)
WORKERS = Gauge("ctr_farm_workers", "Worker processes serving", multiprocess_mode="livesum")
STARTED = Gauge(
    "ctr_farm_start_time_seconds",
    "Unix time the oldest live worker became ready",
    multiprocess_mode="livemin",
)
# A worker that is still loading must not be the oldest: +Inf until it is ready.
STARTED.set(math.inf)
#: Computed when /metrics is read, from the merged drift windows (app/drift.py); no
#: worker sets them. Declared here so the exported names live in one module.
DRIFT_PSI = Gauge(
    "ctr_farm_drift_psi",
    "PSI of a model's feature (a field, or ctr) over the drift window vs its card",
    ["model", "feature"],
    multiprocess_mode="livemax",
)
DRIFT_STATE = Gauge(
    "ctr_farm_drift_state",
    "Drift per model: -1 insufficient data, 0 ok, 1 warn, 2 alert",
    ["model"],
    multiprocess_mode="livemax",
)
PREDICTED_CTR_MEAN = Gauge(
    "ctr_farm_predicted_ctr_mean",
    "Mean predicted CTR of a model over the drift window (sampled rows)",
    ["model"],
    multiprocess_mode="livemax",
)

# -- traffic: A/B variants, canary, shadow (app/traffic.py) -------------------------------
_SHARE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_CTR_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
VARIANT_REQUESTS = Counter(
    "ctr_farm_variant_requests",
    "Requests per A/B variant; outcome ok, degraded, error (5xx, or degraded by a failing"
    " model) or client_error",
    ["variant", "endpoint", "outcome"],
)
VARIANT_LATENCY = Histogram(
    "ctr_farm_variant_request_duration_seconds",
    "Time in the app per request, per A/B variant",
    ["variant", "endpoint"],
    buckets=_LATENCY_BUCKETS,
)
VARIANT_CTR = Histogram(
    "ctr_farm_variant_predicted_ctr",
    "Mean predicted CTR of the candidates returned, per variant (a guardrail)",
    ["variant", "endpoint"],
    buckets=_CTR_BUCKETS,
)
AGREEMENT = Histogram(
    "ctr_farm_agreement",
    "Overlap of another lineup's answer with the served one (shadow or canary vs stable):"
    " what = topk (returned) or stage1 (kept by stage 1)",
    ["comparison", "what"],
    buckets=_SHARE_BUCKETS,
)
COMPARE_LATENCY = Histogram(
    "ctr_farm_compare_duration_seconds",
    "Time the other lineup took on a compared request (off the request path)",
    ["comparison"],
    buckets=_LATENCY_BUCKETS,
)
COMPARE_DROPPED = Counter(
    "ctr_farm_compare_dropped", "Comparisons dropped: the comparator was busy", ["comparison"]
)
COMPARE_FAILED = Counter(
    "ctr_farm_compare_failed", "Comparisons whose other lineup failed", ["comparison"]
)
CANARY_WEIGHT = Gauge(
    "ctr_farm_canary_weight", "Share of keys on the canary now", multiprocess_mode="livemax"
)
CANARY_STATUS = Gauge(
    "ctr_farm_canary_status",
    "Canary rollout: 0 running, 1 promoted, 2 rolled back",
    multiprocess_mode="livemax",
)

BREAKER_LEVEL = {"closed": 0, "half_open": 1, "open": 2}


@cache
def requests_child(endpoint: str, status: str, model: str):
    return REQUESTS.labels(endpoint, status, model)


@cache
def latency_child(endpoint: str):
    return LATENCY.labels(endpoint)


@cache
def stage_child(stage: str, model: str):
    return STAGE_LATENCY.labels(stage, model)


@cache
def oov_child(field: str):
    return OOV_IDS.labels(field)


@cache
def session_wait_child(model: str):
    return SESSION_WAIT.labels(model)


def collect() -> list[Metric]:
    """Every worker's metric families merged (multiprocess mode), or this process's."""
    path = prometheus_multiproc_dir()
    if not path:
        return list(REGISTRY.collect())
    return list(multiprocess.MultiProcessCollector(None, path=path).collect())


class _Families:
    """A collector over already collected families (``generate_latest`` wants one)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self.families


def render(families: Iterable[Metric] | None = None) -> bytes:
    """The exposition text of ``families`` (default: :func:`collect`)."""
    return generate_latest(_Families(collect() if families is None else families))


#: Statuses nginx answers itself (no worker involved), tallied in ``run/front-<status>.tally``.
FRONT_STATUSES = ("429", "503")
FRONT_REJECTED = Counter(
    "ctr_farm_front_rejected",
    "Requests nginx answered itself, no worker asked: 429 rate_limited, 503"
    " upstream_unavailable (counted from nginx's tally logs when /metrics is read)",
    ["status"],
)


def front_rejected(run_path: Path) -> CounterMetricFamily:
    """``FRONT_REJECTED`` from nginx's tally logs: each answer adds ``x\\n`` (2 bytes)."""
    family = CounterMetricFamily(
        FRONT_REJECTED._name, FRONT_REJECTED._documentation, labels=["status"]
    )
    for status in FRONT_STATUSES:
        try:
            size = (run_path / f"front-{status}.tally").stat().st_size
        except FileNotFoundError:
            size = 0  # nothing refused yet (nginx creates the file on the first)
        family.add_metric([status], size // 2)
    return family


def computed(gauge: Gauge, values: Iterable[tuple[Sequence[str], float]]) -> GaugeMetricFamily:
    """One of the gauges computed at read time (e.g. ``DRIFT_PSI``) with its values."""
    family = GaugeMetricFamily(gauge._name, gauge._documentation, labels=gauge._labelnames)
    for label_values, value in values:
        family.add_metric(list(label_values), value)
    return family


def with_computed(families: Iterable[Metric], extra: Sequence[Metric]) -> list[Metric]:
    """``families`` with the computed ones in place of their (empty) declarations."""
    names = {f.name for f in extra}
    return [f for f in families if f.name not in names] + list(extra)


class Samples:
    """The samples of collected families, indexed by sample name, for reading back."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.by_name: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in families:
            for sample in family.samples:
                self.by_name.setdefault(sample.name, []).append((sample.labels, sample.value))

    def select(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """``(labels, value)`` of the samples of ``name`` that carry ``labels``."""
        return [
            (have, value)
            for have, value in self.by_name.get(name, ())
            if all(have.get(k) == v for k, v in labels.items())
        ]

    def total(self, name: str, **labels: str) -> float:
        return sum(value for _, value in self.select(name, **labels))

    def by_label(self, name: str, label: str, **labels: str) -> dict[str, float]:
        """``name``'s samples summed by the value of one label."""
        out: dict[str, float] = {}
        for have, value in self.select(name, **labels):
            out[have.get(label, "")] = out.get(have.get(label, ""), 0.0) + value
        return out

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """A histogram's cumulative ``(upper bound, count)`` pairs, summed over the label
        sets that carry ``labels``."""
        merged = self.by_label(f"{name}_bucket", "le", **labels)
        return sorted((float(le), count) for le, count in merged.items())


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Estimate the ``q`` quantile from cumulative buckets, as PromQL's
    ``histogram_quantile`` does: linear within the bucket that holds it (from 0 for the
    first); in the +Inf bucket, the highest finite bound. None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


@cache
def variant_children(variant: str, endpoint: str):
    """(requests by outcome, latency, predicted CTR) children of one variant/endpoint."""
    outcomes = {
        o: VARIANT_REQUESTS.labels(variant, endpoint, o)
        for o in ("ok", "degraded", "error", "client_error")
    }
    return (
        outcomes,
        VARIANT_LATENCY.labels(variant, endpoint),
        VARIANT_CTR.labels(variant, endpoint),
    )


def touch_comparison(label: str) -> None:
    """Export a comparison's drop and failure counters from 0, before the first one."""
    COMPARE_DROPPED.labels(label)
    COMPARE_FAILED.labels(label)


def variant_snapshot(endpoint: str = "/rank") -> dict[str, Any]:
    """Farm-wide counters the canary is judged on, per variant: requests, errors,
    cumulative latency buckets; and canary-vs-stable agreement sums and counts."""
    out: dict[str, Any] = {}
    for family in collect():
        for sample in family.samples:
            labels = sample.labels
            if family.name == "ctr_farm_variant_requests" and sample.name.endswith("_total"):
                if labels["endpoint"] != endpoint:
                    continue
                row = out.setdefault(labels["variant"], {"requests": 0.0, "errors": 0.0})
                row["requests"] += sample.value
                if labels["outcome"] == "error":
                    row["errors"] += sample.value
            elif (
                family.name == "ctr_farm_variant_request_duration_seconds"
                and sample.name.endswith("_bucket")
                and labels["endpoint"] == endpoint
            ):
                row = out.setdefault(labels["variant"], {"requests": 0.0, "errors": 0.0})
                buckets = row.setdefault("buckets", {})
                buckets[labels["le"]] = buckets.get(labels["le"], 0.0) + sample.value
            elif family.name == "ctr_farm_agreement" and labels.get("comparison") == "canary":
                part = sample.name.rsplit("_", 1)[-1]
                if part in ("sum", "count"):
                    agree = out.setdefault("agreement", {}).setdefault(labels["what"], {})
                    agree[part] = agree.get(part, 0.0) + sample.value
    return out


def set_breaker(model: str, state: str) -> None:
    BREAKER.labels(model).set(BREAKER_LEVEL[state])


def mark_dead(pid: int) -> None:
    """gunicorn ``child_exit``: drop a dead worker's live gauges."""
    if prometheus_multiproc_dir():
        multiprocess.mark_process_dead(pid)
