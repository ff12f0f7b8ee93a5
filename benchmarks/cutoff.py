"""Choose the cascade's cutoff (``stage1_k``) for a latency budget.

On held-out generated logs (:func:`benchmarks.fidelity.held_out_requests`: a log seed no
served model was trained, validated or tested on), every request of ``n`` candidates is
ranked in-process with the real models, once per ``stage1_k`` value and once
single-stage (AutoInt on all ``n``, the reference). Per value:

* ``recall@10`` against single-stage AutoInt's top 10 (mean and p5 over requests);
* latency, the way :class:`benchmarks.ranking.InProcess` times a request: decode of the
  JSON body and the candidates' features, the cascade, the encoded response (``total``),
  and the cascade alone (``pipeline``); p50/p99 over requests. Every round sends one
  request as every variant, the start rotating, so drift is shared by all values.

The choice is the largest ``stage1_k`` whose p99 ``total`` fits the budget; it is
written as a TOML fragment with the farm's ``stages`` (that ``keep_k`` first), which the
farm loads as its config file (``CTR_FARM_CONFIG``), so its default ``stage1_k`` is it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from app.config import Config, StageConfig
from app.pipeline import top_indices
from benchmarks import fidelity
from benchmarks.ranking import InProcess, Table, f2, percentile, rank_body

DEFAULT_STAGE1_KS = (10, 20, 30, 50, 75, 100, 150, 200, 300)
#: What must fit the budget.
QUANTITY = "p99"


@dataclass(frozen=True)
class Sweep:
    budget_ms: float = 15.0
    n: int = 1000
    stage1_ks: tuple[int, ...] = DEFAULT_STAGE1_KS
    requests: int = 200
    warmup: int = 10
    seed: int = fidelity.DEFAULT_SEED
    top_k: int = fidelity.K

    def check(self, config: Config) -> None:
        """Raise ValueError for a sweep the farm would reject."""
        if self.budget_ms <= 0:
            raise ValueError("budget_ms must be positive")
        if not self.stage1_ks or min(self.stage1_ks) < self.top_k:
            raise ValueError(f"every stage1_k must be at least top_k ({self.top_k})")
        if self.n < 1 or self.requests < 1 or self.warmup < 0:
            raise ValueError("n and requests must be >= 1, warmup >= 0")
        if max(self.n, *self.stage1_ks) > config.max_candidates:
            raise ValueError(f"n and stage1_k must be <= max_candidates ({config.max_candidates})")


def fragments(held: fidelity.HeldOut, names: Sequence[str]) -> list[bytes]:
    """Each request's candidates as a JSON array of objects (the reference API's form)."""
    return [
        msgspec.json.encode([dict(zip(names, row, strict=True)) for row in req.tolist()])
        for req in held.ids
    ]


def measure(
    local: InProcess,
    held: fidelity.HeldOut,
    sweep: Sweep,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, list[float]]]:
    """variant (``single`` or ``multi@k``) -> {"total", "pipeline", "recall"} samples."""
    pipeline = local.farm.pipeline
    assert pipeline is not None
    names = next(iter(local.farm.models.values())).card.field_names
    bodies = fragments(held, names)
    variants: list[tuple[str, int | None]] = [("single", None)]
    variants += [("multi", k) for k in sweep.stage1_ks]
    samples: dict[str, dict[str, list[float]]] = {}
    positions = np.arange(held.n)
    top_k = min(sweep.top_k, held.n)
    if progress:
        progress(f"{sweep.warmup} warm-up + {held.requests} rounds x {len(variants)} variants")
    for i in range(sweep.warmup + held.requests):
        r = i % held.requests
        rot = i % len(variants)
        for variant in variants[rot:] + variants[:rot]:
            sample = local(rank_body(bodies[r], top_k, variant))
            if i < sweep.warmup:
                continue
            name = variant[0] if variant[1] is None else f"multi@{variant[1]}"
            rec = samples.setdefault(name, {"total": [], "pipeline": [], "recall": []})
            rec["total"].append(sample["total"])
            rec["pipeline"].append(sample["pipeline"])
    # Recall, apart from the timed runs (the answers are deterministic).
    for r in range(held.requests):
        ids = np.ascontiguousarray(held.ids[r])
        reference = top_indices(pipeline.baseline.run(ids), positions, top_k)
        samples["single"]["recall"].append(1.0)
        for k in sweep.stage1_ks:
            got = pipeline.rank(ids, top_k, k).indices
            samples[f"multi@{k}"]["recall"].append(fidelity.recall_at_k(got, reference))
    return samples


def summarize(samples: dict[str, dict[str, list[float]]], n: int) -> list[dict[str, Any]]:
    """One row per variant: stage1_k (None for single), recall and latency percentiles."""
    rows = []
    for name, rec in samples.items():
        k = None if name == "single" else int(name.split("@")[1])
        rows.append(
            {
                "variant": name,
                "stage1_k": k,
                "kept": n if k is None else min(k, n),
                "recall_mean": float(np.mean(rec["recall"])),
                "recall_p5": percentile(rec["recall"], 5),
                "p50": percentile(rec["total"], 50),
                "p99": percentile(rec["total"], 99),
                "pipeline_p50": percentile(rec["pipeline"], 50),
                "pipeline_p99": percentile(rec["pipeline"], 99),
                "requests": len(rec["total"]),
            }
        )
    rows.sort(key=lambda row: (row["stage1_k"] is not None, row["stage1_k"] or 0))
    return rows


def choose(
    rows: Sequence[dict[str, Any]], budget_ms: float, quantity: str = QUANTITY
) -> dict[str, Any] | None:
    """The cascade row with the largest ``stage1_k`` whose ``quantity`` fits the budget.

    Each value is judged on its own measurement (latency need not be monotone in k when
    two values cost about the same); None if none fits."""
    fits = [r for r in rows if r["stage1_k"] is not None and r[quantity] <= budget_ms]
    return max(fits, key=lambda r: r["stage1_k"]) if fits else None


def stages_with_cutoff(config: Config, stage1_k: int) -> tuple[StageConfig, ...]:
    """The configured cascade with the first stage keeping ``stage1_k``."""
    first, *rest = config.stages
    return (StageConfig(model=first.model, keep_k=stage1_k), *rest)


def cutoff_toml(config: Config, chosen: dict[str, Any], sweep: Sweep, command: str) -> str:
    """A config file fragment: the ``stages`` setting, with why in comments."""
    lines = [
        "# The cascade's cutoff for a latency budget, written by scripts/choose_cutoff.py.",
        f"#   {command}",
        f"# {dt.date.today().isoformat()}: budget {sweep.budget_ms:g} ms on the {QUANTITY} of the",
        f"# in-process request time (decode + cascade + encode), n = {sweep.n} candidates,",
        f"# {sweep.requests} held-out requests (log seed {sweep.seed}). Chosen stage1_k ="
        f" {chosen['stage1_k']}: p99 {chosen['p99']:.2f} ms, p50 {chosen['p50']:.2f} ms,",
        f"# recall@10 vs single-stage AutoInt {chosen['recall_mean']:.3f}"
        f" (p5 {chosen['recall_p5']:.2f}). See docs/results/cutoff.md.",
        "# The farm's config file: CTR_FARM_CONFIG=deploy/cutoff.toml bash scripts/serve",
        "",
    ]
    stages = []
    for s in stages_with_cutoff(config, chosen["stage1_k"]):
        keep = "" if s.keep_k is None else f", keep_k = {s.keep_k}"
        stages.append(f'  {{ model = "{s.model}"{keep} }},')
    return "\n".join([*lines, "stages = [", *stages, "]", ""])


def table(rows: Sequence[dict[str, Any]], chosen: dict[str, Any] | None, sweep: Sweep) -> Table:
    body = []
    for r in rows:
        mark = "<- chosen" if chosen is not None and r is chosen else ""
        fits = "yes" if r[QUANTITY] <= sweep.budget_ms else "no"
        body.append(
            [
                r["variant"],
                str(r["kept"]),
                f"{r['recall_mean']:.3f}",
                f"{r['recall_p5']:.2f}",
                f2(r["p50"]),
                f2(r["p99"]),
                f2(r["pipeline_p50"]),
                f2(r["pipeline_p99"]),
                fits,
                mark,
            ]
        )
    headers = ["variant", "kept", "recall@10", "recall p5", "p50", "p99", "pipe p50"]
    headers += ["pipe p99", f"p99<={sweep.budget_ms:g}", ""]
    title = (
        f"stage1_k sweep: n={sweep.n}, {sweep.requests} held-out requests (seed {sweep.seed}),"
        f" budget {sweep.budget_ms:g} ms on the p99 of the in-process request (ms)"
    )
    return Table(title, headers, body, labels=1)


def report(rows: list[dict[str, Any]], chosen: dict[str, Any] | None, sweep: Sweep) -> dict:
    return {"sweep": asdict(sweep), "rows": rows, "chosen": chosen}


def write_fragment(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
