"""Decode time of 1000 candidates per form (objects, rows, columns) x JSON / msgpack.

``FeatureSpace.decode`` on the ``candidates`` Raw of a /rank body (benchmarks/decode.py);
with --against REV, app/features.py of that git revision side by side, interleaved. E.g.

flock /tmp/ctr-farm-cpu.lock .venv/bin/python scripts/bench_decode.py --against HEAD~1 \\
    --out docs/results/decode
.venv/bin/python scripts/bench_decode.py --quick                 # smoke, a second
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import load
from benchmarks.decode import CURRENT, features_at, markdown, measure, parts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--against", metavar="REV", help="also time app/features.py of this revision")
    p.add_argument("--n", type=int, default=1000, help="candidates (1000)")
    p.add_argument("--rounds", type=int, default=30, help="measured rounds (30)")
    p.add_argument("--batch", type=int, default=20, help="calls per implementation per round")
    p.add_argument("--parts", action="store_true", help="also the objects form's parts")
    p.add_argument("--quick", action="store_true", help="smoke: 2 rounds of 2 calls, n 50")
    p.add_argument("--out", type=Path, help="write <out>.md and <out>.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.rounds, args.batch, args.n = 2, 2, 50
    from app.features import FeatureSpace

    implementations = {}
    if args.against:
        implementations[args.against] = features_at(args.against).FeatureSpace
    implementations[CURRENT] = FeatureSpace
    rows = measure(implementations, load(), args.n, args.rounds, args.batch)
    table = markdown(rows)
    if args.parts:
        split = parts(load(), args.n, args.rounds, args.batch)
        lines = ["| kind | part (objects form) | p50 ms |", "|---|---|---|"]
        lines += [f"| {r['kind']} | {r['part']} | {r['p50_ms']:.3f} |" for r in split]
        table += "\n\n" + "\n".join(lines)
    command = " ".join([".venv/bin/python scripts/bench_decode.py", *(argv or sys.argv[1:])])
    print(table)
    print(f"(load average {os.getloadavg()[0]:.2f})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": command, "machine": platform.processor() or platform.machine()}
        args.out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        text = f"# Candidate decode time\n\n`{command}`\n\n{table}\n"
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
