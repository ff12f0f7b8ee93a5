"""Soak run: a steady mix of /rank and /predict against a fresh farm; RSS slope per worker.

    flock /tmp/ctr-farm-cpu.lock .venv/bin/python scripts/soak.py --minutes 10 --rate 100 \
        --out run/soak-10min

writes ``<out>.json`` (every figure) and ``<out>.md`` (a short table). The farm is started
on a free loopback port over the bundled models with its own run directory, and stopped
afterwards. See benchmarks/soak.py for what is measured; CI runs a 2-minute version
(tests/faults/test_soak.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.stack import running
from benchmarks.soak import markdown, soak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the load")
    p.add_argument("--rate", type=float, default=100.0, help="requests per second offered")
    p.add_argument("--warmup-s", type=float, default=60.0, help="seconds left out of the RSS fit")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("run/soak"), help="output path prefix")
    args = p.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="farm-soak-"))  # short: unix socket paths
    try:
        with running(run_dir, {"workers": args.workers}) as stack:
            result = soak(stack, args.minutes * 60, args.rate, args.warmup_s)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    report = markdown(result)
    args.out.with_suffix(".md").write_text(report)
    print(report)
    sys.exit(0 if result["failed"] == 0 else 1)


if __name__ == "__main__":
    main()
