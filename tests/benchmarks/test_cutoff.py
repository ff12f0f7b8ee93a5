"""benchmarks/cutoff.py: the choice of stage1_k, the config fragment, and a smoke run of
scripts/choose_cutoff.py on a tiny sweep."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from app.config import ConfigError, StageConfig, load
from benchmarks import cutoff
from tests.benchmarks.scripts import run_proc


def row(k: int | None, p99: float, recall: float = 0.9) -> dict[str, Any]:
    return {
        "variant": "single" if k is None else f"multi@{k}",
        "stage1_k": k,
        "kept": k or 1000,
        "recall_mean": recall,
        "recall_p5": recall,
        "p50": p99 / 2,
        "p99": p99,
        "pipeline_p50": p99 / 3,
        "pipeline_p99": p99 / 2,
        "requests": 10,
    }


ROWS = [row(None, 30.0, 1.0), row(10, 5.0), row(50, 9.0), row(100, 14.9), row(200, 15.1)]


@pytest.mark.parametrize(
    ("budget", "want"),
    [
        (15.0, 100),  # 200 is over by 0.1 ms
        (15.1, 200),  # a p99 equal to the budget fits
        (9.0, 50),
        (100.0, 200),  # single-stage fits too, but it is no cutoff
        (4.9, None),  # nothing fits
    ],
)
def test_choose_the_largest_stage1_k_that_fits(budget: float, want: int | None) -> None:
    chosen = cutoff.choose(ROWS, budget)
    assert (chosen and chosen["stage1_k"]) == want


def test_choose_judges_each_value_on_its_own_measurement() -> None:
    # Latency need not be monotone in k: a larger k that fits wins over a smaller that does not.
    rows = [row(10, 5.0), row(20, 16.0), row(30, 14.0)]
    assert cutoff.choose(rows, 15.0)["stage1_k"] == 30


def test_choose_can_use_another_quantity() -> None:
    assert cutoff.choose(ROWS, 7.5, quantity="p50")["stage1_k"] == 100


@pytest.mark.parametrize("k", [10, 150, 300])
def test_fragment_loads_as_the_farm_config_with_that_stage1_k(tmp_path: Path, k: int) -> None:
    config = load(env={})
    chosen = row(k, 12.3, 0.987)
    sweep = cutoff.Sweep(budget_ms=15, n=1000, requests=200)
    text = cutoff.cutoff_toml(config, chosen, sweep, "scripts/choose_cutoff.py --budget-ms 15")
    path = cutoff.write_fragment(tmp_path / "deploy" / "cutoff.toml", text)
    assert tomllib.loads(path.read_text()) == {
        "stages": [{"model": "deepfm", "keep_k": k}, {"model": "autoint"}]
    }
    loaded = load(env={"CTR_FARM_CONFIG": str(path)})
    assert loaded.default_stage1_k == k
    assert loaded.stages == (StageConfig("deepfm", k), StageConfig("autoint"))
    # Everything else stays at its default, and the environment still wins over the file.
    assert loaded.pool_size == config.pool_size
    env = {"CTR_FARM_CONFIG": str(path), "CTR_FARM_STAGES": "deepfm:40,autoint"}
    assert load(env=env).default_stage1_k == 40
    assert "recall@10 vs single-stage AutoInt 0.987" in text
    assert "p99 12.30 ms" in text


def test_fragment_keeps_a_longer_cascade() -> None:
    config = load(
        overrides={
            "stages": [
                {"model": "deepfm", "keep_k": 500},
                {"model": "deepfm", "keep_k": 50},
                {"model": "autoint"},
            ]
        },
        env={},
    )
    stages = cutoff.stages_with_cutoff(config, 300)
    assert stages == (
        StageConfig("deepfm", 300),
        StageConfig("deepfm", 50),
        StageConfig("autoint"),
    )


def test_a_fragment_below_default_top_k_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cutoff.toml"
    path.write_text(cutoff.cutoff_toml(load(env={}), row(5, 1.0), cutoff.Sweep(), "x"))
    with pytest.raises(ConfigError, match="below default_top_k"):
        load(env={"CTR_FARM_CONFIG": str(path)})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"budget_ms": 0}, "budget"),
        ({"stage1_ks": (5, 20)}, "top_k"),
        ({"requests": 0}, "requests"),
        ({"n": 10_000}, "max_candidates"),
    ],
)
def test_sweep_check_rejects(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cutoff.Sweep(**changes).check(load(env={}))


def test_summarize_orders_rows_and_computes_percentiles() -> None:
    samples = {
        "multi@50": {"total": [1.0, 2.0, 3.0], "pipeline": [0.5] * 3, "recall": [1.0, 0.8, 0.9]},
        "single": {"total": [4.0] * 3, "pipeline": [3.0] * 3, "recall": [1.0] * 3},
        "multi@20": {"total": [1.0] * 3, "pipeline": [0.4] * 3, "recall": [0.7] * 3},
    }
    rows = cutoff.summarize(samples, n=30)
    assert [r["variant"] for r in rows] == ["single", "multi@20", "multi@50"]
    assert [r["kept"] for r in rows] == [30, 20, 30]  # a cutoff above n keeps all n
    assert rows[2]["recall_mean"] == pytest.approx(0.9)
    assert rows[2]["p50"] == 2.0
    assert rows[2]["p99"] == pytest.approx(2.98)


@pytest.mark.integration
def test_choose_cutoff_smoke(tmp_path: Path) -> None:
    """The script end to end with the real models on a tiny sweep."""
    out, report = tmp_path / "cutoff.toml", tmp_path / "report"
    proc = run_proc(
        "scripts/choose_cutoff.py",
        "--budget-ms",
        "1000",
        "--n",
        "60",
        "--stage1-k",
        "10,30,100",
        "--requests",
        "4",
        "--warmup",
        "1",
        "--out",
        str(out),
        "--report",
        str(report),
        env={"PATH": "/usr/bin:/bin"},
    )
    assert "largest stage1_k with p99 <= 1000 ms: 100" in proc.stdout
    rep = json.loads(report.with_suffix(".json").read_text())
    rows = {r["variant"]: r for r in rep["rows"]}
    assert set(rows) == {"single", "multi@10", "multi@30", "multi@100"}
    for r in rows.values():
        assert r["requests"] == 4
        assert 0 < r["p50"] <= r["p99"]
        # The cascade is part of each request's time, so its percentiles are too.
        assert r["pipeline_p50"] <= r["p50"] and r["pipeline_p99"] <= r["p99"]
        assert 0.0 <= r["recall_p5"] <= r["recall_mean"] <= 1.0
    # A cutoff that keeps all 60 candidates is exact; the reference agrees with itself.
    assert rows["multi@100"]["recall_mean"] == 1.0 and rows["multi@100"]["kept"] == 60
    assert rows["single"]["recall_mean"] == 1.0
    assert rep["chosen"]["stage1_k"] == 100
    assert load(env={"CTR_FARM_CONFIG": str(out)}).default_stage1_k == 100
    assert report.with_suffix(".md").read_text().startswith("# Choosing stage1_k")


@pytest.mark.integration
def test_choose_cutoff_with_no_value_in_budget_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "cutoff.toml"
    proc = run_proc(
        "scripts/choose_cutoff.py",
        "--budget-ms",
        "0.001",
        "--n",
        "30",
        "--stage1-k",
        "10,20",
        "--requests",
        "2",
        "--warmup",
        "0",
        "--out",
        str(out),
        env={"PATH": "/usr/bin:/bin"},
        returncode=1,
    )
    assert "no stage1_k fits" in proc.stdout
    assert not out.exists()
