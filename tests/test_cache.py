"""app.cache: the first stage's score cache (keys, TTL, size bound, clear, threads) and a
cascade with the cache that answers exactly what the cascade without it answers."""

from __future__ import annotations

import threading
from collections.abc import Callable

import msgspec
import numpy as np
import pytest
from prometheus_client import REGISTRY

from app import cache as cache_mod
from app.cache import CachedScorer, ScoreCache, row_hashes
from app.config import Config
from app.schema import RankRequest
from app.service import Farm
from tests.test_pipeline import FakeScorer

MODEL = "fake/1"
WIDTH = 4


class Clock:
    """An injected clock: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rows(n: int, start: int = 0) -> np.ndarray:
    """``n`` distinct rows: row i is ``[start + i, 1, 2, 3]``."""
    ids = np.tile(np.arange(WIDTH, dtype=np.int64), (n, 1))
    ids[:, 0] = np.arange(start, start + n)
    return ids


def cached(
    entries: int = 800, ttl_s: float = 60.0, clock: Clock | None = None, doorkeeper: bool = False
):
    """(cached scorer, its model, its cache). Without the doorkeeper by default: a row is
    then stored at its first miss, which keeps the mechanics tests short."""
    scorer = FakeScorer(MODEL, seed=3, levels=1000)
    cache = ScoreCache(MODEL, entries, ttl_s, WIDTH, clock=clock or Clock(), doorkeeper=doorkeeper)
    return CachedScorer(scorer, cache), scorer, cache


def truth(ids: np.ndarray) -> np.ndarray:
    return FakeScorer(MODEL, seed=3, levels=1000).run(ids)


def assert_consistent(cache: ScoreCache, distinct: bool = True) -> None:
    """The size is the number of occupied ways; no hash is held twice in a bucket (one
    thread; rows that share a hash, or two threads storing one row, may take two ways)."""
    tags = cache._bucket_tags
    assert len(cache) == np.count_nonzero(tags) <= cache.capacity
    for bucket in tags if distinct else ():
        held = bucket[bucket != 0]
        assert len(np.unique(held)) == len(held)


# -- hashes ----------------------------------------------------------------------------------
def test_row_hashes_tell_rows_apart_and_are_never_zero() -> None:
    ids = np.array([[1, 0, 2], [256, 0, 2], [1, 0, 2], [0, 0, 0], [2, 0, 1]], dtype=np.int64)
    h = row_hashes(ids)
    assert h.dtype == np.uint64 and (h != 0).all()
    assert h[0] == h[2] and len(set(h.tolist())) == 4
    many = np.random.default_rng(0).integers(0, 50, size=(20_000, 16))
    assert len(np.unique(row_hashes(many))) == len(np.unique(many, axis=0))


def test_row_hashes_of_a_non_contiguous_or_int32_matrix() -> None:
    wide = np.arange(40, dtype=np.int64).reshape(5, 8)
    assert np.array_equal(row_hashes(wide[:, ::2]), row_hashes(wide[:, ::2].copy()))
    assert np.array_equal(row_hashes(wide.astype(np.int32)), row_hashes(wide))


# -- hits, misses, what the model sees -------------------------------------------------------
def test_only_misses_are_scored_and_scores_equal_the_models() -> None:
    scorer, model, cache = cached()
    first = rows(10)
    assert np.array_equal(scorer.run(first), truth(first))
    assert (cache.hits, cache.misses, len(cache)) == (0, 10, 10)
    second = rows(10, start=5)  # 5 seen, 5 new
    model.batches.clear()
    got = scorer.run(second)
    assert np.array_equal(model.batches[0], second[5:])
    assert got.tobytes() == truth(second).tobytes()
    assert (cache.hits, cache.misses) == (5, 15)
    assert cache.hit_rate == pytest.approx(0.25)
    model.batches.clear()
    assert np.array_equal(scorer.run(second[::-1]), truth(second[::-1]))
    assert model.batches == []  # all hits: the model is not called
    assert_consistent(cache)


def test_a_single_miss_is_scored_in_a_batch_of_two_and_one_row_bypasses() -> None:
    scorer, model, cache = cached()
    scorer.run(rows(5))
    model.batches.clear()
    scorer.run(rows(6))  # one new row
    assert [len(b) for b in model.batches] == [2]
    assert np.array_equal(model.batches[0], rows(6)[[5, 5]])
    lookups = cache.hits + cache.misses
    scorer.run(rows(1))  # a one-row batch: straight to the model, not looked up
    assert [len(b) for b in model.batches] == [2, 1]
    assert cache.hits + cache.misses == lookups


def test_duplicate_rows_in_one_batch_are_stored_once() -> None:
    scorer, _, cache = cached(entries=8)
    ids = rows(3)[[0, 1, 0, 2, 1, 0]]
    assert np.array_equal(scorer.run(ids), truth(ids))
    assert len(cache) == 3
    assert np.array_equal(scorer.run(ids), truth(ids))
    assert cache.hits == 6
    assert_consistent(cache)


def test_rows_that_share_a_hash_never_share_a_score(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_mod, "row_hashes", lambda ids: np.ones(len(ids), dtype=np.uint64))
    scorer, _, cache = cached()
    for start in (0, 3, 0, 7):
        ids = rows(3, start)
        assert scorer.run(ids).tobytes() == truth(ids).tobytes()
    # Each batch stores its first miss (one hash per batch): rows 0, 3, 1 and 7. Lookups
    # compare with the first way of that hash (row 0): only row 0 ever hits.
    assert len(cache) == 4
    assert cache.hits == 1
    assert_consistent(cache, distinct=False)


def test_rows_with_ids_beyond_int32_are_scored_not_cached() -> None:
    scorer, model, cache = cached()
    ids = rows(4)
    ids[1, 2] = 2**40
    ids[3, 1] = -(2**31) - 1
    assert scorer.run(ids).tobytes() == truth(ids).tobytes()
    assert len(cache) == 2
    model.batches.clear()
    assert scorer.run(ids).tobytes() == truth(ids).tobytes()
    assert np.array_equal(model.batches[0], ids[[1, 3]])


def test_cache_of_another_model_is_refused() -> None:
    with pytest.raises(ValueError, match="fake/2"):
        CachedScorer(FakeScorer("fake/2", seed=1), ScoreCache(MODEL, 10, 1.0, WIDTH))


@pytest.mark.parametrize(("entries", "ttl_s", "width"), [(0, 1.0, 4), (10, 0.0, 4), (10, 1, 0)])
def test_bad_bounds(entries: int, ttl_s: float, width: int) -> None:
    with pytest.raises(ValueError):
        ScoreCache(MODEL, entries, ttl_s, width)


@pytest.mark.parametrize(("entries", "capacity"), [(1, 8), (8, 8), (10, 16), (100_000, 100_000)])
def test_capacity_is_entries_rounded_up_to_whole_buckets(entries: int, capacity: int) -> None:
    assert ScoreCache(MODEL, entries, 1.0, WIDTH).capacity == capacity


# -- the doorkeeper ---------------------------------------------------------------------------
def test_the_doorkeeper_stores_a_row_at_its_second_miss() -> None:
    scorer, model, cache = cached(doorkeeper=True)
    scorer.run(rows(10))  # first misses: remembered, not stored
    assert len(cache) == 0
    scorer.run(rows(10, start=5))  # rows 5-9 miss again: stored; 10-14 remembered
    assert len(cache) == 5
    model.batches.clear()
    ids = rows(15)
    assert scorer.run(ids).tobytes() == truth(ids).tobytes()
    assert model.batches[0][:, 0].tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    assert len(cache) == 15
    assert_consistent(cache)


def test_the_doorkeeper_forgets_when_a_quarter_full() -> None:
    scorer, _, cache = cached(entries=8, doorkeeper=True)
    assert len(cache._door) == 1024  # the smallest: forgets after 256 first misses
    scorer.run(rows(2))
    scorer.run(rows(300, start=1000))  # more than 256 first misses: emptied at the end
    assert cache._door_marks == 0
    stored = len(cache)  # a few of the 300 may have shared a byte with an earlier row
    scorer.run(rows(2))  # rows 0, 1 are first misses again: not stored
    assert (len(cache), cache._door_marks) == (stored, 2)
    scorer.run(rows(2))
    assert len(cache) == min(stored + 2, cache.capacity)


def test_clear_also_empties_the_doorkeeper() -> None:
    scorer, _, cache = cached(doorkeeper=True)
    scorer.run(rows(4))
    cache.clear()
    scorer.run(rows(4))
    assert len(cache) == 0  # a first miss again


# -- TTL -------------------------------------------------------------------------------------
def test_entries_expire_ttl_after_they_were_scored() -> None:
    clock = Clock()
    scorer, model, cache = cached(ttl_s=10.0, clock=clock)
    scorer.run(rows(4))
    clock.now += 9.999
    scorer.run(rows(4))  # hits do not extend the TTL
    assert (cache.hits, cache.misses) == (4, 4)
    clock.now += 0.001  # exactly ttl_s after scoring: expired
    model.batches.clear()
    scorer.run(rows(4))
    assert cache.evictions == {"ttl": 4}
    assert [len(b) for b in model.batches] == [4]  # re-scored
    assert (cache.hits, cache.misses, len(cache)) == (4, 8, 4)
    clock.now += 5.0
    scorer.run(rows(4))  # the new scores got a new TTL
    assert cache.hits == 8
    assert_consistent(cache)


def test_expired_entries_are_replaced_first_and_count_as_ttl() -> None:
    clock = Clock()
    scorer, model, cache = cached(entries=8, ttl_s=1.0, clock=clock)  # one bucket
    scorer.run(rows(4))  # A, scored at t
    clock.now += 0.6
    scorer.run(rows(4, start=100))  # B, at t + 0.6: the bucket is full
    clock.now += 0.3
    scorer.run(rows(4))  # A hit at t + 0.9: now more recently used than B
    clock.now += 0.3  # t + 1.2: A expired, B not
    scorer.run(rows(4, start=200))  # C replaces the expired A, not the older B
    assert cache.evictions == {"ttl": 4}
    model.batches.clear()
    scorer.run(np.vstack([rows(4, start=100), rows(4, start=200)]))
    assert model.batches == []
    assert_consistent(cache)


# -- size bound ------------------------------------------------------------------------------
def test_a_full_bucket_evicts_the_least_recently_hit() -> None:
    scorer, model, cache = cached(entries=8)  # one bucket of 8 ways: an exact LRU
    scorer.run(rows(6))  # rows 0-5
    scorer.run(rows(2, start=100))  # 100, 101: full
    scorer.run(rows(2))  # rows 0, 1 hit: the most recently used
    scorer.run(rows(2, start=200))  # two new rows push out two of rows 2-5
    assert len(cache) == 8
    assert cache.evictions == {"size": 2}
    model.batches.clear()
    scorer.run(np.vstack([rows(2), rows(2, start=100), rows(2, start=200)]))
    assert model.batches == []
    scorer.run(rows(4, start=2))
    assert [len(b) for b in model.batches] == [2]
    assert_consistent(cache)


def test_size_never_exceeds_the_capacity() -> None:
    scorer, model, cache = cached(entries=64)  # 8 buckets
    scorer.run(rows(1000))  # ~125 rows per bucket: 8 of each are kept
    assert len(cache) == 64 and cache.evictions == {}
    scorer.run(rows(1000, start=5000))
    assert len(cache) == 64 and cache.evictions == {"size": 64}
    model.batches.clear()
    ids = rows(1000, start=5000)
    assert np.array_equal(scorer.run(ids), truth(ids))
    assert len(model.batches[0]) == 1000 - 64
    assert_consistent(cache)


# -- clear -----------------------------------------------------------------------------------
def test_clear_drops_everything() -> None:
    scorer, model, cache = cached()
    scorer.run(rows(7))
    assert cache.clear() == 7
    assert len(cache) == 0 and cache.evictions == {"clear": 7}
    model.batches.clear()
    scorer.run(rows(7))
    assert [len(b) for b in model.batches] == [7]
    assert_consistent(cache)


# -- threads ---------------------------------------------------------------------------------
def test_threads_sharing_one_cache_get_the_models_scores() -> None:
    scorer, _, cache = cached(entries=300)
    errors: list[str] = []
    start = threading.Barrier(4)

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        start.wait()
        for _ in range(200):
            ids = rows(1000)[rng.integers(0, 1000, size=int(rng.integers(2, 60)))]
            if scorer.run(ids).tobytes() != truth(ids).tobytes():
                errors.append(f"thread {seed}: wrong scores")

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert cache.hits > 0 and cache.evictions["size"] > 0
    assert_consistent(cache, distinct=False)


# -- metrics ---------------------------------------------------------------------------------
def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_count_hits_misses_evictions_and_entries() -> None:
    model = "metered/1"
    cache = ScoreCache(model, 8, 60.0, WIDTH, doorkeeper=False)
    scorer = CachedScorer(FakeScorer(model, seed=1), cache)
    names = ("hits_total", "misses_total", "evictions_total")
    before = {n: sample(f"ctr_farm_cache_{n}", model=model, reason="size") for n in names}
    before |= {n: sample(f"ctr_farm_cache_{n}", model=model) for n in names[:2]}
    scorer.run(rows(3))  # 3 misses
    scorer.run(rows(3, start=1))  # 2 hits, 1 miss: 4 entries
    scorer.run(rows(2, start=50))  # 2 misses: 6 entries
    scorer.run(rows(4, start=60))  # 4 misses: 2 empty ways, 2 evictions; 8 entries
    assert sample("ctr_farm_cache_hits_total", model=model) - before["hits_total"] == 2
    assert sample("ctr_farm_cache_misses_total", model=model) - before["misses_total"] == 10
    evicted = sample("ctr_farm_cache_evictions_total", model=model, reason="size")
    assert evicted - before["evictions_total"] == 2
    assert sample("ctr_farm_cache_entries", model=model) == 8


# -- the cascade with and without the cache --------------------------------------------------
def rank_request(ids: np.ndarray, **params: int) -> RankRequest:
    return RankRequest(candidates=msgspec.Raw(msgspec.json.encode(ids.tolist())), **params)


def test_farm_with_cache_answers_exactly_as_without(
    make_config: Callable[..., Config], make_farm: Callable[[Config], Farm]
) -> None:
    plain = make_farm(make_config())
    caching = make_farm(make_config(cache_entries=500))
    assert plain.caches == {}
    (cache,) = caching.caches.values()
    assert cache.model == "deepfm/1"
    rng = np.random.default_rng(5)
    pool = rng.integers(0, [7, 24, 35, 400], size=(800, 4))
    requests = [pool[rng.integers(0, 800, size=n)] for n in (300, 300, 50, 2, 1, 299, 300)]
    requests.append(np.vstack([requests[0], [[6, 23, 34, 399]]]))  # one new row
    for ids in requests:
        want = plain.rank(rank_request(ids, top_k=20, stage1_k=40), "json")
        got = caching.rank(rank_request(ids, top_k=20, stage1_k=40), "json")
        assert got.indices.tolist() == want.indices.tolist()
        assert got.scores.tobytes() == want.scores.tobytes()
        assert got.after_stage1 == want.after_stage1
        assert got.models == want.models
    assert cache.hits > 0
    entries = len(cache)
    assert entries > 0
    assert caching.clear_cache() == entries
    assert len(cache) == 0
