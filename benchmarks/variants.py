"""Every graph variant of issue 5 against version 1, side by side (docs/results/issue5_models.md).

Builds, from ``models/<name>/1``, the AutoInt rewrites of :mod:`app.offline.rewrite`
(``mha``, ``fused``, ``contrib-attention``, ``attention``, ``attention`` + the layer-0
fold), the DeepFM ``fm-gemm`` rewrite, and dynamic INT8 of v1 and of the chosen rewrite;
then per model family times them all interleaved round-robin (``benchmarks.bound``'s
timing, the farm's session options, intra 1), and checks each against v1 on held-out ids:
the largest CTR difference, and whether a row scores the same in any batch (a 64-row slice
against the whole batch, bit for bit). A second table times v1 and the served rewrite at
each ORT graph optimisation level, as an offline-optimised file (saved at ALL, loaded at
DISABLE) and with IO binding into a pre-allocated output, against the farm's ALL.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.offline import logs
from app.offline.rewrite import (
    fold_first_layer,
    predict,
    quantize_int8,
    rewrite_autoint,
    rewrite_deepfm,
)
from app.sessions import session_options
from benchmarks.bound import INPUT, OUTPUT, Runner, time_models

HELD_OUT_SEED = 4242


def build(models: Path, work: Path) -> dict[str, list[Path]]:
    """The variant files per family, version 1 first."""
    work.mkdir(parents=True, exist_ok=True)
    a1, d1 = models / "autoint" / "1" / "model.onnx", models / "deepfm" / "1" / "model.onnx"
    auto = [a1]
    for variant in ("mha", "fused", "contrib-attention", "attention"):
        auto.append(rewrite_autoint(a1, work / f"autoint-{variant}.onnx", variant))
    auto.append(fold_first_layer(auto[-1], work / "autoint-attention-fold0.onnx"))
    auto.append(quantize_int8(a1, work / "autoint-v1-int8.onnx"))
    auto.append(quantize_int8(auto[4], work / "autoint-attention-int8.onnx"))
    deep = [d1, rewrite_deepfm(d1, work / "deepfm-fm-gemm.onnx")]
    deep.append(quantize_int8(d1, work / "deepfm-v1-int8.onnx"))
    deep.append(quantize_int8(deep[1], work / "deepfm-fm-gemm-int8.onnx"))
    return {"autoint": auto, "deepfm": deep}


def accuracy(paths: Sequence[Path], ids: np.ndarray) -> dict[Path, tuple[float, bool]]:
    """(max |dCTR| vs the first, batch-invariant?) per variant."""
    ref = predict(paths[0], ids)
    out = {}
    for path in paths:
        whole = predict(path, ids[:1000])
        same = bool(np.array_equal(predict(path, ids[:64]), whole[:64]))
        out[path] = (float(np.abs(predict(path, ids) - ref).max()), same)
    return out


def variants_markdown(
    runners: Sequence[Runner],
    times: dict[tuple[str, int], list[float]],
    acc: dict[Path, tuple[float, bool]],
    batches: Sequence[int],
) -> str:
    head = "| variant | " + " | ".join(f"b{b} p50 ms | p95 | p99 | speed" for b in batches)
    lines = [head + " | max abs dCTR vs v1 | batch-invariant | size MB |"]
    lines.append("|---|" + "---|---|---|---|" * len(batches) + "---|---|---|")
    base = {b: np.median(times[(runners[0].label, b)]) for b in batches}
    for r in runners:
        cells = []
        for b in batches:
            ms = np.asarray(times[(r.label, b)]) * 1e3
            cells.append(
                f"{np.percentile(ms, 50):.2f} | {np.percentile(ms, 95):.2f} | "
                f"{np.percentile(ms, 99):.2f} | {base[b] * 1e3 / np.median(ms):.3f}x"
            )
        err, same = acc[r.path]
        size = r.path.stat().st_size / 1e6
        lines.append(
            f"| {r.label} | " + " | ".join(cells) + f" | {err:.1e} | {'yes' if same else 'NO'} "
            f"| {size:.1f} |"
        )
    return "\n".join(lines) + "\n"


LEVELS = {
    "DISABLE": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def option_runs(path: Path, work: Path) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """One run function per session option studied (the farm's options otherwise)."""
    runs: dict[str, Callable[[np.ndarray], np.ndarray]] = {}

    def session(opts: ort.SessionOptions, model: Path = path) -> ort.InferenceSession:
        return ort.InferenceSession(str(model), opts, ["CPUExecutionProvider"])

    for name, level in LEVELS.items():
        opts = session_options(1, 1)
        opts.graph_optimization_level = level
        sess = session(opts)
        runs[name] = lambda x, s=sess: s.run([OUTPUT], {INPUT: x})[0]
    saved = work / f"{path.parent.parent.name}-{path.parent.name}-optimised.onnx"
    opts = session_options(1, 1)
    opts.optimized_model_filepath = str(saved)
    session(opts)
    opts = session_options(1, 1)
    opts.graph_optimization_level = LEVELS["DISABLE"]
    sess = session(opts, saved)
    runs["offline-optimised"] = lambda x, s=sess: s.run([OUTPUT], {INPUT: x})[0]
    sess = session(session_options(1, 1))
    bound: dict[int, tuple[ort.IOBinding, np.ndarray]] = {}

    def iobinding(x: np.ndarray, s: ort.InferenceSession = sess) -> np.ndarray:
        if len(x) not in bound:
            out = np.empty(len(x), np.float32)
            binding = s.io_binding()
            binding.bind_output(OUTPUT, "cpu", 0, np.float32, [len(x)], out.ctypes.data)
            bound[len(x)] = (binding, out)
        binding, out = bound[len(x)]
        binding.bind_cpu_input(INPUT, x)
        s.run_with_iobinding(binding)
        return out

    runs["iobinding"] = iobinding
    return runs


def time_options(
    models: dict[str, Path], work: Path, ids: np.ndarray, batches: Sequence[int], repeats: int
) -> str:
    runs = {
        (label, opt): fn for label, p in models.items() for opt, fn in option_runs(p, work).items()
    }
    times: dict[tuple[str, str, int], list[float]] = {}
    for batch in batches:
        x = np.ascontiguousarray(ids[:batch])
        for fn in runs.values():
            fn(x)
            fn(x)
        for _ in range(repeats):
            for key, fn in runs.items():
                t0 = time.perf_counter()
                fn(x)
                times.setdefault((*key, batch), []).append(time.perf_counter() - t0)
    options = list(dict.fromkeys(opt for _, opt in runs))
    lines = ["| model | batch | " + " | ".join(options) + " |", "|---|---|" + "---|" * len(options)]
    for label in models:
        for batch in batches:
            base = np.median(times[(label, "ALL", batch)])
            cells = [f"{base / np.median(times[(label, o, batch)]):.2f}x" for o in options]
            lines.append(f"| {label} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(models: Path, work: Path, batches: Sequence[int], repeats: int, option_repeats: int) -> str:
    families = build(models, work)
    ids = logs.generate(5000, HELD_OUT_SEED).id_matrix()
    ids[::97, 5] = 10**9  # out of range: the field's OOV row, in the graph
    text = [
        f"Speed = v1 p50 / variant p50, all variants of a model interleaved; {repeats} "
        f"rounds; held-out ids: generate(5000, seed={HELD_OUT_SEED}) with out-of-range ids.",
        "",
    ]
    for family, paths in families.items():
        runners = [Runner(p) for p in paths]
        runners[0].label = f"{family} v1"
        times = time_models(runners, ids, batches, repeats, warmup=3)
        text += [
            f"**{family}**",
            "",
            variants_markdown(runners, times, accuracy(paths, ids), batches),
        ]
    served = {
        "autoint v1": families["autoint"][0],
        "autoint attention": families["autoint"][4],
        "deepfm v1": families["deepfm"][0],
        "deepfm fm-gemm": families["deepfm"][1],
    }
    text += [
        "**Session options** (speed vs the farm's ORT_ENABLE_ALL, interleaved, "
        f"{option_repeats} rounds):",
        "",
        time_options(served, work, ids, batches, option_repeats),
    ]
    return "\n".join(text)
