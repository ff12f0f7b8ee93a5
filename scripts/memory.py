"""RSS of one worker process per pool size, and ORT time per call, per session variant.

Variants: ``separate`` (every session its own weights and arena), ``shared weights``
(``share_weights``), ``shared weights+arena`` (``share_weights`` + ``shared_arena``).
Each (pool, variant) is a fresh child process; see benchmarks/memory.py. E.g.

flock /tmp/ctr-farm-cpu.lock .venv/bin/python scripts/memory.py --out docs/results/memory
.venv/bin/python scripts/memory.py --pools 1,2 --calls 2 --repeats 1   # smoke, ~10 s
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cli import int_list, setting
from benchmarks.memory import (
    VARIANTS,
    grid,
    markdown_table,
    ratios,
    spawn,
    stack_rss,
    stack_table,
    summarize,
)

VARIANT_FLAGS = {name: key for key, name in VARIANTS.items()}
DEFAULT_VARIANTS = "separate,shared weights,shared weights+arena"


def variant_list(text: str) -> tuple[tuple[bool, bool], ...]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANT_FLAGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"variants are {sorted(VARIANT_FLAGS)}; got {unknown}")
    return tuple(VARIANT_FLAGS[n] for n in names)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pools", type=int_list, default=(1, 2, 3, 4, 5, 6), help="[1..6]")
    p.add_argument("--variants", type=variant_list, default=variant_list(DEFAULT_VARIANTS), help="")
    p.add_argument(
        "--set",
        dest="settings",
        type=setting,
        action="append",
        metavar="LABEL:KEY=VALUE,...",
        help="Config overrides every variant also runs with, side by side (repeatable),"
        " e.g. --set 'pattern on:mem_pattern=true' --set 'pattern off:mem_pattern=false'",
    )
    p.add_argument("--repeats", type=int, default=2, help="child runs per cell [2]")
    p.add_argument("--calls", type=int, default=100, help="rankings per caller thread [100]")
    p.add_argument("--callers", type=int, default=0, help="caller threads [the pool size]")
    p.add_argument("--n", type=int, default=1000, help="candidates per ranking [1000]")
    p.add_argument("--stage1-k", type=int, default=100, help="[100]")
    p.add_argument(
        "--stack",
        type=int,
        metavar="REQUESTS",
        help="instead: the real stack (nginx + 2 gunicorn workers) per (pool, variant),"
        " worker RSS after boot and after REQUESTS /rank calls",
    )
    p.add_argument("--out", type=Path, help="write <out>.md, <out>.csv and <out>.json")
    return p.parse_args(argv)


def main_stack(args: argparse.Namespace, argv: list[str] | None) -> None:
    t0 = time.monotonic()
    runs = []
    for probe in grid(
        args.pools, args.variants, 1, args.settings or (("", {}),), n=args.n, stage1_k=args.stage1_k
    ):
        print(f"[memory] stack pool={probe.pool_size} {probe.variant}", file=sys.stderr)
        runs.append(stack_rss(probe, requests=args.stack))
    table = stack_table(runs)
    seconds = round(time.monotonic() - t0, 1)
    command = " ".join([".venv/bin/python", "scripts/memory.py", *(argv or sys.argv[1:])])
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        text = [
            "# Worker RSS in the real stack (nginx + gunicorn, uvicorn workers)",
            "",
            f"Command: `{command}` ({seconds} s). VmRSS in MiB of each gunicorn worker after",
            f"boot (models loaded and warmed up) and after {args.stack} POST /rank of"
            f" {args.n} candidates (stage1_k {args.stage1_k}) from 12 client threads;"
            " inference = executor.",
            "",
            table,
            "",
        ]
        args.out.with_suffix(".md").write_text("\n".join(text))
        args.out.with_suffix(".json").write_text(json.dumps(runs, indent=1))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.stack:
        main_stack(args, argv)
        return
    probes = grid(
        args.pools,
        args.variants,
        args.repeats,
        args.settings or (("", {}),),
        calls=args.calls,
        callers=args.callers,
        n=args.n,
        stage1_k=args.stage1_k,
    )
    t0 = time.monotonic()
    results = []
    for i, probe in enumerate(probes, 1):
        print(f"[memory] {i}/{len(probes)} pool={probe.pool_size} {probe.variant}", file=sys.stderr)
        results.append(spawn(probe))
    rows = summarize(results)
    table = markdown_table(rows)
    rel = {key: ratios(rows, key) for key in ("ort_ms_p50", "cpu_ms_p50", "after_VmRSS_mib")}
    seconds = round(time.monotonic() - t0, 1)
    command = " ".join([".venv/bin/python", "scripts/memory.py", *(argv or sys.argv[1:])])
    print(table)
    for key, values in rel.items():
        for name, value in values.items():
            print(f"{key}: {name} = {value:.2f}x")
    print(f"({seconds} s, load average {os.getloadavg()[0]:.2f})")
    if args.out:
        write(args.out, rows, rel, results, command, table, seconds)


def write(out: Path, rows, rel, results, command: str, table: str, seconds: float) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    lines = [
        "# Worker memory and ORT time per call, per pool size",
        "",
        f"Command: `{command}` ({seconds} s; {machine}).",
        "",
        "One fresh worker-like process per row (`Farm(config).load()`, warm-up included),",
        "then `callers` threads x `calls` cascade rankings (n candidates, stage1_k kept).",
        "RSS in MiB from /proc/self/status, median over repeats; `ORT ms/call` = stage-1 +",
        "stage-2 model time of one ranking (wall, so it includes waiting for one of the 2",
        "cores); `CPU ms/call` = the calling thread's CPU time for the whole ranking",
        "(intra_threads = 1: ORT runs on that thread), the cache-thrash signal.",
        "",
        table,
        "",
        "Ratios:",
        "",
        *(
            f"- {key}: {name} = {value:.2f}x"
            for key, vals in rel.items()
            for name, value in vals.items()
        ),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    # Per-call samples stay out (they are summarized in rows); the rest of every run stays.
    runs = [{k: v for k, v in r.items() if k != "samples"} for r in results]
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "runs": runs}, indent=1))
    print(f"[memory] wrote {out.with_suffix('.md')}, .csv, .json", file=sys.stderr)


if __name__ == "__main__":
    main()
