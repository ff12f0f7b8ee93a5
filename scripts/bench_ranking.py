"""Single- vs multi-stage ranking latency, in-process and over HTTP through nginx.

.venv/bin/python scripts/bench_ranking.py --n 1000 --stage1-k 100 --top-k 10 --repeats 200
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import onnxruntime

from app.config import load
from benchmarks.ranking import (
    MODES,
    farm_url,
    make_bodies,
    run_http,
    run_in_process,
    speedup_ci,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="candidates per request")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--stage1-k", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=200, help="measured requests per mode")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--payloads", type=int, default=20, help="distinct request bodies")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--url", help="measure a running farm instead of starting one")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--intra-threads", type=int, default=1)
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    overrides = {"workers": args.workers, "intra_threads": args.intra_threads}
    config = load(overrides=overrides)
    bodies = make_bodies(config, args.n, args.top_k, args.stage1_k, args.payloads, args.seed)
    runs = {}
    if not args.skip_in_process:
        runs["in-process"] = run_in_process(config, bodies, args.repeats, args.warmup)
    with farm_url(args.url, overrides) as url:
        runs["http"] = run_http(url, bodies, args.repeats, args.warmup)

    rng = np.random.default_rng(0)
    report: dict = {
        "params": vars(args) | {"json": None},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "ort": onnxruntime.__version__,
        },
    }
    print(f"n={args.n} stage1_k={args.stage1_k} top_k={args.top_k} repeats={args.repeats}")
    print(
        f"{'where':<11} {'mode':<7} {'mean':>7} {'p50':>7} {'p95':>7} {'p99':>7}"
        f" {'stage1':>7} {'stage2':>7}   (ms)"
    )
    for where, results in runs.items():
        for mode in MODES:
            r = results[mode]
            c = r.client.summary()
            s1, s2 = r.stage1.summary()["mean"], r.stage2.summary()["mean"]
            print(
                f"{where:<11} {mode:<7} {c['mean']:7.2f} {c['p50']:7.2f} {c['p95']:7.2f}"
                f" {c['p99']:7.2f} {s1:7.2f} {s2:7.2f}"
            )
            report[f"{where}/{mode}"] = {
                "client": c,
                "stage1": r.stage1.summary(),
                "stage2": r.stage2.summary(),
                "server_total": r.server_total.summary(),
            }
        point, lo, hi = speedup_ci(
            results["single"].client.samples, results["multi"].client.samples, rng
        )
        report[f"{where}/speedup_p50"] = {"point": point, "ci95": [lo, hi]}
        print(f"{where:<11} speedup single/multi (p50): {point:.2f}x  [95% CI {lo:.2f}-{hi:.2f}]")
    if "in-process" in runs:
        overhead = (
            report["http/multi"]["client"]["p50"] / report["in-process/multi"]["client"]["p50"]
        )
        report["http_overhead_multi_p50"] = overhead
        print(f"HTTP overhead (multi, p50 http / in-process): {overhead:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
