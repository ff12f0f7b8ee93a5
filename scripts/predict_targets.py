"""Issue 5's /predict targets in one run (benchmarks/predict_targets.py).

.venv/bin/python scripts/predict_targets.py --rounds 2 --seconds 6 --warmup 2
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from benchmarks.predict_targets import main

main()
