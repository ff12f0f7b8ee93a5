"""Memory and ORT time per call of one worker process, per pool size, with and without
shared weights (``Config.share_weights``).

Each configuration runs in a fresh child process (``python -m benchmarks.memory --probe``)
that does what a gunicorn worker does after fork: build the :class:`~app.service.Farm`
from a Config and ``load()`` it (sessions for every model of the cascade, warm-up). It
reports, from ``/proc/self/status``:

* ``VmRSS`` / ``RssAnon`` / ``RssFile`` after the imports (``base``), after ``load()``
  (``loaded``) and after traffic (``after``): the ORT arenas of each session grow to the
  largest batch it ran, so the RSS that counts is the one after traffic;
* the traffic: ``callers`` threads (default: the pool size, so every session is busy at
  once, as in the reference topology with ``inference = "executor"``) each send
  ``calls`` cascade rankings of ``n`` candidates (DeepFM on ``n``, AutoInt on ``stage1_k``)
  through ``Pipeline.rank``. Per call: the ORT time of each stage (``stageN_model_ms``,
  the scorer's run) and the calling thread's CPU time. With ``intra_threads = 1`` ORT runs
  the graph on the calling thread, so CPU time per call is the cache-thrash signal
  independent of how the 2 cores are shared; wall time adds waiting for a core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def read_status(path: str = "/proc/self/status") -> dict[str, float]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process in MiB (Linux)."""
    out: dict[str, float] = {}
    with open(path) as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in STATUS_KEYS:
                out[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return out


@dataclass(frozen=True)
class Probe:
    """One child run: a Config (as overrides) and the traffic to send it."""

    pool_size: int
    share_weights: bool
    shared_arena: bool = False
    callers: int = 0  # 0: the pool size
    calls: int = 100
    n: int = 1000
    stage1_k: int = 100
    top_k: int = 10
    seed: int = 11
    overrides: dict[str, Any] = field(default_factory=dict)
    #: Names ``overrides`` in tables (e.g. "mem_pattern on"); "" for none.
    label: str = ""

    def config_overrides(self) -> dict[str, Any]:
        return {
            "pool_size": self.pool_size,
            "share_weights": self.share_weights,
            "shared_arena": self.shared_arena,
            "inference": "executor",
            **self.overrides,
        }

    @property
    def threads(self) -> int:
        return self.callers or self.pool_size

    @property
    def variant(self) -> str:
        return variant_name(self.share_weights, self.shared_arena, self.label)


#: (share_weights, shared_arena) -> the name a table shows.
VARIANTS = {
    (False, False): "separate",
    (True, False): "shared weights",
    (False, True): "shared arena",
    (True, True): "shared weights+arena",
}


def variant_name(share_weights: bool, shared_arena: bool, label: str = "") -> str:
    name = VARIANTS[share_weights, shared_arena]
    return f"{name}, {label}" if label else name


# -- the child -----------------------------------------------------------------------------
def _traffic(farm: Any, probe: Probe) -> dict[str, list[float]]:
    """``probe.threads`` threads x ``probe.calls`` rankings; per-call samples in ms."""
    import numpy as np

    pipeline = farm.pipeline
    card = next(iter(farm.models.values())).card
    rng = np.random.default_rng(probe.seed)
    vocab = np.array([f.vocab_size for f in card.fields])
    payloads = [(rng.random((probe.n, len(vocab))) * vocab).astype(np.int64) for _ in range(8)]
    samples: dict[str, list[float]] = {"stage1_model": [], "stage2_model": [], "cpu": []}
    lock = threading.Lock()
    start = threading.Barrier(probe.threads)

    def work(t: int) -> None:
        mine: dict[str, list[float]] = {k: [] for k in samples}
        start.wait()
        for i in range(probe.calls):
            ids = payloads[(t + i) % len(payloads)]
            c0 = time.thread_time()
            result = pipeline.rank(ids, probe.top_k, probe.stage1_k)
            mine["cpu"].append((time.thread_time() - c0) * 1e3)
            mine["stage1_model"].append(result.timings["stage1_model_ms"])
            mine["stage2_model"].append(result.timings["stage2_model_ms"])
        with lock:
            for key, values in mine.items():
                samples[key] += values

    threads = [threading.Thread(target=work, args=(t,)) for t in range(probe.threads)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    samples["wall_s"] = [time.perf_counter() - t0]
    return samples


def run_probe(probe: Probe) -> dict[str, Any]:
    """In this process: load a Farm as a worker does, measure RSS, send traffic, again."""
    from app.config import load
    from app.service import Farm

    env = {k: v for k, v in os.environ.items() if not k.startswith("CTR_FARM_")}
    config = load(overrides=probe.config_overrides(), env=env)
    base = read_status()
    farm = Farm(config)
    t0 = time.perf_counter()
    farm.load()
    load_s = time.perf_counter() - t0
    loaded = read_status()
    shared = {m.key: m.shared_initializers for m in farm.models.values()}
    samples = _traffic(farm, probe) if probe.calls else {}
    after = read_status()
    farm.close()
    return {
        "probe": asdict(probe),
        "callers": probe.threads,
        "load_s": load_s,
        "base": base,
        "loaded": loaded,
        "after": after,
        "shared_initializers": shared,
        "samples": samples,
    }


def read_pss(pid: int) -> float:
    """Proportional set size of a process in MiB (shared pages split among their users:
    the workers' common libraries and the pages they still share with the master)."""
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- the real stack -------------------------------------------------------------------------
def stack_rss(
    probe: Probe, requests: int = 600, concurrency: int = 12, workers: int = 2
) -> dict[str, Any]:
    """The real stack (nginx + gunicorn, ``app.stack.running``) with ``probe``'s settings:
    every worker's RSS after boot and after ``requests`` POST /rank of ``probe.n``
    candidates (``stage1_k`` kept) from ``concurrency`` client threads, on loopback."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import msgspec
    import numpy as np

    from app.config import load
    from app.sessions import read_card
    from app.stack import running

    card = read_card(load(env={}).model_dirs()["deepfm"])
    rng = np.random.default_rng(probe.seed)
    bodies = []
    for _ in range(8):
        cols = {f.name: rng.integers(0, f.vocab_size, probe.n).tolist() for f in card.fields}
        cands = [{k: v[i] for k, v in cols.items()} for i in range(probe.n)]
        body = {"candidates": cands, "top_k": probe.top_k, "stage1_k": probe.stage1_k}
        bodies.append(msgspec.json.encode(body))
    overrides = {**probe.config_overrides(), "workers": workers}
    headers = {"Content-Type": "application/json"}
    with running(Path(tempfile.mkdtemp(prefix="mem-")), overrides) as stack:
        pids = stack.worker_pids()
        booted = {pid: read_status(f"/proc/{pid}/status") for pid in pids}
        with httpx.Client(base_url=stack.url, timeout=60) as client:

            def send(i: int) -> int:
                return client.post("/rank", content=bodies[i % 8], headers=headers).status_code

            with ThreadPoolExecutor(concurrency) as pool:
                codes = list(pool.map(send, range(requests)))
        after = {pid: read_status(f"/proc/{pid}/status") for pid in pids}
        pss = {pid: read_pss(pid) for pid in pids}
    return {
        "probe": asdict(probe),
        "workers": workers,
        "requests": requests,
        "ok": codes.count(200),
        "booted_VmRSS_mib": [booted[p]["VmRSS"] for p in pids],
        "after_VmRSS_mib": [after[p]["VmRSS"] for p in pids],
        "after_Pss_mib": [pss[p] for p in pids],
    }


def stack_table(runs: Sequence[dict[str, Any]]) -> str:
    head = (
        "| pool | sessions | workers | RSS per worker booted | after traffic"
        " | PSS after traffic | requests ok |"
    )
    rows = [head, "|--:|--:|--:|--:|--:|--:|--:|"]
    for r in runs:
        p = r["probe"]
        rows.append(
            f"| {p['pool_size']}"
            f" | {variant_name(p['share_weights'], p['shared_arena'], p.get('label', ''))}"
            f" | {r['workers']}"
            f" | {' / '.join(f'{v:.1f}' for v in r['booted_VmRSS_mib'])}"
            f" | {' / '.join(f'{v:.1f}' for v in r['after_VmRSS_mib'])}"
            f" | {' / '.join(f'{v:.1f}' for v in r.get('after_Pss_mib', []))}"
            f" | {r['ok']}/{r['requests']} |"
        )
    return "\n".join(rows)


# -- the parent ----------------------------------------------------------------------------
def spawn(probe: Probe, timeout: float = 600) -> dict[str, Any]:
    """Run ``probe`` in a fresh interpreter (``python -m benchmarks.memory --probe``)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--probe", json.dumps(asdict(probe))],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"probe {probe} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


#: A labelled set of Config overrides every variant also runs with ("" / {}: none).
Setting = tuple[str, dict[str, Any]]


def grid(
    pools: Iterable[int],
    variants: Iterable[tuple[bool, bool]],
    repeats: int,
    settings: Sequence[Setting] = (("", {}),),
    **traffic: Any,
) -> list[Probe]:
    """Every (pool, variant, setting) ``repeats`` times, interleaved so drift hits all
    alike."""
    cells = [(p, v, s) for p in pools for v in variants for s in settings]
    return [
        Probe(p, w, a, **traffic, overrides=dict(over), label=label)
        for _ in range(repeats)
        for p, (w, a), (label, over) in cells
    ]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (pool, variant): RSS (median over repeats) and per-call ORT time."""
    by_cell: dict[tuple[int, bool, bool, str], list[dict[str, Any]]] = {}
    labels: list[str] = []
    for r in results:
        p = r["probe"]
        label = p.get("label", "")
        key = (p["pool_size"], p["share_weights"], p.get("shared_arena", False), label)
        by_cell.setdefault(key, []).append(r)
        labels += [label] if label not in labels else []
    rows = []
    for (pool, weights, arena, label), runs in sorted(
        by_cell.items(), key=lambda kv: (*kv[0][:3], labels.index(kv[0][3]))
    ):
        row: dict[str, Any] = {
            "pool_size": pool,
            "share_weights": weights,
            "shared_arena": arena,
            "variant": variant_name(weights, arena, label),
            "label": label,
            "runs": len(runs),
        }
        row["callers"] = runs[0]["callers"]
        for phase in ("base", "loaded", "after"):
            for key in ("VmRSS", "RssAnon"):
                row[f"{phase}_{key}_mib"] = statistics.median(r[phase][key] for r in runs)
        row["peak_VmHWM_mib"] = statistics.median(r["after"]["VmHWM"] for r in runs)
        row["load_s"] = statistics.median(r["load_s"] for r in runs)
        pooled: dict[str, list[float]] = {}
        for r in runs:
            for key, values in r["samples"].items():
                if key != "wall_s":
                    pooled.setdefault(key, []).extend(values)
        if pooled:
            parts = zip(pooled["stage1_model"], pooled["stage2_model"], strict=True)
            model = [a + b for a, b in parts]
            row["calls"] = len(model)
            row["ort_ms_p50"] = percentile(model, 50)
            row["ort_ms_mean"] = statistics.fmean(model)
            row["ort_ms_p99"] = percentile(model, 99)
            row["stage1_ms_p50"] = percentile(pooled["stage1_model"], 50)
            row["stage2_ms_p50"] = percentile(pooled["stage2_model"], 50)
            row["cpu_ms_p50"] = percentile(pooled["cpu"], 50)
            row["cpu_ms_mean"] = statistics.fmean(pooled["cpu"])
            walls = [r["samples"]["wall_s"][0] for r in runs]
            row["calls_per_s"] = statistics.median(
                row["callers"] * r["probe"]["calls"] / w for r, w in zip(runs, walls, strict=True)
            )
        rows.append(row)
    return rows


def ratios(rows: Sequence[dict[str, Any]], key: str = "ort_ms_p50") -> dict[str, float]:
    """``key`` at the largest pool over pool 1 (per variant), and each variant over
    ``separate`` at the largest pool; only for the cells present."""
    cell = {(r["pool_size"], r["variant"]): r.get(key) for r in rows}
    top = max(p for p, _ in cell)
    out = {}
    for variant in VARIANTS.values():
        a, b = cell.get((top, variant)), cell.get((1, variant))
        if a and b:
            out[f"{variant}: pool {top} / pool 1"] = a / b
    base = cell.get((top, "separate"))
    for variant in VARIANTS.values():
        a = cell.get((top, variant))
        if a and base and variant != "separate":
            out[f"pool {top}: {variant} / separate"] = a / base
    # Labelled settings: each over the first label of the same pool and sessions.
    first: dict[tuple[int, bool, bool], dict[str, Any]] = {}
    for r in rows:
        cell_key = (r["pool_size"], r["share_weights"], r["shared_arena"])
        ref = first.setdefault(cell_key, r)
        if r is not ref and r.get(key) and ref.get(key):
            out[f"pool {r['pool_size']}: {r['variant']} / {ref['variant']}"] = r[key] / ref[key]
    return out


COLUMNS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("pool", "pool_size", str),
    ("sessions", "variant", str),
    ("RSS loaded", "loaded_VmRSS_mib", lambda v: f"{v:.1f}"),
    ("RSS after traffic", "after_VmRSS_mib", lambda v: f"{v:.1f}"),
    ("anon after", "after_RssAnon_mib", lambda v: f"{v:.1f}"),
    ("peak (HWM)", "peak_VmHWM_mib", lambda v: f"{v:.1f}"),
    ("callers", "callers", str),
    ("ORT ms/call p50", "ort_ms_p50", lambda v: f"{v:.2f}"),
    ("ORT p99", "ort_ms_p99", lambda v: f"{v:.2f}"),
    ("CPU ms/call p50", "cpu_ms_p50", lambda v: f"{v:.2f}"),
    ("calls/s", "calls_per_s", lambda v: f"{v:.0f}"),
)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    head = "| " + " | ".join(c[0] for c in COLUMNS) + " |"
    rule = "|" + "|".join("--:" for _ in COLUMNS) + "|"
    body = [
        "| " + " | ".join(fmt(r[key]) if key in r else "-" for _, key, fmt in COLUMNS) + " |"
        for r in rows
    ]
    return "\n".join([head, rule, *body])


def _probe_main(text: str) -> None:
    raw = json.loads(text)
    result = run_probe(Probe(**raw))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="child of scripts/memory.py")
    parser.add_argument("--probe", required=True, help="a Probe as JSON")
    _probe_main(parser.parse_args().probe)
