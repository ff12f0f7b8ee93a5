"""Smoke run of scripts/bench_observe.py (tiny): it runs end to end and reports figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.scripts import run_proc

pytestmark = pytest.mark.integration


def test_bench_observe_quick(tmp_path: Path) -> None:
    out = tmp_path / "observe.json"
    proc = run_proc("scripts/bench_observe.py", "--quick", "--out", str(out))
    assert "request log off vs on" in proc.stdout
    result = json.loads(out.read_text())
    micro = result["micro"]
    assert set(micro) >= {
        "drift_rank_1000_every_8_us",
        "drift_rank_1000_every_1_us",
        "drift_predict_1_us",
        "goodput_record_us",
        "request_log_record_us",
        "stats_build_ms",
        "metrics_render_ms",
    }
    assert all(v > 0 for v in micro.values())
    for path in ("/predict", "/rank"):
        ab = result["ab"][path]
        assert ab["off_us"] > 0 and ab["on_us"] > 0 and ab["cpu_off_us"] > 0
