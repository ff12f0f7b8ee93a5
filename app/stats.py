"""``GET /stats``: the farm's summary, built from every worker's metrics.

The answering worker reads the same merged metric families as ``/metrics`` (all
workers' files), so any worker answers for the whole farm. What the figures mean:

- ``endpoints[e].requests``, ``outcomes``, ``sla_compliance``, ``latency``: since the farm
  started (counters and histograms of every worker, dead ones included). Quantiles are
  estimated from the histogram buckets.
- ``endpoints[e].window``: the last ``stats_window_s`` seconds (live workers' sliding
  windows, :mod:`app.window`; up to a second behind): throughput is requests answered
  per second, goodput answers within the SLA per second.
- ``drift``: per model version, PSI over the last ``drift_window_s`` seconds
  (:mod:`app.drift`).
"""

from __future__ import annotations

import math
import os
import time

from app import metrics
from app.config import Config
from app.drift import DriftMonitor
from app.goodput import OUTCOMES, WINDOW_SLICES, compliance
from app.metrics import Samples
from app.schema import (
    EndpointStats,
    LatencySummary,
    RequestLogStats,
    StatsResponse,
    WindowSummary,
)
from app.window import covered_s

_BREAKER_NAMES = {level: name for name, level in metrics.BREAKER_LEVEL.items()}


def latency(samples: Samples, name: str, **labels: str) -> LatencySummary:
    """Count, mean and p50/p95/p99 (in ms) of a seconds histogram."""
    buckets = samples.buckets(name, **labels)
    count = int(buckets[-1][1]) if buckets else 0
    if not count:
        return LatencySummary(count=0)
    total_s = samples.total(f"{name}_sum", **labels)

    def ms(q: float) -> float | None:
        value = metrics.quantile(q, buckets)
        return None if value is None else round(value * 1e3, 3)

    return LatencySummary(
        count=count,
        mean_ms=round(total_s / count * 1e3, 3),
        p50_ms=ms(0.5),
        p95_ms=ms(0.95),
        p99_ms=ms(0.99),
    )


def endpoint(
    samples: Samples, config: Config, path: str, now: float, since: float | None
) -> EndpointStats:
    sla_ms = config.sla_ms(path)
    assert sla_ms is not None, path
    totals = samples.by_label("ctr_farm_sla_requests_total", "outcome", endpoint=path)
    recent = samples.by_label("ctr_farm_window_requests", "outcome", endpoint=path)
    outcomes = {o: int(totals.get(o, 0)) for o in OUTCOMES}
    window = {o: int(recent.get(o, 0)) for o in OUTCOMES}
    seconds = round(covered_s(config.stats_window_s, WINDOW_SLICES, now, since), 3)
    answered = sum(window.values())
    return EndpointStats(
        sla_ms=sla_ms,
        requests=sum(outcomes.values()),
        outcomes=outcomes,
        sla_compliance=compliance(outcomes["within"], outcomes["over"], outcomes["failed"]),
        latency=latency(samples, "ctr_farm_request_duration_seconds", endpoint=path),
        window=WindowSummary(
            seconds=seconds,
            requests=answered,
            throughput_rps=round(answered / seconds, 3) if seconds > 0 else 0.0,
            goodput_rps=round(window["within"] / seconds, 3) if seconds > 0 else 0.0,
            sla_compliance=compliance(window["within"], window["over"], window["failed"]),
        ),
    )


def build(
    config: Config,
    samples: Samples,
    drift: DriftMonitor,
    fields: tuple[str, ...] = (),
    now: float | None = None,
) -> StatsResponse:
    """The summary; ``oov_ids`` lists ``fields`` (the served models' fields)."""
    now = time.time() if now is None else now
    ready_since = [v for _, v in samples.select("ctr_farm_start_time_seconds") if 0 < v < math.inf]
    since = min(ready_since) if ready_since else None
    stages: dict[str, dict[str, LatencySummary]] = {}
    for labels, _ in samples.select("ctr_farm_stage_duration_seconds_count"):
        stage, model = labels["stage"], labels["model"]
        name = "ctr_farm_stage_duration_seconds"
        stages.setdefault(stage, {})[model] = latency(samples, name, stage=stage, model=model)
    session_models = samples.by_label("ctr_farm_session_wait_seconds_count", "model")
    oov = samples.by_label("ctr_farm_oov_ids_total", "field")
    degraded = {
        f"{labels['answered_by']}/{labels['reason']}": int(value)
        for labels, value in samples.select("ctr_farm_degraded_total")
    }
    log_rows = samples.by_label("ctr_farm_request_log_rows_total", "result")
    return StatsResponse(
        pid=os.getpid(),
        workers=int(samples.total("ctr_farm_workers")),
        uptime_s=round(now - since, 3) if since else None,
        endpoints={p: endpoint(samples, config, p, now, since) for p in ("/rank", "/predict")},
        stages=stages,
        in_flight=int(samples.total("ctr_farm_in_flight")),
        queue_waiting=int(samples.total("ctr_farm_queue_waiting")),
        queue_wait=latency(samples, "ctr_farm_queue_wait_seconds"),
        session_wait={
            m: latency(samples, "ctr_farm_session_wait_seconds", model=m) for m in session_models
        },
        shed={k: int(v) for k, v in samples.by_label("ctr_farm_shed_total", "reason").items()},
        degraded=degraded,
        oov_ids={f: int(oov.get(f, 0)) for f in fields},
        breakers={
            model: _BREAKER_NAMES.get(int(level), str(level))
            for model, level in samples.by_label("ctr_farm_breaker_state", "model").items()
        },
        request_log=RequestLogStats(
            enabled=bool(config.request_log),
            written=int(log_rows.get("written", 0)),
            dropped=int(log_rows.get("dropped", 0)),
            failed=int(log_rows.get("failed", 0)),
        ),
        drift=drift.report(samples),
    )
