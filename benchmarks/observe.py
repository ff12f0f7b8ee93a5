"""Hot-path cost of the observability: drift accumulation, SLA accounting, the request log.

Run in one process over the real models, with prometheus_client in multiprocess mode as
in the workers (``scripts/bench_observe.py`` sets ``PROMETHEUS_MULTIPROC_DIR`` before
anything imports it). Two measurements:

1. ``micro``: microseconds per call of each piece as the hot path calls it (median of
   ``repeats`` timings of ``number`` calls): the drift monitor on a 1000-candidate
   ``/rank`` batch (1 row in 8 sampled, the default, and every row) and on a one-row
   ``/predict`` batch; ``Goodput.record``; ``RequestLog.record`` with its writer
   running; and what ``/stats`` and ``/metrics`` cost to build (they read every worker's
   metric files).
2. ``ab``: whole requests through the ASGI app (falcon's ``ASGIConductor``: the real
   middleware, lifespan and farm), request log off vs on, in interleaved rounds, for
   ``/predict`` (1 candidate) and ``/rank`` (1000): per-request microseconds of each
   variant (median over rounds), wall time and the process's CPU time including the
   writer thread's turn after the round, and on - off per round (median, quartiles):
   the request log's cost end to end, with the noise it is measured in.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import falcon.testing
import msgspec
import numpy as np

from app import metrics
from app.api import create_app
from app.config import Config, load
from app.drift import DriftMonitor
from app.goodput import Goodput
from app.requestlog import FLUSH_INTERVAL_S, RequestLog, Row
from app.sessions import read_card
from app.stats import build

MSGPACK = "application/msgpack"


def per_call_us(fn: Callable[[], Any], number: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of ``number`` calls, in microseconds."""
    times = timeit.repeat(fn, number=number, repeat=repeats)
    return round(statistics.median(times) / number * 1e6, 3)


def random_ids(config: Config, n: int, seed: int = 0) -> np.ndarray:
    card = read_card(config.model_dirs()[config.stages[0].model])
    vocab = np.array([f.vocab_size for f in card.fields])
    return (np.random.default_rng(seed).random((n, len(vocab))) * vocab).astype(np.int64)


def micro(config: Config, number: int = 2000, repeats: int = 7) -> dict[str, float]:
    key = f"{config.stages[0].model}/1"
    card = read_card(config.model_dirs()[config.stages[0].model])
    ids = random_ids(config, 1000)
    scores = np.random.default_rng(1).random(1000).astype(np.float32) * 0.02
    out: dict[str, float] = {}
    for every in (config.drift_sample_every, 1):
        drift = DriftMonitor(load(env={}, overrides={"drift_sample_every": every}))
        drift.add(key, card)
        out[f"drift_rank_1000_every_{every}_us"] = per_call_us(
            lambda d=drift: d.record(key, ids, scores), number // 10, repeats
        )
    drift = DriftMonitor(config)
    drift.add(key, card)
    out["drift_predict_1_us"] = per_call_us(
        lambda: drift.record(key, ids[:1], scores[:1]), number, repeats
    )
    goodput = Goodput(config)
    out["goodput_record_us"] = per_call_us(
        lambda: goodput.record("/rank", 200, 12.0), number, repeats
    )
    with tempfile.TemporaryDirectory(prefix="obs-bench-") as tmp:
        sink = RequestLog(Path(tmp) / "requests.db", queue_size=1_000_000)
        sink.start()
        stage_ms = {"stage1_ms": 1.0, "stage2_ms": 7.0, "total_ms": 8.5}
        models = "deepfm/1,autoint/1"
        row = Row("bench", time.time(), "/rank", 200, 1000, 9.0, 0.5, stage_ms, models,
                  False, "stage2", None, "within", None, "stable", 1)  # fmt: skip
        out["request_log_record_us"] = per_call_us(lambda: sink.record(row), number, repeats)
        sink.close()
    drift.publish()
    goodput.publish()
    out["stats_build_ms"] = round(
        per_call_us(lambda: build(config, metrics.Samples(metrics.collect()), drift), 20, 5) / 1e3,
        3,
    )
    out["metrics_render_ms"] = round(per_call_us(metrics.render, 20, 5) / 1e3, 3)
    return out


async def _timed(
    conductor: falcon.testing.ASGIConductor, path: str, body: bytes, n: int
) -> tuple[float, float]:
    """Microseconds per request over ``n`` sequential requests: wall time, and the
    process's CPU time until the request log's writer has had its turn (all threads)."""
    headers = {"Content-Type": MSGPACK}
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        result = await conductor.simulate_post(path, body=body, headers=headers)
        assert result.status_code == 200, result.text
    wall = time.perf_counter() - t0
    await asyncio.sleep(FLUSH_INTERVAL_S + 0.05)  # the writer drains what this round queued
    return wall / n * 1e6, (time.process_time() - cpu0) / n * 1e6


async def _ab(
    apps: dict[str, Any], bodies: dict[str, bytes], rounds: int, per_round: dict[str, int]
) -> dict[str, dict[str, float]]:
    wall: dict[str, dict[str, list[float]]] = {p: {name: [] for name in apps} for p in bodies}
    cpu: dict[str, dict[str, list[float]]] = {p: {name: [] for name in apps} for p in bodies}
    async with (
        falcon.testing.ASGIConductor(apps["off"]) as off,
        falcon.testing.ASGIConductor(apps["on"]) as on,
    ):
        conductors = {"off": off, "on": on}
        for path, body in bodies.items():  # warm both
            for c in conductors.values():
                await _timed(c, path, body, 5)
        for r in range(rounds):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for path, body in bodies.items():
                for name in order:
                    w, c = await _timed(conductors[name], path, body, per_round[path])
                    wall[path][name].append(w)
                    cpu[path][name].append(c)
    return {path: _compare(wall[path]) | _compare(cpu[path], "cpu_") for path in bodies}


def _compare(by: dict[str, list[float]], prefix: str = "") -> dict[str, float]:
    """Medians of each variant and of the per-round difference (with its quartiles)."""
    diffs = [b - a for a, b in zip(by["off"], by["on"], strict=True)]
    q1, _, q3 = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else (diffs[0],) * 3
    return {
        f"{prefix}off_us": round(statistics.median(by["off"]), 1),
        f"{prefix}on_us": round(statistics.median(by["on"]), 1),
        f"{prefix}on_minus_off_us": round(statistics.median(diffs), 1),
        f"{prefix}diff_q1_us": round(q1, 1),
        f"{prefix}diff_q3_us": round(q3, 1),
    }


def ab(rounds: int = 20, predict_per_round: int = 200, rank_per_round: int = 20) -> dict:
    """Requests through the app with the request log off and on (interleaved rounds)."""
    with tempfile.TemporaryDirectory(prefix="obs-ab-") as tmp:
        base = {"run_dir": tmp, "warmup_runs": 1, "inference": "inline"}
        configs = {
            "off": load(env={}, overrides=base),
            "on": load(env={}, overrides={**base, "request_log": "requests.db"}),
        }
        apps = {name: create_app(c) for name, c in configs.items()}
        ids = random_ids(configs["off"], 1000, seed=2)
        bodies = {
            "/predict": msgspec.msgpack.encode({"candidates": ids[:1].tolist()}),
            "/rank": msgspec.msgpack.encode({"candidates": ids.tolist()}),
        }
        per_round = {"/predict": predict_per_round, "/rank": rank_per_round}
        return asyncio.run(_ab(apps, bodies, rounds, per_round))


def text(result: dict[str, Any]) -> str:
    lines = ["per call (median):"]
    lines += [f"  {k:<34} {v}" for k, v in result["micro"].items()]
    lines.append("whole requests in-process, request log off vs on (us per request):")
    for path, r in result["ab"].items():
        for what, p in (("wall", ""), ("cpu", "cpu_")):
            spread = f"rounds' quartiles {r[p + 'diff_q1_us']} .. {r[p + 'diff_q3_us']}"
            lines.append(
                f"  {path:<9} {what:<4} off {r[p + 'off_us']:>8}  on {r[p + 'on_us']:>8}"
                f"  on-off {r[p + 'on_minus_off_us']:>6} ({spread})"
            )
    return "\n".join(lines)
