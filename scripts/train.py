"""Train DeepFM and/or AutoInt on synthetic logs and write models/<name>/<version>/.

    python scripts/train.py --model all --out models --version 1

Defaults are the settings of the committed models. Valid and test data are never
down-sampled; train is down-sampled to ``--neg-ratio`` non-clicks per click (``none`` to
disable), and the exported graph is calibrated back. Prints one JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# Run as `python scripts/train.py` from the repo root: make `app` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.offline import logs
from app.offline import train as trainer

DEFAULTS = {
    "rows_train": 3_000_000,
    "rows_valid": 500_000,
    "rows_test": 1_000_000,
    "epochs": 3,
    "neg_ratio": 150.0,
}


def _neg_ratio(text: str) -> float | None:
    return None if text.lower() in {"none", "0", "off"} else float(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*trainer.DEFAULT_SPECS, "all"], default="all")
    parser.add_argument(
        "--rows-train",
        type=int,
        default=DEFAULTS["rows_train"],
        help="train impressions sampled (before down-sampling)",
    )
    parser.add_argument("--rows-valid", type=int, default=DEFAULTS["rows_valid"])
    parser.add_argument("--rows-test", type=int, default=DEFAULTS["rows_test"])
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="max epochs")
    parser.add_argument("--patience", type=int, default=1, help="epochs without AUC gain")
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--version", default="1")
    parser.add_argument("--neg-ratio", type=_neg_ratio, default=DEFAULTS["neg_ratio"])
    parser.add_argument("--base-ctr", type=float, default=logs.DEFAULT_BASE_CTR)
    parser.add_argument("--seed", type=int, default=0, help="torch seed (init, shuffling)")
    parser.add_argument("--seed-train", type=int, default=1)
    parser.add_argument("--seed-valid", type=int, default=2)
    parser.add_argument("--seed-test", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    data_cfg = trainer.DataConfig(
        rows_train=args.rows_train,
        rows_valid=args.rows_valid,
        rows_test=args.rows_test,
        seed_train=args.seed_train,
        seed_valid=args.seed_valid,
        seed_test=args.seed_test,
        neg_ratio=args.neg_ratio,
        base_ctr=args.base_ctr,
    )
    train_cfg = trainer.TrainConfig(
        epochs=args.epochs, patience=args.patience, seed=args.seed, threads=args.threads
    )
    data = trainer.make_datasets(data_cfg)
    names = list(trainer.DEFAULT_SPECS) if args.model == "all" else [args.model]
    for name in names:
        summary = trainer.run(name, data, data_cfg, train_cfg, args.out, args.version)
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
