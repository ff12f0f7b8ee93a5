"""Observability through the real stack (nginx + 2 gunicorn workers + the real models):
/metrics sums across the workers (checked against each worker's own metric files),
/stats answers the same farm-wide figures from either worker, the request log holds one
row per request with the right fields, and drift stays quiet for traffic drawn from the
training generator but alerts for a shifted distribution.

The stack is this module's own: request log on, windows long enough to hold every
request of the module, every candidate row sampled for drift.
"""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import Samples
from app.offline import logs
from app.schema import StatsResponse
from app.stack import Stack
from tests.integration.conftest import JSON, MSGPACK, TIMEOUT, start_stack

pytestmark = pytest.mark.integration

SETTINGS = {
    "request_log": "requests.db",
    "stats_window_s": 3600,
    "drift_window_s": 3600,
    "drift_sample_every": 1,
    "drift_min_rows": 2000,
}
MODEL = "deepfm/1"  # stage 1: the model that sees whole requests


@pytest.fixture(scope="module")
def observed(request: pytest.FixtureRequest) -> Iterator[Stack]:
    yield from start_stack(request, prefix="farm-o-", settings=SETTINGS)


@pytest.fixture(scope="module")
def client(observed: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=observed.url, timeout=TIMEOUT) as c:
        yield c


def worker_client(stack: Stack, slot: int) -> httpx.Client:
    """A client on one worker's own unix socket (no nginx in between)."""
    transport = httpx.HTTPTransport(uds=str(stack.config.worker_socket(slot)))
    return httpx.Client(transport=transport, base_url="http://worker", timeout=TIMEOUT)


def scrape(client: httpx.Client) -> Samples:
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return Samples(text_string_to_metric_families(resp.text))


def per_worker(stack: Stack, kind: str, name: str, **labels: str) -> dict[int, float]:
    """``name`` summed per worker pid, read from each worker's own metric file."""
    out: dict[int, float] = {}
    for path in stack.config.metrics_path.glob(f"{kind}_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        samples = Samples(MultiProcessCollector.merge([str(path)], accumulate=False))
        out[pid] = samples.total(name, **labels)
    return out


def stats(client: httpx.Client) -> StatsResponse:
    resp = client.get("/stats")
    assert resp.status_code == 200 and resp.headers["content-type"] == JSON
    return msgspec.json.decode(resp.content, type=StatsResponse)


def wait_for(check: Callable[[], Any], timeout_s: float = 15.0) -> Any:
    """Poll ``check`` until it returns something truthy (the windows are published once a
    second per worker; the log's writer commits every 0.25 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def generated(rows: int, seed: int, names: list[str]) -> np.ndarray:
    """Impressions from the training generator (its world; another seed than training's)."""
    assert list(logs.FIELD_NAMES) == names, "the cards' field order is the generator's"
    return logs.generate(rows, seed=seed).id_matrix()


def send_all(url: str, jobs: list[tuple[str, str, bytes, str]], threads: int = 4) -> list[int]:
    """POST every ``(request id, path, body, content type)`` from a few concurrent clients
    (so nginx's least_conn spreads them over both workers); the statuses in order."""

    def one(job: tuple[str, str, bytes, str]) -> int:
        rid, path, body, ctype = job
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            headers = {"Content-Type": ctype, "X-Request-ID": rid}
            return c.post(path, content=body, headers=headers).status_code

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, jobs))


def encode(value: Any, ctype: str) -> bytes:
    return msgspec.msgpack.encode(value) if ctype == MSGPACK else msgspec.json.encode(value)


# -- /metrics, /stats and the request log agree, across both workers --------------------------
N_RANK, N_PREDICT, N_BAD, N_CAND = 40, 20, 4, 100


def test_metrics_stats_and_request_log_sum_across_workers(
    observed: Stack, client: httpx.Client
) -> None:
    names = client.get("/models").json()["models"][0]["fields"]
    ids = generated(N_RANK * N_CAND + N_PREDICT * 2, seed=21, names=names)
    jobs = []
    for i in range(N_RANK):
        ctype = (JSON, MSGPACK)[i % 2]
        value = {"candidates": ids[i * N_CAND : (i + 1) * N_CAND].tolist()}
        jobs.append((f"obs-r{i}", "/rank", encode(value, ctype), ctype))
    for i in range(N_PREDICT):
        rows = ids[N_RANK * N_CAND + 2 * i :][:2].tolist()
        jobs.append((f"obs-p{i}", "/predict", encode({"candidates": rows}, JSON), JSON))
    for i in range(N_BAD):
        jobs.append((f"obs-b{i}", "/rank", encode({"candidates": []}, JSON), JSON))

    before = scrape(client)
    rank_ok = {"endpoint": "/rank", "status": "200"}
    workers_before = per_worker(observed, "counter", "ctr_farm_requests_total", **rank_ok)
    statuses = send_all(observed.url, jobs)
    assert statuses == [200] * (N_RANK + N_PREDICT) + [400] * N_BAD
    after = scrape(client)

    def grew(name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    # /metrics: exactly what was sent, summed over the workers.
    assert grew("ctr_farm_requests_total", **rank_ok) == N_RANK
    assert grew("ctr_farm_requests_total", endpoint="/rank", status="400") == N_BAD
    assert grew("ctr_farm_requests_total", endpoint="/predict", status="200") == N_PREDICT
    assert grew("ctr_farm_request_duration_seconds_count", endpoint="/rank") == N_RANK + N_BAD
    assert grew("ctr_farm_candidates_count") == N_RANK
    assert grew("ctr_farm_candidates_sum") == N_RANK * N_CAND
    assert grew("ctr_farm_stage_duration_seconds_count", stage="stage1", model=MODEL) == N_RANK
    sla = {o: grew("ctr_farm_sla_requests_total", endpoint="/rank", outcome=o) for o in
           ("within", "over", "failed", "invalid")}  # fmt: skip
    assert sum(sla.values()) == N_RANK + N_BAD and sla["invalid"] == N_BAD
    assert sla["failed"] == 0

    # ... and each worker's own file holds its share: both served, the shares add up.
    workers_after = per_worker(observed, "counter", "ctr_farm_requests_total", **rank_ok)
    shares = {pid: n - workers_before.get(pid, 0) for pid, n in workers_after.items()}
    assert set(shares) >= set(observed.worker_pids())
    assert sum(shares.values()) == N_RANK
    assert sum(1 for n in shares.values() if n > 0) == 2, shares

    # /stats: the same farm-wide figures from either worker.
    totals = {o: int(after.total("ctr_farm_sla_requests_total", endpoint="/rank", outcome=o))
              for o in sla}  # fmt: skip
    requests_total = int(after.total("ctr_farm_requests_total", endpoint="/rank"))

    def both_workers_caught_up() -> list[StatsResponse] | None:
        answers = []
        for slot in range(2):
            with worker_client(observed, slot) as w:
                answers.append(stats(w))
        windows = [a.endpoints["/rank"].window.requests for a in answers]
        return answers if windows == [requests_total] * 2 else None

    answers = wait_for(both_workers_caught_up)
    assert answers, "the workers' windows never reached the request count"
    assert answers[0].pid != answers[1].pid
    assert {a.pid for a in answers} == set(observed.worker_pids())
    for answer in answers:
        rank = answer.endpoints["/rank"]
        assert answer.workers == 2 and answer.uptime_s is not None and answer.uptime_s > 0
        assert rank.outcomes == totals
        assert rank.requests == requests_total
        judged = totals["within"] + totals["over"] + totals["failed"]
        assert rank.sla_compliance == pytest.approx(totals["within"] / judged)
        assert rank.window.sla_compliance == pytest.approx(rank.sla_compliance)
        assert rank.window.throughput_rps == pytest.approx(
            rank.window.requests / rank.window.seconds, abs=1e-3
        )
        assert rank.window.goodput_rps == pytest.approx(
            totals["within"] / rank.window.seconds, abs=1e-3
        )
        assert rank.latency.count == int(
            after.total("ctr_farm_request_duration_seconds_count", endpoint="/rank")
        )
        assert answer.stages["stage1"][MODEL].count >= N_RANK

    # The request log: one row per request sent, with its fields; both workers wrote.
    sent = {rid: (path, status) for (rid, path, _, _), status in zip(jobs, statuses, strict=True)}
    rows = wait_for(lambda: (lambda r: r if len(r) == len(sent) else None)(log_rows(observed)))
    assert rows, f"the request log holds {len(log_rows(observed))} of {len(sent)} rows"
    assert {rid: (r["endpoint"], r["status"]) for rid, r in rows.items()} == sent
    assert {r["pid"] for r in rows.values()} == set(observed.worker_pids())
    for rid, row in rows.items():
        kind = rid.split("-")[1][0]
        expected = {
            "r": (N_CAND, "deepfm/1,autoint/1", "stage2", None),
            "p": (2, "autoint/1", None, None),
            "b": (None, "", None, "invalid_request"),
        }[kind]
        got = (row["n_candidates"], row["models"], row["answered_by"], row["error_code"])
        assert got == expected, row
        assert row["degraded"] == 0 and row["latency_ms"] > 0 and row["queue_ms"] >= 0
        assert row["outcome"] in (("invalid",) if kind == "b" else ("within", "over"))
        assert (row["stage_ms"] is None) == (kind != "r")
    logged = stats(client).request_log
    assert logged.enabled and logged.written >= len(sent) and logged.dropped == 0


def log_rows(stack: Stack) -> dict[str, dict[str, Any]]:
    path = stack.config.run_path / "requests.db"
    if not path.exists():
        return {}
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        query = "SELECT * FROM requests WHERE request_id LIKE 'obs-%'"
        return {r["request_id"]: dict(r) for r in conn.execute(query)}


# -- a worker killed: its counts stay, its live gauges go -----------------------------------
def test_a_killed_workers_counters_stay_and_its_live_gauges_go(
    observed: Stack, client: httpx.Client
) -> None:
    jobs = [
        (f"obs-k{i}", "/rank", encode({"candidates": [[1] * 16] * 10}, JSON), JSON)
        for i in range(20)
    ]
    assert send_all(observed.url, jobs) == [200] * len(jobs)
    time.sleep(1.5)  # every worker has published its window since (once a second)
    rank_ok = {"endpoint": "/rank", "status": "200"}
    shares = per_worker(observed, "counter", "ctr_farm_requests_total", **rank_ok)
    windows = per_worker(observed, "gauge_livesum", "ctr_farm_window_requests", endpoint="/rank")
    victim, survivor = sorted(observed.worker_pids(), key=lambda pid: -shares.get(pid, 0))
    assert shares[victim] > 0 and windows[victim] > 0
    before = scrape(client)

    os.kill(victim, signal.SIGKILL)
    replaced = wait_for(
        lambda: (lambda pids: victim not in pids and len(pids) == 2)(observed.worker_pids()),
        timeout_s=30,
    )
    assert replaced, observed.worker_pids()
    observed.wait_ready(120)
    after = scrape(client)

    # Counters: the dead worker's file still counts (totals never go back).
    assert after.total("ctr_farm_requests_total", **rank_ok) == before.total(
        "ctr_farm_requests_total", **rank_ok
    )
    assert (observed.config.metrics_path / f"counter_{victim}.db").exists()
    # Live gauges: gone with it (gunicorn's child_exit); the replacement starts from 0.
    assert not list(observed.config.metrics_path.glob(f"gauge_live*_{victim}.db"))
    assert after.total("ctr_farm_workers") == 2
    window = after.total("ctr_farm_window_requests", endpoint="/rank")
    assert window == wait_for(
        lambda: per_worker(observed, "gauge_livesum", "ctr_farm_window_requests",
                           endpoint="/rank").get(survivor)
    )  # fmt: skip
    assert window == before.total("ctr_farm_window_requests", endpoint="/rank") - windows[victim]
    assert stats(client).workers == 2


# -- drift ------------------------------------------------------------------------------------
SHIFTED_FIELDS = ("city", "domain", "creative", "ip_bucket")
OOV_FIELD, OOV_PER_REQUEST = "useragent", 7


def drift_rows(client: httpx.Client) -> int:
    return stats(client).drift[MODEL].rows


def send_rankings(stack: Stack, ids: np.ndarray, per_request: int, prefix: str) -> None:
    jobs = [
        (f"{prefix}-{i}", "/rank", encode({"candidates": chunk.tolist()}, MSGPACK), MSGPACK)
        for i, chunk in enumerate(np.array_split(ids, math.ceil(len(ids) / per_request)))
    ]
    assert send_all(stack.url, jobs) == [200] * len(jobs)


def test_drift_in_distribution_stays_quiet_and_a_shift_alerts(
    observed: Stack, client: httpx.Client
) -> None:
    names = client.get("/models").json()["models"][0]["fields"]
    config = observed.config
    start = drift_rows(client)

    # Traffic drawn from the training generator: every feature under the warn level.
    in_dist = generated(4000, seed=31, names=names)
    send_rankings(observed, in_dist, 500, "obs-in")
    want = start + len(in_dist)
    assert wait_for(lambda: drift_rows(client) == want), (drift_rows(client), want)
    drift = stats(client).drift[MODEL]
    assert drift.state == "ok", drift
    psi = {name: f.psi for name, f in drift.features.items()}
    assert max(psi.values()) < config.drift_psi_warn, psi
    assert drift.ctr_mean == pytest.approx(drift.card_ctr_mean, rel=0.2)

    # The same generator with the content fields' ids reversed (popular ids become rare,
    # a new traffic source), and a few out-of-vocabulary user agents: 3x the rows so far.
    rows = 3 * want
    shifted = generated(rows, seed=32, names=names)
    sizes = np.array([logs.FIELDS[j].cardinality for j in range(len(names))])
    for name in SHIFTED_FIELDS:
        j = names.index(name)
        shifted[:, j] = sizes[j] - 1 - shifted[:, j]
    per_request, j_oov = 1000, names.index(OOV_FIELD)
    n_requests = math.ceil(rows / per_request)
    for r in range(n_requests):
        shifted[r * per_request : r * per_request + OOV_PER_REQUEST, j_oov] = sizes[j_oov] + 5
    oov_before = scrape(client).total("ctr_farm_oov_ids_total", field=OOV_FIELD)
    send_rankings(observed, shifted, per_request, "obs-shift")
    want += rows
    assert wait_for(lambda: drift_rows(client) == want), (drift_rows(client), want)

    answer = stats(client)
    drift = answer.drift[MODEL]
    assert drift.state == "alert", drift
    for name in SHIFTED_FIELDS[1:]:  # the large vocabularies shift the most
        assert drift.features[name].psi >= config.drift_psi_alert, (name, drift.features[name])
    assert drift.features["weekday"].psi < config.drift_psi_warn  # untouched field
    assert drift.features[OOV_FIELD].oov_rate == pytest.approx(
        n_requests * OOV_PER_REQUEST / want,
        abs=1e-6,  # /stats rounds to 6 digits
    )
    assert drift.worst in SHIFTED_FIELDS

    # /metrics says the same, and counts every OOV id once, across both workers.
    after = scrape(client)
    psi_metric = after.total("ctr_farm_drift_psi", model=MODEL, feature="domain")
    assert psi_metric == pytest.approx(drift.features["domain"].psi, rel=1e-4)
    assert after.total("ctr_farm_drift_state", model=MODEL) == 2
    oov_sent = n_requests * OOV_PER_REQUEST
    assert after.total("ctr_farm_oov_ids_total", field=OOV_FIELD) - oov_before == oov_sent
    # Both workers' windows hold rows of the shifted traffic (the drift is farm-wide).
    live = per_worker(observed, "gauge_livesum", "ctr_farm_drift_window_rows", model=MODEL)
    assert sum(1 for v in live.values() if v > 0) == 2, live
