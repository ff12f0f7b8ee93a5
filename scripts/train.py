"""Kept for old commands and recorded results: the same as `ctr-farm train`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from app.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
