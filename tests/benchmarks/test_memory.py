"""benchmarks/memory.py: summaries and ratios on made-up runs, and tiny real probes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from app.config import REPO_ROOT
from app.registry import newest
from benchmarks import memory
from tests.benchmarks.scripts import run_proc


def fake_run(pool: int, weights: bool, arena: bool, rss: float, ms: float) -> dict[str, Any]:
    status = {"VmRSS": rss, "RssAnon": rss - 40, "RssFile": 40.0, "VmHWM": rss + 1}
    return {
        "probe": {
            "pool_size": pool,
            "share_weights": weights,
            "shared_arena": arena,
            "calls": 2,
        },
        "callers": pool,
        "load_s": 1.0,
        "base": status,
        "loaded": status,
        "after": status,
        "shared_initializers": {},
        "samples": {
            "stage1_model": [ms / 2] * (2 * pool),
            "stage2_model": [ms / 2] * (2 * pool),
            "cpu": [ms] * (2 * pool),
            "wall_s": [0.5],
        },
    }


def test_grid_interleaves_repeats() -> None:
    probes = memory.grid((1, 6), ((False, False), (True, True)), repeats=2, calls=3)
    cells = [(p.pool_size, p.variant) for p in probes]
    assert cells[:4] == cells[4:]  # every cell once per repeat, in the same order
    assert set(cells) == {
        (1, "separate"),
        (1, "shared weights+arena"),
        (6, "separate"),
        (6, "shared weights+arena"),
    }
    assert all(p.calls == 3 and p.threads == p.pool_size for p in probes)


def test_summarize_takes_medians_and_pools_samples() -> None:
    runs = [
        fake_run(1, False, False, 150, 8),
        fake_run(1, False, False, 160, 8),
        fake_run(1, False, False, 155, 8),
        fake_run(6, False, False, 520, 24),
        fake_run(6, True, True, 165, 24),
    ]
    rows = memory.summarize(runs)
    assert [(r["pool_size"], r["variant"]) for r in rows] == [
        (1, "separate"),
        (6, "separate"),
        (6, "shared weights+arena"),
    ]
    first = rows[0]
    assert first["runs"] == 3
    assert first["after_VmRSS_mib"] == 155  # the median run
    assert first["ort_ms_p50"] == 8.0 and first["cpu_ms_p50"] == 8.0
    assert first["calls"] == 6 and first["calls_per_s"] == pytest.approx(4.0)
    rel = memory.ratios(rows, "after_VmRSS_mib")
    assert rel["separate: pool 6 / pool 1"] == pytest.approx(520 / 155)
    assert rel["pool 6: shared weights+arena / separate"] == pytest.approx(165 / 520)
    assert memory.ratios(rows, "ort_ms_p50")["separate: pool 6 / pool 1"] == pytest.approx(3.0)
    table = memory.markdown_table(rows)
    assert table.count("\n") == 1 + len(rows)
    assert "| 6 | shared weights+arena | 165.0 |" in table


def labelled(run: dict[str, Any], label: str, **overrides: Any) -> dict[str, Any]:
    return {**run, "probe": {**run["probe"], "label": label, "overrides": overrides}}


def test_settings_run_side_by_side_and_get_ratios() -> None:
    settings = (("on", {"mem_pattern": True}), ("off", {"mem_pattern": False}))
    probes = memory.grid((1, 6), ((True, True),), repeats=2, settings=settings, calls=3)
    cells = [(p.pool_size, p.variant, p.overrides["mem_pattern"]) for p in probes]
    assert cells[:4] == cells[4:]
    assert cells[:4] == [
        (1, "shared weights+arena, on", True),
        (1, "shared weights+arena, off", False),
        (6, "shared weights+arena, on", True),
        (6, "shared weights+arena, off", False),
    ]
    assert probes[1].config_overrides()["mem_pattern"] is False
    runs = [
        labelled(fake_run(1, True, True, 150, 8), "on"),
        labelled(fake_run(1, True, True, 120, 8), "off"),
        labelled(fake_run(6, True, True, 165, 24), "on"),
        labelled(fake_run(6, True, True, 135, 12), "off"),
    ]
    rows = memory.summarize(runs)
    assert [r["variant"] for r in rows] == [
        "shared weights+arena, on",
        "shared weights+arena, off",
    ] * 2
    rel = memory.ratios(rows, "after_VmRSS_mib")
    assert rel["pool 1: shared weights+arena, off / shared weights+arena, on"] == 120 / 150
    assert rel["pool 6: shared weights+arena, off / shared weights+arena, on"] == 135 / 165
    ort = memory.ratios(rows, "ort_ms_p50")
    assert ort["pool 6: shared weights+arena, off / shared weights+arena, on"] == 0.5


def test_read_pss_is_at_most_rss() -> None:
    pss = memory.read_pss(os.getpid())
    assert 1 < pss <= memory.read_status()["VmRSS"] + 1


def test_read_status_in_mib() -> None:
    status = memory.read_status()
    assert set(status) == set(memory.STATUS_KEYS)
    assert 1 < status["VmRSS"] <= status["VmHWM"] < 100_000
    assert status["RssAnon"] + status["RssFile"] <= status["VmRSS"] + 1


@pytest.mark.integration
def test_probes_show_the_pool_sharing_its_memory() -> None:
    """Two real worker-like children at pool 2: the shared pool holds less, and scores the
    same traffic."""
    separate = memory.spawn(memory.Probe(2, False, False, calls=3, n=200, stage1_k=50))
    shared = memory.spawn(memory.Probe(2, True, True, calls=3, n=200, stage1_k=50))
    served = [
        f"{name}/{newest(REPO_ROOT / 'models' / name).name}" for name in ("deepfm", "autoint")
    ]
    assert separate["shared_initializers"] == dict.fromkeys(served, 0)
    for key in served:
        assert shared["shared_initializers"][key] >= 10
    for run in (separate, shared):
        assert run["callers"] == 2
        assert len(run["samples"]["cpu"]) == 6
        assert all(ms > 0 for ms in run["samples"]["stage1_model"])
        assert run["base"]["VmRSS"] < run["loaded"]["VmRSS"] <= run["after"]["VmHWM"]
    # Measured 157 vs 224 MiB (docs/results/memory.md); a wide margin for a noisy box.
    assert shared["after"]["VmRSS"] < separate["after"]["VmRSS"] - 30


@pytest.mark.integration
def test_memory_script_smoke(tmp_path: Path) -> None:
    out = tmp_path / "memory"
    proc = run_proc(
        "scripts/memory.py",
        "--pools",
        "1",
        "--variants",
        "separate,shared weights",
        "--repeats",
        "1",
        "--calls",
        "2",
        "--n",
        "100",
        "--stage1-k",
        "20",
        "--set",
        "pattern:mem_pattern=true",
        "--set",
        "no pattern:mem_pattern=false",
        "--out",
        str(out),
    )
    assert "| 1 | separate, pattern |" in proc.stdout
    assert "| 1 | shared weights, no pattern |" in proc.stdout
    assert "pool 1: separate, no pattern / separate, pattern = " in proc.stdout
    lines = out.with_suffix(".csv").read_text().splitlines()
    assert lines[0].startswith("pool_size,share_weights,shared_arena,variant")
    assert len(lines) == 5
    assert out.with_suffix(".md").read_text().startswith("# Worker memory")


def test_stack_table_shows_rss_and_pss_per_worker() -> None:
    run = {
        "probe": {"pool_size": 6, "share_weights": True, "shared_arena": True, "label": "off"},
        "workers": 2,
        "requests": 10,
        "ok": 10,
        "booted_VmRSS_mib": [145.6, 145.7],
        "after_VmRSS_mib": [154.2, 154.4],
        "after_Pss_mib": [120.5, 121.0],
    }
    table = memory.stack_table([run])
    assert "| 6 | shared weights+arena, off | 2 | 145.6 / 145.7 | 154.2 / 154.4" in table
    assert "| 120.5 / 121.0 | 10/10 |" in table
