"""app.requestlog: the SQLite sink, its bounded queue, schema version and shutdown flush."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import msgspec
import pytest

from app import metrics
from app.metrics import Samples
from app.requestlog import (
    COLUMNS,
    SCHEMA_VERSION,
    RequestLog,
    RequestLogError,
    Row,
    connect,
    create,
)


def row(i: int, **changes: object) -> Row:
    base = Row(
        request_id=f"r-{i}",
        ts=1_700_000_000.0 + i,
        endpoint="/rank",
        status=200,
        n_candidates=1000,
        latency_ms=12.5,
        queue_ms=0.5,
        stage_ms={"stage1_ms": 2.0, "stage2_ms": 9.0, "total_ms": 11.0},
        models="deepfm/1,autoint/1",
        degraded=False,
        answered_by="stage2",
        reason=None,
        outcome="within",
        error_code=None,
        variant="stable",
        pid=4242,
    )
    return base._replace(**changes)


def rows_in(path: Path) -> list[dict]:
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM requests ORDER BY id")]


def log_counts() -> dict[str, float]:
    return Samples(metrics.collect()).by_label("ctr_farm_request_log_rows_total", "result")


def test_rows_are_written_with_every_field(tmp_path: Path) -> None:
    path = tmp_path / "log" / "requests.db"  # the directory is created
    sink = RequestLog(path, queue_size=100)
    sink.start()
    before = log_counts()
    sink.record(row(1))
    sink.record(
        row(
            2,
            endpoint="/predict",
            status=503,
            n_candidates=None,
            stage_ms=None,
            models="",
            answered_by=None,
            outcome="failed",
            error_code="overloaded",
        )
    )
    sink.close()
    got = rows_in(path)
    assert [r["request_id"] for r in got] == ["r-1", "r-2"]
    first = got[0]
    assert {k: first[k] for k in COLUMNS if k != "stage_ms"} == {
        "request_id": "r-1",
        "ts": 1_700_000_001.0,
        "endpoint": "/rank",
        "status": 200,
        "n_candidates": 1000,
        "latency_ms": 12.5,
        "queue_ms": 0.5,
        "models": "deepfm/1,autoint/1",
        "degraded": 0,
        "answered_by": "stage2",
        "reason": None,
        "outcome": "within",
        "error_code": None,
        "variant": "stable",
        "pid": 4242,
    }
    assert msgspec.json.decode(first["stage_ms"]) == row(1).stage_ms
    second = got[1]
    assert (second["stage_ms"], second["n_candidates"], second["error_code"]) == (
        None,
        None,
        "overloaded",
    )
    assert log_counts()["written"] - before.get("written", 0) == 2


def test_the_file_is_wal_and_versioned(tmp_path: Path) -> None:
    path = tmp_path / "requests.db"
    create(path)
    create(path)  # again (the next worker, the next start): nothing changes
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_file_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "requests.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RequestLogError, match=r"schema version 2.*move the file away"):
        RequestLog(path, queue_size=10).start()


def test_an_unusable_path_is_refused_naming_the_setting(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(RequestLogError, match=r"^request_log: cannot open"):
        create(tmp_path / "file" / "requests.db")


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "requests.db"
    sink = RequestLog(path, queue_size=5)
    # Not started: nobody drains the queue, so the sixth row on finds it full.
    before = log_counts().get("dropped", 0)
    t0 = time.perf_counter()
    for i in range(20):
        sink.record(row(i))
    assert time.perf_counter() - t0 < 0.5  # never waits for room
    assert log_counts()["dropped"] - before == 15
    # Started later, the writer still gets the five queued rows; close flushes them.
    sink.start()
    sink.close()
    assert [r["request_id"] for r in rows_in(path)] == [f"r-{i}" for i in range(5)]


def test_batches_from_several_threads_and_sinks_all_land(tmp_path: Path) -> None:
    """Two sinks (two workers) on one file, each fed by 2 threads: no row lost."""
    path = tmp_path / "requests.db"
    sinks = [RequestLog(path, queue_size=10_000) for _ in range(2)]
    for sink in sinks:
        sink.start()

    def feed(sink: RequestLog, base: int) -> None:
        for i in range(1500):
            sink.record(row(base + i))

    threads = [
        threading.Thread(target=feed, args=(sink, 10_000 * k + 5_000 * j))
        for k, sink in enumerate(sinks)
        for j in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sink in sinks:
        sink.close()
    ids = {r["request_id"] for r in rows_in(path)}
    assert len(ids) == 6000


def test_sqlite_errors_are_counted_and_the_writer_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "requests.db"
    sink = RequestLog(path, queue_size=100)
    sink.start()
    before = log_counts()
    with connect(path) as conn:
        conn.execute("DROP TABLE requests")  # an operator deleting it under the farm
    sink.record(row(1))
    sink.close()
    after = log_counts()
    assert after["failed"] - before.get("failed", 0) == 1
    assert after.get("written", 0) == before.get("written", 0)


def test_close_before_start_is_a_no_op(tmp_path: Path) -> None:
    RequestLog(tmp_path / "requests.db", queue_size=1).close()
    assert not (tmp_path / "requests.db").exists()
