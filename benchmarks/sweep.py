"""``ctr-farm sweep``: the throughput sweep over farm configurations, with wrk (one farm
per cell, through nginx on a free loopback port).

    ctr-farm sweep --endpoint predict --workers 1,2 --pool 1,6 --seconds 10 \
        --out docs/results/sweep.csv

Axes take comma-separated values; every combination is one cell.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.throughput import grid, measure_cell, plot, write_bodies, write_tables


def _list(kind):
    return lambda text: [kind(v) for v in text.split(",")]


def _bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes", "per_worker")


COLUMNS = [
    "endpoint",
    "workers",
    "pool_size",
    "intra_threads",
    "inter_threads",
    "per_worker_sockets",
    "inference",
    "rps",
    "mean_ms",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "non2xx",
    "socket_errors",
    "worker_cpu_cores",
    "cpu_us_per_request",
    "worker_cpu_share",
    "upstream_share",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint", choices=["predict", "rank"], default="predict", help="what to load"
    )
    p.add_argument(
        "--candidates",
        type=int,
        default=None,
        help="candidates per body (default 1 for predict, 1000 for rank)",
    )
    p.add_argument(
        "--workers", type=_list(int), default=None, help="gunicorn workers (default 2; --quick 1,2)"
    )
    p.add_argument(
        "--pool", type=_list(int), default=None, help="sessions per worker (default 1; --quick 1,6)"
    )
    p.add_argument("--intra", type=_list(int), default=[1], help="ORT intra-op threads")
    p.add_argument("--inter", type=_list(int), default=[1], help="ORT inter-op threads")
    p.add_argument(
        "--ratios",
        type=_list(str),
        default=None,
        help="intra:inter pairs, e.g. 1:1,2:1,2:2 (instead of the --intra x --inter product)",
    )
    p.add_argument(
        "--sockets", type=_list(_bool), default=[True], help="per_worker,shared (True: per worker)"
    )
    p.add_argument(
        "--inference", type=_list(str), default=["executor"], help="auto,executor,inline"
    )
    p.add_argument("--threads", type=int, default=4, help="wrk threads")
    p.add_argument("--connections", type=int, default=100, help="wrk connections")
    p.add_argument("--seconds", type=int, default=10, help="measured seconds per cell")
    p.add_argument(
        "--warmup", type=int, default=3, help="warm-up seconds per cell (wrk takes whole seconds)"
    )
    p.add_argument(
        "--open-loop",
        type=_list(float),
        default=[],
        help="also offer these fractions of each cell's wrk RPS open-loop,"
        " e.g. 0.5,0.8,1.0,1.5 (latency-at-load curve)",
    )
    p.add_argument("--sla-ms", type=float, default=50.0, help="SLA for goodput in open loop")
    p.add_argument(
        "--quick", action="store_true", help="preset: workers 1,2 x pool 1,6, 3 s cells (36 s here)"
    )
    p.add_argument("--out", type=Path, help="CSV output (a .md table is written beside it)")


def run(args: argparse.Namespace) -> None:
    if args.quick:
        # A 4-cell grid of 3 s cells: about a minute on 2 cores.
        args.seconds, args.warmup = 3, 1
        args.workers, args.pool = args.workers or [1, 2], args.pool or [1, 6]
    args.workers, args.pool = args.workers or [2], args.pool or [1]
    n = args.candidates or (1 if args.endpoint == "predict" else 1000)
    bodies_dir = tempfile.TemporaryDirectory(prefix="sweep-bodies-")
    bodies = write_bodies(Path(bodies_dir.name) / "bodies.txt", args.endpoint, n, 200, 1)
    cells = grid(
        workers=args.workers,
        pool_size=args.pool,
        intra_threads=args.intra,
        inter_threads=args.inter,
        per_worker_sockets=args.sockets,
        inference=args.inference,
    )
    if args.ratios:
        pairs = [tuple(int(x) for x in r.split(":")) for r in args.ratios]
        cells = [
            {**c, "intra_threads": a, "inter_threads": b}
            for c in grid(
                workers=args.workers,
                pool_size=args.pool,
                per_worker_sockets=args.sockets,
                inference=args.inference,
            )
            for a, b in pairs
        ]
    rows = []
    for cell in cells:
        row = measure_cell(
            cell,
            args.endpoint,
            bodies,
            args.threads,
            args.connections,
            args.seconds,
            args.warmup,
            tuple(args.open_loop),
            args.sla_ms,
        )
        rows.append(row)
        print(" ".join(f"{k}={row.get(k)}" for k in COLUMNS), flush=True)
    markdown = markdown_tables(rows)
    print(markdown)
    if args.out:
        write_tables(args.out, COLUMNS, rows, markdown)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
        try:
            for path in plot(rows, args.out.parent, args.out.stem):
                print(f"wrote {path}")
        except ImportError:
            print(
                "matplotlib missing: no plots (install the extra: CTR_FARM_EXTRAS=dev,bench"
                " bash scripts/install)",
                file=sys.stderr,
            )


def markdown_tables(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(k)) for k in COLUMNS) + " |" for r in rows]
    curve_rows = [(r, point) for r in rows for point in r["open_loop"]]
    if curve_rows:
        cols = [
            "workers",
            "pool_size",
            "load_fraction",
            "offered_rps",
            "ok_rps",
            "goodput_rps",
            "ok_p50_ms",
            "ok_p99_ms",
            "errors",
        ]
        lines += [
            "",
            "Open loop (latency from each request's due time):",
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "---|" * len(cols),
        ]
        for r, point in curve_rows:
            merged = {**r, **point}
            lines.append("| " + " | ".join(_fmt(merged.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)
