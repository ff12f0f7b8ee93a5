"""app.report and scripts/report.py over a request log with known rows."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from app.report import ReportError, bucket_for, plot, summarize, text
from app.requestlog import SCHEMA_VERSION, RequestLog, Row
from tests.benchmarks.scripts import run_proc

T0 = 1_800_000_000.0


def rank_row(i: int, t: float, latency_ms: float, **changes: object) -> Row:
    row = Row(
        request_id=f"r{i}",
        ts=T0 + t,
        endpoint="/rank",
        status=200,
        n_candidates=1000,
        latency_ms=latency_ms,
        queue_ms=1.0,
        stage_ms={"stage1_ms": 2.0, "stage2_ms": latency_ms - 3.0, "total_ms": latency_ms - 1},
        models="deepfm/1,autoint/1",
        degraded=False,
        answered_by="stage2",
        reason=None,
        outcome="within" if latency_ms + 1.0 <= 50 else "over",
        error_code=None,
        variant="stable",
        pid=100 + i % 2,
    )
    return row._replace(**changes)


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 rankings over 10 s at 10, 11, ..., 109 ms (so 40 within a 50 ms SLA), the last
    10 of them degraded; 5 shed 503s; 10 /predict answers; 2 invalid /predict."""
    path = tmp_path_factory.mktemp("report") / "requests.db"
    sink = RequestLog(path, queue_size=1000)
    sink.start()
    for i in range(100):
        changes = (
            {"degraded": True, "answered_by": "stage1", "reason": "deadline"} if i >= 90 else {}
        )
        sink.record(rank_row(i, i * 0.1, 10.0 + i, **changes))
    for i in range(5):
        sink.record(
            rank_row(100 + i, 5.0, 0.5, status=503, stage_ms=None, n_candidates=None, models="",
                     answered_by=None, outcome="failed", error_code="overloaded")
        )  # fmt: skip
    for i in range(12):
        bad = i >= 10
        sink.record(
            rank_row(200 + i, i * 0.5, 2.0, endpoint="/predict", n_candidates=3,
                     models="autoint/1", stage_ms=None, answered_by=None,
                     status=400 if bad else 200, outcome="invalid" if bad else "within",
                     error_code="invalid_request" if bad else None)
        )  # fmt: skip
    sink.close()
    return path


def test_summary_figures(log_path: Path) -> None:
    report = summarize(log_path, bucket_s=1)
    assert report.rows == 117 and report.pids == 2
    assert report.duration_s == pytest.approx(9.9)
    rank = report.endpoints["/rank"]
    assert rank.requests == 105
    assert rank.outcomes == {"within": 40, "over": 60, "failed": 5, "invalid": 0}
    assert rank.sla_compliance == pytest.approx(40 / 105)
    assert rank.degraded_share == pytest.approx(10 / 100)
    assert rank.statuses == {"200": 100, "503 overloaded": 5}
    app_ms = np.array([10.0 + i for i in range(100)] + [0.5] * 5)
    assert rank.latency_ms["p99"] == pytest.approx(np.percentile(app_ms, 99), abs=1e-3)
    assert rank.sla_clock_ms["p50"] == pytest.approx(np.percentile(app_ms + 1.0, 50), abs=1e-3)
    assert set(rank.stages_ms) == {"stage1", "stage2"}
    assert rank.stages_ms["stage1"] == {"p50": 2.0, "p95": 2.0, "p99": 2.0}
    # 10 rankings per second; within the SLA only in the first four seconds (10..49 ms).
    assert len(rank.throughput) == 10
    assert rank.throughput[1:5] == [10.0, 10.0, 10.0, 10.0]
    assert rank.goodput[:4] == [10.0, 10.0, 10.0, 10.0] and rank.goodput[4:] == [0.0] * 6
    assert rank.throughput[5] == 15.0  # the 5 sheds at t = 5 s
    predict = report.endpoints["/predict"]
    assert predict.outcomes == {"within": 10, "over": 0, "failed": 0, "invalid": 2}
    assert predict.sla_compliance == 1.0 and predict.stages_ms == {}


def test_since_keeps_the_last_seconds(log_path: Path) -> None:
    report = summarize(log_path, since_s=2.0, bucket_s=1)
    assert report.endpoints["/rank"].requests == 21  # t = 7.9 .. 9.9 s


def test_text_report(log_path: Path) -> None:
    out = text(summarize(log_path))
    assert "117 requests over 10 s from 2 worker process(es)" in out
    assert "/rank statuses: 200: 100, 503 overloaded: 5" in out
    assert "/rank stage2 ms p50 / p95 / p99" in out
    assert "per 1 s" in out


def test_plots_are_written(log_path: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    written = plot(summarize(log_path), tmp_path / "plots")
    assert [p.name for p in written] == ["goodput.png", "latency.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


@pytest.mark.parametrize(("duration", "expected"), [(5, 1), (30, 1), (31, 2), (600, 30)])
def test_bucket_for(duration: float, expected: int) -> None:
    assert bucket_for(duration) == expected


def test_unreadable_logs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no such file"):
        summarize(tmp_path / "missing.db")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ReportError, match="schema version"):
        summarize(other)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ReportError):
        summarize(junk)


def test_an_empty_log(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    sink = RequestLog(path, queue_size=1)
    sink.start()
    sink.close()
    report = summarize(path)
    assert report.rows == 0 and text(report).endswith("no requests logged")


def test_the_script(log_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_proc("scripts/report.py", str(log_path), "--bucket-s", "5", "--out", str(out))
    assert "per 5 s" in proc.stdout and "/rank statuses" in proc.stdout
    saved = json.loads((out / "report.json").read_text())
    assert saved["endpoints"]["/rank"]["outcomes"]["within"] == 40
    run_proc("scripts/report.py", str(tmp_path / "nothing.db"), returncode=1)
