"""Throughput sweep: wrk against the real stack, one farm per configuration cell.

For each cell the harness starts nginx + gunicorn with the cell's settings, warms
up, runs wrk (closed loop: wrk's latencies suffer from coordinated omission, so read
them as service times under that concurrency, not as user-visible latency at a fixed
rate), and reads the per-worker split from nginx's access log.
"""

from __future__ import annotations

import collections
import csv
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from app.config import load
from app.sessions import read_card
from app.stack import running
from benchmarks.openloop import run_open_loop
from benchmarks.ranking import candidates

WRK_SCRIPT = Path(__file__).parent / "wrk" / "bodies.lua"


def write_bodies(path: Path, endpoint: str, n: int, count: int, seed: int) -> Path:
    """``count`` varied request bodies, one per line (the wrk script's input)."""
    config = load(env={})
    card = read_card(config.model_dirs()[config.predict_model])
    rng = np.random.default_rng(seed)
    with path.open("wb") as fh:
        for _ in range(count):
            cands = candidates(card, n, rng)
            if endpoint == "predict":
                body: dict[str, Any] = {"candidate": cands[0]} if n == 1 else {"candidates": cands}
            else:
                body = {"candidates": cands, "top_k": 10, "stage1_k": min(100, n)}
            fh.write(msgspec.json.encode(body) + b"\n")
    return path


def run_wrk(url: str, bodies: Path, threads: int, connections: int, seconds: float) -> dict:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (scripts/install installs it)")
    out = subprocess.run(
        [
            wrk,
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "10s",
            "-s",
            str(WRK_SCRIPT),
            url,
            "--",
            str(bodies),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 60,
    )
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("JSON "))
    return json.loads(line[5:])


def worker_split(access_log: Path, since_bytes: int) -> dict[str, int]:
    """Requests per upstream (worker socket) in the access log after ``since_bytes``."""
    counts: collections.Counter[str] = collections.Counter()
    with access_log.open("rb") as fh:
        fh.seek(since_bytes)
        for line in fh:
            counts[json.loads(line)["upstream"].rsplit("/", 1)[-1]] += 1
    return dict(sorted(counts.items()))


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each process."""
    out = {}
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out[pid] = (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in ticks
    return out


def measure_cell(
    overrides: dict[str, Any],
    endpoint: str,
    bodies: Path,
    threads: int,
    connections: int,
    seconds: float,
    warmup_s: float,
    load_fractions: tuple[float, ...] = (),
    sla_ms: float = 50.0,
) -> dict[str, Any]:
    """One farm, one wrk measurement; then, for each of ``load_fractions``, an open-loop
    run offering that fraction of the measured RPS (latency at load, no coordinated
    omission)."""
    run_dir = Path(tempfile.mkdtemp(prefix="sweep-"))
    curve: list[dict[str, float]] = []
    try:
        # Closed-loop peak throughput: wrk's connections beyond the slots queue in the
        # workers instead of being refused by nginx's heavy lane (unless a cell sets it).
        with running(run_dir, {"heavy_lane_bytes": 0, **overrides}) as stack:
            url = f"{stack.url}/{endpoint}"
            run_wrk(url, bodies, threads, connections, warmup_s)
            time.sleep(1.2)  # access log flushes every second
            log = stack.config.run_path / "access.log"
            offset = log.stat().st_size
            pids = stack.worker_pids()
            cpu0, t0 = cpu_seconds(pids), time.monotonic()
            result = run_wrk(url, bodies, threads, connections, seconds)
            cpu1, elapsed = cpu_seconds(pids), time.monotonic() - t0
            time.sleep(1.2)
            split = worker_split(log, offset)
            payloads = bodies.read_bytes().splitlines()
            for fraction in load_fractions:
                rate = max(1.0, fraction * result["rps"])
                point = run_open_loop(url, payloads, rate, seconds).summary(sla_ms=sla_ms)
                curve.append({"load_fraction": fraction, **point})
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    total = sum(split.values()) or 1
    used = {pid: cpu1[pid] - cpu0[pid] for pid in pids}
    cpu_total = sum(used.values()) or 1.0
    return {
        **overrides,
        "endpoint": endpoint,
        **result,
        "worker_cpu_cores": round(cpu_total / elapsed, 2),
        # Requests per upstream socket (nginx's view) and CPU per worker process (the
        # kernel's view: the only one that sees the split behind a shared socket).
        "upstream_share": {k: round(v / total, 3) for k, v in split.items()},
        "worker_cpu_share": sorted(round(u / cpu_total, 3) for u in used.values()),
        "cpu_us_per_request": round(cpu_total / max(result["requests"], 1) * 1e6, 1),
        "open_loop": curve,
    }


def write_tables(out: Path, columns: list[str], rows: list[dict[str, Any]], markdown: str) -> None:
    """``out`` (CSV of ``columns``) and the markdown beside it (``.md``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    out.with_suffix(".md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")


def grid(**axes: list[Any]) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


def plot(rows: list[dict[str, Any]], out_dir: Path, stem: str) -> list[Path]:
    """Heatmaps of RPS and p99 over workers x pool (one per thread setting), and the
    open-loop latency-at-load curves. Needs the ``bench`` extra (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    threads = sorted({(r["intra_threads"], r["inter_threads"]) for r in rows})
    workers = sorted({r["workers"] for r in rows})
    pools = sorted({r["pool_size"] for r in rows})
    if len(workers) > 1 or len(pools) > 1:
        fig, axes = plt.subplots(2, len(threads), figsize=(4.5 * len(threads), 7), squeeze=False)
        for col, (intra, inter) in enumerate(threads):
            for row_i, (metric, cmap) in enumerate((("rps", "viridis"), ("p99_ms", "magma_r"))):
                grid_ = np.full((len(workers), len(pools)), np.nan)
                for r in rows:
                    if (r["intra_threads"], r["inter_threads"]) == (intra, inter):
                        grid_[workers.index(r["workers"]), pools.index(r["pool_size"])] = r[metric]
                ax = axes[row_i][col]
                im = ax.imshow(grid_, cmap=cmap, aspect="auto")
                ax.set_xticks(range(len(pools)), [str(p) for p in pools])
                ax.set_yticks(range(len(workers)), [str(w) for w in workers])
                ax.set_xlabel("sessions per worker (pool)")
                ax.set_ylabel("worker processes")
                ax.set_title(f"{metric}, intra:inter {intra}:{inter}")
                for (i, j), v in np.ndenumerate(grid_):
                    if not np.isnan(v):
                        light = im.norm(v) > 0.5 if cmap == "viridis" else im.norm(v) < 0.5
                        color = "k" if light else "w"
                        ax.text(j, i, f"{v:.0f}", ha="center", va="center", color=color)
                fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = out_dir / f"{stem}_heatmap.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    curves = [r for r in rows if r.get("open_loop")]
    if curves:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for r in curves:
            pts = r["open_loop"]
            threads_ = f"{r['intra_threads']}:{r['inter_threads']}"
            label = f"{r['workers']}w x pool {r['pool_size']} ({threads_})"
            ax.plot(
                [p["offered_rps"] for p in pts], [p["ok_p99_ms"] for p in pts], "o-", label=label
            )
        ax.set_xlabel("offered load (requests/s, open loop)")
        ax.set_ylabel("p99 latency of 200s (ms)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{stem}_latency_at_load.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
