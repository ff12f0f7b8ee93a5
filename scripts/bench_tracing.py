"""What tracing costs per request, in process: off vs sampled-out vs memory vs stdout.

The Falcon app over a loaded Farm per variant (benchmarks/tracing.py; "off-again" is a
second untraced farm: the noise floor), a one-candidate
/predict and a /rank of --rank-n candidates, interleaved rounds. E.g.

flock /tmp/ctr-farm-cpu.lock .venv/bin/python scripts/bench_tracing.py --out docs/results/tracing
.venv/bin/python scripts/bench_tracing.py --quick          # smoke, a few seconds
.venv/bin/python scripts/bench_tracing.py --variants off   # one variant (e.g. on another checkout)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import load
from benchmarks.tracing import VARIANTS, markdown, measure


def variant_list(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    if not names or set(names) - set(VARIANTS):
        raise argparse.ArgumentTypeError(f"variants are {', '.join(VARIANTS)}; got {text!r}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", type=variant_list, default=VARIANTS, help=",".join(VARIANTS))
    p.add_argument("--rank-n", type=int, default=1000, help="candidates per /rank (1000)")
    p.add_argument("--rounds", type=int, default=20, help="measured rounds (20)")
    p.add_argument("--predict-batch", type=int, default=200, help="/predict per round (200)")
    p.add_argument("--rank-batch", type=int, default=10, help="/rank per round (10)")
    p.add_argument("--quick", action="store_true", help="smoke: 3 rounds, tiny batches")
    p.add_argument("--out", type=Path, help="directory for results.json and report.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.rounds, args.predict_batch, args.rank_batch, args.rank_n = 3, 5, 2, 100
    config = load(overrides={"warmup_runs": 1})  # the configured models; env and file apply
    rows = measure(
        config, args.variants, args.rank_n, args.rounds, args.predict_batch, args.rank_batch
    )
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        command = "python scripts/bench_tracing.py " + " ".join(argv or sys.argv[1:])
        meta = {"command": command, "machine": platform.processor() or platform.machine()}
        (args.out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
        (args.out / "report.md").write_text(f"# Tracing overhead\n\n`{command}`\n\n{table}\n")


if __name__ == "__main__":
    main()
