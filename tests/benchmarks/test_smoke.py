"""Smoke runs of the benchmark scripts on a tiny grid, so they never rot.

They assert the scripts run end to end and report sane figures, not speed.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import REPO_ROOT

pytestmark = pytest.mark.integration


def run_script(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_ranking_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    stdout = run_script(
        "scripts/bench_ranking.py",
        "--n",
        "60",
        "--stage1-k",
        "20",
        "--top-k",
        "5",
        "--repeats",
        "5",
        "--warmup",
        "1",
        "--payloads",
        "2",
        "--json",
        str(out),
    )
    assert "speedup single/multi" in stdout
    report = json.loads(out.read_text())
    for where in ("in-process", "http"):
        for mode in ("single", "multi"):
            client = report[f"{where}/{mode}"]["client"]
            assert 0 < client["min"] <= client["p50"] <= client["p99"] <= client["max"]
        assert report[f"{where}/speedup_p50"]["point"] > 0
    # Single-stage runs AutoInt only: its stage-1 time is zero by definition.
    assert report["http/single"]["stage1"]["max"] == 0.0


def test_sweep_tiny(tmp_path: Path) -> None:
    out = tmp_path / "sweep.csv"
    run_script(
        "scripts/sweep.py",
        "--endpoint",
        "predict",
        "--workers",
        "2",
        "--pool",
        "1",
        "--seconds",
        "1",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--connections",
        "4",
        "--out",
        str(out),
    )
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert len(rows) == 1
    assert float(rows[0]["rps"]) > 0
    assert int(rows[0]["non2xx"]) == 0
    assert out.with_suffix(".md").read_text().startswith("| endpoint |")
