"""Optimisation study: INT8 quantisation, graph optimisation levels and execution providers.

For each model (DeepFM, AutoInt) the committed fp32 graph is snapshotted (sha256 checked
against its card, so a concurrent retrain cannot change the model mid-study) and turned
into variants:

* ``fp32``: as committed, with the farm's session options (ORT_ENABLE_ALL);
* ``opt-*``: the same graph at each other graph optimisation level, and ``opt-offline``:
  optimised once at ALL, saved (``optimized_model_filepath``) and reloaded with DISABLE;
* ``dyn-*``: ``quantize_dynamic`` recipes (dense layers and/or the embedding Gathers;
  it rewrites each Gemm into MatMul + Add itself, so the DNN's Gemms are covered);
* ``emb-rowwise``: the embedding tables stored as int8 with one fp32 scale per row
  (hand-rolled ``Gather -> Cast -> Mul``; ORT's quantisers only do per-tensor Gathers);
* ``st-*``: ``quantize_static`` in QDQ format, calibrated on generated click logs;
* one fp32 variant per CPU-relevant execution provider other than the default, if any.

Every variant is measured with the farm's session options (intra 1, inter 1, sequential,
no spinning) except the graph optimisation level it is about: file size, session load
time, latency p50/p99 per batch size (variants interleaved round-robin in one loop, so
they share the machine's noise), and accuracy on a held-out set from the click-log
generator: AUC, log loss, the AUC delta vs fp32 with its paired DeLong standard error,
and the largest absolute CTR difference vs fp32.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import datetime as dt
import io
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from app.offline import logs
from app.sessions import CARD_FILE, MODEL_FILE, session_options, sha256_of

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
OPT_LEVELS = {
    "DISABLE": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "LAYOUT": ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT,
    "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
#: Execution providers that run on this kind of CPU; anything else listed is not a CPU
#: compute EP (e.g. AzureExecutionProvider forwards to a remote endpoint).
CPU_EPS = (
    "XnnpackExecutionProvider",
    "DnnlExecutionProvider",
    "OpenVINOExecutionProvider",
    "ACLExecutionProvider",
)
#: /proc/cpuinfo flags that decide which int8 / fp kernels MLAS can use.
CPU_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_int8",
)
#: Short names for the quantised kernels counted in the graph ORT actually runs.
INT8_OPS = {
    "DynamicQuantizeMatMul": "DynQMatMul",
    "MatMulIntegerToFloat": "MatMulIntToFloat",
    "MatMulInteger": "MatMulInteger",
    "DynamicQuantizeLinear": "DynQLinear",
    "QGemm": "QGemm",
    "QLinearMatMul": "QLinearMatMul",
    "QuantizeLinear": "Q",
    "DequantizeLinear": "DQ",
    "QAttention": "QAttention",
}
DENSE_FP32_OPS = ("Gemm", "MatMul", "FusedMatMul", "FusedGemm")
DEFAULT_BATCHES = (1, 100, 1000)
QUICK_BATCHES = (1, 100)
#: Seed of the calibration logs: not the card's train/valid/test seeds (1/2/3).
CALIB_SEED = 1000
QUICK_TEST_SEED = 4242


# -- model snapshot ------------------------------------------------------------------------
@dataclass
class Snapshot:
    """A model copied out of ``models/`` with its card, sha256 checked against the card."""

    name: str
    path: Path
    card: dict[str, Any]
    source: Path

    @property
    def sha256(self) -> str:
        return str(self.card["sha256"])


def snapshot(model_dir: Path, dest: Path, attempts: int = 5) -> Snapshot:
    """Copy ``model.onnx`` + ``card.json`` into ``dest`` once the copy matches the card.

    A retrain may be rewriting the pair; a mismatch is retried a few times, then fatal:
    measuring a model that is not the one its card describes would be meaningless.
    """
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / "fp32.onnx"
    actual, card = "", {}
    for attempt in range(attempts):
        card = json.loads((model_dir / CARD_FILE).read_text())
        shutil.copyfile(model_dir / MODEL_FILE, target)
        actual = sha256_of(target)
        if actual == card["sha256"]:
            (dest / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
            return Snapshot(card["name"], target, card, model_dir)
        log.warning("%s: sha256 mismatch (attempt %d), retrying", model_dir, attempt + 1)
        time.sleep(2.0)
    raise RuntimeError(
        f"{model_dir}: model sha256 {actual} does not match card {card.get('sha256')}"
    )


# -- data ----------------------------------------------------------------------------------
@dataclass
class HeldOut:
    ids: np.ndarray
    labels: np.ndarray
    description: str


def held_out(card: dict[str, Any], rows: int | None, seed: int | None) -> HeldOut:
    """The card's test set (``generate(rows_test, seed_test)``), or its first ``rows`` rows.

    With an explicit ``seed``, or more ``rows`` than the card's test set has, a set of
    ``rows`` rows is generated instead (the card's seed unless ``seed`` is given).
    """
    tr = card["training"]
    base_ctr = float(tr.get("base_ctr", logs.DEFAULT_BASE_CTR))
    full, card_seed = int(tr["rows_test"]), int(tr["seed_test"])
    if seed is None and (not rows or rows <= full):
        table = _generate(full, card_seed, base_ctr)
        n = rows or full
        what = f"card test set: generate({full:_}, seed={card_seed}, base_ctr={base_ctr})"
        what += "" if n == full else f", first {n:_} rows"
    else:
        n = int(rows or full)
        seed = card_seed if seed is None else seed
        table = _generate(n, seed, base_ctr)
        what = f"generate({n:_}, seed={seed}, base_ctr={base_ctr})"
        what += (
            f" (the card's seed, but more rows than its {full:_}-row test set)"
            if seed == card_seed
            else " (fresh seed)"
        )
    ids, labels = table.id_matrix()[:n], table[logs.LABEL][:n].astype(np.int8)
    return HeldOut(ids, labels, f"{what} ({int(labels.sum()):_} clicks)")


_GENERATED: dict[tuple[int, int, float], logs.Logs] = {}


def _generate(rows: int, seed: int, base_ctr: float) -> logs.Logs:
    key = (rows, seed, base_ctr)
    if key not in _GENERATED:
        _GENERATED.clear()  # keep at most one big table alive
        _GENERATED[key] = logs.generate(rows, seed, base_ctr=base_ctr)
    return _GENERATED[key]


class LogsReader(CalibrationDataReader):
    """Feeds generated click-log id matrices to ``quantize_static``'s calibrator."""

    def __init__(self, ids: np.ndarray, input_name: str, batch: int = 1000) -> None:
        self._ids, self._input, self._batch = ids, input_name, batch
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = (
            {self._input: self._ids[i : i + self._batch]}
            for i in range(0, len(self._ids), self._batch)
        )


# -- metrics -------------------------------------------------------------------------------
def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    avg = np.cumsum(counts) - (counts - 1) / 2.0
    return avg[inverse]


@dataclass
class AucParts:
    """AUC and its DeLong placement values (per positive / per negative)."""

    auc: float
    v10: np.ndarray
    v01: np.ndarray


def auc_parts(scores: np.ndarray, labels: np.ndarray) -> AucParts:
    """Rank-based (Mann-Whitney) AUC with DeLong's structural components."""
    scores = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(labels) > 0
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    ranks = _midranks(scores)
    pos_scores, neg_scores = scores[pos], scores[~pos]
    # Negatives ranked below each positive (ties count one half), and the converse.
    v10 = (ranks[pos] - _midranks(pos_scores)) / n_neg
    v01 = 1.0 - (ranks[~pos] - _midranks(neg_scores)) / n_pos
    return AucParts(float(v10.mean()), v10, v01)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    return auc_parts(scores, labels).auc


def auc_delta_se(a: AucParts, b: AucParts) -> float:
    """DeLong standard error of ``auc(a) - auc(b)`` for two scorers of the same rows."""
    d10, d01 = a.v10 - b.v10, a.v01 - b.v01
    var = d10.var(ddof=1) / len(d10) + d01.var(ddof=1) / len(d01)
    return float(np.sqrt(max(var, 0.0)))


def logloss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


# -- graph rewrites ------------------------------------------------------------------------
def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def rowwise_int8_embeddings(model: onnx.ModelProto, min_dim: int = 2) -> onnx.ModelProto:
    """Store each 2-D Gather table (``[rows, dim]``, ``dim >= min_dim``) as int8 + row scale.

    ``Gather(W, i)`` becomes ``Cast(Gather(Wq, i)) * Gather(s, i)`` with ``Wq`` int8 and
    ``s[r] = max|W[r]| / 127``: each id keeps its own range, which a per-tensor scale over
    a Zipf-trained table (rare ids near 0, popular ids large) does not.
    """
    model = copy.deepcopy(model)
    inits = _initializers(model)
    done: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        dims = list(table.dims) if table is not None else []
        if table is None or len(dims) != 2 or dims[1] < min_dim or _attrs(node).get("axis", 0):
            nodes.append(node)
            continue
        q_name, s_name = f"{table.name}__int8", f"{table.name}__scale"
        if table.name not in done:
            w = numpy_helper.to_array(table).astype(np.float32)
            scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
            scale[scale == 0] = 1.0
            q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
            model.graph.initializer.extend(
                [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)]
            )
            done.add(table.name)
        out, idx, base = node.output[0], node.input[1], node.name or node.output[0]
        nodes += [
            helper.make_node("Gather", [q_name, idx], [f"{out}__q"], f"{base}_q"),
            helper.make_node(
                "Cast", [f"{out}__q"], [f"{out}__f"], f"{base}_cast", to=TensorProto.FLOAT
            ),
            helper.make_node("Gather", [s_name, idx], [f"{out}__s"], f"{base}_s"),
            helper.make_node("Mul", [f"{out}__f", f"{out}__s"], [out], f"{base}_deq"),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _drop_unused_initializers(model)
    return model


def weight_breakdown(model_path: Path) -> dict[str, int]:
    """Bytes of the Gather tables (embeddings) vs the rest of the initializers."""
    model = onnx.load(str(model_path))
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    out = {"embedding_bytes": 0, "other_bytes": 0}
    for init in model.graph.initializer:
        size = numpy_helper.to_array(init).nbytes
        out["embedding_bytes" if init.name in gathered else "other_bytes"] += size
    return out


# -- variants ------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    family: str
    recipe: str
    build: Callable[[Path, Path], Path] | None = None
    opt_level: str = "ALL"
    provider: str = CPU
    #: Filled in by :func:`build_variants` / the measurements.
    path: Path | None = None
    error: str | None = None
    results: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyConfig:
    batches: tuple[int, ...] = DEFAULT_BATCHES
    repeats: int = 200
    warmup: int = 10
    payloads: int = 8
    test_rows: int | None = 300_000
    test_seed: int | None = None
    calib_rows: int = 20_000
    calib_seed: int = CALIB_SEED
    score_batch: int = 10_000
    load_repeats: int = 3
    quick: bool = False
    only: tuple[str, ...] = ()


def _dynamic(
    *,
    op_types: list[str] | None,
    weight: QuantType,
    per_channel: bool,
    reduce_range: bool = False,
    rowwise_embeddings: bool = False,
) -> Callable[[Path, Path], Path]:
    def build(src: Path, dst: Path) -> Path:
        if rowwise_embeddings:
            src = _rowwise(src, dst.with_name(dst.stem + ".rowwise.onnx"))
        # quantize_dynamic rewrites Gemm into MatMul + Add itself, so Gemms are covered.
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=op_types,
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=weight,
        )
        if rowwise_embeddings:
            src.unlink(missing_ok=True)
        return dst

    return build


def _static(
    calib: Callable[[], CalibrationDataReader],
    *,
    method: CalibrationMethod,
    op_types: list[str] | None,
    activation: QuantType = QuantType.QInt8,
    extra: dict[str, Any] | None = None,
) -> Callable[[Path, Path], Path]:
    def build(src: Path, dst: Path) -> Path:
        pre = dst.with_name(dst.stem + ".pre.onnx")
        try:
            quant_pre_process(str(src), str(pre))
        except Exception as exc:  # pre-processing is advisory; quantise the raw graph
            log.warning("quant_pre_process failed (%s); quantising the raw graph", exc)
            shutil.copyfile(src, pre)
        # The histogram calibrators print() their progress: keep stdout for the table.
        with contextlib.redirect_stdout(sys.stderr):
            quantize_static(
                pre,
                dst,
                calib(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=op_types,
                per_channel=True,
                activation_type=activation,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                extra_options=extra or {},
            )
        pre.unlink(missing_ok=True)
        return dst

    return build


def _offline(src: Path, dst: Path) -> Path:
    """Optimise at ALL once and save the result; the variant reloads it with DISABLE."""
    opts = session_options(1, 1)
    opts.graph_optimization_level = OPT_LEVELS["ALL"]
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), sess_options=opts, providers=[CPU])
    return dst


def _rowwise(src: Path, dst: Path) -> Path:
    onnx.save(rowwise_int8_embeddings(onnx.load(str(src))), str(dst))
    return dst


def variants(calib: Callable[[], CalibrationDataReader], quick: bool = False) -> list[Variant]:
    """The study's variants (``quick``: a subset for the smoke test)."""
    s8, u8 = QuantType.QInt8, QuantType.QUInt8
    all_variants = [
        Variant("fp32", "fp32", "as committed, ORT_ENABLE_ALL (farm default)"),
        *(
            Variant(f"opt-{lvl.lower()}", "graph-opt", f"fp32, ORT_{lvl}", opt_level=lvl)
            for lvl in ("DISABLE", "BASIC", "EXTENDED", "LAYOUT")
        ),
        Variant(
            "opt-offline",
            "graph-opt",
            "fp32 optimised at ALL, saved, reloaded with DISABLE",
            _offline,
            opt_level="DISABLE",
        ),
        Variant(
            "dyn-defaults",
            "dynamic",
            "quantize_dynamic defaults: MatMul (Gemm rewritten) + Gather, s8 per-tensor",
            _dynamic(op_types=None, weight=s8, per_channel=False),
        ),
        Variant(
            "dyn-all-pc",
            "dynamic",
            "MatMul/Gemm + Gather, s8 weights per-channel",
            _dynamic(op_types=None, weight=s8, per_channel=True),
        ),
        Variant(
            "dyn-all-pc-rr",
            "dynamic",
            "MatMul/Gemm + Gather, s8 weights per-channel, reduce_range (7-bit weights)",
            _dynamic(op_types=None, weight=s8, per_channel=True, reduce_range=True),
        ),
        Variant(
            "dyn-all-u8",
            "dynamic",
            "MatMul/Gemm + Gather, u8 weights per-tensor",
            _dynamic(op_types=None, weight=u8, per_channel=False),
        ),
        Variant(
            "dyn-dense-rr",
            "dynamic",
            "MatMul/Gemm only (embedding tables fp32), s8 per-channel, reduce_range",
            _dynamic(op_types=["MatMul"], weight=s8, per_channel=True, reduce_range=True),
        ),
        Variant(
            "dyn-emb",
            "dynamic",
            "Gather only (embedding tables int8 per-tensor), dense fp32",
            _dynamic(op_types=["Gather"], weight=s8, per_channel=False),
        ),
        Variant(
            "emb-rowwise",
            "rowwise",
            "embedding tables int8 + fp32 scale per row (Gather->Cast->Mul), dense fp32",
            _rowwise,
        ),
        Variant(
            "emb-rowwise+dyn",
            "rowwise",
            "emb-rowwise, then dyn-dense-rr on the dense layers",
            _dynamic(
                op_types=["MatMul"],
                weight=s8,
                per_channel=True,
                reduce_range=True,
                rowwise_embeddings=True,
            ),
        ),
        Variant(
            "st-minmax",
            "static",
            "QDQ s8/s8 per-channel, MinMax, all ops incl. Gather",
            _static(calib, method=CalibrationMethod.MinMax, op_types=None),
        ),
        Variant(
            "st-pct",
            "static",
            "QDQ s8/s8 per-channel, Percentile 99.999, all ops incl. Gather",
            _static(
                calib,
                method=CalibrationMethod.Percentile,
                op_types=None,
                extra={"CalibPercentile": 99.999},
            ),
        ),
        Variant(
            "st-minmax-dense",
            "static",
            "QDQ s8/s8 per-channel, MinMax, Gemm/MatMul only (embeddings fp32)",
            _static(calib, method=CalibrationMethod.MinMax, op_types=["Gemm", "MatMul"]),
        ),
    ]
    for ep in ort.get_available_providers():
        if ep in CPU_EPS:
            all_variants.append(
                Variant(f"ep-{ep.removesuffix('ExecutionProvider').lower()}", "ep", ep, provider=ep)
            )
    if quick:
        keep = {"fp32", "opt-disable", "dyn-defaults", "st-minmax"}
        all_variants = [v for v in all_variants if v.name in keep]
    return all_variants


def build_variants(snap: Snapshot, work: Path, chosen: Sequence[Variant]) -> None:
    """Write each variant's model under ``work`` (never into ``models/``)."""
    for v in chosen:
        if v.build is None:
            v.path = snap.path
            continue
        t0 = time.perf_counter()
        try:
            v.path = v.build(snap.path, work / f"{v.name}.onnx")
        except Exception as exc:  # a failing recipe is a finding, not a crash
            v.error = f"build: {type(exc).__name__}: {exc}"[:300]
            log.warning("%s/%s: %s", snap.name, v.name, v.error)
        else:
            log.info("%s/%s built in %.1fs", snap.name, v.name, time.perf_counter() - t0)


# -- sessions ------------------------------------------------------------------------------
def make_session(
    path: Path, opt_level: str = "ALL", provider: str = CPU, optimized_out: Path | None = None
) -> ort.InferenceSession:
    """A session with the farm's options (intra 1, inter 1, no spinning) at ``opt_level``."""
    opts = session_options(1, 1)
    opts.graph_optimization_level = OPT_LEVELS[opt_level]
    if optimized_out is not None:
        opts.optimized_model_filepath = str(optimized_out)
    providers = [provider] if provider == CPU else [provider, CPU]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def kernel_summary(path: Path) -> dict[str, str | int]:
    """The quantised and dense fp32 kernels in a graph as ORT runs it (after optimisation)."""
    ops = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)

    def fmt(names: Iterable[str], short: Callable[[str], str]) -> str:
        return " ".join(f"{short(op)}x{ops[op]}" for op in names if ops[op]) or "-"

    return {
        "nodes": sum(ops.values()),
        "int8_kernels": fmt(INT8_OPS, INT8_OPS.__getitem__),
        "fp32_dense": fmt(DENSE_FP32_OPS, str),
    }


def open_sessions(
    snap: Snapshot, work: Path, chosen: Sequence[Variant], load_repeats: int
) -> dict[str, ort.InferenceSession]:
    """Load every built variant (load time: median of interleaved loads) + its final graph."""
    live = [v for v in chosen if v.error is None and v.path is not None]
    sessions: dict[str, ort.InferenceSession] = {}
    loads: dict[str, list[float]] = {v.name: [] for v in live}
    for _ in range(max(1, load_repeats)):
        for v in list(live):
            t0 = time.perf_counter()
            try:
                sessions[v.name] = make_session(v.path, v.opt_level, v.provider)
            except Exception as exc:
                v.error = f"load: {type(exc).__name__}: {exc}"[:300]
                live.remove(v)
                log.warning("%s/%s: %s", snap.name, v.name, v.error)
                continue
            loads[v.name].append((time.perf_counter() - t0) * 1e3)
    for v in live:
        final = work / f"{v.name}.final.onnx"
        make_session(v.path, v.opt_level, v.provider, optimized_out=final)
        v.results |= kernel_summary(final)
        v.results["load_ms"] = statistics.median(loads[v.name])
        v.results["size_bytes"] = v.path.stat().st_size
        final.unlink(missing_ok=True)
    return sessions


# -- measurements --------------------------------------------------------------------------
def time_interleaved(
    sessions: dict[str, ort.InferenceSession],
    feeds: dict[int, list[np.ndarray]],
    input_name: str,
    repeats: int,
    warmup: int,
) -> dict[str, dict[int, list[float]]]:
    """Latency samples (ms) per variant and batch, variants run round-robin.

    Each round runs every variant once on the same payload; the starting variant rotates
    round by round so none is always first (or always right after a given neighbour).
    """
    names = list(sessions)
    samples: dict[str, dict[int, list[float]]] = {n: {} for n in names}
    for batch, payloads in feeds.items():
        for name in names:
            samples[name][batch] = []
            for i in range(warmup):
                sessions[name].run(None, {input_name: payloads[i % len(payloads)]})
        for r in range(repeats):
            x = {input_name: payloads[r % len(payloads)]}
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                t0 = time.perf_counter_ns()
                sessions[name].run(None, x)
                samples[name][batch].append((time.perf_counter_ns() - t0) / 1e6)
    return samples


def score(sess: ort.InferenceSession, ids: np.ndarray, input_name: str, batch: int) -> np.ndarray:
    out = [
        sess.run(None, {input_name: ids[i : i + batch]})[0].reshape(-1)
        for i in range(0, len(ids), batch)
    ]
    return np.concatenate(out).astype(np.float32)


def accuracy(
    sessions: dict[str, ort.InferenceSession],
    chosen: Sequence[Variant],
    data: HeldOut,
    input_name: str,
    batch: int,
) -> None:
    """AUC / log loss per variant, and deltas vs the ``fp32`` variant."""
    base_ctr: np.ndarray | None = None
    base_parts: AucParts | None = None
    for v in chosen:
        if v.name not in sessions:
            continue
        t0 = time.perf_counter()
        try:
            ctr = score(sessions[v.name], data.ids, input_name, batch)
        except Exception as exc:
            v.error = f"run: {type(exc).__name__}: {exc}"[:300]
            sessions.pop(v.name)
            continue
        parts = auc_parts(ctr, data.labels)
        v.results |= {"auc": parts.auc, "logloss": logloss(ctr, data.labels)}
        if base_ctr is None:  # fp32 comes first
            base_ctr, base_parts = ctr, parts
        v.results["auc_delta"] = parts.auc - base_parts.auc
        v.results["auc_delta_se"] = auc_delta_se(parts, base_parts)
        v.results["max_abs_ctr_diff"] = float(np.max(np.abs(ctr - base_ctr)))
        log.info("scored %s in %.1fs: auc %.5f", v.name, time.perf_counter() - t0, parts.auc)


def summarise_latency(v: Variant, samples: dict[int, list[float]]) -> None:
    for batch, s in samples.items():
        arr = np.asarray(s)
        v.results[f"b{batch}_p50_ms"] = float(np.percentile(arr, 50))
        v.results[f"b{batch}_p99_ms"] = float(np.percentile(arr, 99))


# -- the study -----------------------------------------------------------------------------
@dataclass
class ModelStudy:
    snap: Snapshot
    variants: list[Variant]
    data: HeldOut
    weights: dict[str, int]


def study_model(model_dir: Path, work: Path, cfg: StudyConfig) -> ModelStudy:
    snap = snapshot(model_dir, work)
    input_name = snap.card["input"]["name"]
    data = held_out(snap.card, cfg.test_rows, cfg.test_seed)
    base_ctr = float(snap.card["training"].get("base_ctr", logs.DEFAULT_BASE_CTR))
    calib_ids = logs.generate(cfg.calib_rows, cfg.calib_seed, base_ctr=base_ctr).id_matrix()

    chosen = variants(lambda: LogsReader(calib_ids, input_name), quick=cfg.quick)
    if cfg.only:
        chosen = [v for v in chosen if v.name == "fp32" or v.name in cfg.only]
    build_variants(snap, work, chosen)
    sessions = open_sessions(snap, work, chosen, cfg.load_repeats)
    accuracy(sessions, chosen, data, input_name, cfg.score_batch)

    rng = np.random.default_rng(0)
    feeds = {
        b: [data.ids[s : s + b] for s in rng.integers(0, len(data.ids) - b, cfg.payloads)]
        for b in cfg.batches
    }
    t0 = time.perf_counter()
    samples = time_interleaved(sessions, feeds, input_name, cfg.repeats, cfg.warmup)
    log.info("%s: timed %d variants in %.1fs", snap.name, len(sessions), time.perf_counter() - t0)
    for v in chosen:
        if v.name in samples:
            summarise_latency(v, samples[v.name])
    return ModelStudy(snap, chosen, data, weight_breakdown(snap.path))


def run_study(models_root: Path, names: Sequence[str], work: Path, cfg: StudyConfig) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    studies = [study_model(models_root / n / "1", work / n, cfg) for n in names]
    return {"machine": machine_info(), "config": cfg, "studies": studies}


# -- environment ---------------------------------------------------------------------------
def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": {f: f in flags for f in CPU_FLAGS}}


def machine_info() -> dict[str, Any]:
    providers = ort.get_available_providers()
    try:
        devices = sorted({f"{d.ep_name} ({d.device.type.name})" for d in ort.get_ep_devices()})
    except Exception:  # the plugin-EP API is recent; absent on old wheels
        devices = []
    return {
        "cpu": cpu_info(),
        "cores": len(os.sched_getaffinity(0)),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "providers": providers,
        "ep_devices": devices,
        "cpu_eps_present": [p for p in providers if p in CPU_EPS],
        "xnnpack": "XnnpackExecutionProvider" in providers,
    }


# -- report --------------------------------------------------------------------------------
CSV_COLUMNS = (
    "model",
    "variant",
    "family",
    "recipe",
    "opt_level",
    "provider",
    "size_bytes",
    "load_ms",
    "nodes",
    "int8_kernels",
    "fp32_dense",
    "auc",
    "auc_delta",
    "auc_delta_se",
    "logloss",
    "max_abs_ctr_diff",
)


def rows(result: dict) -> list[dict[str, Any]]:
    out = []
    batches = result["config"].batches
    lat = [f"b{b}_{q}_ms" for b in batches for q in ("p50", "p99")]
    for st in result["studies"]:
        for v in st.variants:
            row = {
                "model": st.snap.name,
                "variant": v.name,
                "family": v.family,
                "recipe": v.recipe,
                "opt_level": v.opt_level,
                "provider": v.provider,
                "error": v.error or "",
            }
            row |= {k: v.results.get(k) for k in (*CSV_COLUMNS[6:], *lat)}
            out.append(row)
    return out


def to_csv(result: dict) -> str:
    table = rows(result)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]) if table else list(CSV_COLUMNS))
    writer.writeheader()
    writer.writerows(table)
    return buf.getvalue()


def _f(value: Any, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def model_table(st: ModelStudy, batches: Sequence[int]) -> str:
    base = next((v for v in st.variants if v.name == "fp32"), None)
    base_size = base.results.get("size_bytes") if base else None
    head = ["variant", "size MB", "x fp32", "load ms"]
    for b in batches:
        head += [f"b{b} p50 ms", f"b{b} p99 ms", f"b{b} speedup"]
    head += ["AUC", "dAUC (+-SE)", "log loss", "max abs dCTR", "int8 kernels", "fp32 dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in st.variants:
        r = v.results
        if v.error:
            lines.append(f"| {v.name} | failed: {v.error} |")
            continue
        size = r.get("size_bytes")
        cells = [
            v.name,
            _f(size and size / 1e6, ".2f"),
            _f(size and base_size and size / base_size, ".2f"),
            _f(r.get("load_ms"), ".0f"),
        ]
        for b in batches:
            p50, p99 = r.get(f"b{b}_p50_ms"), r.get(f"b{b}_p99_ms")
            ref = base.results.get(f"b{b}_p50_ms") if base else None
            cells += [_ms(p50), _ms(p99), _f(p50 and ref and ref / p50, ".2f")]
        delta = r.get("auc_delta")
        cells += [
            _f(r.get("auc"), ".5f"),
            "-" if delta is None else f"{delta:+.5f} (+-{r['auc_delta_se']:.5f})",
            _f(r.get("logloss"), ".5f"),
            _f(r.get("max_abs_ctr_diff"), ".2e"),
            str(r.get("int8_kernels", "-")),
            str(r.get("fp32_dense", "-")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recipes_table(st: ModelStudy) -> str:
    lines = ["| variant | recipe | session opt level | provider |", "|---|---|---|---|"]
    lines += [f"| {v.name} | {v.recipe} | {v.opt_level} | {v.provider} |" for v in st.variants]
    return "\n".join(lines)


def to_markdown(result: dict) -> str:
    m, cfg = result["machine"], result["config"]
    flags = ", ".join(f"{f}={'yes' if on else 'no'}" for f, on in m["cpu"]["flags"].items())
    cpu_eps = ", ".join(m["cpu_eps_present"]) or "none besides CPUExecutionProvider"
    out = [
        f"Generated {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} by "
        "`scripts/quantize.py`" + (" (--quick)" if cfg.quick else "") + ".",
        "",
        f"- CPU: {m['cpu']['model']}, {m['cores']} cores; flags: {flags}",
        f"- onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, numpy {m['numpy']}",
        f"- available providers: {', '.join(m['providers'])}; EP devices: "
        f"{', '.join(m['ep_devices']) or '-'}; CPU compute EPs besides the default: {cpu_eps}"
        + ("" if m["xnnpack"] else " (XNNPACK is not built into this wheel)"),
        f"- sessions: farm options (intra 1, inter 1, sequential, no spinning); latency = "
        f"`session.run` wall time, {cfg.repeats} interleaved rounds per batch size after "
        f"{cfg.warmup} warm-up runs, {cfg.payloads} payloads drawn from the held-out set",
        f"- calibration (static): generate({cfg.calib_rows:_}, seed={cfg.calib_seed}), "
        "batches of 1000",
        "- dAUC: AUC minus fp32's on the same rows, +-SE = paired DeLong standard error; "
        "speedup = fp32 p50 / variant p50 (same batch size)",
    ]
    for st in result["studies"]:
        w = st.weights
        total = w["embedding_bytes"] + w["other_bytes"]
        out += [
            "",
            f"### {st.snap.name}",
            "",
            f"sha256 `{st.snap.sha256}` (card test AUC {st.snap.card['metrics']['test_auc']}, "
            f"trained {st.snap.card['training'].get('created_utc', '?')}); held-out: "
            f"{st.data.description}; weights {total / 1e6:.2f} MB of which embedding tables "
            f"(Gather) {w['embedding_bytes'] / 1e6:.2f} MB "
            f"({100 * w['embedding_bytes'] / max(total, 1):.0f}%)",
            "",
            model_table(st, cfg.batches),
            "",
            recipes_table(st),
        ]
    return "\n".join(out) + "\n"


BEGIN, END = "<!-- BEGIN GENERATED quantize -->", "<!-- END GENERATED quantize -->"


def write_report(path: Path, markdown: str, csv_text: str) -> tuple[Path, Path]:
    """Write the table between markers (hand-written text around them is kept) + a CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = f"{BEGIN}\n{markdown}{END}\n"
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, _, rest = old.partition(BEGIN)
        _, _, tail = rest.partition(END)
        tail = tail.lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = "# Optimisation study: INT8 quantisation, graph optimisation, EPs\n\n" + block
    path.write_text(text)
    csv_path = path.with_suffix(".csv")
    csv_path.write_text(csv_text)
    return path, csv_path
