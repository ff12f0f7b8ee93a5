"""ctr-farm against what a user would pick instead: same models, bodies and machine.

    .venv/bin/python scripts/compare_peers.py                # 10 s cells, the full table
    .venv/bin/python scripts/compare_peers.py --quick        # 2 s cells (smoke run)
    .venv/bin/python scripts/compare_peers.py --endpoints rank --targets ctr-farm,litserve \
        --out docs/results/peers.csv                         # + docs/results/peers.md

For each endpoint and target: start the target (one at a time, loopback only), check
its answer to the first body against the farm's, warm up with wrk, then measure with
wrk (closed loop, equal threads and connections for every target, the same bodies).
The farm is measured through nginx, its real deployment; the peers directly, theirs.
Ratios: farm/peer for RPS (above 1: the farm serves more), peer/farm for latencies
(above 1: the peer is slower). The peers run in ``.venv-peers`` (created on first use).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from app.stack import running
from benchmarks.peers import PEERS, session_cpu_seconds, start_peer
from benchmarks.throughput import run_wrk, write_bodies, write_tables

#: target -> (peer name or None for the farm, workers; None = --workers)
TARGETS: dict[str, tuple[str | None, int | None]] = {
    "ctr-farm": (None, None),
    "fastapi-1w": ("fastapi", 1),
    "fastapi-2w": ("fastapi", 2),
    "litserve": ("litserve", None),
    "gthread-falcon": ("gthread-falcon", None),
}
DEFAULT_CONNECTIONS = {"predict": 32, "rank": 8}
COLUMNS = [
    "endpoint",
    "target",
    "workers",
    "connections",
    "rps",
    "p50_ms",
    "p99_ms",
    "non2xx",
    "socket_errors",
    "cpu_cores",
    "rps_farm_over_peer",
    "p50_peer_over_farm",
    "p99_peer_over_farm",
    "agrees",
    "error",
]


@contextlib.contextmanager
def start_target(
    target: str, endpoint: str, workers: int, farm_pool_size: int
) -> Iterator[tuple[str, list[int]]]:
    """(base URL, session ids of its processes) of a running target."""
    peer, fixed = TARGETS[target]
    if peer is None:
        run_dir = Path(tempfile.mkdtemp(prefix="cmp-"))  # short: unix socket paths
        try:
            # Closed-loop peak throughput: more connections than slots must queue, not be
            # refused by the heavy lane (the overload study measures that; RELIABILITY.md).
            overrides = {"workers": workers, "pool_size": farm_pool_size, "heavy_lane_bytes": 0}
            with running(run_dir, overrides) as stack:
                assert stack.gunicorn is not None and stack.nginx is not None
                yield stack.url, [stack.gunicorn.pid, stack.nginx.pid]
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        return
    with start_peer(peer, workers=fixed or workers, endpoints=(endpoint,)) as running_peer:
        yield running_peer.url, running_peer.session_ids


def post_first(url: str, endpoint: str, bodies: Path) -> Any:
    """The decoded answer to the first body (a correctness check before measuring)."""
    body = bodies.open("rb").readline().strip()
    host, _, port = url.split("//", 1)[1].partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", f"/{endpoint}", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"{url}/{endpoint} answered {resp.status}: {data[:300]!r}")
    return json.loads(data)


def agrees(endpoint: str, answer: Any, reference: Any) -> bool | None:
    if reference is None:
        return None
    if endpoint == "rank":
        return [r["index"] for r in answer["rankings"]] == [
            r["index"] for r in reference["rankings"]
        ]
    return bool(np.allclose(answer["ctr"], reference["ctr"], rtol=1e-5, atol=1e-7))


def measure(
    args: argparse.Namespace, target: str, endpoint: str, bodies: Path, reference: Any
) -> tuple[dict[str, Any], Any]:
    workers = TARGETS[target][1] or args.workers
    connections = args.connections or DEFAULT_CONNECTIONS[endpoint]
    row: dict[str, Any] = {
        "endpoint": endpoint,
        "target": target,
        "workers": workers,
        "connections": connections,
    }
    answer = None
    try:
        with start_target(target, endpoint, args.workers, args.farm_pool_size) as (url, sids):
            answer = post_first(url, endpoint, bodies)
            row["agrees"] = agrees(endpoint, answer, reference)
            run_wrk(f"{url}/{endpoint}", bodies, args.threads, connections, args.warmup)
            cpu0, t0 = session_cpu_seconds(sids), time.monotonic()
            result = run_wrk(f"{url}/{endpoint}", bodies, args.threads, connections, args.seconds)
            cpu, elapsed = session_cpu_seconds(sids) - cpu0, time.monotonic() - t0
        row.update({k: result[k] for k in ("rps", "p50_ms", "p99_ms", "non2xx", "socket_errors")})
        row["cpu_cores"] = round(cpu / elapsed, 2)
    except Exception as exc:  # one broken target must not lose the others' numbers
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        print(f"{endpoint} {target}: {row['error']}", file=sys.stderr, flush=True)
    return row, answer


def add_ratios(rows: list[dict[str, Any]]) -> None:
    farm = {r["endpoint"]: r for r in rows if r["target"] == "ctr-farm" and "rps" in r}
    for r in rows:
        f = farm.get(r["endpoint"])
        if f is None or "rps" not in r:
            continue
        r["rps_farm_over_peer"] = round(f["rps"] / r["rps"], 2) if r["rps"] else None
        r["p50_peer_over_farm"] = round(r["p50_ms"] / f["p50_ms"], 2) if f["p50_ms"] else None
        r["p99_peer_over_farm"] = round(r["p99_ms"] / f["p99_ms"], 2) if f["p99_ms"] else None


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 100 else f"{value:.2f}"
    return str(value)


MD_COLUMNS = [
    ("endpoint", "endpoint"),
    ("target", "target"),
    ("workers", "workers"),
    ("connections", "conns"),
    ("rps", "RPS"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("non2xx", "non-2xx"),
    ("cpu_cores", "CPU cores"),
    ("rps_farm_over_peer", "RPS farm/peer"),
    ("p50_peer_over_farm", "p50 peer/farm"),
    ("p99_peer_over_farm", "p99 peer/farm"),
    ("agrees", "same answer"),
]


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, started: str) -> str:
    lines = [
        f"ctr-farm vs peers — {started}, {os.cpu_count()} cores, load average at start"
        f" {os.getloadavg()[0]:.2f}; wrk -t{args.threads}, {args.seconds} s cells after"
        f" {args.warmup} s warm-up; /predict 1 candidate, /rank {args.rank_candidates}"
        " candidates (top_k 10, stage1_k 100). ctr-farm through nginx (its deployment),"
        " peers direct (theirs).",
        "",
        "| " + " | ".join(title for _, title in MD_COLUMNS) + " |",
        "|" + "---|" * len(MD_COLUMNS),
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['endpoint']} | {r['target']} | failed: {r['error']} |")
            continue
        lines.append("| " + " | ".join(fmt(r.get(key)) for key, _ in MD_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--endpoints", default="predict,rank", help="comma-separated")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated")
    p.add_argument("--workers", type=int, default=2, help="worker processes of every target")
    p.add_argument("--farm-pool-size", type=int, default=1, help="farm sessions per model")
    p.add_argument("--seconds", type=int, default=10, help="measured seconds per cell")
    p.add_argument("--warmup", type=int, default=3, help="warm-up seconds per cell")
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument(
        "--connections", type=int, default=None, help="wrk connections (default 32 predict, 8 rank)"
    )
    p.add_argument("--rank-candidates", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="2 s cells, 1 s warm-up (smoke run)")
    p.add_argument("--out", type=Path, help="CSV output; a .md table is written beside it")
    args = p.parse_args()
    if args.quick:
        args.seconds, args.warmup = 2, 1
    endpoints = [e for e in args.endpoints.split(",") if e]
    targets = [t for t in args.targets.split(",") if t]
    for name in targets:
        if name not in TARGETS:
            p.error(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    for endpoint in endpoints:
        if endpoint not in DEFAULT_CONNECTIONS:
            p.error(f"unknown endpoint {endpoint!r}")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    print(
        f"python {platform.python_version()}; peers: "
        + "; ".join(f"{k}: {v.description}" for k, v in PEERS.items()),
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cmp-bodies-") as tmp:
        for endpoint in endpoints:
            n = 1 if endpoint == "predict" else args.rank_candidates
            count = 200 if endpoint == "predict" else 40
            bodies = write_bodies(Path(tmp) / f"{endpoint}.txt", endpoint, n, count, seed=1)
            reference = None
            # The farm first: its answer to the first body is every peer's reference.
            for target in sorted(targets, key=lambda t: t != "ctr-farm"):
                row, answer = measure(args, target, endpoint, bodies, reference)
                if target == "ctr-farm":
                    reference = answer
                rows.append(row)
                print(" ".join(f"{k}={row.get(k)}" for k in COLUMNS if k in row), flush=True)
    add_ratios(rows)
    table = markdown(rows, args, started)
    print(table)
    if args.out:
        write_tables(args.out, COLUMNS, rows, table)
    if any(r.get("error") or r.get("agrees") is False for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
