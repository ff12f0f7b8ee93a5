"""Issue 5's /predict targets, measured in ONE run, cells alternating round by round.

    .venv/bin/python scripts/predict_targets.py --rounds 2 --seconds 6 --warmup 2 \
        --out /tmp/targets.csv

Cells (each round starts every cell afresh, in this order; wrk -t4 -c100, the same 200
varied one-candidate bodies as ``ctr-farm sweep``):

    hello        the farm's default (2 workers x pool 1), ``GET /hello`` through nginx
    predict      the same farm, ``POST /predict``
    nobatch      the same farm with micro-batching off (``predict_batch_max`` 1)
    predict_1x1  1 worker x pool 1 (one process, one inference thread), ``/predict``
    peer         gunicorn gthread + Falcon WSGI + one session per worker, 2 workers,
                 direct (no nginx), as ``scripts/compare_peers.py`` runs it

Ratios per round (and their median over rounds):

    scaling      best farm /predict cell / predict_1x1            (target >= 1.95)
    vs_hello     predict / hello                                  (target >= 0.9)
    vs_peer      predict / peer                                   (target >= 2)

Worker classes: the farm's app is ASGI (uvicorn's worker); gthread/sync/gevent would
need a WSGI app, and the gthread peer is that comparison (no second WSGI farm here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.stack import running
from benchmarks.peers import session_cpu_seconds, start_peer
from benchmarks.throughput import cpu_seconds, run_wrk, write_bodies, write_tables

#: Cell -> (farm overrides, or None for the gthread peer; endpoint).
CELLS: dict[str, tuple[dict[str, Any] | None, str]] = {
    "hello": ({"workers": 2, "pool_size": 1}, "hello"),
    "predict": ({"workers": 2, "pool_size": 1}, "predict"),
    "nobatch": ({"workers": 2, "pool_size": 1, "predict_batch_max": 1}, "predict"),
    "predict_1x1": ({"workers": 1, "pool_size": 1}, "predict"),
    "peer": (None, "predict"),
}
FARM_PREDICT = ("predict", "nobatch")
COLUMNS = [
    "round",
    "cell",
    "rps",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "non2xx",
    "socket_errors",
    "cpu_us_per_request",
]


@contextmanager
def _target(cell: str) -> Iterator[tuple[str, Callable[[], float]]]:
    """(base URL, CPU seconds so far of its serving processes) of a running cell."""
    overrides, _ = CELLS[cell]
    if overrides is None:
        with start_peer("gthread-falcon", workers=2, endpoints=("predict",)) as peer:
            yield peer.url, lambda: session_cpu_seconds(peer.session_ids)
        return
    run_dir = Path(tempfile.mkdtemp(prefix="tgt-"))  # short: unix socket paths
    # Closed-loop peak throughput: no heavy lane (as ctr-farm sweep and compare_peers),
    # no per-client rate limit (wrk is one client; /hello passes its 10,000/s default).
    with running(run_dir, {"heavy_lane_bytes": 0, "rate_limit_rps": 0, **overrides}) as stack:
        pids = stack.worker_pids()
        yield stack.url, lambda: sum(cpu_seconds(pids).values())


def measure(cell: str, bodies: Path, args: argparse.Namespace) -> dict[str, Any]:
    endpoint = CELLS[cell][1]
    source = Path("GET") if endpoint == "hello" else bodies
    with _target(cell) as (url, cpu):
        run_wrk(f"{url}/{endpoint}", source, args.threads, args.connections, args.warmup)
        cpu0, t0 = cpu(), time.monotonic()
        result = run_wrk(f"{url}/{endpoint}", source, args.threads, args.connections, args.seconds)
        used = cpu() - cpu0
    row = {"cell": cell, **result, "elapsed_s": round(time.monotonic() - t0, 2)}
    row["cpu_us_per_request"] = round(used / max(result["requests"], 1) * 1e6, 1)
    return row


def ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The three targets' ratios of one round's rows."""
    rps = {r["cell"]: r["rps"] for r in rows}
    best = max((rps[c] for c in FARM_PREDICT if c in rps), default=None)

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    return {
        "scaling": ratio(best, rps.get("predict_1x1")),
        "vs_hello": ratio(rps.get("predict"), rps.get("hello")),
        "vs_peer": ratio(rps.get("predict"), rps.get("peer")),
    }


TARGETS = {"scaling": 1.95, "vs_hello": 0.9, "vs_peer": 2.0}


def markdown(rows: list[dict[str, Any]], per_round: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(k)) for k in COLUMNS) + " |" for r in rows]
    lines += ["", "| round | " + " | ".join(TARGETS) + " |", "|---|" + "---|" * len(TARGETS)]
    for i, rs in enumerate(per_round, 1):
        lines.append(f"| {i} | " + " | ".join(str(rs[k]) for k in TARGETS) + " |")
    medians = {
        k: round(statistics.median(v), 3) if (v := [rs[k] for rs in per_round if rs[k]]) else None
        for k in TARGETS
    }
    lines.append("| median | " + " | ".join(str(medians[k]) for k in TARGETS) + " |")
    lines.append("| target | " + " | ".join(f">= {t}" for t in TARGETS.values()) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated of {list(CELLS)}")
    p.add_argument("--rounds", type=int, default=2, help="every cell once per round")
    p.add_argument("--seconds", type=int, default=6, help="measured seconds per cell")
    p.add_argument("--warmup", type=int, default=2, help="warm-up seconds per cell")
    p.add_argument("--threads", type=int, default=4, help="wrk threads")
    p.add_argument("--connections", type=int, default=100, help="wrk connections")
    p.add_argument("--out", type=Path, help="CSV output (a .md table is written beside it)")


def run(args: argparse.Namespace) -> None:
    cells = [c for c in args.cells.split(",") if c]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        raise SystemExit(f"unknown cells {unknown}; known: {list(CELLS)}")
    rows: list[dict[str, Any]] = []
    per_round: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tgt-bodies-") as tmp:
        bodies = write_bodies(Path(tmp) / "bodies.txt", "predict", 1, 200, 1)
        for i in range(1, args.rounds + 1):
            these = []
            for cell in cells:
                row = {"round": i, **measure(cell, bodies, args)}
                these.append(row)
                print(" ".join(f"{k}={row.get(k)}" for k in COLUMNS), flush=True)
            rows += these
            per_round.append(ratios(these))
            print(f"round {i} ratios: {json.dumps(per_round[-1])}", flush=True)
    table = markdown(rows, per_round)
    print(table)
    if args.out:
        write_tables(args.out, COLUMNS, rows, table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
