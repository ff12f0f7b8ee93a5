"""Smoke run of scripts/bench_tracing.py on a tiny grid, so it never rots (not speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.tracing import VARIANTS
from tests.benchmarks.scripts import run_proc

pytestmark = pytest.mark.integration


def test_bench_tracing_quick(tmp_path: Path) -> None:
    proc = run_proc("scripts/bench_tracing.py", "--quick", "--out", str(tmp_path))
    assert "| /predict 1 | stdout |" in proc.stdout and "| /rank 100 | off |" in proc.stdout
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["endpoint"], r["variant"]): r for r in report["rows"]}
    assert set(rows) == {(e, v) for e in ("/predict 1", "/rank 100") for v in VARIANTS}
    for (endpoint, variant), row in rows.items():
        assert row["rounds"] == 3
        assert 0 < row["min_us"] <= row["us_per_request"]
        assert row["us_per_request"] == pytest.approx(
            row["vs_off"] * rows[endpoint, "off"]["us_per_request"]
        )
        assert (row["extra_us"] == 0) is (variant == "off")
    assert (tmp_path / "report.md").read_text().startswith("# Tracing overhead")
