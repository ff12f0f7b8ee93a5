"""Two model lineups over HTTP, side by side (benchmarks/version_ab.py), e.g.

flock /tmp/ctr-farm-cpu.lock .venv/bin/python scripts/version_ab.py 1,1 2,2 --rounds 100
(each lineup: deepfm version,autoint version under models/)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import REPO_ROOT
from benchmarks.version_ab import Lineup, markdown, measure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("lineups", nargs="+", help="DEEPFM_VERSION,AUTOINT_VERSION")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--stage1-k", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    models = REPO_ROOT / "models"
    lineups = [
        Lineup(models / "deepfm" / d, models / "autoint" / a)
        for d, a in (x.split(",") for x in args.lineups)
    ]
    samples = measure(lineups, args.n, args.stage1_k, args.rounds, args.warmup)
    text = markdown(samples)
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
