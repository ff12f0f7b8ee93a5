"""When does the first stage's score cache pay? ``/rank`` latency with the cache off and
on, side by side, over the share of candidates that repeat.

The workload: ads repeat across page views. A context has a pool of ``pool`` candidate
rows (20k); a request holds ``n`` candidates (1000), a share ``repeat`` of them drawn
from the pool (distinct within the request) and the rest fresh rows never sent before.
Before a cell's rounds the cache is cleared and the whole pool goes through the caching
farm twice, unmeasured (a row is stored at its second miss): a repeated row then hits
while the cache holds it, i.e. unless its bucket's ways went to rows seen more recently,
or ``ttl_s`` passed.

Two in-process :class:`~app.service.Farm` (the real models, the same Config but for
``cache_entries``) answer every round's request, alternating which goes first; a request
is timed as :class:`benchmarks.ranking.InProcess` times it (decode of the JSON body and
the candidates, the cascade, the encoded response). The speedup is the ratio of the
medians of paired samples with a bootstrap CI over rounds. Per cell also: the hit rate
the cache saw over the measured rounds, and stage 1's time (where the cache acts).

Also: the cache's memory (``ScoreCache.nbytes``), and the cost of looking up one
request's rows and storing its misses, against cachetools' ``TTLCache`` behind a lock
when cachetools is installed (the choice recorded in app/cache.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import msgspec
import numpy as np

from app.cache import ScoreCache, row_hashes
from app.config import Config
from app.schema import ModelCard
from benchmarks.ranking import InProcess, Table, f2, first_stage_card, ratio_ci, summary

DEFAULT_RATES = (0.0, 0.5, 0.9)
DEFAULT_ENTRIES = (100_000,)


@dataclass(frozen=True)
class Grid:
    rates: tuple[float, ...] = DEFAULT_RATES
    entries: tuple[int, ...] = DEFAULT_ENTRIES
    pool: int = 20_000
    n: int = 1000
    stage1_k: int = 100
    top_k: int = 10
    rounds: int = 300
    warmup: int = 20
    ttl_s: float = 300.0
    seed: int = 17

    def check(self, config: Config) -> None:
        """Raise ValueError for a grid that cannot run."""
        if not self.rates or not all(0.0 <= r <= 1.0 for r in self.rates):
            raise ValueError("repeat rates must be in [0, 1]")
        if not self.entries or min(self.entries) < 1:
            raise ValueError("cache entries must be >= 1")
        if self.n < 2 or self.rounds < 1 or self.warmup < 0:
            raise ValueError("n must be >= 2, rounds >= 1, warmup >= 0")
        if round(max(self.rates) * self.n) > self.pool:
            raise ValueError("the pool must hold a request's repeated candidates")
        if (
            not self.top_k <= self.stage1_k <= config.max_candidates
            or self.n > config.max_candidates
        ):
            raise ValueError("need top_k <= stage1_k <= max_candidates and n <= max_candidates")


class Traffic:
    """Requests of one context: ``repeat`` of each from the pool, the rest fresh."""

    def __init__(self, card: ModelCard, grid: Grid, seed: int) -> None:
        self.grid = grid
        self.rng = np.random.default_rng(seed)
        self.vocab = np.array([f.vocab_size for f in card.fields], dtype=np.int64)
        self.pool = self.fresh(grid.pool)

    def fresh(self, n: int) -> np.ndarray:
        # 16 uniform ids: two draws share a row with negligible probability.
        return (self.rng.random((n, len(self.vocab))) * self.vocab).astype(np.int64)

    def request(self, repeat: float) -> np.ndarray:
        k = round(repeat * self.grid.n)
        ids = np.vstack(
            [
                self.pool[self.rng.choice(len(self.pool), k, replace=False)],
                self.fresh(self.grid.n - k),
            ]
        )
        return ids[self.rng.permutation(len(ids))]

    def body(self, ids: np.ndarray) -> bytes:
        grid = self.grid
        return msgspec.json.encode(
            {"candidates": ids.tolist(), "top_k": grid.top_k, "stage1_k": grid.stage1_k}
        )

    def pool_bodies(self) -> list[bytes]:
        step = self.grid.n
        return [self.body(self.pool[i : i + step]) for i in range(0, len(self.pool), step)]


def cache_of(farm: InProcess) -> ScoreCache:
    (cache,) = farm.farm.caches.values()
    return cache


def measure_cell(
    off: InProcess, on: InProcess, traffic: Traffic, repeat: float, grid: Grid
) -> dict[str, Any]:
    """One (repeat rate, entries) cell: paired rounds through both farms."""
    cache = cache_of(on)
    cache.clear()
    for body in traffic.pool_bodies() * 2:
        on(body)
    samples: dict[str, dict[str, list[float]]] = {
        "off": {"total": [], "stage1": []},
        "on": {"total": [], "stage1": []},
    }
    hits0 = misses0 = 0
    for r in range(grid.warmup + grid.rounds):
        if r == grid.warmup:
            hits0, misses0 = cache.hits, cache.misses
        body = traffic.body(traffic.request(repeat))
        order = (("off", off), ("on", on)) if r % 2 == 0 else (("on", on), ("off", off))
        for name, farm in order:
            timed = farm(body)
            if r >= grid.warmup:
                samples[name]["total"].append(timed["total"])
                samples[name]["stage1"].append(timed["stage1"])
    hits, misses = cache.hits - hits0, cache.misses - misses0
    rng = np.random.default_rng(grid.seed)
    return {
        "repeat": repeat,
        "entries": cache.capacity,
        "hit_rate": hits / max(hits + misses, 1),
        "cached_rows": len(cache),
        "cache_mib": cache.nbytes / 2**20,
        "off": {k: summary(v) for k, v in samples["off"].items()},
        "on": {k: summary(v) for k, v in samples["on"].items()},
        "speedup_p50": ratio_ci(samples["off"]["total"], samples["on"]["total"], rng),
    }


def measure(
    config: Config, grid: Grid, log: Callable[[str], None] = lambda _: None
) -> list[dict[str, Any]]:
    grid.check(config)
    card = first_stage_card(config)
    cells = []
    off = InProcess(msgspec.structs.replace(config, cache_entries=0))
    try:
        for entries in grid.entries:
            cfg = msgspec.structs.replace(config, cache_entries=entries, cache_ttl_s=grid.ttl_s)
            on = InProcess(cfg)
            try:
                for repeat in grid.rates:
                    log(f"entries={entries} repeat={repeat:.0%}: {grid.rounds} paired rounds")
                    traffic = Traffic(card, grid, seed=grid.seed)
                    cells.append(measure_cell(off, on, traffic, repeat, grid))
            finally:
                on.close()
    finally:
        off.close()
    return cells


# -- side measurements -------------------------------------------------------------------------
def lookup_cost(
    n: int = 1000, repeat: float = 0.9, entries: int = 100_000, rounds: int = 200
) -> dict[str, float]:
    """Microseconds to look up one request's ``n`` rows (a share ``repeat`` cached) and
    store the misses, in the steady state of a full cache: ScoreCache, and cachetools'
    TTLCache behind a lock (keyed by the rows' bytes) when cachetools is installed."""
    rng = np.random.default_rng(1)
    pool = rng.integers(0, 2**31, size=(n * 10, 16))
    hot = round(repeat * n)

    def request() -> np.ndarray:
        fresh = rng.integers(0, 2**31, size=(n - hot, 16))
        return np.vstack([pool[rng.integers(0, len(pool), hot)], fresh])

    cache = ScoreCache("bench/lookup", entries, 1e9, width=16)

    def ours(ids: np.ndarray) -> None:
        hashes = row_hashes(ids)
        miss = ~cache.lookup(ids, hashes).hit
        cache.store(ids[miss], hashes[miss], np.zeros(int(miss.sum()), np.float32))

    out = {"score_cache_us": _time_per_call(ours, request, rounds, fill=entries // n)}
    try:
        import cachetools  # not a dependency: measured when installed
    except ImportError:
        return out
    ttl = cachetools.TTLCache(maxsize=entries, ttl=1e9)
    lock = threading.Lock()

    def theirs(ids: np.ndarray) -> None:
        keys = ids.view(np.dtype((np.void, ids.shape[1] * 8))).reshape(-1).tolist()
        with lock:
            found = [ttl.get(k) for k in keys]
        with lock:
            for k, v in zip(keys, found, strict=True):
                if v is None:
                    ttl[k] = 0.5

    out["cachetools_ttlcache_us"] = _time_per_call(theirs, request, rounds, fill=entries // n)
    return out


def _time_per_call(
    fn: Callable[[np.ndarray], None], make: Callable[[], np.ndarray], rounds: int, fill: int
) -> float:
    for _ in range(fill):  # reach the steady state: a full cache that evicts
        fn(make())
    times = []
    for _ in range(rounds):
        ids = make()
        t0 = time.perf_counter()
        fn(ids)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


# -- report ------------------------------------------------------------------------------------
def table(cells: Sequence[dict[str, Any]]) -> Table:
    rows = []
    for c in cells:
        off, on, speed = c["off"], c["on"], c["speedup_p50"]
        rows.append(
            [
                f"{c['repeat']:.0%}",
                str(c["entries"]),
                f"{c['cache_mib']:.1f}",
                f"{c['hit_rate']:.1%}",
                f2(off["total"]["p50"]),
                f2(on["total"]["p50"]),
                f2(off["total"]["p99"]),
                f2(on["total"]["p99"]),
                f2(off["stage1"]["p50"]),
                f2(on["stage1"]["p50"]),
                f"{speed['point']:.2f} ({speed['ci95'][0]:.2f}-{speed['ci95'][1]:.2f})",
            ]
        )
    return Table(
        "Rank latency (ms), cache off vs on, paired rounds",
        [
            "repeat",
            "entries",
            "MiB",
            "hit rate",
            "p50 off",
            "p50 on",
            "p99 off",
            "p99 on",
            "stage1 p50 off",
            "stage1 p50 on",
            "speedup p50 (95% CI)",
        ],
        rows,
        labels=2,
    )


def report(grid: Grid, cells: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    return {"grid": asdict(grid), "cells": cells, **extra}
