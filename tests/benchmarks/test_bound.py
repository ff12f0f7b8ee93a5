"""benchmarks/bound.py: FLOPs counted from the graphs, and a smoke run of scripts/bound.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config import REPO_ROOT
from app.offline.rewrite import rewrite_autoint
from benchmarks.bound import count_work
from tests.benchmarks.scripts import run_proc

AUTOINT_1 = REPO_ROOT / "models" / "autoint" / "1" / "model.onnx"
DEEPFM_1 = REPO_ROOT / "models" / "deepfm" / "1" / "model.onnx"
FIELDS, DIM, HEADS, LAYERS = 16, 64, 4, 3


def autoint_flops_per_row() -> int:
    """The AutoInt of the cards, by hand: 3 layers of Q/K/V + residual projections and
    per-head QK^T and PV products, then the DNN 1024 -> 256 -> 128 -> 1."""
    hd = DIM // HEADS
    layer = 2 * FIELDS * DIM * (3 * DIM + DIM) + 2 * (2 * HEADS * FIELDS * FIELDS * hd)
    dnn = 2 * (FIELDS * DIM * 256 + 256 * 128 + 128 * 1)
    return LAYERS * layer + dnn


@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_autoint_flops_from_the_graph(batch: int) -> None:
    work = count_work(AUTOINT_1, batch)
    assert work.gemm_flops == batch * autoint_flops_per_row()
    assert not work.unknown
    assert work.elements["Softmax"] == batch * LAYERS * HEADS * FIELDS * FIELDS
    assert work.gather_bytes == batch * FIELDS * (DIM + 1) * 4  # two fp32 tables


def test_rewritten_graph_counts_the_same_flops(tmp_path: Path) -> None:
    # The contrib op's shapes come from ORT (onnx has no shape inference for it).
    for variant in ("attention", "contrib-attention"):
        out = rewrite_autoint(AUTOINT_1, tmp_path / f"{variant}.onnx", variant)
        work = count_work(out, 5)
        assert work.gemm_flops == 5 * autoint_flops_per_row(), variant
        assert not work.unknown
        assert work.elements["Transpose"] == 0


def test_deepfm_flops() -> None:
    work = count_work(DEEPFM_1, 10)
    assert work.gemm_flops == 10 * 2 * (128 * 256 + 256 * 128 + 128 * 64 + 64 * 1)
    assert not work.unknown


@pytest.mark.integration
def test_bound_script_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bound.md"
    proc = run_proc(
        "scripts/bound.py",
        str(REPO_ROOT / "models" / "deepfm" / "1"),
        str(REPO_ROOT / "models" / "autoint" / "1"),
        *("--batches", "4,8", "--cascade", "4,8", "--repeats", "2", "--warmup", "1"),
        *("--gemm-min-time", "0.01", "--out", str(out)),
        timeout_s=120,
    )
    text = out.read_text()
    assert text == proc.stdout
    assert "OPENBLAS_NUM_THREADS=1" in text
    assert "| autoint/1 | 8 | 2.360 |" in text and "| deepfm/1 | 4 | 0.148 |" in text
    assert "FLOP ratio **" in text


@pytest.mark.integration
def test_model_variants_script_smoke(tmp_path: Path) -> None:
    out = tmp_path / "variants.md"
    run_proc(
        "scripts/model_variants.py",
        *("--batches", "8", "--repeats", "2", "--option-repeats", "1"),
        *("--work-dir", str(tmp_path / "work"), "--out", str(out)),
        timeout_s=180,
    )
    text = out.read_text()
    # Version 1 against itself; the served rewrites exact or within 1e-5, batch-invariant.
    assert "| autoint v1 | " in text and "| 1.000x | 0.0e+00 | yes |" in text
    assert "| autoint-attention | " in text and "| deepfm-fm-gemm | " in text
    for line in text.splitlines():
        if line.startswith(("| autoint-attention |", "| deepfm-fm-gemm |")):
            cells = [c.strip() for c in line.split("|")]
            assert float(cells[-4]) <= 1e-5 and cells[-3] == "yes", line
        if "-int8 |" in line:
            assert "| NO |" in line  # one activation scale per batch
    assert "| offline-optimised | iobinding |" in text
