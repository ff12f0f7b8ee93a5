"""Regenerate docs/status.png: the status page of a real farm under load, in headless Chromium.

    flock /tmp/ctr-farm-cpu.lock .venv/bin/python scripts/status_screenshot.py

Starts the stack (nginx + 2 workers, the bundled models) with the same versions served as
a canary at 50% (so the canary panel has something to show), opens ``/status`` in
Chromium (tests/browser.py), sends the soak's mixed /rank + /predict load to 127.0.0.1
in three phases of different rates so the charts move, and screenshots the page.
Bounded: every phase, the browser and the stack stop after ``--seconds`` or fail.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import REPO_ROOT
from app.stack import running
from benchmarks.soak import OpenLoad, mixed_bodies
from tests.browser import Chromium

CANARY = {"steps": [0.5, 1.0], "step_s": 600}
RATES = (15.0, 40.0, 25.0)  # requests/s of each phase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "status.png")
    parser.add_argument("--seconds", type=float, default=45.0, help="load time, all phases")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1600)
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="farm-shot-"))
    with running(run_dir, {"workers": 2, "canary": CANARY}, timeout_s=180.0) as stack:
        mix = mixed_bodies(stack.config, seed=11)
        with Chromium(args.width, args.height, timeout_s=30.0) as chromium:
            chromium.open(f"{stack.url}/status")
            chromium.wait_for("Number(document.body.dataset.polls) >= 1")
            phase_s = args.seconds / len(RATES)
            for i, rate in enumerate(RATES):
                load = OpenLoad(stack.url, mix, rate, phase_s).start()
                if i == len(RATES) - 1:  # the picture while the last phase runs
                    time.sleep(phase_s * 0.8)
                    if chromium.errors:
                        raise SystemExit(f"the page reported errors: {chromium.errors}")
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    chromium.screenshot(args.out)
                shots = load.join()
                failed = sum(s.status != 200 for s in shots)
                print(f"{len(shots)} requests at {rate:g}/s, {failed} not 200")
    shutil.rmtree(run_dir, ignore_errors=True)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
