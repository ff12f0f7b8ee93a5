"""Every issue-5 graph variant against version 1, side by side (benchmarks/variants.py).

flock /tmp/ctr-farm-cpu.lock .venv/bin/python scripts/model_variants.py \
    --out docs/results/issue5_variants.md
.venv/bin/python scripts/model_variants.py --batches 10 --repeats 2 --option-repeats 2  # smoke
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ["OPENBLAS_NUM_THREADS"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import REPO_ROOT
from benchmarks.cli import int_list
from benchmarks.variants import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models-root", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "run" / "variants")
    parser.add_argument("--batches", type=int_list, default=(1000, 100))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--option-repeats", type=int, default=15)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the quantiser's advice on every call
    text = run(args.models_root, args.work_dir, args.batches, args.repeats, args.option_repeats)
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
