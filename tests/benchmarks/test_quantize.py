"""Smoke run of the quantisation study (``scripts/quantize.py --quick``), so it never rots.

It asserts the study runs end to end on the real models and reports sane figures, not
that INT8 is faster.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from tests.benchmarks.scripts import run_proc

pytestmark = pytest.mark.integration


def test_quantize_quick(tmp_path: Path) -> None:
    out = tmp_path / "quantize.md"
    proc = run_proc(
        "scripts/quantize.py",
        "--quick",
        "--work-dir",
        str(tmp_path / "work"),
        "--out",
        str(out),
        timeout_s=120,
    )
    assert "| fp32 |" in proc.stdout
    # One results row per model: "| fp32 | <size MB> | ...".
    assert len(re.findall(r"^\| fp32 \| [0-9.]+ \|", out.read_text(), re.M)) == 2
    rows = list(csv.DictReader(out.with_suffix(".csv").read_text().splitlines()))
    by_model: dict[str, dict[str, dict[str, str]]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["variant"]] = row
    assert set(by_model) == {"deepfm", "autoint"}
    for variants in by_model.values():
        fp32, dyn = variants["fp32"], variants["dyn-defaults"]
        assert not fp32["error"] and not dyn["error"]
        assert int(dyn["size_bytes"]) < int(fp32["size_bytes"])
        assert 0.0 < float(dyn["auc"]) < 1.0
        assert float(fp32["auc_delta"]) == 0.0
        assert float(dyn["b1_p50_ms"]) > 0 and float(dyn["b100_p99_ms"]) > 0
    # Quantised models go to the work dir only.
    assert list((tmp_path / "work").rglob("dyn-defaults.onnx"))
