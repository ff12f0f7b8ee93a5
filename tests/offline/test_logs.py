"""The synthetic log generator: deterministic, well-formed, and CTR/sampling as asked."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from app.offline import logs

ROWS = 200_000


@pytest.fixture(scope="module")
def table() -> logs.Logs:
    return logs.generate(ROWS, seed=7)


def test_same_seed_is_identical(table: logs.Logs) -> None:
    again = logs.generate(ROWS, seed=7)
    assert list(again) == list(table)
    for name in table:
        assert np.array_equal(again[name], table[name])


def test_different_seeds_differ(table: logs.Logs) -> None:
    other = logs.generate(ROWS, seed=8)
    assert not np.array_equal(other["domain"], table["domain"])
    assert not np.array_equal(other["click"], table["click"])


def test_schema_and_dtypes(table: logs.Logs) -> None:
    assert list(table) == [*logs.FIELD_NAMES, logs.LABEL]
    assert len(logs.FIELDS) == 16
    for name in logs.FIELD_NAMES:
        assert table[name].dtype == np.int64
        assert table[name].shape == (ROWS,)
    assert table[logs.LABEL].dtype == np.int8
    assert set(np.unique(table[logs.LABEL]).tolist()) <= {0, 1}
    assert table.id_matrix().shape == (ROWS, 16)


def test_ids_in_range(table: logs.Logs) -> None:
    for spec in logs.FIELDS:
        col = table[spec.name]
        assert col.min() >= 0
        assert col.max() < spec.cardinality


def test_popular_ids_are_scattered(table: logs.Logs) -> None:
    # The permutation means the most frequent domain is not simply id 0.
    counts = np.bincount(table["domain"], minlength=24000)
    top = np.argsort(-counts)[:10]
    assert not np.array_equal(np.sort(top), np.arange(10))
    assert counts[top[0]] > 20 * np.median(counts)  # Zipf head


def test_base_ctr(table: logs.Logs) -> None:
    ctr = float(table[logs.LABEL].mean())
    assert 0.001 <= ctr <= 0.01
    assert ctr == pytest.approx(logs.DEFAULT_BASE_CTR, rel=0.15)


def test_base_ctr_is_configurable() -> None:
    ctr = float(logs.generate(ROWS, seed=3, base_ctr=0.002)[logs.LABEL].mean())
    assert ctr == pytest.approx(0.002, rel=0.2)
    with pytest.raises(ValueError):
        logs.generate(10, seed=3, base_ctr=0.5)


def test_neg_downsampling_ratio(table: logs.Logs) -> None:
    sampled = logs.generate(ROWS, seed=7, neg_ratio=50)
    clicks = int(sampled[logs.LABEL].sum())
    negatives = sampled.n_rows - clicks
    # Same seed, same impressions before sampling: every click is kept.
    assert clicks == int(table[logs.LABEL].sum())
    assert negatives / clicks == pytest.approx(50, rel=0.05)
    rate = sampled.meta["neg_sampling_rate"]
    assert 0 < rate < 1
    assert negatives == pytest.approx(rate * (ROWS - clicks), rel=0.05)
    assert table.meta["neg_sampling_rate"] == 1.0


def test_write_parquet_and_csv_roundtrip(tmp_path, table: logs.Logs) -> None:
    small = logs.generate(5_000, seed=1, neg_ratio=150)
    pq_path = logs.write(small, tmp_path / "a.parquet")
    meta = json.loads(pq.read_schema(pq_path).metadata[logs.META_KEY])
    assert meta["neg_sampling_rate"] == small.meta["neg_sampling_rate"]
    for path in (pq_path, logs.write(small, tmp_path / "a.csv")):
        back = logs.read(path)
        assert back.meta == small.meta
        for name in small:
            assert np.array_equal(back[name], small[name])
    # Byte-identical output for identical arguments.
    again = logs.write(logs.generate(5_000, seed=1, neg_ratio=150), tmp_path / "b.parquet")
    assert again.read_bytes() == pq_path.read_bytes()
    with pytest.raises(ValueError):
        logs.write(small, tmp_path / "a.json")
