"""Smoke runs of ``ctr-farm bench`` and ``ctr-farm sweep`` on a tiny grid, so they never rot.

They assert the commands run end to end through the real stack and report sane figures,
not speed.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import os
from pathlib import Path

import pytest

from tests.benchmarks.scripts import run_proc

pytestmark = pytest.mark.integration


def run_script(*args: str) -> str:
    return run_proc(*args).stdout


#: `ctr-farm bench --quick`'s grid (keep in step with benchmarks/study.py's QUICK).
QUICK_NS, QUICK_STAGE1_KS, QUICK_INTRAS, QUICK_FIDELITY_N = (50, 100), (20, 100), (1, 2), 100
PARTS = ("decode", "stage1_model", "stage1_cut", "stage2_model", "stage2_cut", "encode")


def check_stats(stats: dict) -> None:
    assert stats["count"] == 3  # --quick: 3 measured rounds
    assert 0 <= stats["min"] <= stats["p50"] <= stats["p95"] <= stats["p99"] <= stats["max"]
    assert stats["min"] <= stats["mean"] <= stats["max"]


def test_bench_ranking_quick(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_proc("-m", "app", "bench", "--quick", "--out", str(out))
    for title in ("End-to-end latency", "Speedup single/multi", "per-stage breakdown"):
        assert title in proc.stdout
    assert "HTTP overhead" in proc.stdout
    assert "Fidelity @10" in proc.stdout
    report = json.loads((out / "results.json").read_text())
    assert report["command"] == f"ctr-farm bench --quick --out {out}"  # how to rerun it
    assert (out / "report.md").read_text().startswith("# Ranking latency study")

    # Every grid cell, once.
    cells = {(c["where"], c["intra"], c["n"], c["stage1_k"]): c for c in report["cells"]}
    want = set(itertools.product(("in-process", "http"), QUICK_INTRAS, QUICK_NS, QUICK_STAGE1_KS))
    assert set(cells) == want
    assert len(report["cells"]) == len(want)
    for (where, _, n, stage1_k), cell in cells.items():
        assert cell["after_stage1"] == min(stage1_k, n)
        for mode in ("single", "multi"):
            stats = cell[mode]
            check_stats(stats["total"])
            assert stats["total"]["min"] > 0
            # The server's pipeline time is part of the end-to-end time.
            assert stats["pipeline"]["max"] <= stats["total"]["max"]
            if where == "in-process":
                parts = sum(stats[p]["mean"] for p in PARTS)
                assert parts <= stats["total"]["mean"]
                for stage in ("stage1", "stage2"):
                    split = stats[f"{stage}_model"]["mean"] + stats[f"{stage}_cut"]["mean"]
                    assert split == pytest.approx(stats[stage]["mean"], rel=1e-6, abs=1e-6)
        # Single-stage runs AutoInt only: its stage-1 time is zero by definition.
        assert cell["single"]["stage1"]["max"] == 0.0
        assert cell["multi"]["stage1"]["min"] > 0.0
        speedup = cell["speedup_p50"]
        assert speedup["point"] > 0
        assert 0 < speedup["ci95"][0] <= speedup["ci95"][1]
    overhead = {(r["intra"], r["n"], r["variant"]) for r in report["http_overhead"]}
    variants = ["single"] + [f"multi@{k}" for k in QUICK_STAGE1_KS]
    assert overhead == set(itertools.product(QUICK_INTRAS, QUICK_NS, variants))
    assert all(r["ratio_p50"]["point"] > 0 for r in report["http_overhead"])
    assert len(report["samples"]) == len(overhead) * 2  # every (path, intra, n, variant)
    assert all(len(s["total"]) == 3 for s in report["samples"])
    for row in report["scaling"]:
        assert row["n"] == list(QUICK_NS)
        assert row["loglog_slope"] is not None

    fid = report["fidelity"]
    assert fid["n"] == QUICK_FIDELITY_N
    assert fid["seed"] not in (1, 2, 3)  # the cards' train/valid/test seeds
    assert set(fid["systems"]) == {"single", "deepfm_only"} | {
        f"cascade@{k}" for k in QUICK_STAGE1_KS
    }
    for system, metrics in fid["systems"].items():
        for metric, m in metrics.items():
            assert 0.0 <= m["min"] <= m["p5"] <= m["mean"] <= m["max"] <= 1.0 + 1e-9, (
                system,
                metric,
            )
    # The reference agrees with itself; a cascade that keeps every candidate is exact.
    for system in ["single"] + [f"cascade@{k}" for k in QUICK_STAGE1_KS if k >= fid["n"]]:
        assert fid["systems"][system]["recall_vs_single"]["min"] == 1.0
        assert fid["systems"][system]["ndcg_vs_single"]["min"] == pytest.approx(1.0)

    pngs = sorted(p.name for p in out.glob("*.png"))
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in proc.stderr  # the plot part is skipped
        assert pngs == []
    else:
        assert pngs == sorted(
            f"scaling_{where}_intra{i}.png"
            for where in ("in-process", "http")
            for i in QUICK_INTRAS
        )
        for name in pngs:
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_ranking_without_matplotlib(tmp_path: Path) -> None:
    """No matplotlib: a clear message, the JSON and markdown all the same, exit 0."""
    shadow = tmp_path / "shadow" / "matplotlib"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("hidden for this test")\n')
    env = {**os.environ, "PYTHONPATH": str(shadow.parent)}
    out = tmp_path / "out"
    proc = run_proc(
        "-m",
        "app",
        "bench",
        "--quick",
        "--skip-http",
        "--skip-fidelity",
        "--intra-threads",
        "1",
        "--n",
        "50",
        "--out",
        str(out),
        env=env,
    )
    assert "matplotlib is not installed" in proc.stderr
    assert "pip install -e '.[bench]'" in proc.stderr
    assert (out / "results.json").exists() and (out / "report.md").exists()
    assert not list(out.glob("*.png"))


def test_sweep_tiny(tmp_path: Path) -> None:
    out = tmp_path / "sweep.csv"
    run_script(
        "-m",
        "app",
        "sweep",
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
