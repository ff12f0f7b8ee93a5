"""/rank end to end per body form: in-process vs a worker's socket vs nginx (two clients).

benchmarks/http_overhead.py; one stack of one worker and one in-process farm, interleaved
rounds. E.g.

flock /tmp/ctr-farm-cpu.lock .venv/bin/python scripts/bench_http.py --out docs/results/http
.venv/bin/python scripts/bench_http.py --quick                 # smoke, ~15 s
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.http_overhead import (
    FORMS,
    KINDS,
    PATHS,
    bodies,
    markdown,
    measure,
    paths_for,
    summarize,
)


def names(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        out = tuple(v.strip() for v in text.split(",") if v.strip())
        if not out or set(out) - set(allowed):
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}; got {text!r}")
        return out

    return parse


def override(text: str) -> tuple[str, object]:
    """``key=value`` (the value as JSON, else a string) -> a Config override."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value; got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000, help="candidates (1000)")
    p.add_argument("--stage1-k", type=int, default=100, help="(100)")
    p.add_argument("--forms", type=names(FORMS), default=FORMS, help=",".join(FORMS))
    p.add_argument("--kinds", type=names(KINDS), default=KINDS, help=",".join(KINDS))
    p.add_argument("--paths", type=names(PATHS), default=PATHS, help=",".join(PATHS))
    p.add_argument("--rounds", type=int, default=100, help="measured rounds (100)")
    p.add_argument("--warmup", type=int, default=10, help="unmeasured rounds first (10)")
    p.add_argument("--intra-threads", type=int, default=1, help="(1)")
    p.add_argument(
        "--set",
        dest="overrides",
        type=override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Config override for the stack and the in-process farm (repeatable)",
    )
    p.add_argument("--quick", action="store_true", help="smoke: 2 rounds, n 50")
    p.add_argument("--out", type=Path, help="write <out>.md and <out>.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.n, args.stage1_k = 2, 1, 50, 20
    overrides = {"intra_threads": args.intra_threads, "warmup_runs": 1, **dict(args.overrides)}
    with paths_for(overrides, args.paths) as paths:
        from app.config import load

        payloads = bodies(load(env={}), args.n, args.stage1_k, args.forms, args.kinds)
        samples = measure(paths, payloads, args.rounds, args.warmup)
    rows = summarize(samples, payloads)
    table = markdown(rows)
    command = " ".join([".venv/bin/python scripts/bench_http.py", *(argv or sys.argv[1:])])
    print(table)
    print(f"(load average {os.getloadavg()[0]:.2f})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": command, "machine": platform.processor() or platform.machine()}
        args.out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        args.out.with_suffix(".md").write_text(f"# /rank over HTTP\n\n`{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
