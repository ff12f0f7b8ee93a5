"""Smoke run of scripts/bench_http.py on a tiny grid (not speed), and its summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import http_overhead as bench
from tests.benchmarks.scripts import run_proc


def test_summarize_pairs_every_path_with_in_process() -> None:
    payloads = {("rows", "msgpack"): b"x" * 10}
    samples = {
        ("rows", "msgpack", "nginx"): [12.0, 11.0, 13.0],
        ("rows", "msgpack", "in-process"): [10.0, 10.0, 10.0],
    }
    rows = bench.summarize(samples, payloads)
    assert [r["path"] for r in rows] == ["in-process", "nginx"]
    nginx = rows[1]
    assert nginx["bytes"] == 10 and nginx["rounds"] == 3
    assert nginx["p50_ms"] == 12.0 and nginx["vs_in_process_p50"] == pytest.approx(1.2)
    assert nginx["added_ms_p50"] == 2.0
    assert "| rows | msgpack | 10 | nginx | 12.00 |" in bench.markdown(rows)


@pytest.mark.integration
def test_bench_http_quick(tmp_path: Path) -> None:
    out = tmp_path / "http"
    proc = run_proc(
        "scripts/bench_http.py", "--quick", "--forms", "objects,columns", "--out", str(out)
    )
    assert "| objects | json |" in proc.stdout and "| columns | msgpack |" in proc.stdout
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    cells = {(r["form"], r["kind"], r["path"]) for r in rows}
    assert cells == {
        (f, k, p) for f in ("objects", "columns") for k in bench.KINDS for p in bench.PATHS
    }
    for row in rows:
        assert row["rounds"] == 2 and 0 < row["p50_ms"] <= row["p99_ms"]
        assert (row["path"] == "in-process") is (row["vs_in_process_p50"] == 1.0)
