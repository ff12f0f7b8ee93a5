"""Rewrite an exported AutoInt graph into one that computes the same function faster.

Offline only (imports ``onnx``; the server never imports this module). The torch export
of :class:`app.offline.train.InteractingLayer` runs, per attention layer, a Q/K/V MatMul,
three Slices, three Reshapes, four Transposes, a MatMul + Div for the scores, Softmax, the
value MatMul and a separate residual MatMul. At batch 1000 the Transposes and Slices alone
were 16 ms of 61 (docs/results/issue5_models.md). The rewrite keeps everything before the
first layer (id clamping, offsets, the Gathers) and after the last (DNN, calibration) and
replaces each layer by:

* ``attention`` (the default, opset 23): three ``[dim, dim]`` MatMuls for Q, K, V, the
  standard ONNX ``Attention`` op (ORT's fused CPU kernel: per batch and head ``QK^T``,
  softmax and ``PV`` without materialising the transposes), then the residual projection
  as ONE Gemm with the attention output as its C input, fused by ORT with the Relu;
* ``contrib-attention``: ``com.microsoft.Attention`` (it projects Q/K/V itself from
  ``[dim, 3 dim]`` weights) + the same residual Gemm;
* ``mha``: ONE MatMul of the layer input with the concatenated weights
  ``[Wq | Wk | Wv | Wr]`` (``[dim, 4 dim]``), a Split into four ``[batch, fields, dim]``
  tensors, ``com.microsoft.MultiHeadAttention`` on Q, K, V, then ``Relu(attn + residual)``;
* ``fused``: the same single MatMul, with the scale folded into ``Wq`` (exact: a power of
  two for head_dim 16), standard ONNX ops only (one Reshape + Transpose of the packed
  projections to ``[batch, 4*heads, fields, head_dim]``, head-group Slices, two batched
  MatMuls, Softmax, one Transpose back).

:func:`rewrite_deepfm` (``fm-gemm``) does the same for DeepFM's first-order and FM terms.

Every variant is checked against the original on held-out ids (tests/offline). The
chosen ones ship as new model versions (``derive``, then ``models publish``; run from the
repository root so that ``app`` and ``models`` are this checkout's):

    .venv/bin/python -m app.offline.rewrite models/autoint/1 run/derived/autoint-2
    .venv/bin/python -m app.offline.rewrite models/deepfm/1 run/derived/deepfm-2 \\
        --transform fm-gemm
    .venv/bin/python -m app models publish --root models run/derived/autoint-2

``derive`` can also make dynamic INT8 versions (``--transform int8``: ORT's
``quantize_dynamic``, per-channel, ``reduce_range``; docs/results/quantize.md), but none
ships: dynamic INT8 quantises the activations with ONE scale per tensor, i.e. per batch,
so a candidate's score depends on the other candidates of its batch (3e-4 of CTR between
/predict in batches of 64 and offline scoring; docs/results/issue5_models.md). Every
derived card records its metrics re-measured on the card's own valid and test splits.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

ATTN_PREFIX = "/model/attention/attention."
#: (variant, opset of the rewritten model); the first is the default.
VARIANTS = {"attention": 23, "contrib-attention": 17, "mha": 17, "fused": 17}
ONNX_ATTENTION_OPSET = 23


def _layer_weights(model: onnx.ModelProto) -> list[tuple[np.ndarray, np.ndarray, str, str]]:
    """Per attention layer: (W_qkv [dim, 3 dim], W_res [dim, dim], input name, output name)."""
    inits = {t.name: t for t in model.graph.initializer}
    layers: dict[int, dict[str, object]] = {}
    for node in model.graph.node:
        if not node.name.startswith(ATTN_PREFIX) and not any(
            o.startswith(ATTN_PREFIX) for o in node.output
        ):
            continue
        out = node.output[0]
        idx = int(out[len(ATTN_PREFIX) :].split("/")[0])
        entry = layers.setdefault(idx, {})
        if node.op_type == "MatMul" and "/qkv/" in out:
            entry["qkv"] = numpy_helper.to_array(inits[node.input[1]])
            entry["input"] = node.input[0]
        elif node.op_type == "MatMul" and "/residual/" in out:
            entry["res"] = numpy_helper.to_array(inits[node.input[1]])
        elif node.op_type == "Relu":
            entry["output"] = out
    return [
        (layers[i]["qkv"], layers[i]["res"], layers[i]["input"], layers[i]["output"])  # type: ignore[misc]
        for i in sorted(layers)
    ]


def _mha_layer(i: int, w: np.ndarray, heads: int, x: str, out: str) -> tuple[list, list]:
    dim = w.shape[0]
    p = f"/rw/attention.{i}/"
    nodes = [
        helper.make_node("MatMul", [x, p + "W"], [p + "proj"], name=p + "proj"),
        helper.make_node(
            "Split",
            [p + "proj", p + "sizes"],
            [p + "q", p + "k", p + "v", p + "r"],
            name=p + "split",
            axis=-1,
        ),
        helper.make_node(
            "MultiHeadAttention",
            [p + "q", p + "k", p + "v"],
            [p + "attn"],
            name=p + "mha",
            domain="com.microsoft",
            num_heads=heads,
            scale=1.0 / math.sqrt(dim // heads),
        ),
        helper.make_node("Add", [p + "attn", p + "r"], [p + "sum"], name=p + "add"),
        helper.make_node("Relu", [p + "sum"], [out], name=p + "relu"),
    ]
    inits = [
        numpy_helper.from_array(w, p + "W"),
        numpy_helper.from_array(np.array([dim] * 4, np.int64), p + "sizes"),
    ]
    return nodes, inits


def _onnx_attention_layer(
    i: int, w_qkv: np.ndarray, w_res: np.ndarray, heads: int, fields: int, x: str, out: str
) -> tuple[list, list]:
    """ONNX ``Attention`` (opset 23) on three projections, residual as a Gemm + Relu."""
    dim = w_qkv.shape[0]
    p = f"/rw/attention.{i}/"
    nodes = [
        # Three [dim, dim] MatMuls instead of one [dim, 3 dim] and a Split: no copies.
        *(
            helper.make_node("MatMul", [x, p + "W" + t], [p + t], name=p + t)
            for t in ("q", "k", "v")
        ),
        helper.make_node(
            "Attention",
            [p + "q", p + "k", p + "v"],
            [p + "attn"],
            name=p + "attention",
            q_num_heads=heads,
            kv_num_heads=heads,
            scale=1.0 / math.sqrt(dim // heads),
        ),
        *_residual(p, x, out),
    ]
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(w_qkv[:, j * dim : (j + 1) * dim]), p + n)
        for j, n in enumerate(("Wq", "Wk", "Wv"))
    ]
    inits += _residual_inits(p, w_res, fields)
    return nodes, inits


def _residual(p: str, x: str, out: str) -> list:
    """``relu(x Wr + attn)`` as one Gemm (C = attn, beta 1) that ORT fuses with the Relu:
    no separate Add and Relu passes over the ``[batch * fields, dim]`` tensor."""
    return [
        helper.make_node("Reshape", [x, p + "rows"], [p + "x2"], name=p + "x2"),
        helper.make_node("Reshape", [p + "attn", p + "rows"], [p + "attn2"], name=p + "a2"),
        helper.make_node("Gemm", [p + "x2", p + "Wr", p + "attn2"], [p + "sum"], name=p + "res"),
        helper.make_node("Relu", [p + "sum"], [p + "relu"], name=p + "relu"),
        helper.make_node("Reshape", [p + "relu", p + "shape3"], [out], name=p + "r3"),
    ]


def _residual_inits(p: str, w_res: np.ndarray, fields: int) -> list:
    dim = w_res.shape[0]
    return [
        numpy_helper.from_array(np.ascontiguousarray(w_res, np.float32), p + "Wr"),
        numpy_helper.from_array(np.array([-1, dim], np.int64), p + "rows"),
        numpy_helper.from_array(np.array([-1, fields, dim], np.int64), p + "shape3"),
    ]


def _contrib_attention_layer(
    i: int, w_qkv: np.ndarray, w_res: np.ndarray, heads: int, fields: int, x: str, out: str
) -> tuple[list, list]:
    """``com.microsoft.Attention``: it projects Q/K/V itself (weights [dim, 3 dim])."""
    dim = w_qkv.shape[0]
    p = f"/rw/attention.{i}/"
    nodes = [
        helper.make_node(
            "Attention",
            [x, p + "W", p + "b"],
            [p + "attn"],
            name=p + "attention",
            domain="com.microsoft",
            num_heads=heads,
            scale=1.0 / math.sqrt(dim // heads),
        ),
        *_residual(p, x, out),
    ]
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(w_qkv, np.float32), p + "W"),
        numpy_helper.from_array(np.zeros(3 * dim, np.float32), p + "b"),
        *_residual_inits(p, w_res, fields),
    ]
    return nodes, inits


def _fused_layer(
    i: int, w: np.ndarray, heads: int, fields: int, x: str, out: str
) -> tuple[list, list]:
    dim = w.shape[0]
    hd = dim // heads
    p = f"/rw/attention.{i}/"
    c = {
        "shape4": np.array([-1, fields, 4 * heads, hd], np.int64),
        "shape3": np.array([-1, fields, dim], np.int64),
        "zero": np.array([0], np.int64),
        "h1": np.array([heads], np.int64),
        "h2": np.array([2 * heads], np.int64),
        "h3": np.array([3 * heads], np.int64),
        "h4": np.array([4 * heads], np.int64),
        "axis1": np.array([1], np.int64),
    }
    nodes = [
        helper.make_node("MatMul", [x, p + "W"], [p + "proj"], name=p + "proj"),
        helper.make_node("Reshape", [p + "proj", p + "shape4"], [p + "proj4"], name=p + "r4"),
        # [b, fields, groups, hd] -> [b, groups, fields, hd]: one copy for Q, K, V and R.
        helper.make_node("Transpose", [p + "proj4"], [p + "g"], name=p + "tg", perm=[0, 2, 1, 3]),
        helper.make_node("Slice", [p + "g", p + "zero", p + "h1", p + "axis1"], [p + "q"]),
        helper.make_node("Slice", [p + "g", p + "h1", p + "h2", p + "axis1"], [p + "k"]),
        helper.make_node("Slice", [p + "g", p + "h2", p + "h3", p + "axis1"], [p + "v"]),
        helper.make_node("Slice", [p + "g", p + "h3", p + "h4", p + "axis1"], [p + "r"]),
        helper.make_node("Transpose", [p + "k"], [p + "kt"], name=p + "tk", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", [p + "q", p + "kt"], [p + "s"], name=p + "qk"),
        helper.make_node("Softmax", [p + "s"], [p + "a"], name=p + "softmax", axis=-1),
        helper.make_node("MatMul", [p + "a", p + "v"], [p + "o"], name=p + "av"),
        helper.make_node("Add", [p + "o", p + "r"], [p + "sum"], name=p + "add"),
        helper.make_node("Relu", [p + "sum"], [p + "relu"], name=p + "relu"),
        helper.make_node("Transpose", [p + "relu"], [p + "back"], name=p + "tb", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [p + "back", p + "shape3"], [out], name=p + "r3"),
    ]
    w = w.copy()
    w[:, :dim] *= np.float32(1.0 / math.sqrt(hd))
    inits = [numpy_helper.from_array(w, p + "W")]
    inits += [numpy_helper.from_array(v, p + k) for k, v in c.items()]
    return nodes, inits


def rewrite_autoint(
    src: Path, dest: Path, variant: str = "attention", heads: int = 4, fields: int = 16
) -> Path:
    """Write the rewritten graph of ``src`` to ``dest`` (same input/output names)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {sorted(VARIANTS)}")
    model = onnx.load(str(src))
    layers = _layer_weights(model)
    if not layers:
        raise ValueError(f"{src}: no AutoInt attention layers found")
    graph = model.graph
    kept = [
        n
        for n in graph.node
        if not n.name.startswith(ATTN_PREFIX)
        and not any(o.startswith(ATTN_PREFIX) for o in n.output)
    ]
    # Insert the new layers where the old first layer was (after the embedding Gather).
    first_input = layers[0][2]
    at = next(i for i, n in enumerate(kept) if first_input in n.output) + 1
    new_nodes, new_inits = [], []
    for i, (w_qkv, w_res, x, out) in enumerate(layers):
        w = np.concatenate([w_qkv, w_res], axis=1).astype(np.float32)
        if variant == "attention":
            nodes, inits = _onnx_attention_layer(i, w_qkv, w_res, heads, fields, x, out)
        elif variant == "contrib-attention":
            nodes, inits = _contrib_attention_layer(i, w_qkv, w_res, heads, fields, x, out)
        elif variant == "mha":
            nodes, inits = _mha_layer(i, w, heads, x, out)
        else:
            nodes, inits = _fused_layer(i, w, heads, fields, x, out)
        new_nodes += nodes
        new_inits += inits
    del graph.node[:]
    graph.node.extend(kept[:at] + new_nodes + kept[at:])
    graph.initializer.extend(new_inits)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.value_info[:]
    if variant in ("contrib-attention", "mha"):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            # The ops kept from the torch export (opset 17) mean the same at 23.
            opset.version = max(opset.version, VARIANTS[variant])
    onnx.checker.check_model(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dest))
    return dest


def fold_first_layer(src: Path, dest: Path) -> Path:
    """Fold layer 0's Q/K/V/residual projections into the embedding table (measured, not
    shipped): layer 0's input is ``Gather(table, ids)``, so ``Gather(table) W`` equals
    ``Gather(table W)``; four ``[rows, dim]`` tables (``table W``, computed in float64)
    replace the table and the layer's four GEMMs (-22 % of the FLOPs) at the price of
    4x the table's bytes. ``src`` must be an ``attention`` rewrite."""
    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    p = "/rw/attention.0/"
    if p + "Wq" not in inits:
        raise ValueError(f"{src}: not an 'attention' rewrite")
    table = inits["model.embed.table.weight"].astype(np.float64)
    gather = next(
        n for n in graph.node if n.op_type == "Gather" and n.input[0] == "model.embed.table.weight"
    )
    idx = gather.input[1]
    out0 = next(n for n in graph.node if n.name == p + "r3").output[0]
    tables = {t: (table @ inits[p + "W" + t]).astype(np.float32) for t in ("q", "k", "v", "r")}
    drop = {gather.name, p + "q", p + "k", p + "v", p + "x2", p + "a2", p + "res", p + "relu"}
    drop.add(p + "r3")
    nodes = []
    for node in graph.node:
        if node.name in drop and node is not gather:
            if node.name in (p + "q", p + "k", p + "v"):
                t = node.name[-1]
                nodes.append(
                    helper.make_node("Gather", [p + "T" + t, idx], [p + t], name=node.name)
                )
            elif node.name == p + "r3":
                nodes += [
                    helper.make_node("Gather", [p + "Tr", idx], [p + "r0"], name=p + "r0"),
                    helper.make_node("Add", [p + "attn", p + "r0"], [p + "sum0"], name=p + "add0"),
                    helper.make_node("Relu", [p + "sum0"], [out0], name=p + "relu0"),
                ]
            continue
        if node is not gather:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(numpy_helper.from_array(v, p + "T" + k) for k, v in tables.items())
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))
    return dest


# -- DeepFM --------------------------------------------------------------------------------
DEEPFM_KEEP = ("Less", "Greater", "Or", "Where", "Gather", "Flatten", "Relu", "Gemm")


def rewrite_deepfm(src: Path, dest: Path) -> Path:
    """DeepFM's first-order, FM and calibration terms as GEMMs chained by their C inputs.

    The export sums over fields with four ReduceSums (16 % of DeepFM's time at batch
    1000) and adds the terms one Add at a time. Here, with ``e`` the flattened embeddings
    ``[batch, fields * dim]`` and ``S`` the ``[fields * dim, dim]`` stack of identities:
    ``sum_f e = e S``, ``sum_f e^2 = (e * e) S``, ``fm = ((eS)^2 - (e*e)S) (0.5 * 1)``;
    the first-order term is ``lin 1`` with the model bias, the last DNN bias and the
    calibration shift as its C, itself the C of the FM Gemm, itself the C of the last
    DNN Gemm. Same function; sums in another order (differences ~1e-7 of the logit)."""
    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in graph.node
        if n.op_type == "Constant"
    }
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    gathers = {n.input[0]: n for n in graph.node if n.op_type == "Gather"}
    has_fm = any(n.op_type == "Pow" for n in graph.node)  # the FM's squares
    if "model.linear.table.weight" not in gathers or len(gemms) < 2 or not has_fm:
        raise ValueError(f"{src}: not a DeepFM export")
    last = gemms[-1]
    flatten = next(n for n in graph.node if n.op_type == "Flatten")
    sigmoid_in = next(n for n in graph.node if n.op_type == "Sigmoid").input[0]
    shift_node = next(n for n in graph.node if n.output[0] == sigmoid_in)  # Add(logit, shift)
    shift = float(next(consts[i] for i in shift_node.input if i in consts))
    emb = inits["model.embed.table.weight"]
    fields = int(np.prod(consts["/model/linear/Constant_3_output_0"].shape))  # the offsets
    dim = emb.shape[1]
    stack = np.tile(np.eye(dim, dtype=np.float32), (fields, 1))  # [fields * dim, dim]
    bias = inits["model.bias"].astype(np.float64) + inits[last.input[2]].astype(np.float64)
    p = "/rw/deepfm/"
    kept = [
        n
        for n in graph.node
        if (n.op_type in DEEPFM_KEEP and n is not last)
        or (n.op_type == "Constant" and n.output[0].startswith("/model/linear/"))
        or (n.op_type == "Add" and n.output[0] == "/model/linear/Add_output_0")
    ]
    lin = gathers["model.linear.table.weight"].output[0]
    new_nodes = [
        helper.make_node("Reshape", [lin, p + "rows16"], [p + "lin"], name=p + "lin"),
        helper.make_node(
            "Gemm", [p + "lin", p + "ones_f", p + "bias"], [p + "first"], name=p + "first"
        ),
        helper.make_node("MatMul", [flatten.output[0], p + "S"], [p + "sum"], name=p + "sum"),
        helper.make_node("Mul", [flatten.output[0], flatten.output[0]], [p + "e2"], name=p + "e2"),
        helper.make_node("MatMul", [p + "e2", p + "S"], [p + "sumsq"], name=p + "sumsq"),
        helper.make_node("Mul", [p + "sum", p + "sum"], [p + "sum2"], name=p + "sum2"),
        helper.make_node("Sub", [p + "sum2", p + "sumsq"], [p + "diff"], name=p + "diff"),
        helper.make_node("Gemm", [p + "diff", p + "half", p + "first"], [p + "fm"], name=p + "fm"),
        helper.make_node(
            "Gemm",
            [last.input[0], last.input[1], p + "fm"],
            [p + "logit"],
            name=p + "logit",
            transB=1,
        ),
        helper.make_node("Sigmoid", [p + "logit"], [p + "ctr2"], name=p + "sigmoid"),
        helper.make_node("Reshape", [p + "ctr2", p + "flat"], ["ctr"], name=p + "ctr"),
    ]
    new_inits = {
        "rows16": np.array([-1, fields], np.int64),
        "ones_f": np.ones((fields, 1), np.float32),
        "bias": np.array([bias.item() + shift], np.float32),
        "S": stack,
        "half": np.full((dim, 1), 0.5, np.float32),
        "flat": np.array([-1], np.int64),
    }
    del graph.node[:]
    graph.node.extend(kept + new_nodes)
    graph.initializer.extend(numpy_helper.from_array(v, p + k) for k, v in new_inits.items())
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.value_info[:]
    onnx.checker.check_model(model)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dest))
    return dest


# -- new model versions from old ones ------------------------------------------------------
#: AutoInt rewrites (VARIANTS), the DeepFM rewrite, and dynamic INT8 (of either model).
TRANSFORMS = (*VARIANTS, "fm-gemm", "int8")


def predict(path: Path, ids: np.ndarray, batch: int = 65536) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return np.concatenate(
        [sess.run(["ctr"], {"ids": ids[i : i + batch]})[0] for i in range(0, len(ids), batch)]
    )


def quantize_int8(src: Path, dest: Path) -> Path:
    """Dynamic INT8 (7-bit per-channel weights: no u8s8 saturation on AVX2 without VNNI).

    ONNX ``Attention`` (opset 23) nodes stay fp32: the quantiser takes them for the contrib
    op of the same name and writes an invalid QAttention (``nodes_to_exclude`` and
    ``op_types_to_quantize`` notwithstanding), so they are renamed while it runs."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    hidden = [
        n for n in model.graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")
    ]
    for node in hidden:
        node.op_type = _HIDDEN_ATTENTION
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "fp32.onnx"
        onnx.save(model, str(staged))
        quantize_dynamic(
            staged,
            dest,
            per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm", "Gather"],
        )
    out = onnx.load(str(dest))
    for node in out.graph.node:
        if node.op_type == _HIDDEN_ATTENTION:
            node.op_type = "Attention"
    onnx.checker.check_model(out)
    onnx.save(out, str(dest))
    return dest


_HIDDEN_ATTENTION = "AttentionKeptFp32"


def card_metrics(model: Path, source: Path, card: dict) -> dict[str, float]:
    """valid AUC, test AUC and log loss on the card's own splits (as training measured),
    and the largest CTR difference from the ``source`` model on the test split."""
    from app.offline import logs
    from app.offline.evaluate import auc, logloss

    tr = card["training"]
    out: dict[str, float] = {}
    for split in ("valid", "test"):
        table = logs.generate(int(tr[f"rows_{split}"]), int(tr[f"seed_{split}"]),
                              base_ctr=float(tr["base_ctr"]))  # fmt: skip
        click = table[logs.LABEL].astype(np.float32)
        ctr = predict(model, table.id_matrix())
        out[f"{split}_auc"] = round(auc(ctr, click), 6)
        if split == "test":
            out["test_logloss"] = round(logloss(ctr, click), 6)
            out["max_abs_dctr_vs_source"] = float(
                np.abs(ctr - predict(source, table.id_matrix())).max()
            )
    return out


def derive(src_dir: Path, dest: Path, transform: str, version: str | None = None) -> Path:
    """``dest/{model.onnx, card.json}``: ``src_dir``'s model transformed, a new version."""
    from app.registry import next_version
    from app.sessions import sha256_of

    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; one of {TRANSFORMS}")
    card = json.loads((src_dir / "card.json").read_text())
    dest.mkdir(parents=True, exist_ok=True)
    model = dest / "model.onnx"
    if transform == "int8":
        quantize_int8(src_dir / "model.onnx", model)
    elif transform == "fm-gemm":
        rewrite_deepfm(src_dir / "model.onnx", model)
    else:
        rewrite_autoint(src_dir / "model.onnx", model, transform)
    metrics = card_metrics(model, src_dir / "model.onnx", card)
    source = f"{card['name']}/{card['version']}"
    card["version"] = version or next_version(src_dir.parent)
    card["opset"] = next(
        o.version for o in onnx.load(str(model)).opset_import if o.domain in ("", "ai.onnx")
    )
    card["sha256"], card["size_bytes"] = sha256_of(model), model.stat().st_size
    max_dctr = metrics.pop("max_abs_dctr_vs_source")
    card["hyperparameters"]["derived_from"] = {
        "model": source,
        "sha256": json.loads((src_dir / "card.json").read_text())["sha256"],
        "transform": transform,
        "how": "python -m app.offline.rewrite" + f" {src_dir} DEST --transform {transform}",
        "max_abs_dctr_on_test": max_dctr,
    }
    card["training"]["derived_utc"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    card["training"]["note"] = (
        f"not retrained: the weights of {source}, {transform} (app/offline/rewrite.py); "
        "metrics re-measured on the same valid/test splits"
    )
    card["metrics"] = metrics
    (dest / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="derive a new model version from an old one")
    parser.add_argument("source", type=Path, help="a version dir, e.g. models/autoint/1")
    parser.add_argument("dest", type=Path, help="where to write model.onnx + card.json")
    parser.add_argument("--transform", choices=TRANSFORMS, default="attention")
    parser.add_argument("--version", help="the new version (default: the next number)")
    args = parser.parse_args(argv)
    out = derive(args.source, args.dest, args.transform, args.version)
    print(json.dumps(json.loads((out / "card.json").read_text())["metrics"]), file=sys.stderr)


if __name__ == "__main__":
    main()
