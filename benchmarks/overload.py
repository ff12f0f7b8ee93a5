"""Overload study: offered load at a multiple of measured capacity, under an SLA.

1. Capacity: closed-loop clients (``2 x workers`` connections: every worker always has
   one request running and one waiting) for ``capacity_s``; capacity = answers/s.
2. Overload: an open-loop schedule at ``factor x capacity`` for ``overload_s``
   (latency from each request's due time: no coordinated omission). Every body carries
   ``timeout_ms = sla_ms``, so the farm's deadline is the SLA.
3. ``rounds`` times: overload, then capacity again. Each overload phase is judged
   against the mean of the capacity phases on either side of it, because on a shared
   2-core machine capacity drifts by +-15% between runs; a capacity measured once,
   minutes away from the overload, made the goodput share mostly noise.
4. Figures: goodput (200s within the SLA per second) as a share of capacity (the median
   over the rounds, and each round's), p50/p99 of the accepted, how many were shed
   (503 + Retry-After) and how fast.

Loopback only; the stack is the caller's (``app.stack.running``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import msgspec
import numpy as np

from app.config import load
from app.sessions import read_card
from benchmarks.openloop import OpenLoopResult, run_closed_loop, run_open_loop

MSGPACK = "application/msgpack"


@dataclass
class OverloadFigures:
    sla_ms: float
    capacity_rps: float
    capacity_p99_ms: float
    offered_rps: float
    sent: int
    ok: int
    shed: int
    other: int
    errors: int
    goodput_rps: float
    goodput_share: float
    accepted_p50_ms: float
    accepted_p99_ms: float
    shed_p50_ms: float
    shed_p99_ms: float
    shed_with_retry_after: int
    #: Goodput share of each round, against the capacity measured around it.
    round_shares: list[float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def rank_bodies(n: int, count: int, sla_ms: int, seed: int = 7) -> list[bytes]:
    """``count`` msgpack /rank bodies of ``n`` candidates each (columnar form: ~30 KB
    instead of ~130 KB of objects, so the load driver on the same two cores costs the
    farm less), budget = the SLA."""
    config = load(env={})
    card = read_card(config.model_dirs()[config.predict_model])
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(count):
        columns = {f.name: rng.integers(0, f.vocab_size, n).tolist() for f in card.fields}
        body = {"candidates": columns, "top_k": 10, "stage1_k": 100, "timeout_ms": sla_ms}
        bodies.append(msgspec.msgpack.encode(body))
    return bodies


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


def _good(overload: OpenLoopResult, sla_ms: float) -> int:
    return sum(1 for status, ms in overload.samples if status == 200 and ms <= sla_ms)


def figures(
    sla_ms: float, capacities: list[OpenLoopResult], overloads: list[OpenLoopResult]
) -> OverloadFigures:
    """Figures of ``rounds`` overload phases, ``capacities`` measured before, between and
    after them (one more than ``overloads``)."""
    if len(capacities) != len(overloads) + 1:
        raise ValueError("need a capacity phase before and after every overload phase")
    samples = [s for o in overloads for s in o.samples]
    ok = [ms for status, ms in samples if status == 200]
    shed = [ms for status, ms in samples if status == 503]
    duration = sum(o.duration_s for o in overloads)
    shares = []
    for i, overload in enumerate(overloads):
        around = (capacities[i].rate + capacities[i + 1].rate) / 2
        goodput = _good(overload, sla_ms) / overload.duration_s
        shares.append(goodput / around if around else 0.0)
    return OverloadFigures(
        sla_ms=sla_ms,
        capacity_rps=float(np.mean([c.rate for c in capacities])),
        capacity_p99_ms=_pct([ms for c in capacities for _, ms in c.samples], 99),
        offered_rps=float(np.mean([o.rate for o in overloads])),
        sent=sum(o.sent for o in overloads),
        ok=len(ok),
        shed=len(shed),
        other=len(samples) - len(ok) - len(shed),
        errors=sum(o.errors for o in overloads),
        goodput_rps=sum(_good(o, sla_ms) for o in overloads) / duration,
        goodput_share=float(np.median(shares)),
        accepted_p50_ms=_pct(ok, 50),
        accepted_p99_ms=_pct(ok, 99),
        shed_p50_ms=_pct(shed, 50),
        shed_p99_ms=_pct(shed, 99),
        shed_with_retry_after=sum(o.retry_after for o in overloads),
        round_shares=[round(s, 3) for s in shares],
    )


def measure(
    url: str,
    workers: int,
    sla_ms: int = 100,
    factor: float = 2.0,
    n: int = 1000,
    capacity_s: float = 4.0,
    overload_s: float = 8.0,
    rounds: int = 1,
) -> OverloadFigures:
    bodies = rank_bodies(n, 32, sla_ms)
    rank_url = f"{url}/rank"
    run_closed_loop(rank_url, bodies, 2 * workers, 1.0, MSGPACK)  # warm the connections
    capacities = [run_closed_loop(rank_url, bodies, 2 * workers, capacity_s, MSGPACK)]
    overloads = []
    for _ in range(rounds):
        overloads.append(
            run_open_loop(
                rank_url,
                bodies,
                rate=factor * capacities[-1].rate,
                duration_s=overload_s,
                max_connections=512,
                timeout_s=10.0,
                content_type=MSGPACK,
            )
        )
        capacities.append(run_closed_loop(rank_url, bodies, 2 * workers, capacity_s, MSGPACK))
    return figures(sla_ms, capacities, overloads)
