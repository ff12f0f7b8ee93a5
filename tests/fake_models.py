"""Small ONNX models built in tests: a real graph ORT runs, with known behaviour.

``write_model`` writes ``<root>/<name>/<version>/model.onnx`` + ``card.json`` in the
layout the farm serves. ``kind`` picks the behaviour: ``ok`` (sigmoid of a sum of
per-id weights), ``nan`` (every score NaN), ``corrupt`` (bytes that are not ONNX).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FIELDS = (("weekday", 7), ("hour", 24), ("region", 35), ("city", 400))


def build_graph(fields, seed: int, kind: str) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    vocab = np.array([v for _, v in fields], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(vocab + 1)[:-1]]).astype(np.int64)
    weights = rng.normal(0, 1, size=int((vocab + 1).sum())).astype(np.float32)
    if kind == "nan":
        weights[:] = np.nan
    inits = [
        numpy_helper.from_array(offsets, "offsets"),
        numpy_helper.from_array(weights, "weights"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([-3.0], dtype=np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("Add", ["ids", "offsets"], ["gidx"]),
        helper.make_node("Gather", ["weights", "gidx"], ["w"], axis=0),
        helper.make_node("ReduceSum", ["w", "axis1"], ["s"], keepdims=0),
        helper.make_node("Add", ["s", "bias"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["ctr"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fake",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", len(fields)])],
        [helper.make_tensor_value_info("ctr", TensorProto.FLOAT, ["batch"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def write_model(
    root: Path, name: str, version: str = "1", fields=FIELDS, seed: int = 0, kind: str = "ok"
) -> Path:
    out = Path(root) / name / version
    out.mkdir(parents=True, exist_ok=True)
    data = (
        b"not an onnx model"
        if kind == "corrupt"
        else build_graph(fields, seed, kind).SerializeToString()
    )
    (out / "model.onnx").write_bytes(data)
    card = {
        "name": name,
        "version": version,
        "architecture": "FakeLinear",
        "fields": [{"name": f, "vocab_size": v, "oov_index": v} for f, v in fields],
        "input": {"name": "ids", "dtype": "int64", "shape": ["batch", len(fields)]},
        "output": {"name": "ctr", "dtype": "float32", "shape": ["batch"]},
        "opset": 17,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "metrics": {"valid_auc": 0.5, "test_auc": 0.5, "test_logloss": 0.7},
    }
    (out / "card.json").write_bytes(msgspec.json.encode(card))
    return out
