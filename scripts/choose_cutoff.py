"""Sweep stage1_k on held-out logs; pick the largest that fits a latency budget.

Prints recall@10 (vs single-stage AutoInt) and p50/p99 latency per stage1_k, then the
largest stage1_k whose p99 fits --budget-ms, and writes it as a config fragment the farm
loads (CTR_FARM_CONFIG=deploy/cutoff.toml). See benchmarks/cutoff.py. E.g.

flock /tmp/ctr-farm-cpu.lock .venv/bin/python scripts/choose_cutoff.py --budget-ms 15 \\
    --out deploy/cutoff.toml --report docs/results/cutoff
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import load
from benchmarks import cutoff, fidelity
from benchmarks.cli import sorted_int_set
from benchmarks.ranking import InProcess


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = cutoff.Sweep()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget-ms", type=float, default=d.budget_ms, help=f"[{d.budget_ms:g}]")
    p.add_argument("--n", type=int, default=d.n, help=f"candidates per request [{d.n}]")
    p.add_argument(
        "--stage1-k",
        type=sorted_int_set,
        default=d.stage1_ks,
        help=f"values to sweep [{','.join(map(str, d.stage1_ks))}]",
    )
    p.add_argument("--requests", type=int, default=d.requests, help=f"[{d.requests}]")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"unmeasured rounds [{d.warmup}]")
    p.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help=f"held-out log seed, never one the models were trained on [{d.seed}]",
    )
    p.add_argument("--out", type=Path, help="write the chosen cutoff as a TOML config fragment")
    p.add_argument("--report", type=Path, help="write <report>.md and <report>.json")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[choose_cutoff] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sweep = cutoff.Sweep(
        budget_ms=args.budget_ms,
        n=args.n,
        stage1_ks=args.stage1_k,
        requests=args.requests,
        warmup=args.warmup,
        seed=args.seed,
    )
    # The farm as configured (file/env), so the fragment keeps its cascade's models.
    config = load()
    sweep.check(config)
    command = " ".join([".venv/bin/python", "scripts/choose_cutoff.py", *(argv or sys.argv[1:])])
    t0 = time.monotonic()
    local = InProcess(load(overrides={"warmup_runs": 3}))
    try:
        cards = [m.card for m in local.farm.models.values()]
        held = fidelity.held_out_requests(cards, sweep.n, sweep.requests, sweep.seed)
        samples = cutoff.measure(local, held, sweep, log)
    finally:
        local.close()
    rows = cutoff.summarize(samples, sweep.n)
    chosen = cutoff.choose(rows, sweep.budget_ms)
    table = cutoff.table(rows, chosen, sweep)
    seconds = round(time.monotonic() - t0, 1)
    print(table.text() + "\n")
    if chosen is None:
        print(f"no stage1_k fits a p99 of {sweep.budget_ms:g} ms; nothing written")
    else:
        print(
            f"largest stage1_k with p99 <= {sweep.budget_ms:g} ms: {chosen['stage1_k']}"
            f" (p99 {chosen['p99']:.2f} ms, recall@10 {chosen['recall_mean']:.3f})"
        )
    print(f"({seconds} s; load average {os.getloadavg()[0]:.2f})")
    if args.report:
        md = ["# Choosing stage1_k for a latency budget", "", f"Command: `{command}`", ""]
        md += [table.markdown(), "", f"({seconds} s)", ""]
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.with_suffix(".md").write_text("\n".join(md))
        rep = cutoff.report(rows, chosen, sweep) | {"command": command, "seconds": seconds}
        args.report.with_suffix(".json").write_text(json.dumps(rep, indent=2) + "\n")
    if chosen is None:
        return 1
    if args.out:
        path = cutoff.write_fragment(args.out, cutoff.cutoff_toml(config, chosen, sweep, command))
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
