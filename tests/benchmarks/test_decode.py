"""Smoke run of scripts/bench_decode.py (not speed), and its side-by-side loader."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from app.config import REPO_ROOT, load
from app.features import FeatureSpace
from benchmarks import decode
from tests.benchmarks.scripts import run_proc


def test_bench_decode_quick(tmp_path: Path) -> None:
    out = tmp_path / "decode"
    proc = run_proc("scripts/bench_decode.py", "--quick", "--parts", "--out", str(out))
    assert "| json | to matrix, struct pack (after) |" in proc.stdout
    assert "| msgpack | msgspec decode, ids Id (before) |" in proc.stdout
    assert "| objects | json |" in proc.stdout and "| columns | msgpack |" in proc.stdout
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    cells = {(r["form"], r["kind"]) for r in rows}
    assert cells == {(f, k) for f in decode.FORMS for k in decode.KINDS}
    for row in rows:
        assert row["n"] == 50 and row["calls"] == 4
        assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["vs_first_p50"] == 1.0
    assert out.with_suffix(".md").read_text().startswith("# Candidate decode time")


def test_two_implementations_side_by_side() -> None:
    try:
        subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    old = decode.features_at("HEAD").FeatureSpace
    assert old is not FeatureSpace
    rows = decode.measure(
        {"HEAD": old, decode.CURRENT: FeatureSpace},
        load(),
        n=20,
        rounds=1,
        batch=1,
        forms=("rows",),
        kinds=("json",),
    )
    assert [r["implementation"] for r in rows] == ["HEAD", decode.CURRENT]
    assert rows[0]["vs_first_p50"] == 1.0
    assert rows[1]["vs_first_p50"] == pytest.approx(rows[1]["p50_ms"] / rows[0]["p50_ms"])
