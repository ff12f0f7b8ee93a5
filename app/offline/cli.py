"""``ctr-farm make-logs`` and ``ctr-farm train``: the data and training commands.

    ctr-farm make-logs --rows 1000000 --seed 3 --out data/logs_test.parquet
    ctr-farm train --model all --out models --version 1     # needs the train extra (torch)

Training imports torch, so :mod:`app.offline.train` is imported only when ``train`` runs:
``ctr-farm --help`` and every other command work without the train extra.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from app.errors import CommandError
from app.offline import logs

#: The trainable architectures (``app.offline.train.DEFAULT_SPECS``, which needs torch).
MODELS = ("deepfm", "autoint")
#: The settings of the committed models.
TRAIN_DEFAULTS = {
    "rows_train": 3_000_000,
    "rows_valid": 500_000,
    "rows_test": 1_000_000,
    "epochs": 3,
    "neg_ratio": 150.0,
}


# -- make-logs ---------------------------------------------------------------------------------
def make_logs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, required=True, help="impressions sampled")
    parser.add_argument("--seed", type=int, required=True, help="which impressions are drawn")
    parser.add_argument(
        "--neg-ratio",
        type=float,
        default=None,
        help="keep all clicks and ~this many non-clicks per click, e.g. 150 (default: keep all)",
    )
    parser.add_argument(
        "--base-ctr", type=float, default=logs.DEFAULT_BASE_CTR, help="expected click rate"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output file: .parquet or .csv (its format)"
    )


def make_logs(args: argparse.Namespace) -> None:
    """Generate logs (deterministic, seeded) and print a one-line JSON summary."""
    try:
        table = logs.generate(
            args.rows, args.seed, base_ctr=args.base_ctr, neg_ratio=args.neg_ratio
        )
        path = logs.write(table, args.out)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    clicks = int(table[logs.LABEL].sum())
    summary = {
        "rows": table.n_rows,
        "clicks": clicks,
        "ctr": round(clicks / table.n_rows, 6),
        "neg_sampling_rate": table.meta["neg_sampling_rate"],
        "path": str(path),
    }
    print(json.dumps(summary))


# -- train -------------------------------------------------------------------------------------
def _neg_ratio(text: str) -> float | None:
    return None if text.lower() in {"none", "0", "off"} else float(text)


def train_arguments(parser: argparse.ArgumentParser) -> None:
    d = TRAIN_DEFAULTS
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all", help="what to train")
    parser.add_argument(
        "--rows-train",
        type=int,
        default=d["rows_train"],
        help="train impressions sampled (before down-sampling)",
    )
    parser.add_argument("--rows-valid", type=int, default=d["rows_valid"], help="valid rows")
    parser.add_argument("--rows-test", type=int, default=d["rows_test"], help="test rows")
    parser.add_argument("--epochs", type=int, default=d["epochs"], help="max epochs")
    parser.add_argument("--patience", type=int, default=1, help="epochs without AUC gain")
    parser.add_argument("--out", type=Path, default=Path("models"), help="models root")
    parser.add_argument("--version", default="1", help="writes <out>/<model>/<version>/")
    parser.add_argument(
        "--neg-ratio",
        type=_neg_ratio,
        default=d["neg_ratio"],
        help="train non-clicks kept per click ('none': no down-sampling)",
    )
    parser.add_argument(
        "--base-ctr", type=float, default=logs.DEFAULT_BASE_CTR, help="logs' click rate"
    )
    parser.add_argument("--seed", type=int, default=0, help="torch seed (init, shuffling)")
    parser.add_argument("--seed-train", type=int, default=1, help="train logs seed")
    parser.add_argument("--seed-valid", type=int, default=2, help="valid logs seed")
    parser.add_argument("--seed-test", type=int, default=3, help="test logs seed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")


def train(args: argparse.Namespace) -> None:
    """Train, export to ONNX, verify, write model + card; one JSON line per model."""
    try:
        from app.offline import train as trainer
    except ImportError as exc:
        raise CommandError(
            f"training needs the train extra ({exc.name} is missing):"
            " CTR_FARM_EXTRAS=dev,train bash scripts/install"
        ) from exc
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
    names = list(MODELS) if args.model == "all" else [args.model]
    for name in names:
        summary = trainer.run(name, data, data_cfg, train_cfg, args.out, args.version)
        print(json.dumps(summary), flush=True)
