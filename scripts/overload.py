"""Offered load at a multiple of capacity against a fresh farm; goodput under an SLA.

    .venv/bin/python scripts/overload.py --sla-ms 100 --factor 2 --overload-s 60 \
        --out docs/results/overload.json

The fault suite runs the same study with short durations (tests/faults/test_overload.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.stack import running
from benchmarks.overload import measure


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sla-ms", type=int, default=100)
    parser.add_argument("--factor", type=float, default=2.0, help="offered load / capacity")
    parser.add_argument("--n", type=int, default=1000, help="candidates per /rank")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--capacity-s", type=float, default=5.0)
    parser.add_argument("--overload-s", type=float, default=10.0, help="per round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="overload phases, each between two capacity phases"
    )
    parser.add_argument("--max-conns", type=int, default=0, help="upstream_max_conns")
    parser.add_argument(
        "--heavy-lane-bytes", type=int, default=10_000, help="heavy_lane_bytes (0: no lane)"
    )
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    settings = {
        "workers": args.workers,
        "upstream_max_conns": args.max_conns,
        "heavy_lane_bytes": args.heavy_lane_bytes,
    }
    with running(Path(tempfile.mkdtemp(prefix="ovl-")), settings) as stack:
        figures = measure(
            stack.url,
            args.workers,
            sla_ms=args.sla_ms,
            factor=args.factor,
            n=args.n,
            capacity_s=args.capacity_s,
            overload_s=args.overload_s,
            rounds=args.rounds,
        )
    text = json.dumps(figures.as_dict(), indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
