"""ORT time per call per session setting, side by side in one process (alternating runs).

benchmarks/session_options.py. E.g.

flock /tmp/ctr-farm-cpu.lock .venv/bin/python scripts/bench_session_options.py \\
    --set 'prepack on:prepack_weights=true' --set 'prepack off:prepack_weights=false'
.venv/bin/python scripts/bench_session_options.py --quick --set a:mem_pattern=true \\
    --set b:mem_pattern=false                                    # smoke, a second
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cli import setting
from benchmarks.session_options import DEFAULT_CASES, markdown, measure


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--set",
        dest="settings",
        type=setting,
        action="append",
        required=True,
        metavar="LABEL:KEY=VALUE,...",
        help="a labelled set of Config overrides (repeat: the first is the reference)",
    )
    p.add_argument("--cases", default=",".join(DEFAULT_CASES), help="model@rows,...")
    p.add_argument("--runs", type=int, default=200, help="measured runs per setting (200)")
    p.add_argument("--quick", action="store_true", help="smoke: 3 runs, two small cases")
    p.add_argument("--out", type=Path, help="write <out>.md and <out>.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if args.quick:
        args.runs, cases = 3, ["deepfm@10", "autoint@1"]
    rows = measure(args.settings, cases, args.runs, warmup=1 if args.quick else 5)
    table = markdown(rows)
    command = " ".join(
        [".venv/bin/python scripts/bench_session_options.py", *(argv or sys.argv[1:])]
    )
    print(table)
    print(f"(load average {os.getloadavg()[0]:.2f})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(
            json.dumps({"command": command, "rows": rows}, indent=1)
        )
        text = f"# ORT time per call per session setting\n\n`{command}`\n\n{table}\n"
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
