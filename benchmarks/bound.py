"""How far each model is from its arithmetic bound on this CPU (issue 5).

For every model (a version directory, or a bare ``.onnx`` candidate) this

* counts the work of one run **from the ONNX graph itself** at a concrete batch size
  (``onnx.shape_inference`` with the batch fixed; shapes that it cannot infer, e.g. of
  ``com.microsoft`` contrib ops, from one ORT run with those tensors exposed as outputs):
  MatMul / Gemm as ``2 M N K`` (with their GEMM shapes), ORT's fused attention contrib
  ops as their projections + ``QK^T`` + ``PV`` products, and apart from those the
  elements written by elementwise, softmax and data-movement ops and the bytes gathered;
* measures this machine's achievable **single-thread fp32 GEMM throughput** with numpy
  (OpenBLAS pinned to one thread by ``scripts/bound.py``, which sets
  ``OPENBLAS_NUM_THREADS=1`` before numpy loads) on a large square GEMM and on the
  model's own GEMM shapes;
* times the model in ONNX Runtime at intra_op 1 exactly as the farm configures sessions
  (``app.service.load_model`` with the default :class:`app.config.Config` at intra 1,
  pool 1), all models interleaved round-robin per batch size;

and reports ``time / bound`` with two bounds: ``peak`` (GEMM FLOPs / the best rate numpy
reached on any GEMM, large squares or the model's shapes: what the FMA units can do) and
``shapes`` (the time numpy's BLAS needs for the model's own GEMM shapes alone, each at
its measured rate). Everything that is
not a GEMM (softmax, elementwise, copies, gathers) counts as zero in both bounds.

It also reports the cascade's FLOP ratio ``A(n) / (D(n) + A(k))``: the model-only
speed-up of the cascade if every model ran at the same FLOP rate.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper, shape_inference

from app.offline import logs

#: ops that write a new tensor element by element (one "element op" per output element).
ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Pow", "Where", "Less", "Greater",
    "Or", "And", "Not", "Equal", "Cast", "Sqrt", "Exp", "Tanh", "Erf", "Neg", "Abs",
}  # fmt: skip
#: ops that only move data (copies; ORT makes Reshape/Flatten/Squeeze/Unsqueeze views).
MOVES = {"Transpose", "Slice", "Split", "Concat", "Expand", "Tile"}
VIEWS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Constant"}
REDUCE = {"ReduceSum", "ReduceMean", "ReduceMax"}
#: (A [..., m, k]) x (B [k, n] or [..., k, n]); the integer ones count int8 multiply-adds.
MATMULS = {
    "MatMul",
    "FusedMatMul",
    "MatMulInteger",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
}
QUANT = {"DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear"}
#: Square GEMM sizes whose best rate is the machine's "peak" (with the model's own shapes).
SQUARES = (512, 1024, 2048)
INPUT, OUTPUT = "ids", "ctr"


@dataclass(frozen=True)
class Gemm:
    """One GEMM-like product: ``batch`` independent ``[m, k] x [k, n]`` products."""

    node: str
    op: str
    batch: int
    m: int
    k: int
    n: int

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.m, self.k, self.n)


@dataclass
class Work:
    """What one run of a graph at ``batch`` rows computes."""

    batch: int
    gemms: list[Gemm] = field(default_factory=list)
    #: output elements per op type (elementwise, softmax, reductions, copies).
    elements: Counter = field(default_factory=Counter)
    gather_bytes: int = 0
    #: op types whose cost is not counted anywhere (should stay empty).
    unknown: Counter = field(default_factory=Counter)

    @property
    def gemm_flops(self) -> int:
        return sum(g.flops for g in self.gemms)

    def per_row(self) -> float:
        return self.gemm_flops / self.batch


def _dims(vi: onnx.ValueInfoProto) -> list[int] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    return None if any(d < 0 for d in dims) else dims


def tensor_shapes(model: onnx.ModelProto, batch: int) -> dict[str, list[int]]:
    """Concrete shape of every tensor of ``model`` at ``batch`` rows."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = batch
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, list[int]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = _dims(vi)
        if dims is not None:
            shapes[vi.name] = dims
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    missing = [o for n in model.graph.node for o in n.output if o and o not in shapes]
    if missing:  # contrib ops: ask ORT, with the graph as written (no fusions)
        del model.graph.output[:]
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(m) for m in missing)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts, ["CPUExecutionProvider"])
        ids = np.zeros((batch, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value))
        for name, value in zip(
            missing, sess.run(missing, {INPUT: ids.astype(np.int64)}), strict=True
        ):
            shapes[name] = list(np.shape(value))
    return shapes


def count_work(model_path: Path, batch: int) -> Work:
    """The GEMMs and other work of one run of ``model_path`` at ``batch`` rows."""
    model = onnx.load(str(model_path))
    shapes = tensor_shapes(model, batch)
    inits = {t.name: t for t in model.graph.initializer}
    work = Work(batch)
    for node in model.graph.node:
        op, out = node.op_type, shapes.get(node.output[0]) if node.output else None
        numel = int(np.prod(out)) if out is not None else 0
        if op in MATMULS:
            a, b = shapes[node.input[0]], shapes[node.input[1]]
            k, n = a[-1], b[-1]
            if len(b) == 2:  # a constant (or 2-D) right side: one GEMM over all leading rows
                work.gemms.append(Gemm(node.name, op, 1, numel // n, k, n))
            else:
                work.gemms.append(Gemm(node.name, op, numel // (out[-2] * n), out[-2], k, n))
        elif op == "Gemm":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            a = shapes[node.input[0]]
            m, k = (a[1], a[0]) if attrs.get("transA") else (a[0], a[1])
            work.gemms.append(Gemm(node.name, op, 1, m, k, out[-1]))
            if len(node.input) > 2:
                work.elements["Add"] += numel
        elif op in ("Attention", "MultiHeadAttention"):
            _attention(work, node, shapes)
        elif op == "Gather" and node.input[0] in inits:
            itemsize = numpy_helper.to_array(inits[node.input[0]]).itemsize
            work.gather_bytes += numel * itemsize
        elif op == "Softmax":
            work.elements["Softmax"] += numel
        elif op in ELEMENTWISE or op in REDUCE or op in MOVES or op in QUANT:
            work.elements[op] += numel
        elif op in VIEWS or op == "Gather":
            pass
        else:
            work.unknown[op] += 1
    return work


def _attention(work: Work, node: onnx.NodeProto, shapes: dict[str, list[int]]) -> None:
    """ORT's fused attention ops: their projections (contrib Attention) and products."""
    op = node.op_type
    if op == "Attention" and node.domain == "com.microsoft":
        heads = _attr(node, "num_heads")
        b, s, d_in = shapes[node.input[0]]
        d3 = shapes[node.input[1]][1]
        work.gemms.append(Gemm(node.name + " (qkv)", op, 1, b * s, d_in, d3))
        _attention_core(work, node.name, op, b, heads, s, s, d3 // 3)
        work.elements["Add"] += b * s * d3  # the projection bias
    elif op == "Attention":  # ONNX opset 23
        q, kv = shapes[node.input[0]], shapes[node.input[1]]
        if len(q) == 4:  # [b, heads, s, head_dim]
            b, heads, s, hd = q
            _attention_core(work, node.name, op, b, heads, s, kv[2], heads * hd)
        else:  # [b, s, heads * head_dim]
            b, s, d = q
            _attention_core(work, node.name, op, b, _attr(node, "q_num_heads"), s, kv[1], d)
    else:  # com.microsoft.MultiHeadAttention
        b, s, d = shapes[node.input[0]]
        kv = shapes[node.input[1]][1]
        _attention_core(work, node.name, op, b, _attr(node, "num_heads"), s, kv, d)


def _attr(node: onnx.NodeProto, name: str) -> int:
    return next(int(onnx.helper.get_attribute_value(a)) for a in node.attribute if a.name == name)


def _attention_core(work: Work, name: str, op: str, b: int, heads: int, s: int, kv: int, d: int):
    hd = d // heads
    work.gemms.append(Gemm(name + " (QK^T)", op, b * heads, s, hd, kv))
    work.gemms.append(Gemm(name + " (PV)", op, b * heads, s, kv, hd))
    work.elements["Softmax"] += b * heads * s * kv


# -- the machine ---------------------------------------------------------------------------
def blas_threads() -> str:
    return os.environ.get("OPENBLAS_NUM_THREADS", "unset")


def gemm_seconds(shape: tuple[int, int, int, int], min_time: float = 0.2) -> float:
    """Best-of time numpy needs for ``batch`` ``[m, k] x [k, n]`` fp32 products."""
    batch, m, k, n = shape
    rng = np.random.default_rng(0)
    if batch == 1:
        a, b = rng.random((m, k), np.float32), rng.random((k, n), np.float32)
        c = np.empty((m, n), np.float32)
    else:
        a, b = rng.random((batch, m, k), np.float32), rng.random((batch, k, n), np.float32)
        c = np.empty((batch, m, n), np.float32)
    np.matmul(a, b, out=c)
    best, spent, reps = float("inf"), 0.0, 0
    while spent < min_time or reps < 5:
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
    return best


@dataclass
class Machine:
    #: best single-thread rate of the large square GEMMs, per size.
    square_gflops: dict[int, float]
    #: seconds numpy needs per distinct GEMM shape of the models.
    shape_seconds: dict[tuple[int, int, int, int], float]

    def rate(self, shape: tuple[int, int, int, int]) -> float:
        b, m, k, n = shape
        return 2 * b * m * k * n / self.shape_seconds[shape] / 1e9

    @property
    def peak_gflops(self) -> float:
        """The best rate seen on any GEMM, square or the models' own: the strictest bound."""
        return max([*self.square_gflops.values(), *map(self.rate, self.shape_seconds)])


def measure_machine(shapes: Sequence[tuple[int, int, int, int]], min_time: float) -> Machine:
    squares = {n: 2 * n**3 / gemm_seconds((1, n, n, n), 2 * min_time) / 1e9 for n in SQUARES}
    return Machine(squares, {s: gemm_seconds(s, min_time) for s in sorted(set(shapes))})


# -- the models in ORT ---------------------------------------------------------------------
class Runner:
    """One model as the farm runs it (a version dir) or a bare candidate .onnx file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.is_dir():
            from app.config import Config
            from app.service import load_model

            cfg = Config(pool_size=1, intra_threads=1, inter_threads=1)
            self.model = load_model(path.parent.name, path, cfg)
            self.onnx_path = path / "model.onnx"
            self.label = f"{self.model.name}/{self.model.version}"
            self._run = self.model.run
        else:
            from app.sessions import session_options

            sess = ort.InferenceSession(str(path), session_options(1, 1), ["CPUExecutionProvider"])
            self.onnx_path = path
            self.label = path.stem
            self._run = lambda ids: sess.run([OUTPUT], {INPUT: ids})[0]

    def run(self, ids: np.ndarray) -> np.ndarray:
        return self._run(ids)


def time_models(
    runners: Sequence[Runner], ids: np.ndarray, batches: Sequence[int], repeats: int, warmup: int
) -> dict[tuple[str, int], list[float]]:
    """Seconds per run, per (model, batch), models interleaved round-robin."""
    out: dict[tuple[str, int], list[float]] = {}
    for batch in batches:
        x = np.ascontiguousarray(ids[:batch])
        for r in runners:
            for _ in range(warmup):
                r.run(x)
        for _ in range(repeats):
            for r in runners:
                t0 = time.perf_counter()
                r.run(x)
                out.setdefault((r.label, batch), []).append(time.perf_counter() - t0)
    return out


def profile_ops(path: Path, ids: np.ndarray, runs: int, work_dir: Path) -> Counter:
    """ORT's own profile (the farm's session options + profiling): kernel time per op type
    per run, in ms, of the graph ORT really runs (after its fusions)."""
    import json

    from app.sessions import session_options

    opts = session_options(1, 1)
    opts.enable_profiling = True
    work_dir.mkdir(parents=True, exist_ok=True)
    opts.profile_file_prefix = str(work_dir / path.parent.name)
    sess = ort.InferenceSession(str(path), opts, ["CPUExecutionProvider"])
    sess.run([OUTPUT], {INPUT: ids})  # warm-up: sized allocations, first-run costs
    total: Counter = Counter()
    start = time.perf_counter()
    for _ in range(runs):
        sess.run([OUTPUT], {INPUT: ids})
    wall = (time.perf_counter() - start) / runs
    events = json.loads(Path(sess.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    for e in kernels[len(kernels) // (runs + 1) :]:  # skip the warm-up run's nodes
        total[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
    total["(wall per run)"] = wall * 1e3
    return total


def profile_markdown(profiles: dict[str, Counter], batch: int) -> str:
    ops = sorted({op for p in profiles.values() for op in p if op != "(wall per run)"},
                 key=lambda op: -max(p.get(op, 0.0) for p in profiles.values()))  # fmt: skip
    labels = list(profiles)
    lines = [
        f"ORT profile at batch {batch} (kernel ms per run by op type, farm session options):",
        "",
        "| op | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for op in [*ops, "(wall per run)"]:
        cells = [f"{profiles[x][op]:.2f}" if profiles[x].get(op) else "-" for x in labels]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- the study -----------------------------------------------------------------------------
@dataclass
class Row:
    label: str
    batch: int
    work: Work
    times: list[float]
    peak_s: float
    shapes_s: float

    def pct(self, q: float) -> float:
        return float(np.percentile(self.times, q))

    @property
    def p50(self) -> float:
        return statistics.median(self.times)


def study(
    paths: Sequence[Path],
    batches: Sequence[int] = (100, 1000),
    repeats: int = 30,
    warmup: int = 3,
    gemm_min_time: float = 0.2,
    seed: int = 1000,
) -> tuple[list[Row], Machine]:
    runners = [Runner(p) for p in paths]
    works = {(r.label, b): count_work(r.onnx_path, b) for r in runners for b in batches}
    shapes = [g.shape for w in works.values() for g in w.gemms]
    machine = measure_machine(shapes, gemm_min_time)
    ids = logs.generate(max(batches), seed).id_matrix()
    times = time_models(runners, ids, batches, repeats, warmup)
    rows = []
    for (label, batch), work in works.items():
        peak = work.gemm_flops / (machine.peak_gflops * 1e9)
        by_shape = sum(machine.shape_seconds[g.shape] for g in work.gemms)
        rows.append(Row(label, batch, work, times[(label, batch)], peak, by_shape))
    return rows, machine


def cascade_flop_ratio(
    rows: Sequence[Row], stage1: str, stage2: str, n: int, k: int
) -> tuple[float, float]:
    """(FLOP ratio, measured model-only p50 ratio) of ``A(n) / (D(n) + A(k))``."""
    get = {(r.label, r.batch): r for r in rows}
    a_n, d_n, a_k = get[(stage2, n)], get[(stage1, n)], get[(stage2, k)]
    flops = a_n.work.gemm_flops / (d_n.work.gemm_flops + a_k.work.gemm_flops)
    return flops, a_n.p50 / (d_n.p50 + a_k.p50)


def markdown(rows: Sequence[Row], machine: Machine) -> str:
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, ORT {ort.__version__}, "
        f"numpy {np.__version__}, OPENBLAS_NUM_THREADS={blas_threads()}. Single-thread fp32 "
        "GEMM, square: "
        + ", ".join(f"{n}^3 {r:.1f}" for n, r in machine.square_gflops.items())
        + f" GFLOP/s; peak (best of those and the shapes below): "
        f"**{machine.peak_gflops:.1f} GFLOP/s**.",
        "",
        "| model | batch | GEMM MFLOP/row | other elem ops/row | gathered B/row | p50 ms "
        "| p95 | p99 | GFLOP/s | bound peak ms | time/peak | bound shapes ms | time/shapes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w = r.work
        lines.append(
            f"| {r.label} | {r.batch} | {w.per_row() / 1e6:.3f} "
            f"| {sum(w.elements.values()) / r.batch:,.0f} | {w.gather_bytes / r.batch:,.0f} "
            f"| {r.p50 * 1e3:.2f} | {r.pct(95) * 1e3:.2f} | {r.pct(99) * 1e3:.2f} "
            f"| {w.gemm_flops / r.p50 / 1e9:.1f} | {r.peak_s * 1e3:.2f} "
            f"| **{r.p50 / r.peak_s:.2f}x** | {r.shapes_s * 1e3:.2f} | {r.p50 / r.shapes_s:.2f}x |"
        )
    lines += ["", "GEMM shapes (batch x [m,k]x[k,n]) and numpy's single-thread rate:", ""]
    lines += ["| shape | GFLOP/s |", "|---|---|"]
    for shape in sorted(machine.shape_seconds):
        lines.append(f"| {shape[0]} x [{shape[1]},{shape[2]}]x[{shape[2]},{shape[3]}] "
                     f"| {machine.rate(shape):.1f} |")  # fmt: skip
    lines += ["", "Other work per run (elements written, by op type):", ""]
    for r in rows:
        if r.batch == max(x.batch for x in rows):
            parts = ", ".join(f"{k} {v:,}" for k, v in r.work.elements.most_common())
            unknown = f"; NOT COUNTED: {dict(r.work.unknown)}" if r.work.unknown else ""
            lines.append(f"- {r.label} at {r.batch}: {parts}{unknown}")
    return "\n".join(lines) + "\n"
