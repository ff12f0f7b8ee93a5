"""INT8 quantisation / graph optimisation / execution provider study of the farm's models.

    .venv/bin/python scripts/quantize.py --out docs/results/quantize.md
    .venv/bin/python scripts/quantize.py --quick --work-dir /tmp/q   # smoke run, < 1 min

Quantised and optimised models are written under --work-dir only, never into models/.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import REPO_ROOT
from benchmarks.quantize import (
    DEFAULT_BATCHES,
    QUICK_BATCHES,
    QUICK_TEST_SEED,
    StudyConfig,
    run_study,
    to_csv,
    to_markdown,
    write_report,
)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="deepfm,autoint", help="comma-separated names")
    parser.add_argument("--models-root", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "run" / "quantize")
    parser.add_argument(
        "--out",
        type=Path,
        help="markdown report (+ .csv next to it); default "
        "docs/results/quantize.md, none with --quick",
    )
    parser.add_argument("--quick", action="store_true", help="smoke preset: small and fast")
    parser.add_argument("--batches", type=_ints, help=f"default {DEFAULT_BATCHES}")
    parser.add_argument("--repeats", type=int, help="timed rounds per batch size (200)")
    parser.add_argument("--warmup", type=int, help="warm-up runs per variant and batch (10)")
    parser.add_argument(
        "--test-rows", type=int, help="held-out rows (300_000; 0 = the card's whole test set)"
    )
    parser.add_argument(
        "--test-seed",
        type=int,
        help="generate a fresh held-out set with this seed instead "
        "of (a prefix of) the card's test set",
    )
    parser.add_argument("--calib-rows", type=int, help="static calibration rows (20_000)")
    parser.add_argument("--variants", default="", help="only these variants (+ fp32)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> StudyConfig:
    cfg = StudyConfig()
    if args.quick:
        cfg = StudyConfig(
            batches=QUICK_BATCHES,
            repeats=20,
            warmup=2,
            payloads=4,
            test_rows=20_000,
            test_seed=QUICK_TEST_SEED,
            calib_rows=1_000,
            load_repeats=1,
            quick=True,
        )
    overrides = {
        "batches": args.batches,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "test_rows": args.test_rows,
        "test_seed": args.test_seed,
        "calib_rows": args.calib_rows,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    cfg.only = tuple(v for v in args.variants.split(",") if v)
    return cfg


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # The quantiser logs every tensor at INFO on the root logger: keep the root at WARNING.
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    if not args.quick:
        logging.getLogger("benchmarks").setLevel(logging.INFO)
    cfg = config_from(args)
    names = [n for n in args.models.split(",") if n]
    result = run_study(args.models_root, names, args.work_dir, cfg)
    markdown, csv_text = to_markdown(result), to_csv(result)
    sys.stdout.write(markdown)
    out = args.out or (None if args.quick else REPO_ROOT / "docs" / "results" / "quantize.md")
    if out is not None:
        md_path, csv_path = write_report(out, markdown, csv_text)
        print(f"wrote {md_path} and {csv_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
