"""AutoInt / DeepFM against their arithmetic bound on this CPU (benchmarks/bound.py).

flock /tmp/ctr-farm-cpu.lock .venv/bin/python scripts/bound.py --out docs/results/bound.md
.venv/bin/python scripts/bound.py --repeats 2 --batches 10 --gemm-min-time 0.01   # smoke
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# One BLAS thread, set before numpy loads: the bound is single-thread, like the farm's ORT.
os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import REPO_ROOT
from app.offline import logs
from app.registry import versions
from benchmarks.bound import (
    Runner,
    cascade_flop_ratio,
    markdown,
    profile_markdown,
    profile_ops,
    study,
)
from benchmarks.cli import int_list


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "models",
        nargs="*",
        type=Path,
        help="version dirs or .onnx files (default: every version under models/)",
    )
    parser.add_argument("--batches", type=int_list, default=(100, 1000))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--gemm-min-time", type=float, default=0.2)
    parser.add_argument("--cascade", default="100,1000", help="stage1_k,n of the FLOP ratio")
    parser.add_argument(
        "--profile", type=int, default=0, help="also ORT-profile each model at this batch"
    )
    parser.add_argument("--profile-runs", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    paths = args.models or [
        v for name in ("deepfm", "autoint") for v in versions(REPO_ROOT / "models" / name)
    ]
    rows, machine = study(paths, args.batches, args.repeats, args.warmup, args.gemm_min_time)
    text = markdown(rows, machine)
    k, n = (int(v) for v in args.cascade.split(","))
    labels = {r.label for r in rows}
    if {n, k} <= set(args.batches):
        lines = ["", f"Cascade A({n}) / (D({n}) + A({k})):", ""]
        for d in sorted(x for x in labels if x.startswith("deepfm/")):
            for a in sorted(x for x in labels if x.startswith("autoint/")):
                flops, measured = cascade_flop_ratio(rows, d, a, n, k)
                lines.append(
                    f"- {d} + {a}: FLOP ratio **{flops:.2f}x**, measured model-only p50 "
                    f"ratio {measured:.2f}x"
                )
        text += "\n".join(lines) + "\n"
    if args.profile:
        ids = logs.generate(args.profile, 1000).id_matrix()
        work = REPO_ROOT / "run" / "bound-profiles"
        profiles = {
            r.label: profile_ops(r.onnx_path, ids, args.profile_runs, work)
            for r in map(Runner, paths)
        }
        text += "\n" + profile_markdown(profiles, args.profile)
    sys.stdout.write(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
