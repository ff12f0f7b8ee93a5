"""Generate synthetic iPinYou-style impression logs.

    python scripts/make_logs.py --rows 1000000 --seed 1 --neg-ratio 150 \
        --out data/logs_train.parquet

The format follows the extension (.parquet or .csv). Prints a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run as `python scripts/make_logs.py` from the repo root: make `app` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.offline import logs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, required=True, help="impressions sampled")
    parser.add_argument("--seed", type=int, required=True, help="which impressions are drawn")
    parser.add_argument(
        "--neg-ratio",
        type=float,
        default=None,
        help="keep all clicks and ~this many non-clicks per click (e.g. 150)",
    )
    parser.add_argument("--base-ctr", type=float, default=logs.DEFAULT_BASE_CTR)
    parser.add_argument("--out", type=Path, required=True, help=".parquet or .csv")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    table = logs.generate(args.rows, args.seed, base_ctr=args.base_ctr, neg_ratio=args.neg_ratio)
    path = logs.write(table, args.out)
    clicks = int(table[logs.LABEL].sum())
    summary = {
        "rows": table.n_rows,
        "clicks": clicks,
        "ctr": round(clicks / table.n_rows, 6),
        "neg_sampling_rate": table.meta["neg_sampling_rate"],
        "path": str(path),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
