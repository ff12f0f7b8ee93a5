"""Ranking latency study: single- vs multi-stage, in-process and over HTTP, over a grid.

The grid is candidates ``n`` x ``stage1_k`` x ONNX Runtime ``intra_threads``. For each
intra value, one in-process :class:`~app.service.Farm` and (unless skipped) one real
stack (nginx + gunicorn, ``app.stack.running``) are up at the same time. For each ``n``
every *round* takes one payload and sends it as

    single, multi@k1, multi@k2, ...   (the start rotates by one every round)

and each of those through every path (in-process and HTTP, alternating which goes
first). Every speedup (single/multi) and every HTTP overhead (http/in-process) is thus a
ratio of side-by-side samples from the same rounds; its bootstrap CI resamples rounds
(paired). A single-stage request ignores ``stage1_k``, so it is measured once per round
and shared by every ``stage1_k`` cell of that ``n`` and path.

In-process, the request goes through what ``app.api.RankResource`` does around the farm
(minus Falcon and the executor hop): ``decode`` = msgspec decode of the RankRequest plus
the candidates' features (``FeatureSpace.decode``); the pipeline, split per stage into
model time and top-k cut time (``RankResult.timings``); ``encode`` = build the
RankResponse and encode it with ``msgspec.json.Encoder``. Over HTTP the client sees one
end-to-end time plus the server-reported ``stage1_ms``, ``stage2_ms``, ``total_ms``.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np

from app.api import rank_response
from app.config import Config
from app.offline import logs as logs_mod
from app.pipeline import RankResult
from app.schema import ModelCard, RankRequest
from app.service import Farm
from app.sessions import read_card
from app.stack import running

MODES = ("single", "multi")
WHERES = ("in-process", "http")
#: Default grid (the benchmark issue's).
FULL_NS = (100, 250, 500, 1000, 2000, 5000)
FULL_STAGE1_KS = (50, 100, 200)
FULL_INTRAS = (1, 2)
PLOT_HINT = (
    "matplotlib is not installed; plots skipped (install: .venv/bin/pip install -e '.[bench]')"
)

#: One request variant: ("single", None) or ("multi", stage1_k).
Variant = tuple[str, int | None]
#: quantity name -> samples in ms, one per measured round.
Samples = dict[str, list[float]]
#: (where, intra, n, variant) -> samples.
Raw = dict[tuple[str, int, int, Variant], Samples]


def candidates(card: ModelCard, n: int, rng: np.random.Generator) -> list[dict[str, int]]:
    """``n`` candidates in the reference API's form (objects keyed by field name)."""
    cols = {f.name: rng.integers(0, f.vocab_size, n).tolist() for f in card.fields}
    return [{name: cols[name][i] for name in cols} for i in range(n)]


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def summary(samples: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(samples),
        "p50": percentile(samples, 50),
        "p95": percentile(samples, 95),
        "p99": percentile(samples, 99),
        "min": min(samples),
        "max": max(samples),
        "count": len(samples),
    }


def ratio_ci(
    num: Sequence[float], den: Sequence[float], rng: np.random.Generator, boots: int = 2000
) -> dict[str, Any]:
    """median(num) / median(den) with a 95% paired bootstrap CI (rounds resampled jointly)."""
    a, b = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("paired samples must be non-empty and of equal length")
    idx = rng.integers(0, a.size, (boots, a.size))
    ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    return {
        "point": float(np.median(a) / np.median(b)),
        "ci95": [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))],
    }


# -- the grid --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grid:
    ns: tuple[int, ...] = FULL_NS
    stage1_ks: tuple[int, ...] = FULL_STAGE1_KS
    intras: tuple[int, ...] = FULL_INTRAS
    top_k: int = 10
    repeats: int = 200
    warmup: int = 20
    payloads: int = 20
    seed: int = 7
    #: Where candidate ids come from: "uniform" over each vocabulary (as the first version
    #: of the study) or "logs" (rows of generated logs: Zipf-popular ids, like traffic).
    source: str = "uniform"

    def check(self, config: Config) -> None:
        """Raise ValueError for a grid the farm would reject."""
        if not (self.ns and self.stage1_ks and self.intras):
            raise ValueError("every grid axis needs at least one value")
        if min(self.repeats, self.payloads) < 1 or self.warmup < 0:
            raise ValueError("repeats and payloads must be >= 1, warmup >= 0")
        if self.top_k > min(self.stage1_ks):
            raise ValueError(f"top_k ({self.top_k}) must not exceed any stage1_k")
        if max(*self.ns, *self.stage1_ks) > config.max_candidates:
            raise ValueError(f"n and stage1_k must be <= max_candidates ({config.max_candidates})")
        if self.source not in ("uniform", "logs"):
            raise ValueError("source must be 'uniform' or 'logs'")

    def variants(self) -> list[Variant]:
        return [("single", None)] + [("multi", k) for k in self.stage1_ks]


def variant_name(variant: Variant) -> str:
    mode, k = variant
    return mode if k is None else f"{mode}@{k}"


# -- payloads --------------------------------------------------------------------------------
def first_stage_card(config: Config) -> ModelCard:
    return read_card(config.model_dirs()[config.stages[0].model])


def candidate_fragments(card: ModelCard, grid: Grid) -> dict[int, list[bytes]]:
    """Per ``n``: ``grid.payloads`` JSON arrays of candidates (objects form), fixed seed."""
    rng = np.random.default_rng(grid.seed)
    names = card.field_names
    out: dict[int, list[bytes]] = {}
    for n in grid.ns:
        if grid.source == "logs":
            ids = logs_mod.generate(n * grid.payloads, grid.seed).id_matrix()
            rows = ids.reshape(grid.payloads, n, len(names)).tolist()
            sets = [[dict(zip(names, row, strict=True)) for row in rows_] for rows_ in rows]
        else:
            sets = [candidates(card, n, rng) for _ in range(grid.payloads)]
        out[n] = [msgspec.json.encode(s) for s in sets]
    return out


def rank_body(fragment: bytes, top_k: int, variant: Variant) -> bytes:
    """A /rank JSON body around an encoded candidates array."""
    mode, k = variant
    tail: dict[str, Any] = {"top_k": top_k, "multi_stage": mode == "multi"}
    if k is not None:
        tail["stage1_k"] = k
    return b'{"candidates":' + fragment + b"," + msgspec.json.encode(tail)[1:]


# -- the two paths -----------------------------------------------------------------------------
def encode_response(encoder: msgspec.json.Encoder, result: RankResult) -> bytes:
    """What ``app.api.RankResource`` builds and writes for a JSON response."""
    return encoder.encode(rank_response(result))


class InProcess:
    """decode -> pipeline -> encode in this process, timed per part (ms)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.farm = Farm(config)
        self.farm.load()
        self.decoder = msgspec.json.Decoder(RankRequest)
        self.encoder = msgspec.json.Encoder()

    def close(self) -> None:
        self.farm.close()

    def __call__(self, body: bytes) -> dict[str, float]:
        features, pipeline = self.farm.features, self.farm.pipeline
        assert features is not None and pipeline is not None
        t0 = time.perf_counter()
        request = self.decoder.decode(body)
        ids, _ = features.decode(request.candidates, "json")
        t1 = time.perf_counter()
        top_k = request.top_k  # as Farm.rank: the default never exceeds stage1_k
        if top_k is None:
            top_k = min(self.config.default_top_k, request.stage1_k or self.config.default_top_k)
        result = pipeline.rank(ids, top_k, request.stage1_k, request.multi_stage)
        t2 = time.perf_counter()
        encode_response(self.encoder, result)
        t3 = time.perf_counter()
        return {
            "total": (t3 - t0) * 1e3,
            "decode": (t1 - t0) * 1e3,
            "encode": (t3 - t2) * 1e3,
            "pipeline": result.latency["total_ms"],
            "stage1": result.latency["stage1_ms"],
            "stage2": result.latency["stage2_ms"],
            **{k.removesuffix("_ms"): v for k, v in result.timings.items()},
        }


class OverHttp:
    """POST /rank through nginx; the client's end-to-end time plus the server's split."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=60)
        self.headers = {"Content-Type": "application/json"}

    def close(self) -> None:
        self.client.close()

    def __call__(self, body: bytes) -> dict[str, float]:
        t0 = time.perf_counter()
        resp = self.client.post("/rank", content=body, headers=self.headers)
        elapsed = (time.perf_counter() - t0) * 1e3
        resp.raise_for_status()
        latency = msgspec.json.decode(resp.content)["latency"]
        return {
            "total": elapsed,
            "pipeline": latency["total_ms"],
            "stage1": latency["stage1_ms"],
            "stage2": latency["stage2_ms"],
        }


Measure = Callable[[bytes], dict[str, float]]


@contextmanager
def paths_for(
    config: Config, wheres: Sequence[str], url: str | None = None
) -> Iterator[dict[str, Measure]]:
    """The measuring paths for one farm configuration, all up at once; closed on exit."""
    with ExitStack() as stack:
        paths: dict[str, Measure] = {}
        if "in-process" in wheres:
            local = InProcess(config)
            stack.callback(local.close)
            paths["in-process"] = local
        if "http" in wheres:
            if url is None:
                overrides = {"workers": config.workers, "intra_threads": config.intra_threads}
                run_dir = Path(tempfile.mkdtemp(prefix="bench-"))
                url = stack.enter_context(running(run_dir, overrides)).url
            remote = OverHttp(url)
            stack.callback(remote.close)
            paths["http"] = remote
        yield paths


def measure(
    grid: Grid,
    intra: int,
    paths: Mapping[str, Measure],
    fragments: Mapping[int, list[bytes]],
    progress: Callable[[str], None] | None = None,
) -> Raw:
    """Rounds of interleaved variants x paths for every ``n`` (see the module docstring)."""
    raw: Raw = {}
    variants = grid.variants()
    wheres = list(paths)
    for n in grid.ns:
        if progress:
            progress(f"intra={intra} n={n}: {grid.warmup} warm-up + {grid.repeats} rounds")
        for i in range(grid.warmup + grid.repeats):
            fragment = fragments[n][i % len(fragments[n])]
            r = i % len(variants)
            order = wheres if i % 2 == 0 else wheres[::-1]
            for variant in variants[r:] + variants[:r]:
                body = rank_body(fragment, grid.top_k, variant)
                for where in order:
                    sample = paths[where](body)
                    if i >= grid.warmup:
                        rec = raw.setdefault((where, intra, n, variant), {})
                        for quantity, ms in sample.items():
                            rec.setdefault(quantity, []).append(ms)
    return raw


# -- from samples to a report -----------------------------------------------------------------
def _order(key: tuple[str, int, int, Variant]) -> tuple:
    """Sort raw keys: path, intra, n, then single before multi@k ascending."""
    where, intra, n, (mode, k) = key
    return (WHERES.index(where), intra, n, mode != "single", k or 0)


def build_cells(grid: Grid, raw: Raw, rng: np.random.Generator) -> list[dict[str, Any]]:
    """One cell per (where, intra, n, stage1_k): single and multi stats, speedup with CI."""
    cells = []
    for where, intra, n, variant in sorted(raw, key=_order):
        mode, k = variant
        if mode != "multi":
            continue
        single, multi = raw[where, intra, n, ("single", None)], raw[where, intra, n, variant]
        cells.append(
            {
                "where": where,
                "intra": intra,
                "n": n,
                "stage1_k": k,
                "after_stage1": min(k, n),
                "single": {q: summary(s) for q, s in single.items()},
                "multi": {q: summary(s) for q, s in multi.items()},
                "speedup_p50": ratio_ci(single["total"], multi["total"], rng),
            }
        )
    return cells


def http_overhead(raw: Raw, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Per (intra, n, variant): HTTP end-to-end over in-process end-to-end, paired."""
    rows = []
    for where, intra, n, variant in sorted(raw, key=_order):
        if where != "http" or ("in-process", intra, n, variant) not in raw:
            continue
        http, local = raw[where, intra, n, variant]["total"], raw["in-process", intra, n, variant]
        rows.append(
            {
                "intra": intra,
                "n": n,
                "variant": variant_name(variant),
                "in_process_p50": percentile(local["total"], 50),
                "http_p50": percentile(http, 50),
                "added_ms_p50": float(np.median(np.subtract(http, local["total"]))),
                "ratio_p50": ratio_ci(http, local["total"], rng),
            }
        )
    return rows


def scaling(raw: Raw) -> list[dict[str, Any]]:
    """Per (where, intra, variant): p50 vs n and log-log slopes (time ~ n^slope).

    ``loglog_slope`` is a least-squares fit over every n; the cascade's cost is rather
    ``a + b n`` (fixed stage-2 work, linear stage 1), so ``loglog_slope_top``, between
    the two largest n, says more about its marginal growth."""
    series: dict[tuple[str, int, Variant], list[tuple[int, float]]] = {}
    for where, intra, n, variant in sorted(raw, key=_order):
        samples = raw[where, intra, n, variant]
        series.setdefault((where, intra, variant), []).append((n, percentile(samples["total"], 50)))
    rows = []
    for (where, intra, variant), points in series.items():
        points.sort()
        ns, p50s = zip(*points, strict=True)
        slope = top_slope = None
        if len(ns) > 1:
            slope = float(np.polyfit(np.log(ns), np.log(p50s), 1)[0])
            top_slope = math.log(p50s[-1] / p50s[-2]) / math.log(ns[-1] / ns[-2])
        rows.append(
            {
                "where": where,
                "intra": intra,
                "variant": variant_name(variant),
                "n": list(ns),
                "p50": list(p50s),
                "loglog_slope": slope,
                "loglog_slope_top": top_slope,
            }
        )
    return rows


def report(grid: Grid, raw: Raw, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "grid": asdict(grid),
        "cells": build_cells(grid, raw, rng),
        "http_overhead": http_overhead(raw, rng),
        "scaling": scaling(raw),
        # Raw end-to-end and pipeline samples (ms, in round order) for later analysis.
        "samples": [
            {
                "where": where,
                "intra": intra,
                "n": n,
                "variant": variant_name(variant),
                "total": raw[where, intra, n, variant]["total"],
                "pipeline": raw[where, intra, n, variant]["pipeline"],
            }
            for where, intra, n, variant in sorted(raw, key=_order)
        ],
    }


# -- tables ------------------------------------------------------------------------------------
@dataclass
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    #: How many leading columns are labels (left-aligned); the rest are numbers.
    labels: int = 1

    def text(self) -> str:
        widths = [
            max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h)
            for i, h in enumerate(self.headers)
        ]

        def line(cells: list[str]) -> str:
            return "  ".join(
                c.ljust(w) if i < self.labels else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        return "\n".join([self.title, line(self.headers), *map(line, self.rows)])

    def markdown(self) -> str:
        head = "| " + " | ".join(self.headers) + " |"
        rule = "|" + "|".join(":--" if i < self.labels else "--:" for i in range(len(self.headers)))
        rule += "|"
        body = ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join([f"### {self.title}", "", head, rule, *body])


def f2(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def ci_text(ratio: dict[str, Any]) -> str:
    return f"{ratio['ci95'][0]:.2f}-{ratio['ci95'][1]:.2f}"


def _variant_rows(cells: list[dict]) -> Iterator[tuple[dict, str, dict]]:
    """(cell, variant name, stats) once per (where, intra, n, variant), single first."""
    seen: set[tuple] = set()
    for c in cells:
        key = (c["where"], c["intra"], c["n"])
        if key not in seen:
            seen.add(key)
            yield c, "single", c["single"]
        yield c, f"multi@{c['stage1_k']}", c["multi"]


def latency_table(cells: list[dict]) -> Table:
    rows = []
    for c, name, stats in _variant_rows(cells):
        t = stats["total"]
        rows.append(
            [c["where"], str(c["intra"]), str(c["n"]), name]
            + [f2(t[q]) for q in ("mean", "p50", "p95", "p99", "min", "max")]
        )
    headers = ["where", "intra", "n", "variant", "mean", "p50", "p95", "p99", "min", "max"]
    return Table("End-to-end latency (ms)", headers, rows, labels=4)


STAGE_PARTS = ("decode", "stage1_model", "stage1_cut", "stage2_model", "stage2_cut", "encode")


def breakdown_table(cells: list[dict]) -> Table:
    """In-process: mean ms per part; ``other`` = total - parts (timer + Python glue)."""
    rows = []
    for c, name, stats in _variant_rows([c for c in cells if c["where"] == "in-process"]):
        means = {q: stats[q]["mean"] for q in (*STAGE_PARTS, "total")}
        other = means["total"] - sum(means[q] for q in STAGE_PARTS)
        rows.append(
            [str(c["intra"]), str(c["n"]), name]
            + [f2(means[q]) for q in STAGE_PARTS]
            + [f2(other), f2(means["total"])]
        )
    headers = ["intra", "n", "variant", "decode", "s1 model", "s1 cut", "s2 model", "s2 cut"]
    headers += ["encode", "other", "total"]
    return Table("In-process per-stage breakdown (mean ms)", headers, rows, labels=3)


def http_breakdown_table(cells: list[dict]) -> Table:
    """HTTP: the server's stage split vs what the client saw (mean ms)."""
    rows = []
    for c, name, stats in _variant_rows([c for c in cells if c["where"] == "http"]):
        m = {q: stats[q]["mean"] for q in ("stage1", "stage2", "pipeline", "total")}
        rows.append(
            [str(c["intra"]), str(c["n"]), name]
            + [f2(m[q]) for q in ("stage1", "stage2", "pipeline")]
            + [f2(m["total"] - m["pipeline"]), f2(m["total"])]
        )
    headers = ["intra", "n", "variant", "stage1", "stage2", "pipeline", "outside", "client"]
    return Table("HTTP: server-reported stages vs client (mean ms)", headers, rows, labels=3)


def speedup_table(cells: list[dict]) -> Table:
    rows = []
    for c in cells:
        s = c["speedup_p50"]
        rows.append(
            [
                c["where"],
                str(c["intra"]),
                str(c["n"]),
                str(c["stage1_k"]),
                str(c["after_stage1"]),
                f2(c["single"]["total"]["p50"]),
                f2(c["multi"]["total"]["p50"]),
                f"{s['point']:.2f}x",
                ci_text(s),
            ]
        )
    headers = ["where", "intra", "n", "stage1_k", "kept", "single p50", "multi p50", "speedup"]
    headers.append("95% CI")
    return Table(
        "Speedup single/multi (ratio of p50s, paired bootstrap CI)", headers, rows, labels=5
    )


def overhead_table(rows_: list[dict]) -> Table:
    rows = [
        [
            str(r["intra"]),
            str(r["n"]),
            r["variant"],
            f2(r["in_process_p50"]),
            f2(r["http_p50"]),
            f2(r["added_ms_p50"]),
            f"{r['ratio_p50']['point']:.2f}x",
            ci_text(r["ratio_p50"]),
        ]
        for r in rows_
    ]
    headers = ["intra", "n", "variant", "in-proc p50", "http p50", "added p50", "ratio", "95% CI"]
    return Table(
        "HTTP overhead (http / in-process, same payloads, paired)", headers, rows, labels=3
    )


def scaling_table(rows_: list[dict]) -> Table:
    rows = [
        [
            r["where"],
            str(r["intra"]),
            r["variant"],
            f"{r['n'][0]}-{r['n'][-1]}",
            f2(r["p50"][0]),
            f2(r["p50"][-1]),
            f2(r["loglog_slope"]),
            f2(r["loglog_slope_top"]),
        ]
        for r in rows_
    ]
    headers = ["where", "intra", "variant", "n range", "p50 first", "p50 last", "slope"]
    headers.append("slope top 2")
    return Table(
        "Cost vs n (log-log slope of p50: time ~ n^slope; fit, and top two n)",
        headers,
        rows,
        labels=4,
    )


def fidelity_table(fid: dict[str, Any]) -> Table:
    """Each cell: mean over requests (p5 over requests)."""
    columns = {
        "recall_vs_single": "recall",
        "ndcg_vs_single": "NDCG",
        "ndcg_vs_single_minmax": "NDCG min-max",
        "recall_vs_truth": "recall (truth)",
        "ndcg_vs_truth": "NDCG (truth)",
    }
    rows = [
        [name] + [f"{m[c]['mean']:.3f} ({m[c]['p5']:.3f})" for c in columns]
        for name, m in fid["systems"].items()
    ]
    spread = ", ".join(f"{k} {v:.2f}" for k, v in fid.get("score_spread_p50", {}).items())
    title = (
        f"Fidelity @{fid['k']}: mean (p5) over {fid['requests']} requests of n={fid['n']},"
        f" held-out seed {fid['seed']}; reference = single-stage AutoInt, truth = the"
        f" generator's hidden CTR; score spread (p95-p5)/p50: {spread}"
    )
    return Table(title, ["system", *columns.values()], rows)


def tables(rep: dict[str, Any]) -> list[Table]:
    out: list[Table] = []
    cells = rep.get("cells", [])
    if cells:
        out += [latency_table(cells), speedup_table(cells)]
        if any(c["where"] == "in-process" for c in cells):
            out.append(breakdown_table(cells))
        if any(c["where"] == "http" for c in cells):
            out.append(http_breakdown_table(cells))
    if rep.get("http_overhead"):
        out.append(overhead_table(rep["http_overhead"]))
    if rep.get("scaling"):
        out.append(scaling_table(rep["scaling"]))
    if rep.get("fidelity"):
        out.append(fidelity_table(rep["fidelity"]))
    return out


# -- plots -------------------------------------------------------------------------------------
def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_scaling(rows_: list[dict], out_dir: Path) -> list[Path]:
    """One log-log PNG of p50 time vs n per (where, intra): single and each multi@k.

    Raises ImportError (with :data:`PLOT_HINT`) if matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(PLOT_HINT) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for where, intra in dict.fromkeys((r["where"], r["intra"]) for r in rows_):
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        for r in rows_:
            if (r["where"], r["intra"]) != (where, intra):
                continue
            style = "o-" if r["variant"] == "single" else "s--"
            slope = f" (slope {r['loglog_slope']:.2f})" if r["loglog_slope"] is not None else ""
            ax.loglog(r["n"], r["p50"], style, label=f"{r['variant']}{slope}")
        ax.set_xlabel("candidates n")
        ax.set_ylabel("p50 end-to-end time (ms)")
        ax.set_title(f"ranking time vs n: {where}, intra_threads={intra}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        path = out_dir / f"scaling_{where}_intra{intra}.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
