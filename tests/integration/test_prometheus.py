"""The real Prometheus server (the Debian package's binary, as ``ctr-farm serve
--prometheus`` runs it) scrapes the real farm through nginx: the request count it stores
is exactly the count the farm reports, and moves by exactly what this test sends."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from app.monitoring import prepare, scrape_target
from app.stack import Stack, free_port
from tests.integration.conftest import TIMEOUT, Candidates, metric_sum, post

pytestmark = pytest.mark.integration

#: Every wait of this module is bounded by this.
WAIT_S = 30.0
RANK_SERIES = 'sum(ctr_farm_requests_total{endpoint="/rank"})'


@pytest.fixture(scope="module")
def prometheus(stack: Stack) -> Iterator[httpx.Client]:
    """Prometheus on a free loopback port, scraping the stack's nginx every second."""
    run_dir = Path(tempfile.mkdtemp(prefix="farm-p-"))
    config = msgspec.structs.replace(
        stack.config,
        run_dir=str(run_dir),
        prometheus_port=free_port(),
        prometheus_scrape_interval_s=1,
    )
    try:
        argv = prepare(config)
    except Exception as exc:
        pytest.fail(f"{exc} (CI installs it: scripts/test runs scripts/install --monitoring)")
    log = run_dir / "prometheus.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{config.prometheus_port}", timeout=TIMEOUT)
    try:
        wait_until(lambda: _ready(client, proc), True, f"Prometheus ready ({log})")
        yield client
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)  # its graceful stop
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(run_dir, ignore_errors=True)


def _ready(client: httpx.Client, proc: subprocess.Popen[bytes]) -> bool:
    assert proc.poll() is None, f"prometheus exited with {proc.returncode}"
    try:
        return client.get("/-/ready").status_code == 200
    except httpx.TransportError:
        return False


def wait_until(probe: Callable[[], Any], want: Any, what: str) -> Any:
    """Poll ``probe`` until it returns ``want`` (at most WAIT_S); its last value."""
    deadline = time.monotonic() + WAIT_S
    while True:
        got = probe()
        if got == want:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"waited {WAIT_S:.0f} s for {what}: got {got!r}, want {want!r}")
        time.sleep(0.25)


def query(prom: httpx.Client, expr: str) -> list[dict[str, Any]]:
    resp = prom.get("/api/v1/query", params={"query": expr})
    assert resp.status_code == 200, resp.text[:500]
    body = resp.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar(prom: httpx.Client, expr: str) -> float | None:
    """The single value of an instant query, or None while it has no result."""
    result = query(prom, expr)
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None


def farm_rank_requests(client: httpx.Client) -> float:
    """``/rank`` requests the farm itself reports (its /metrics, summed over workers)."""
    return metric_sum(client, "ctr_farm_requests_total", endpoint="/rank")


def send_rank(client: httpx.Client, candidates: Candidates, seed: int) -> None:
    body = {"candidates": candidates.form(candidates.ids(20, seed=seed), "rows"), "top_k": 3}
    resp = post(client, "/rank", body)
    assert resp.status_code == 200, resp.text[:300]


def test_prometheus_stores_exactly_the_requests_sent(
    prometheus: httpx.Client, client: httpx.Client, stack: Stack, candidates: Candidates
) -> None:
    send_rank(client, candidates, seed=0)  # the series exists even if no test ranked yet
    before = farm_rank_requests(client)
    # Prometheus has scraped the farm as it is now: the same number, not just a close one.
    wait_until(lambda: scalar(prometheus, RANK_SERIES), before, "the first scrape")
    sent = 7
    for seed in range(1, sent + 1):
        send_rank(client, candidates, seed)
    after = farm_rank_requests(client)
    assert after == before + sent  # the farm counted each of them, once
    wait_until(lambda: scalar(prometheus, RANK_SERIES), after, f"{sent} more /rank requests")

    (up,) = query(prometheus, 'up{job="ctr-farm"}')
    assert up["metric"]["instance"] == scrape_target(stack.config)
    assert float(up["value"][1]) == 1.0


def test_the_recording_rules_are_loaded_and_evaluate(prometheus: httpx.Client) -> None:
    def rule_health() -> dict[str, str]:
        body = prometheus.get("/api/v1/rules").json()
        assert body["status"] == "success", body
        return {r["name"]: r["health"] for g in body["data"]["groups"] for r in g["rules"]}

    healthy = {"ctr_farm:cache_hit_ratio:rate1m": "ok", "ctr_farm:requests:rate1m": "ok"}
    wait_until(rule_health, healthy, "both recording rules evaluated")
    # Two scrapes a second apart make a rate: the farm's own /metrics answers (the scrapes).
    expr = 'ctr_farm:requests:rate1m{endpoint="/metrics"}'
    wait_until(lambda: len(query(prometheus, expr)), 1, "a request rate")
    (series,) = query(prometheus, expr)
    assert series["metric"]["status"] == "200"
    assert float(series["value"][1]) > 0
