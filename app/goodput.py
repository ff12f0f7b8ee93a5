"""Goodput: answers within their endpoint's latency objective (SLA).

Every ``/rank`` and ``/predict`` request ends in one outcome:

    within   answered (2xx) within the endpoint's SLA (``sla_rank_ms``, ``sla_predict_ms``)
    over     answered (2xx), later than that
    failed   a 5xx: shed (503), deadline, model error
    invalid  a 4xx: the client's request was wrong; not held against the SLA

Goodput is the ``within`` answers per second; SLA compliance is
``within / (within + over + failed)``. Degraded answers (``degraded: true``) are answers:
they count by their latency (their share is in ``ctr_farm_degraded_total``). The clock
starts when nginx received the request (``X-Request-Start``; the app's own time when
absent), like the request's deadline.

Outcomes go to ``ctr_farm_sla_requests_total{endpoint,outcome}`` (since the start; PromQL
derives rates) and to a sliding window published as ``ctr_farm_window_requests`` (the
last ``stats_window_s`` seconds, farm-wide, for ``/stats``).
"""

from __future__ import annotations

from app import metrics
from app.config import Config
from app.window import PublishedWindow, SlidingCounts

OUTCOMES = ("within", "over", "failed", "invalid")
#: Slices of the stats window (60 s -> 5 s slices).
WINDOW_SLICES = 12


def outcome(status: int, latency_ms: float, sla_ms: float) -> str:
    if status >= 500:
        return "failed"
    if status >= 400:
        return "invalid"
    return "within" if latency_ms <= sla_ms else "over"


def compliance(within: float, over: float, failed: float) -> float | None:
    """Share of the requests held against the SLA that met it (None: there were none)."""
    judged = within + over + failed
    return within / judged if judged else None


class Goodput:
    """Per worker: classifies each answered request and counts its outcome."""

    def __init__(self, config: Config) -> None:
        self.sla_ms = {"/rank": config.sla_rank_ms, "/predict": config.sla_predict_ms}
        keys = [(e, o) for e in self.sla_ms for o in OUTCOMES]
        self._index = {key: i for i, key in enumerate(keys)}
        self._counters = {key: metrics.SLA_REQUESTS.labels(*key) for key in keys}
        counts = SlidingCounts(len(keys), config.stats_window_s, WINDOW_SLICES)
        children = [metrics.WINDOW_REQUESTS.labels(*key) for key in keys]
        self.window = PublishedWindow(counts, children)

    def record(self, endpoint: str, status: int, latency_ms: float) -> str | None:
        """Count one answered request; its outcome (None for endpoints without an SLA)."""
        sla = self.sla_ms.get(endpoint)
        if sla is None:
            return None
        key = (endpoint, outcome(status, latency_ms, sla))
        self._counters[key].inc()
        self.window.counts.add(self._index[key])
        return key[1]

    def publish(self) -> None:
        self.window.publish()
