"""scripts/bench_session_options.py: a smoke run (not speed) and the settings parser."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks.cli import setting
from tests.benchmarks.scripts import run_proc


def test_setting_parses_json_values_else_strings() -> None:
    assert setting("off:prepack_weights=false, inference=inline") == (
        "off",
        {"prepack_weights": False, "inference": "inline"},
    )
    assert setting("n: pool_size=6") == ("n", {"pool_size": 6})
    for bad in ("no-label", ":x=1", "a:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            setting(bad)


def test_bench_session_options_quick(tmp_path: Path) -> None:
    out = tmp_path / "opts"
    proc = run_proc(
        "scripts/bench_session_options.py",
        "--quick",
        "--set",
        "on:prepack_weights=true",
        "--set",
        "off:prepack_weights=false",
        "--out",
        str(out),
    )
    assert "| deepfm@10 | on | 3 |" in proc.stdout and "| autoint@1 | off | 3 |" in proc.stdout
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["case"], r["setting"]) for r in rows] == [
        ("deepfm@10", "on"),
        ("deepfm@10", "off"),
        ("autoint@1", "on"),
        ("autoint@1", "off"),
    ]
    assert rows[0]["vs_first_p50"] == 1.0 and rows[1]["vs_first_p50"] > 0
