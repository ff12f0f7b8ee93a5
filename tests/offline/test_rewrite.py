"""app.offline.rewrite: the rewritten AutoInt graphs compute what the export computes."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from app.config import REPO_ROOT
from app.offline import logs
from app.offline.rewrite import (
    VARIANTS,
    derive,
    fold_first_layer,
    predict,
    quantize_int8,
    rewrite_autoint,
    rewrite_deepfm,
)
from app.sessions import sha256_of

AUTOINT_1 = REPO_ROOT / "models" / "autoint" / "1"
DEEPFM_1 = REPO_ROOT / "models" / "deepfm" / "1"
#: Held-out ids: not the cards' train/valid/test seeds (1/2/3), with OOV and bad ids too.
HELD_OUT_SEED = 4242


def held_out(rows: int = 3000) -> np.ndarray:
    ids = logs.generate(rows, HELD_OUT_SEED).id_matrix()
    ids[::97, 5] = 10**9  # out of range -> the field's OOV row, in the graph
    ids[1::89, 3] = -3
    return ids


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return held_out()


@pytest.fixture(scope="module")
def reference(ids: np.ndarray) -> np.ndarray:
    return predict(AUTOINT_1 / "model.onnx", ids)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_compute_the_same_ctrs(
    variant: str, tmp_path: Path, ids: np.ndarray, reference: np.ndarray
) -> None:
    out = rewrite_autoint(AUTOINT_1 / "model.onnx", tmp_path / "m.onnx", variant)
    got = predict(out, ids)
    assert got.dtype == np.float32 and got.shape == reference.shape
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5)
    # The attention layers were replaced, the rest kept: no transposes of Q/K/V left
    # but in the standard-ops variant, which keeps two per layer.
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["Transpose"] == (9 if variant == "fused" else 0)
    assert ops["Gather"] == 2 and ops["Sigmoid"] == 1


def test_default_variant_uses_onnx_attention(tmp_path: Path) -> None:
    out = rewrite_autoint(AUTOINT_1 / "model.onnx", tmp_path / "m.onnx")
    model = onnx.load(str(out))
    assert {o.domain: o.version for o in model.opset_import}[""] == 23
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Attention"] == 3 and ops["Softmax"] == 0 and ops["Slice"] == 0


def test_rejects_unknown_variant_and_non_autoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        rewrite_autoint(AUTOINT_1 / "model.onnx", tmp_path / "m.onnx", "nope")
    with pytest.raises(ValueError, match="no AutoInt attention layers"):
        rewrite_autoint(DEEPFM_1 / "model.onnx", tmp_path / "m.onnx")


def test_deepfm_rewrite_computes_the_same_ctrs(tmp_path: Path, ids: np.ndarray) -> None:
    out = rewrite_deepfm(DEEPFM_1 / "model.onnx", tmp_path / "m.onnx")
    want = predict(DEEPFM_1 / "model.onnx", ids)
    got = predict(out, ids)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["ReduceSum"] == 0 and ops["Pow"] == 0 and ops["Gather"] == 2
    with pytest.raises(ValueError, match="not a DeepFM export"):
        rewrite_deepfm(AUTOINT_1 / "model.onnx", tmp_path / "x.onnx")


@pytest.mark.parametrize("model", ["autoint", "deepfm"])
def test_fp32_rewrites_score_a_row_the_same_in_any_batch(
    model: str, tmp_path: Path, ids: np.ndarray
) -> None:
    """What the farm relies on (the cache, offline scoring == /predict, stage 2 on the
    survivors only): a row's score does not depend on the other rows of its batch."""
    if model == "autoint":
        out = rewrite_autoint(AUTOINT_1 / "model.onnx", tmp_path / "m.onnx")
    else:
        out = rewrite_deepfm(DEEPFM_1 / "model.onnx", tmp_path / "m.onnx")
    whole = predict(out, ids[:1000])
    for start, size in ((0, 64), (100, 100), (37, 2), (500, 500)):
        part = predict(out, ids[start : start + size])
        assert np.array_equal(part, whole[start : start + size]), (start, size)


def test_layer0_fold_computes_the_same_ctrs(
    tmp_path: Path, ids: np.ndarray, reference: np.ndarray
) -> None:
    rewritten = rewrite_autoint(AUTOINT_1 / "model.onnx", tmp_path / "m.onnx")
    out = fold_first_layer(rewritten, tmp_path / "fold.onnx")
    got = predict(out, ids)
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5)
    inits = {t.name for t in onnx.load(str(out)).graph.initializer}
    assert "model.embed.table.weight" not in inits  # replaced by the four folded tables
    assert np.array_equal(predict(out, ids[:64]), got[:64])
    with pytest.raises(ValueError, match="not an 'attention' rewrite"):
        fold_first_layer(AUTOINT_1 / "model.onnx", tmp_path / "x.onnx")


def test_int8_keeps_attention_fp32_and_stays_close(
    tmp_path: Path, ids: np.ndarray, reference: np.ndarray
) -> None:
    fp32 = rewrite_autoint(AUTOINT_1 / "model.onnx", tmp_path / "fp32.onnx")
    int8 = quantize_int8(fp32, tmp_path / "int8.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(int8)).graph.node)
    assert ops["Attention"] == 3 and ops["QAttention"] == 0 and ops["MatMulInteger"] > 0
    got = predict(int8, ids)
    assert 0 < np.abs(got - reference).max() < 5e-3  # quantised: close, not equal
    # Why no INT8 version ships: one activation scale per tensor, i.e. per batch, so a
    # row's score moves with the other rows of its batch.
    assert not np.array_equal(predict(int8, ids[:64]), got[:64])


def test_derive_writes_a_publishable_card(tmp_path: Path) -> None:
    # The source version with a small valid/test split, so the metrics are quick.
    src = tmp_path / "autoint" / "1"
    shutil.copytree(AUTOINT_1, src)
    card = json.loads((src / "card.json").read_text())
    card["training"] |= {"rows_valid": 4000, "rows_test": 5000}
    (src / "card.json").write_text(json.dumps(card))

    out = derive(src, tmp_path / "out", "attention")
    new = json.loads((out / "card.json").read_text())
    assert new["version"] == "2" and new["opset"] == 23
    assert new["sha256"] == sha256_of(out / "model.onnx")
    assert new["size_bytes"] == (out / "model.onnx").stat().st_size
    assert new["hyperparameters"]["derived_from"]["model"] == "autoint/1"
    assert new["hyperparameters"]["derived_from"]["max_abs_dctr_on_test"] <= 1e-5
    # Same function: the re-measured AUC on the same split is the source's.
    test = logs.generate(5000, card["training"]["seed_test"], base_ctr=card["training"]["base_ctr"])
    from app.offline.evaluate import auc

    want = auc(predict(src / "model.onnx", test.id_matrix()), test[logs.LABEL])
    assert new["metrics"]["test_auc"] == pytest.approx(want, abs=1e-6)
