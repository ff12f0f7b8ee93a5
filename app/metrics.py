"""Prometheus metrics, correct across gunicorn's worker processes.

prometheus_client's multiprocess mode: every worker writes its samples to memory-mapped
files under ``PROMETHEUS_MULTIPROC_DIR`` (set by ``deploy/gunicorn.conf.py`` from
``Config.metrics_dir`` before any worker starts; the master empties the directory at
start and marks a dead worker's gauges dead, ``child_exit``), and ``GET /metrics`` on
any worker merges all of them. Without that variable (unit tests, one process) the
same metrics live in this process's default registry.

Recording is on the hot path, so label children are bound once per label set.
"""

from __future__ import annotations

from functools import cache

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from app.config import prometheus_multiproc_dir

CONTENT_TYPE = CONTENT_TYPE_LATEST

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


def render() -> bytes:
    """The exposition text: every worker's samples merged, or this process's."""
    path = prometheus_multiproc_dir()
    if not path:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return generate_latest(registry)


def set_breaker(model: str, state: str) -> None:
    BREAKER.labels(model).set(BREAKER_LEVEL[state])


def mark_dead(pid: int) -> None:
    """gunicorn ``child_exit``: drop a dead worker's live gauges."""
    if prometheus_multiproc_dir():
        multiprocess.mark_process_dead(pid)
