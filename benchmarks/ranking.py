"""Ranking latency study: single-stage vs multi-stage, in-process and over HTTP.

The two modes are measured interleaved (single, multi, single, ...) on the same
payloads in one run, so the speedup is a ratio of side-by-side samples rather than
of two runs on a noisy machine. Over HTTP the farm is started by this harness
(real nginx + gunicorn on a free loopback port) unless ``--url`` names one.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
import numpy as np

from app.config import Config
from app.schema import ModelCard, RankRequest
from app.service import Farm
from app.sessions import read_card
from app.stack import running


def candidates(card: ModelCard, n: int, rng: np.random.Generator) -> list[dict[str, int]]:
    """``n`` candidates in the reference API's form (objects keyed by field name)."""
    cols = {f.name: rng.integers(0, f.vocab_size, n).tolist() for f in card.fields}
    return [{name: cols[name][i] for name in cols} for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


@dataclass
class Series:
    """Samples (ms) of one measured quantity."""

    samples: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        s = self.samples
        return {
            "mean": statistics.fmean(s),
            "p50": percentile(s, 50),
            "p95": percentile(s, 95),
            "p99": percentile(s, 99),
            "min": min(s),
            "max": max(s),
        }


@dataclass
class ModeResult:
    client: Series = field(default_factory=Series)
    stage1: Series = field(default_factory=Series)
    stage2: Series = field(default_factory=Series)
    server_total: Series = field(default_factory=Series)

    def add(self, client_ms: float, latency: dict[str, float]) -> None:
        self.client.samples.append(client_ms)
        self.stage1.samples.append(latency["stage1_ms"])
        self.stage2.samples.append(latency["stage2_ms"])
        self.server_total.samples.append(latency["total_ms"])


def speedup_ci(single: list[float], multi: list[float], rng: np.random.Generator) -> tuple:
    """Median ratio single/multi with a 95% bootstrap confidence interval."""
    a, b = np.asarray(single), np.asarray(multi)
    point = float(np.median(a) / np.median(b))
    boots = [
        np.median(rng.choice(a, a.size)) / np.median(rng.choice(b, b.size)) for _ in range(1000)
    ]
    return point, float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


Bodies = dict[str, list[bytes]]
MODES = ("single", "multi")


def run_http(url: str, bodies: Bodies, repeats: int, warmup: int) -> dict[str, ModeResult]:
    results = {mode: ModeResult() for mode in MODES}
    headers = {"Content-Type": "application/json"}
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(warmup + repeats):
            for mode in MODES:
                body = bodies[mode][i % len(bodies[mode])]
                t0 = time.perf_counter()
                resp = client.post("/rank", content=body, headers=headers)
                elapsed = (time.perf_counter() - t0) * 1e3
                resp.raise_for_status()
                if i >= warmup:
                    results[mode].add(elapsed, msgspec.json.decode(resp.content)["latency"])
    return results


def run_in_process(
    config: Config, bodies: Bodies, repeats: int, warmup: int
) -> dict[str, ModeResult]:
    """The same payloads through decode + pipeline in this process (no HTTP)."""
    farm = Farm(config)
    farm.load()
    decoder = msgspec.json.Decoder(RankRequest)
    results = {mode: ModeResult() for mode in MODES}
    try:
        for i in range(warmup + repeats):
            for mode in MODES:
                body = bodies[mode][i % len(bodies[mode])]
                t0 = time.perf_counter()
                request = decoder.decode(body)
                result = farm.rank(request, "json")
                elapsed = (time.perf_counter() - t0) * 1e3
                if i >= warmup:
                    results[mode].add(elapsed, result.latency)
    finally:
        farm.close()
    return results


@contextmanager
def farm_url(url: str | None, overrides: dict) -> Iterator[str]:
    if url:
        yield url
        return
    with running(Path(tempfile.mkdtemp(prefix="bench-")), overrides) as stack:
        yield stack.url


def make_bodies(config: Config, n: int, top_k: int, stage1_k: int, count: int, seed: int) -> Bodies:
    """``count`` distinct JSON bodies per mode; mode i-th bodies share their candidates."""
    card = read_card(config.model_dirs()[config.stages[0].model])
    rng = np.random.default_rng(seed)
    sets = [candidates(card, n, rng) for _ in range(count)]
    return {
        mode: [
            msgspec.json.encode(
                {
                    "candidates": c,
                    "top_k": top_k,
                    "stage1_k": stage1_k,
                    "multi_stage": mode == "multi",
                }
            )
            for c in sets
        ]
        for mode in MODES
    }
