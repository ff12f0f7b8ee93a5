"""Small ONNX models built in tests: a real graph ORT runs, with known behaviour.

``write_model`` writes ``<root>/<name>/<version>/model.onnx`` + ``card.json`` in the
layout the farm serves. ``kind`` picks the behaviour: ``ok`` (sigmoid of a sum of
per-id weights), ``nan`` (every score NaN), ``corrupt`` (bytes that are not ONNX),
``poisoned`` (ORT raises for a batch holding a row whose first id is >= ``POISON_ID``:
a fault switched on by the request), ``slow`` (``ok`` plus ``SLOW_LAYERS`` 512x512
matmuls per row that do not change the score: slow in proportion to the batch).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FIELDS = (("weekday", 7), ("hour", 24), ("region", 35), ("city", 400))
POISON_ID = 7  # the OOV bucket of weekday: warm-up never sends it, a client can
SLOW_LAYERS, SLOW_WIDTH = 24, 512


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
    if kind == "poisoned":
        _poison(nodes, inits)
    elif kind == "slow":
        _slow(nodes, inits, rng)
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


def _poison(nodes: list, inits: list) -> None:
    """Gather from a table of POISON_ID rows by the first id: out of range -> ORT error."""
    inits += [
        numpy_helper.from_array(np.array(0, dtype=np.int64), "col0"),
        numpy_helper.from_array(np.zeros(POISON_ID, dtype=np.float32), "guard"),
    ]
    nodes[-1:] = [
        helper.make_node("Gather", ["ids", "col0"], ["first"], axis=1),
        helper.make_node("Gather", ["guard", "first"], ["guarded"], axis=0),
        helper.make_node("Add", ["logit", "guarded"], ["logit2"]),
        helper.make_node("Sigmoid", ["logit2"], ["ctr"]),
    ]


def _slow(nodes: list, inits: list, rng: np.random.Generator) -> None:
    """Busy work per row whose result is multiplied by 0 before it meets the score."""
    inits += [
        numpy_helper.from_array(np.ones((1, SLOW_WIDTH), dtype=np.float32), "widen"),
        numpy_helper.from_array(np.array([0.0], dtype=np.float32), "zero"),
        numpy_helper.from_array(
            (rng.normal(0, 1, (SLOW_WIDTH, SLOW_WIDTH)) / SLOW_WIDTH).astype(np.float32), "W"
        ),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axes1"),
    ]
    busy = [
        helper.make_node("Unsqueeze", ["s", "axes1"], ["s2"]),
        helper.make_node("Mul", ["s2", "widen"], ["h0"]),
    ]
    for i in range(SLOW_LAYERS):
        busy.append(helper.make_node("MatMul", [f"h{i}", "W"], [f"h{i + 1}"]))
    busy += [
        helper.make_node("ReduceSum", [f"h{SLOW_LAYERS}", "axis1"], ["busy"], keepdims=0),
        helper.make_node("Mul", ["busy", "zero"], ["nothing"]),
        helper.make_node("Add", ["logit", "nothing"], ["logit2"]),
        helper.make_node("Sigmoid", ["logit2"], ["ctr"]),
    ]
    nodes[-1:] = busy


def write_model(
    root: Path,
    name: str,
    version: str = "1",
    fields=FIELDS,
    seed: int = 0,
    kind: str = "ok",
    distribution: dict | None = None,
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
    if distribution is not None:
        card["distribution"] = distribution
    (out / "card.json").write_bytes(msgspec.json.encode(card))
    return out


def copy_as_version(src: Path, out: Path, version: str) -> Path:
    """A version dir's model and card copied to ``out`` under another card version (a new
    model key with the same weights: what a training run hands over, without golden.json)."""
    out.mkdir(parents=True)
    (out / "model.onnx").write_bytes((src / "model.onnx").read_bytes())
    card = msgspec.json.decode((src / "card.json").read_bytes())
    (out / "card.json").write_bytes(msgspec.json.encode({**card, "version": version}))
    return out
