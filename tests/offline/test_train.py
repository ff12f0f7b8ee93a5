"""Tiny end-to-end: generate, train one epoch of each model, export, serve with ORT."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from app.catalog import validate  # noqa: E402
from app.config import load  # noqa: E402
from app.offline import logs  # noqa: E402
from app.offline import train as trainer  # noqa: E402

CARD_KEYS = {
    "name",
    "version",
    "architecture",
    "hyperparameters",
    "fields",
    "input",
    "output",
    "opset",
    "sha256",
    "size_bytes",
    "training",
    "metrics",
    "distribution",
}
TINY = {
    "deepfm": trainer.ModelSpec(
        "deepfm", embedding_dim=4, dnn=(16, 8), dropout=0.1, lr=1e-2, batch_size=512
    ),
    "autoint": trainer.ModelSpec(
        "autoint",
        embedding_dim=8,
        dnn=(16,),
        dropout=0.1,
        lr=1e-2,
        batch_size=512,
        attention_layers=1,
        attention_heads=2,
    ),
}
DATA_CFG = trainer.DataConfig(
    rows_train=3000, rows_valid=3000, rows_test=3000, neg_ratio=50.0, base_ctr=0.01
)


@pytest.fixture(scope="module")
def data() -> trainer.Datasets:
    return trainer.make_datasets(DATA_CFG)


def test_calibration_intercept_matches_mean_ctr() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(-4.0, 1.0, 50_000)
    clicks = (rng.random(50_000) < 0.01).astype(np.float32)
    cal = trainer.fit_calibration(logits, clicks, rate=0.5)
    served = 1.0 / (1.0 + np.exp(-(logits + cal.logit_shift)))
    assert served.mean() == pytest.approx(clicks.mean(), rel=1e-4)
    assert cal.logit_shift == pytest.approx(math.log(0.5) + cal.intercept)


@pytest.mark.parametrize("name", ["deepfm", "autoint"])
def test_train_export_serve(name: str, data: trainer.Datasets, tmp_path: Path) -> None:
    cfg = trainer.TrainConfig(epochs=1)
    summary = trainer.run(name, data, DATA_CFG, cfg, tmp_path, "7", spec=TINY[name])
    model_path = tmp_path / name / "7" / "model.onnx"
    card = json.loads((tmp_path / name / "7" / "card.json").read_text())

    assert set(card) == CARD_KEYS
    assert card["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert card["size_bytes"] == model_path.stat().st_size
    assert [f["name"] for f in card["fields"]] == list(logs.FIELD_NAMES)
    assert all(f["oov_index"] == f["vocab_size"] for f in card["fields"])
    assert card["input"] == {"name": "ids", "dtype": "int64", "shape": ["batch", 16]}
    assert card["output"] == {"name": "ctr", "dtype": "float32", "shape": ["batch"]}
    hist = card["distribution"]["ctr_histogram"]
    assert len(hist["edges"]) == 21 and len(hist["shares"]) == 20
    assert sum(hist["shares"]) == pytest.approx(1.0)
    assert len(card["distribution"]["fields"]["domain"]["top_ids"]) == 20
    calibration = card["hyperparameters"]["calibration"]
    expected_shift = math.log(data.neg_sampling_rate) + calibration["intercept"]
    assert calibration["logit_shift"] == pytest.approx(expected_shift)
    assert summary["onnx_max_abs_diff"] < 1e-5
    # What a worker would check before serving it: `ctr-farm models validate` passes.
    check = validate(tmp_path / name / "7", load(env={}))
    assert check.ok, check.error

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    ids = data.test.ids[:257]
    (ctr,) = session.run(["ctr"], {"ids": ids})
    assert ctr.dtype == np.float32 and ctr.shape == (257,)
    assert np.all((ctr > 0) & (ctr < 1))
    # OOV index and out-of-range ids (either side) are served, not rejected.
    odd = np.tile(np.array([f.cardinality for f in logs.FIELDS], dtype=np.int64), (3, 1))
    odd[1] += 1000
    odd[2] = -5
    (odd_ctr,) = session.run(["ctr"], {"ids": odd})
    assert np.all(np.isfinite(odd_ctr)) and odd_ctr[0] == odd_ctr[1] == odd_ctr[2]
