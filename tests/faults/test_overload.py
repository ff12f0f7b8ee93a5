"""Fault 4: offered load at 2x measured capacity, through the real nginx + gunicorn.

The same study as ``scripts/overload.py`` (benchmarks/overload.py), short: capacity
from closed-loop clients, then an open-loop schedule at twice that rate with every
request's budget (``timeout_ms``) set to the SLA. The farm must keep the accepted
within the SLA, shed the rest quickly with 503 + Retry-After, and keep its goodput
near capacity (shedding must be cheap). The shed count is also read back from
/metrics, summed over both workers.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.stack import Stack, running
from benchmarks.overload import measure
from tests.integration.conftest import metric_sum_at

pytestmark = pytest.mark.integration

SLA_MS = 100
#: Issue 6's figure is goodput at 2x capacity >= 0.9 of capacity: measured 0.90-0.95 here
#: (median over the rounds, each against the capacity around it; the long run of
#: scripts/overload.py: 0.915; docs/RELIABILITY.md). One run in seven gave 0.899 with the
#: load driver on the same two cores, so CI guards a clear regression (shedding that costs
#: a worker again), not the third decimal: timed figures live in the benchmarks.
MIN_GOODPUT_SHARE = 0.85
#: The 1000-candidate msgpack bodies (~30 KB) go through nginx's heavy lane.
HEAVY_LANE_BYTES = 10_000
#: Latency is measured by the driver from each request's due time; the deadline runs
#: from nginx's receipt. The driver's own lag on the shared cores sits in between.
DRIVER_SLACK = 1.15


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    # The heavy lane on: nginx refuses the excess large rankings (docs/RELIABILITY.md).
    settings = {"workers": 2, "heavy_lane_bytes": HEAVY_LANE_BYTES}
    with running(Path(tempfile.mkdtemp(prefix="fovl-")), settings) as stack:
        yield stack


def shed_total(url: str) -> float:
    """503s the farm counted: the workers' (by reason) and nginx's own (the heavy lane)."""
    shed = metric_sum_at(url, "ctr_farm_shed_total")
    return shed + metric_sum_at(url, "ctr_farm_front_rejected_total", status="503")


def test_twice_capacity_sheds_quickly_and_keeps_goodput(stack: Stack) -> None:
    shed_before = shed_total(stack.url)
    fig = measure(
        stack.url, workers=2, sla_ms=SLA_MS, factor=2.0, capacity_s=3, overload_s=5, rounds=5
    )
    print(fig.as_dict())
    assert fig.errors == 0 and fig.other == 0, fig
    assert fig.shed > 0.2 * fig.sent, "2x capacity must shed a good share"
    assert fig.shed_with_retry_after == fig.shed
    assert fig.accepted_p99_ms <= SLA_MS * DRIVER_SLACK
    assert fig.shed_p50_ms <= 10.0  # refused at once, not after queueing
    assert fig.shed_p99_ms <= SLA_MS * DRIVER_SLACK  # nobody waits past its budget
    assert fig.goodput_share >= MIN_GOODPUT_SHARE
    # Every 503 the clients saw is counted once in /metrics, across both workers.
    assert shed_total(stack.url) - shed_before == fig.shed
