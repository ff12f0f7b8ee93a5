"""Per-worker cache of first-stage scores, keyed by (candidate feature row, model version).

The first stage (DeepFM) scores every candidate of a request, and the same ads come back
page view after page view: a row of ids scored recently by the same model version need
not be scored again. :class:`CachedScorer` wraps the first stage's scorer (the cascade
sees an ordinary :class:`~app.pipeline.Scorer`): it looks up every row of the batch,
scores only the misses, and stores them. Off unless ``cache_entries`` > 0
(docs/BENCHMARKS.md, "Result cache", says when it pays).

- **Key.** The row (its ids after out-of-vocabulary mapping, i.e. exactly what the model
  sees) within a cache that belongs to one model version (``model``, e.g. ``deepfm/1``).
  A 64-bit hash of the row picks its place, and the whole row is stored and compared on
  every hit: two rows that share a hash never share a score (one of them misses).
- **Bounds.** A set-associative table: ``entries`` rounded up to a multiple of
  :data:`WAYS`, in buckets of :data:`WAYS` rows. A new row replaces an expired or empty
  way of its bucket, else the way least recently hit. A score is used for at most
  ``ttl_s`` after it was computed (hits do not extend it, as in cachetools' ``TTLCache``).
- **Admission.** A doorkeeper (as in TinyLFU) stores a row only at its second miss: a
  candidate seen once (most of a long tail) costs a byte, not a slot and an eviction.
- **Invalidation.** :meth:`ScoreCache.clear`; a model reload must call it (or build a new
  cache): a new version never meets the old version's entries, but new weights under the
  same version would.
- **Threads.** One lock per cache, held for the lookup and for the store, never while
  the model runs.
- **Exact scores.** ONNX Runtime scores a one-row batch on another code path (GEMV) than
  a batch of two or more, and some rows then differ in the last bit (ORT 1.31.1, 2000
  rows: ~3% for deepfm/1 and autoint/1-2; none for deepfm/2, whose FM sums are GEMMs;
  batches of 2 to 1500 rows gave identical bits). So a
  batch of one row bypasses the cache, and a single miss is scored in a batch of two (the
  row twice): a cached score is bit for bit the score the uncached cascade computes.

PERF: a request's rows are hashed, looked up and stored with whole-array numpy operations,
no Python work per row: 0.40 ms to look up 1000 rows (90% cached) and store the misses in
a full cache of 100k rows, against 2.4 ms for cachetools' ``TTLCache`` behind a lock and
1.3 ms for a first version (a dict from row bytes to a ring slot), while DeepFM scores
1000 rows in ~3.5 ms (``scripts/bench_cache.py``; docs/BENCHMARKS.md, "Result cache").
The doorkeeper took the cost of a request whose rows never repeat from ~1.1 to ~0.7 ms.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from app import metrics
from app.pipeline import Scorer

#: Rows per bucket: a row can live in any of its bucket's ways.
WAYS = 8
#: Why an entry left the cache (the ``reason`` label of the evictions counter).
EVICTION_REASONS = ("size", "ttl", "clear")
#: Fixed odd multipliers of the row hash (one per column) and splitmix64's finalizer.
_MULTIPLIERS = np.random.default_rng(0x5C0BE).integers(1, 2**63, 256, dtype=np.uint64) | 1
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_INT32 = np.iinfo(np.int32)


def row_hashes(ids: np.ndarray) -> np.ndarray:
    """``[n, k]`` integer ids -> ``[n]`` uint64 hashes, never 0 (0 marks an empty way)."""
    rows = np.ascontiguousarray(ids, dtype=np.int64).view(np.uint64)
    h = rows @ _MULTIPLIERS[: rows.shape[1]]  # wraps modulo 2**64
    h ^= h >> _S30
    h *= _MIX1
    h ^= h >> _S27
    h *= _MIX2
    h ^= h >> _S31
    h[h == 0] = 1
    return h


@dataclass(frozen=True, slots=True)
class Lookup:
    #: ``[n]`` float32: the cached score of each hit (misses: undefined until scored).
    scores: np.ndarray
    #: ``[n]`` bool: the row was cached and not expired.
    hit: np.ndarray


class ScoreCache:
    """Scores of one model version for rows of ``width`` ids, at most ``capacity`` rows."""

    def __init__(
        self,
        model: str,
        entries: int,
        ttl_s: float,
        width: int,
        clock: Callable[[], float] = time.monotonic,
        doorkeeper: bool = True,
    ) -> None:
        if entries < 1 or ttl_s <= 0 or width < 1:
            raise ValueError("a score cache needs entries >= 1, ttl_s > 0 and width >= 1")
        self.model, self.ttl_s, self.width, self.clock = model, ttl_s, width, clock
        self.buckets = math.ceil(entries / WAYS)
        self.capacity = self.buckets * WAYS
        # One slot per way, bucket b holding slots [b * WAYS, (b + 1) * WAYS).
        self._lock = threading.Lock()
        self._tags = np.zeros(self.capacity, dtype=np.uint64)  # row hash; 0 = empty
        self._rows = np.zeros((self.capacity, width), dtype=np.int32)
        self._scores = np.zeros(self.capacity, dtype=np.float32)
        self._expires = np.zeros(self.capacity, dtype=np.float64)
        self._used = np.zeros(self.capacity, dtype=np.int64)  # the lookup that last hit it
        # Per-bucket views of the same memory (gathers of whole buckets).
        self._bucket_tags = self._tags.reshape(self.buckets, WAYS)
        self._bucket_expires = self._expires.reshape(self.buckets, WAYS)
        self._bucket_used = self._used.reshape(self.buckets, WAYS)
        self._tick = 0
        self._size = 0
        #: TinyLFU's doorkeeper: a byte per hash slot, set on a row's first miss; only a
        #: row that misses again (its byte set) is stored. Emptied when a quarter is set,
        #: so a row must come back within ~2 x capacity misses, and at most a quarter of
        #: the first misses get in by sharing a byte.
        self._door = np.zeros(1 << max(10, (8 * self.capacity - 1).bit_length()), np.uint8)
        self._door_mask = np.uint64(len(self._door) - 1)
        self._door_marks = 0
        self.doorkeeper = doorkeeper
        self.hits = self.misses = 0
        self.evictions: Counter[str] = Counter()
        self._hits = metrics.CACHE_HITS.labels(model)
        self._misses = metrics.CACHE_MISSES.labels(model)
        self._evicted = {r: metrics.CACHE_EVICTIONS.labels(model, r) for r in EVICTION_REASONS}
        self._entries = metrics.CACHE_ENTRIES.labels(model)

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        """Memory of the table (allocated at start; resident as it fills): per row, the
        ids as int32, a hash, a score, an expiry, a last-use tick, and the doorkeeper."""
        arrays = (self._tags, self._rows, self._scores, self._expires, self._used, self._door)
        return sum(a.nbytes for a in arrays)

    @property
    def hit_rate(self) -> float:
        """Hits / rows looked up since the worker started (0.0 before any lookup)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def _bucket(self, hashes: np.ndarray) -> np.ndarray:
        # The hash's high 32 bits scaled to [0, buckets): no division (Lemire's reduction).
        scaled = ((hashes >> np.uint64(32)) * np.uint64(self.buckets)) >> np.uint64(32)
        return scaled.astype(np.int64)

    def lookup(self, ids: np.ndarray, hashes: np.ndarray) -> Lookup:
        """The cached, unexpired scores of the rows ``ids`` (``hashes``: their
        :func:`row_hashes`); expired entries met here are dropped."""
        n = len(ids)
        bucket = self._bucket(hashes)
        with self._lock:
            now = self.clock()
            self._tick += 1
            match = self._bucket_tags[bucket] == hashes[:, None]
            found = np.flatnonzero(match.any(axis=1))
            slot = bucket[found] * WAYS + match[found].argmax(axis=1)
            same = (self._rows[slot] == ids[found]).all(axis=1)
            found, slot = found[same], slot[same]
            fresh = self._expires[slot] > now
            if not fresh.all():
                self._drop(slot[~fresh], "ttl")
                found, slot = found[fresh], slot[fresh]
            self._used[slot] = self._tick
            scores = np.empty(n, dtype=np.float32)
            scores[found] = self._scores[slot]
            self.hits += len(found)
            self.misses += n - len(found)
        hit = np.zeros(n, dtype=bool)
        hit[found] = True
        self._hits.inc(len(found))
        self._misses.inc(n - len(found))
        return Lookup(scores, hit)

    def store(self, ids: np.ndarray, hashes: np.ndarray, scores: np.ndarray) -> None:
        """Cache the scores of rows that missed; each takes an expired, empty or least
        recently hit way of its bucket (a bucket takes at most :data:`WAYS` per call)."""
        # Rows are kept as int32 (half the memory): a row with an id beyond is not cached.
        if len(ids) and (ids.min() < _INT32.min or ids.max() > _INT32.max):
            fits = ((ids >= _INT32.min) & (ids <= _INT32.max)).all(axis=1)
            ids, hashes, scores = ids[fits], hashes[fits], scores[fits]
        if not len(ids):
            return
        if self.doorkeeper:
            again = self._admit(hashes)
            ids, hashes, scores = ids[again], hashes[again], scores[again]
            if not len(ids):
                return
        # A row twice in the batch is stored once. PERF: the bucket is monotonic in the
        # hash, so the sorted unique hashes come grouped by bucket: no second sort.
        hashes, first = np.unique(hashes, return_index=True)
        bucket = self._bucket(hashes)
        rank = _rank_in_runs(bucket)
        if rank.max() >= WAYS:
            keep = rank < WAYS
            first, hashes, bucket, rank = first[keep], hashes[keep], bucket[keep], rank[keep]
        with self._lock:
            now = self.clock()
            # Victims in order: empty or expired ways first, then the least recently hit.
            # (Two threads storing the same row at once may give it two ways for a while.)
            tags, expires = self._bucket_tags[bucket], self._bucket_expires[bucket]
            age = np.where((tags == 0) | (expires <= now), -1, self._bucket_used[bucket])
            way = age.argmin(axis=1)
            later = np.flatnonzero(rank)  # the 2nd, 3rd... row of one bucket in this batch
            if len(later):
                order = np.argsort(age[later], axis=1, kind="stable")
                way[later] = order[np.arange(len(later)), rank[later]]
            slot = bucket * WAYS + way
            old = self._tags[slot] != 0
            stale = old & (self._expires[slot] <= now)
            self._evict("ttl", int(stale.sum()))
            self._evict("size", int((old & ~stale).sum()))
            self._size += len(slot) - int(old.sum())
            self._tags[slot] = hashes
            self._rows[slot] = ids[first]
            self._scores[slot] = scores[first]
            self._expires[slot] = now + self.ttl_s
            self._used[slot] = self._tick
            size = self._size
        self._entries.set(size)

    def clear(self) -> int:
        """Drop every entry (a model reload calls this); returns how many there were."""
        with self._lock:
            dropped = self._size
            self._tags[:] = 0
            self._size = 0
            self._door[:] = 0
            self._door_marks = 0
            self._evict("clear", dropped)
        self._entries.set(0)
        return dropped

    def _admit(self, hashes: np.ndarray) -> np.ndarray:
        """The doorkeeper: which rows missed before (their byte is set); sets the rest."""
        door = (hashes & self._door_mask).astype(np.intp)
        with self._lock:
            again = self._door[door] != 0
            self._door[door] = 1
            self._door_marks += len(again) - int(again.sum())
            if 4 * self._door_marks >= len(self._door):
                self._door[:] = 0
                self._door_marks = 0
        return again

    def _drop(self, slot: np.ndarray, reason: str) -> None:
        """Empty these slots (one met twice in a batch counts once); lock held."""
        slot = np.unique(slot)
        self._tags[slot] = 0
        self._size -= len(slot)
        self._evict(reason, len(slot))

    def _evict(self, reason: str, count: int) -> None:
        if count:
            self.evictions[reason] += count
            self._evicted[reason].inc(count)


def _rank_in_runs(values: np.ndarray) -> np.ndarray:
    """For a sorted array: each element's position within its run of equal values."""
    index = np.arange(len(values))
    starts = np.r_[True, values[1:] != values[:-1]]
    return index - np.maximum.accumulate(np.where(starts, index, 0))


class CachedScorer:
    """A :class:`~app.pipeline.Scorer` that scores only the rows its cache lacks."""

    def __init__(self, scorer: Scorer, cache: ScoreCache) -> None:
        if scorer.key != cache.model:
            raise ValueError(f"cache of {cache.model!r} cannot serve model {scorer.key!r}")
        self.scorer, self.cache = scorer, cache

    @property
    def key(self) -> str:
        return self.scorer.key

    def run(self, ids: np.ndarray, run_options: ort.RunOptions | None = None) -> np.ndarray:
        if len(ids) < 2:  # a one-row batch rounds differently (module docstring)
            return self.scorer.run(ids, run_options)
        hashes = row_hashes(ids)
        found = self.cache.lookup(ids, hashes)
        scores = found.scores
        miss = np.flatnonzero(~found.hit)
        if len(miss):
            batch = ids[miss] if len(miss) > 1 else ids[np.repeat(miss, 2)]
            scores[miss] = self.scorer.run(batch, run_options)[: len(miss)]
            self.cache.store(ids[miss], hashes[miss], scores[miss])
        return scores
