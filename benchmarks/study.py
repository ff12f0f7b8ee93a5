"""``ctr-farm bench``: the ranking latency study, single vs multi-stage, in-process and over
HTTP, plus fidelity (recall/NDCG of the cascade against single-stage AutoInt).

Grid axes take comma-separated lists (defaults: the benchmark issue's grid). E.g.

    ctr-farm bench --repeats 200 --warmup 20 --out run/bench-ranking
    ctr-farm bench --quick --out /tmp/bench   # tiny grid, ~15 s

See benchmarks/ranking.py (latency) and benchmarks/fidelity.py (recall/NDCG) for what is
measured and how.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

from app.config import Config, load
from app.errors import CommandError
from benchmarks import fidelity
from benchmarks.cli import int_list
from benchmarks.ranking import (
    FULL_INTRAS,
    FULL_NS,
    FULL_STAGE1_KS,
    PLOT_HINT,
    WHERES,
    Grid,
    InProcess,
    candidate_fragments,
    first_stage_card,
    have_matplotlib,
    measure,
    paths_for,
    plot_scaling,
    report,
    tables,
)

#: Defaults of the full study and of ``--quick`` (the smoke test's tiny grid).
FULL = {
    "n": FULL_NS,
    "stage1_k": FULL_STAGE1_KS,
    "intra_threads": FULL_INTRAS,
    "top_k": 10,
    "repeats": 200,
    "warmup": 20,
    "payloads": 20,
    "fidelity_n": 1000,
    "fidelity_requests": 200,
}
QUICK = {
    "n": (50, 100),
    "stage1_k": (20, 100),
    "intra_threads": (1, 2),
    "top_k": 5,
    "repeats": 3,
    "warmup": 1,
    "payloads": 2,
    "fidelity_n": 100,
    "fidelity_requests": 4,
}


def _show(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    grid = p.add_argument_group("grid (lists are comma-separated)")

    def dflt(name: str) -> str:
        return f"(default {_show(FULL[name])}; --quick {_show(QUICK[name])})"

    grid.add_argument("--n", type=int_list, help=f"candidates per request {dflt('n')}")
    grid.add_argument("--stage1-k", type=int_list, help=f"stage 1's cut {dflt('stage1_k')}")
    grid.add_argument(
        "--intra-threads", type=int_list, help=f"ORT intra-op threads {dflt('intra_threads')}"
    )
    grid.add_argument("--top-k", type=int, help=f"rankings returned {dflt('top_k')}")
    grid.add_argument("--repeats", type=int, help=f"measured rounds per n {dflt('repeats')}")
    grid.add_argument("--warmup", type=int, help=f"unmeasured rounds per n first {dflt('warmup')}")
    grid.add_argument(
        "--payloads", type=int, help=f"distinct candidate sets per n {dflt('payloads')}"
    )
    grid.add_argument("--seed", type=int, default=7, help="payload seed")
    grid.add_argument(
        "--source",
        choices=("uniform", "logs"),
        default="uniform",
        help="payload ids: uniform over each vocabulary (as the first study) or generated logs",
    )
    grid.add_argument("--quick", action="store_true", help="tiny grid (smoke test); flags win")
    fid = p.add_argument_group("fidelity (in-process, model only)")
    fid.add_argument("--fidelity-n", type=int, help=f"candidates per request {dflt('fidelity_n')}")
    fid.add_argument("--fidelity-requests", type=int, help=f"requests {dflt('fidelity_requests')}")
    fid.add_argument(
        "--fidelity-seed",
        type=int,
        default=fidelity.DEFAULT_SEED,
        help="held-out log seed; must not be a seed the cards say they were trained,"
        " validated or tested on",
    )
    where = p.add_argument_group("what to run")
    where.add_argument("--url", help="measure this running farm over HTTP (one intra value)")
    where.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    where.add_argument("--skip-in-process", action="store_true", help="no in-process runs")
    where.add_argument("--skip-http", action="store_true", help="no runs through nginx")
    where.add_argument("--skip-fidelity", action="store_true", help="no fidelity study")
    p.add_argument("--out", type=Path, help="write results.json, report.md and PNG plots here")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the grid defaults (``--quick`` picks the tiny grid) and check the flags."""
    defaults = QUICK if args.quick else FULL
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.url and len(args.intra_threads) > 1:
        raise CommandError("--url measures one farm: give one --intra-threads value (its setting)")
    return args


def farm_config(args: argparse.Namespace, intra: int) -> Config:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTR_FARM_")}
    return load(overrides={"workers": args.workers, "intra_threads": intra}, env=env)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_latency(args: argparse.Namespace, grid: Grid) -> dict[str, Any]:
    wheres = [w for w in WHERES if not getattr(args, f"skip_{w.replace('-', '_')}")]
    if not wheres:
        return {}
    config = farm_config(args, grid.intras[0])
    grid.check(config)
    fragments = candidate_fragments(first_stage_card(config), grid)
    raw = {}
    for intra in grid.intras:
        log(f"intra_threads={intra}: starting {', '.join(wheres)}")
        with paths_for(farm_config(args, intra), wheres, args.url) as paths:
            raw.update(measure(grid, intra, paths, fragments, log))
    return report(grid, raw)


def run_fidelity(args: argparse.Namespace) -> dict[str, Any]:
    n, requests, seed = args.fidelity_n, args.fidelity_requests, args.fidelity_seed
    log(f"fidelity: {requests} requests of {n} candidates, held-out seed {seed}")
    local = InProcess(farm_config(args, 1))
    try:
        cards = [m.card for m in local.farm.models.values()]
        held = fidelity.held_out_requests(cards, n, requests, seed)
        assert local.farm.pipeline is not None
        return fidelity.evaluate(local.farm.pipeline, held, args.stage1_k)
    finally:
        local.close()


def machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "loadavg_start": list(os.getloadavg()),
    }


def write_outputs(out: Path, rep: dict[str, Any], text_tables: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rep, indent=2) + "\n")
    md = ["# Ranking latency study", "", f"Command: `{rep['command']}`", ""]
    md += [t.markdown() + "\n" for t in text_tables]
    (out / "report.md").write_text("\n".join(md))
    written = [out / "results.json", out / "report.md"]
    if rep.get("scaling"):
        if have_matplotlib():
            written += plot_scaling(rep["scaling"], out)
        else:
            log(PLOT_HINT)
    log("wrote " + ", ".join(str(p) for p in written))


def run(args: argparse.Namespace) -> None:
    args = resolve(args)
    if args.out and not have_matplotlib():
        log(PLOT_HINT)  # said up front, not only after a long run
    grid = Grid(
        ns=args.n,
        stage1_ks=args.stage1_k,
        intras=args.intra_threads,
        top_k=args.top_k,
        repeats=args.repeats,
        warmup=args.warmup,
        payloads=args.payloads,
        seed=args.seed,
        source=args.source,
    )
    t0 = time.monotonic()
    rep: dict[str, Any] = {
        "command": " ".join(["ctr-farm", "bench", *args.argv]),
        "params": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "argv"
        },
        "machine": machine(),
    }
    rep.update(run_latency(args, grid))
    if not args.skip_fidelity:
        rep["fidelity"] = run_fidelity(args)
    rep["machine"]["loadavg_end"] = list(os.getloadavg())
    rep["seconds"] = round(time.monotonic() - t0, 1)
    text_tables = tables(rep)
    for table in text_tables:
        print(table.text() + "\n")
    print(f"({rep['seconds']} s; load average {rep['machine']['loadavg_end'][0]:.2f})")
    if args.out:
        write_outputs(args.out, rep, text_tables)
