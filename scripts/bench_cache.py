"""When the first stage's score cache pays: /rank latency, cache off vs on, by repeat rate.

In-process, the real models; see benchmarks/cache.py for the workload. E.g.

flock /tmp/ctr-farm-cpu.lock .venv/bin/python scripts/bench_cache.py --out docs/results/cache
.venv/bin/python scripts/bench_cache.py --quick   # tiny grid (the smoke test), ~10 s
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
from benchmarks import cache
from benchmarks.cli import int_list

QUICK = {"entries": (2000,), "pool": 400, "n": 100, "rounds": 6, "warmup": 2, "stage1_k": 20}


def rate_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated shares: {text!r}") from exc
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"expected shares between 0 and 1: {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = cache.Grid()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=rate_list, help="shares of repeated candidates [0,0.5,0.9]")
    p.add_argument("--entries", type=int_list, help=f"cache sizes (rows) [{d.entries[0]}]")
    p.add_argument("--pool", type=int, help=f"distinct rows of the context [{d.pool}]")
    p.add_argument("--n", type=int, help=f"candidates per request [{d.n}]")
    p.add_argument("--stage1-k", type=int, help=f"[{d.stage1_k}]")
    p.add_argument("--rounds", type=int, help=f"measured rounds per cell [{d.rounds}]")
    p.add_argument("--warmup", type=int, help=f"unmeasured rounds per cell [{d.warmup}]")
    p.add_argument("--ttl-s", type=float, help=f"cache_ttl_s [{d.ttl_s:g}]")
    p.add_argument("--quick", action="store_true", help="tiny grid (smoke test); flags win")
    p.add_argument("--out", type=Path, help="write results.json and report.md here")
    return p.parse_args(argv)


def grid_from(args: argparse.Namespace) -> cache.Grid:
    values = {**(QUICK if args.quick else {})}
    for name in ("entries", "pool", "n", "stage1_k", "rounds", "warmup", "ttl_s"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if args.repeat is not None:
        values["rates"] = args.repeat
    return cache.Grid(**values)


def log(msg: str) -> None:
    print(f"[bench_cache] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    grid = grid_from(args)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTR_FARM_")}
    config = load(env=env)
    t0 = time.monotonic()
    cells = cache.measure(config, grid, log)
    extra = {
        "command": " ".join([".venv/bin/python", "scripts/bench_cache.py", *sys.argv[1:]]),
        "lookup_cost": cache.lookup_cost(n=grid.n, entries=max(grid.entries)),
        "loadavg_end": list(os.getloadavg()),
        "seconds": round(time.monotonic() - t0, 1),
    }
    rep = cache.report(grid, cells, extra)
    table = cache.table(cells)
    cost = extra["lookup_cost"]
    side = [
        f"look up {grid.n} rows (90% cached) + store the misses, full cache of"
        f" {max(grid.entries)}: "
        + ", ".join(f"{k.removesuffix('_us')} {v:.0f} us" for k, v in cost.items()),
    ]
    print(table.text() + "\n\n" + "\n".join(side))
    print(f"({extra['seconds']} s; load average {extra['loadavg_end'][0]:.2f})")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(rep, indent=2) + "\n")
        md = ["# Result cache", "", f"Command: `{rep['command']}`", "", table.markdown(), ""]
        (args.out / "report.md").write_text("\n".join([*md, *side, ""]))
        log(f"wrote {args.out}/results.json, {args.out}/report.md")


if __name__ == "__main__":
    main()
