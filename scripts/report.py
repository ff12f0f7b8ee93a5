"""Latency / goodput report of a farm's request log (the ``request_log`` setting).

    .venv/bin/python scripts/report.py run/requests.db                # text report
    .venv/bin/python scripts/report.py run/requests.db --since-s 600 --out run/report

Per endpoint: requests/s, SLA outcomes and compliance, degraded share, status counts,
p50/p95/p99 latency (in the app, and from nginx's receipt), per-stage percentiles, and
requests and goodput per second over time. ``--out`` also writes goodput.png and
latency.png (matplotlib: the ``bench`` extra) and report.json. See app/report.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.report import ReportError, have_matplotlib, plot, summarize, text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("log", type=Path, help="the request log (SQLite)")
    parser.add_argument("--since-s", type=float, help="only the last N seconds of the log")
    parser.add_argument("--bucket-s", type=int, help="goodput bucket (default: <= 30 buckets)")
    parser.add_argument("--out", type=Path, help="write report.json and the plots here")
    args = parser.parse_args()
    try:
        report = summarize(args.log, since_s=args.since_s, bucket_s=args.bucket_s)
    except ReportError as exc:
        sys.exit(f"report: {exc}")
    print(text(report))
    if args.out is None:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    print(f"\nwrote {args.out / 'report.json'}")
    if not report.rows:
        return
    if not have_matplotlib():
        print("matplotlib is not installed: no plots (pip install -e '.[bench]')")
        return
    for path in plot(report, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
