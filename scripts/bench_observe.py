"""Hot-path cost of the observability (drift, SLA accounting, request log), in-process.

    flock /tmp/ctr-farm-cpu.lock .venv/bin/python scripts/bench_observe.py \
        --out docs/results/observe.json
    .venv/bin/python scripts/bench_observe.py --quick          # smoke, a few seconds

See benchmarks/observe.py for what is measured.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import PROMETHEUS_ENV

# prometheus_client picks its multiprocess value class when first imported: set the
# directory before anything imports it, so the figures are a worker's.
os.environ[PROMETHEUS_ENV] = tempfile.mkdtemp(prefix="obs-metrics-")
atexit.register(shutil.rmtree, os.environ[PROMETHEUS_ENV], ignore_errors=True)

from app.config import load  # noqa: E402
from benchmarks.observe import ab, micro, text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="A/B rounds (interleaved)")
    parser.add_argument("--quick", action="store_true", help="a tiny run (the smoke test)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.quick:
        result = {"micro": micro(load(env={}), number=50, repeats=2), "ab": ab(2, 5, 2)}
    else:
        result = {"micro": micro(load(env={})), "ab": ab(args.rounds)}
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    print(text(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
