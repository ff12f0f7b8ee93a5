"""app.stats over the in-process app: /stats figures agree with what was sent and with
/metrics. (One process here; tests/integration/test_observe.py runs two workers.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import falcon.testing
import msgspec
import pytest

from app.schema import StatsResponse
from tests.conftest import client_for, config_for
from tests.fake_models import write_model
from tests.test_api import ROWS, post
from tests.test_drift import DISTRIBUTION, sample_rows


def stats(client: falcon.testing.TestClient) -> StatsResponse:
    result = client.simulate_get("/stats")
    assert result.status_code == 200 and result.headers["content-type"] == "application/json"
    return msgspec.json.decode(result.content, type=StatsResponse)


def outcomes(s: StatsResponse, endpoint: str) -> dict[str, int]:
    return s.endpoints[endpoint].outcomes


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    return {k: after[k] - before.get(k, 0) for k in after}


@pytest.fixture
def monitored_client(tmp_path: Path, make_farm) -> falcon.testing.TestClient:
    write_model(tmp_path, "deepfm", seed=1, distribution=DISTRIBUTION)
    write_model(tmp_path, "autoint", seed=2, distribution=DISTRIBUTION)
    config = config_for(tmp_path, drift_sample_every=1, drift_min_rows=100, sla_predict_ms=60_000)
    return client_for(make_farm(config))


def test_stats_count_what_was_sent(monitored_client: falcon.testing.TestClient) -> None:
    client = monitored_client
    before = stats(client)
    for _ in range(3):
        assert post(client, "/rank", {"candidates": ROWS, "top_k": 2}).status_code == 200
    assert post(client, "/rank", {"candidates": []}).status_code == 400
    assert post(client, "/predict", {"candidates": ROWS[:2]}).status_code == 200
    oov = [[7, 1, 1, 1], [1, 24, 1, 400]]  # weekday, hour and city out of vocabulary
    assert post(client, "/rank", {"candidates": oov, "top_k": 1}).status_code == 200
    after = stats(client)

    assert delta(outcomes(after, "/rank"), outcomes(before, "/rank")) == {
        "within": 4,
        "over": 0,
        "failed": 0,
        "invalid": 1,
    }
    assert delta(outcomes(after, "/predict"), outcomes(before, "/predict"))["within"] == 1
    rank = after.endpoints["/rank"]
    assert rank.sla_ms == 50.0 and after.endpoints["/predict"].sla_ms == 60_000
    assert rank.requests - before.endpoints["/rank"].requests == 5
    assert rank.latency.count - before.endpoints["/rank"].latency.count == 5
    assert rank.latency.p50_ms is not None and rank.latency.p50_ms <= rank.latency.p99_ms
    # The window counts this client's requests too (its publisher ran for /stats).
    assert rank.window.requests - before.endpoints["/rank"].window.requests == 5
    assert rank.window.seconds > 0
    assert rank.window.throughput_rps == pytest.approx(
        rank.window.requests / rank.window.seconds, rel=1e-3, abs=1e-3
    )
    assert delta(after.oov_ids, before.oov_ids) == {
        "weekday": 1,
        "hour": 1,
        "region": 0,
        "city": 1,
    }
    assert after.stages["stage1"]["deepfm/1"].count >= 4
    # (This process's registry also holds other tests' model versions.)
    assert {k: after.breakers[k] for k in ("deepfm/1", "autoint/1")} == {
        "deepfm/1": "closed",
        "autoint/1": "closed",
    }
    assert after.request_log.enabled is False


def test_stats_drift_reflects_the_traffic(monitored_client: falcon.testing.TestClient) -> None:
    ids, _ = sample_rows(400, seed=7)
    for i in range(0, 400, 100):
        body = {"candidates": ids[i : i + 100].tolist()}
        assert post(monitored_client, "/rank", body).status_code == 200
    drift = stats(monitored_client).drift
    assert set(drift) == {"deepfm/1", "autoint/1"}
    assert drift["deepfm/1"].rows == 400  # this farm's window (only this farm publishes)
    assert drift["deepfm/1"].state in {"ok", "warn", "alert"}  # judged: enough rows
    assert drift["autoint/1"].rows == 0 and drift["autoint/1"].state == "insufficient_data"
    # The fake model's CTRs are not the card's, the fields are: only ctr may drift.
    fields = {k: f.psi for k, f in drift["deepfm/1"].features.items() if k != "ctr"}
    assert max(fields.values()) < 0.1, fields
    text = monitored_client.simulate_get("/metrics").text
    assert 'ctr_farm_drift_psi{feature="city",model="deepfm/1"}' in text
    assert 'ctr_farm_drift_window_rows{bin="oov",feature="city",model="deepfm/1"}' in text
