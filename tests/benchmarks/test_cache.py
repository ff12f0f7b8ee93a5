"""Smoke run of scripts/bench_cache.py on its tiny grid, so it never rots: every cell
is measured both ways, and the hit rate follows the share of repeated candidates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.scripts import run_proc

pytestmark = pytest.mark.integration


def test_bench_cache_quick(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_proc("scripts/bench_cache.py", "--quick", "--out", str(out))
    assert "Rank latency (ms), cache off vs on" in proc.stdout
    assert "score_cache" in proc.stdout
    report = json.loads((out / "results.json").read_text())
    assert (out / "report.md").read_text().startswith("# Result cache")
    cells = {c["repeat"]: c for c in report["cells"]}
    assert set(cells) == {0.0, 0.5, 0.9}
    for cell in cells.values():
        for side in ("off", "on"):
            stats = cell[side]["total"]
            assert stats["count"] == 6  # --quick: 6 measured rounds
            assert 0 < stats["min"] <= stats["p50"] <= stats["p99"] <= stats["max"]
            assert cell[side]["stage1"]["p50"] < stats["p50"]
        assert cell["entries"] == 2000 and cell["cached_rows"] <= 2000
    # The pool went through twice before the rounds: every repeated row hits.
    assert cells[0.0]["hit_rate"] == 0.0
    assert 0.45 <= cells[0.5]["hit_rate"] <= 0.5
    assert 0.85 <= cells[0.9]["hit_rate"] <= 0.9
