"""The request log (:mod:`app.requestlog`) as a latency / goodput report, with plots.

:func:`summarize` reads the SQLite file (read-only; the farm may be writing it) and
computes, per endpoint: requests and requests per second, SLA outcomes and compliance,
the share of degraded rankings, status counts, latency percentiles (in the app, and from
nginx's receipt: the SLA clock), per-stage percentiles, and goodput per time bucket.
:func:`text` prints it; :func:`plot` writes PNGs (needs matplotlib, the ``bench``
extra). ``scripts/report.py`` is the command line.

Percentiles here are exact (over the logged rows), unlike ``/stats``' estimates from
histogram buckets. Rows the farm dropped (queue full) are not in the log: ``/stats``
counts them (``request_log.dropped``).
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from app.goodput import OUTCOMES, compliance
from app.requestlog import SCHEMA_VERSION, TABLE

QUANTILES = (50, 95, 99)
PLOT_HINT = (
    "matplotlib is not installed; plots skipped (install: .venv/bin/pip install -e '.[bench]')"
)
#: Goodput buckets: at most this many rows in the printed time series.
MAX_BUCKETS = 30
_NICE_BUCKETS_S = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)


class ReportError(Exception):
    """The file is not a request log this version can read."""


def percentiles(values: np.ndarray) -> dict[str, float | None]:
    if not len(values):
        return {f"p{q}": None for q in QUANTILES}
    got = np.percentile(values, QUANTILES)
    return {f"p{q}": round(float(v), 3) for q, v in zip(QUANTILES, got, strict=True)}


def bucket_for(duration_s: float, max_buckets: int = MAX_BUCKETS) -> int:
    """The smallest "nice" bucket (1 s, 2 s, 5 s, ... 1 day) giving at most ``max_buckets``."""
    for size in _NICE_BUCKETS_S:
        if duration_s / size <= max_buckets:
            return size
    return _NICE_BUCKETS_S[-1]


@dataclass
class EndpointReport:
    endpoint: str
    requests: int
    rps: float
    outcomes: dict[str, int]
    sla_compliance: float | None
    #: Degraded rankings among the answered (2xx) requests.
    degraded_share: float | None
    statuses: dict[str, int]
    #: Time in the app, and from nginx's receipt (queue + app: the SLA clock), in ms.
    latency_ms: dict[str, float | None]
    sla_clock_ms: dict[str, float | None]
    stages_ms: dict[str, dict[str, float | None]]
    #: Per bucket start (s since the first row): requests and within-SLA answers per second.
    throughput: list[float] = field(default_factory=list)
    goodput: list[float] = field(default_factory=list)


@dataclass
class Report:
    path: str
    rows: int
    start: float | None
    end: float | None
    duration_s: float
    pids: int
    bucket_s: int
    endpoints: dict[str, EndpointReport]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_rows(path: Path, since_s: float | None = None) -> list[sqlite3.Row]:
    """The log's rows (the last ``since_s`` seconds of it, if given), oldest first."""
    if not path.exists():
        raise ReportError(f"{path}: no such file")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ReportError(f"{path}: cannot open: {exc}") from exc
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise ReportError(
                f"{path}: schema version {version}; this report reads {SCHEMA_VERSION}"
            )
        conn.row_factory = sqlite3.Row
        where, args = "", ()
        if since_s is not None:
            where, args = f"WHERE ts >= (SELECT MAX(ts) FROM {TABLE}) - ?", (since_s,)
        return conn.execute(f"SELECT * FROM {TABLE} {where} ORDER BY ts", args).fetchall()
    except sqlite3.DatabaseError as exc:
        raise ReportError(f"{path}: not a request log: {exc}") from exc
    finally:
        conn.close()


def _endpoint(
    name: str, rows: list[sqlite3.Row], start: float, duration_s: float, bucket_s: int
) -> EndpointReport:
    status = np.array([r["status"] for r in rows])
    app_ms = np.array([r["latency_ms"] for r in rows])
    clock_ms = app_ms + np.array([r["queue_ms"] for r in rows])
    counted = Counter(r["outcome"] for r in rows)
    outcomes = {o: counted.get(o, 0) for o in OUTCOMES}
    ok = status < 300
    degraded = sum(1 for r, good in zip(rows, ok, strict=True) if good and r["degraded"])
    statuses = Counter(
        f"{r['status']} {r['error_code']}" if r["error_code"] else str(r["status"]) for r in rows
    )
    stage_values: dict[str, list[float]] = {}
    for r in rows:
        for key, ms in msgspec.json.decode(r["stage_ms"] or b"{}").items():
            if key != "total_ms" and ms > 0:  # 0.0: the stage did not run
                stage_values.setdefault(key.removesuffix("_ms"), []).append(ms)
    n_buckets = max(1, math.ceil(duration_s / bucket_s))
    index = np.minimum(
        ((np.array([r["ts"] for r in rows]) - start) // bucket_s).astype(int), n_buckets - 1
    )
    within = np.array([r["outcome"] == "within" for r in rows])
    return EndpointReport(
        endpoint=name,
        requests=len(rows),
        rps=round(len(rows) / duration_s, 3) if duration_s else 0.0,
        outcomes=outcomes,
        sla_compliance=compliance(outcomes["within"], outcomes["over"], outcomes["failed"]),
        degraded_share=round(degraded / int(ok.sum()), 6) if ok.any() else None,
        statuses=dict(sorted(statuses.items())),
        latency_ms=percentiles(app_ms),
        sla_clock_ms=percentiles(clock_ms),
        stages_ms={k: percentiles(np.array(v)) for k, v in sorted(stage_values.items())},
        throughput=(np.bincount(index, minlength=n_buckets) / bucket_s).tolist(),
        goodput=(np.bincount(index[within], minlength=n_buckets) / bucket_s).tolist(),
    )


def summarize(path: Path, since_s: float | None = None, bucket_s: int | None = None) -> Report:
    rows = read_rows(path, since_s)
    if not rows:
        return Report(str(path), 0, None, None, 0.0, 0, bucket_s or 1, {})
    start, end = rows[0]["ts"], rows[-1]["ts"]
    # A single instant still spans a second: rates stay finite.
    duration_s = max(end - start, 1.0)
    bucket_s = bucket_s or bucket_for(duration_s)
    by_endpoint: dict[str, list[sqlite3.Row]] = {}
    for r in rows:
        by_endpoint.setdefault(r["endpoint"], []).append(r)
    return Report(
        path=str(path),
        rows=len(rows),
        start=start,
        end=end,
        duration_s=round(duration_s, 3),
        pids=len({r["pid"] for r in rows}),
        bucket_s=bucket_s,
        endpoints={
            name: _endpoint(name, group, start, duration_s, bucket_s)
            for name, group in sorted(by_endpoint.items())
        },
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def text(report: Report) -> str:
    """The report as plain text (what ``scripts/report.py`` prints)."""
    if not report.rows:
        return f"{report.path}: no requests logged"
    lines = [
        f"{report.path}: {report.rows} requests over {report.duration_s:.0f} s"
        f" from {report.pids} worker process(es)",
        "",
        f"{'endpoint':<10} {'requests':>8} {'rps':>8} {'within':>7} {'over':>6} {'failed':>6}"
        f" {'invalid':>7} {'SLA ok':>7} {'degraded':>8}   ms p50 / p95 / p99 (app; from nginx)",
    ]
    for e in report.endpoints.values():
        o = e.outcomes
        lat, clock = e.latency_ms, e.sla_clock_ms
        lines.append(
            f"{e.endpoint:<10} {e.requests:>8} {e.rps:>8.1f} {o['within']:>7} {o['over']:>6}"
            f" {o['failed']:>6} {o['invalid']:>7} {_share(e.sla_compliance):>7}"
            f" {_share(e.degraded_share):>8}   {_ms(lat['p50'])} / {_ms(lat['p95'])} /"
            f" {_ms(lat['p99'])}; {_ms(clock['p50'])} / {_ms(clock['p95'])} / {_ms(clock['p99'])}"
        )
    lines.append("")
    for e in report.endpoints.values():
        statuses = ", ".join(f"{k}: {v}" for k, v in e.statuses.items())
        lines.append(f"{e.endpoint} statuses: {statuses}")
        for stage, q in e.stages_ms.items():
            lines.append(
                f"{e.endpoint} {stage} ms p50 / p95 / p99: "
                f"{_ms(q['p50'])} / {_ms(q['p95'])} / {_ms(q['p99'])}"
            )
    lines += ["", f"per {report.bucket_s} s (s since the first request): requests/s, goodput/s"]
    names = list(report.endpoints)
    lines.append(f"{'':>7}  " + "  ".join(f"{n:>22}" for n in names))
    lines.append(f"{'t':>7}  " + "  ".join(f"{'req/s':>10} {'goodput/s':>11}" for _ in names))
    n_buckets = len(next(iter(report.endpoints.values())).throughput)
    for i in range(n_buckets):
        cells = [
            f"{report.endpoints[n].throughput[i]:>10.1f} {report.endpoints[n].goodput[i]:>11.1f}"
            for n in names
        ]
        lines.append(f"{i * report.bucket_s:>7}  " + "  ".join(cells))
    return "\n".join(lines)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(report: Report, out_dir: Path) -> list[Path]:
    """``goodput.png`` (requests and goodput per second over time, per endpoint) and
    ``latency.png`` (latency percentiles per endpoint and stage). Raises ImportError
    (with :data:`PLOT_HINT`) without matplotlib."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(PLOT_HINT) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for e in report.endpoints.values():
        # One more point so the last bucket is drawn to its end.
        t = np.arange(len(e.throughput) + 1) * report.bucket_s
        rps, good = [*e.throughput, e.throughput[-1]], [*e.goodput, e.goodput[-1]]
        (line,) = ax.step(t, rps, where="post", label=f"{e.endpoint} requests/s")
        ax.step(t, good, where="post", ls="--", color=line.get_color(),
                label=f"{e.endpoint} goodput/s")  # fmt: skip
    ax.set_xlabel("seconds since the first logged request")
    ax.set_ylabel("per second")
    ax.set_title(f"throughput and goodput (bucket {report.bucket_s} s)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    written.append(out_dir / "goodput.png")
    fig.savefig(written[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    labels, series = [], []
    for e in report.endpoints.values():
        labels.append(f"{e.endpoint}\n(from nginx)")
        series.append(e.sla_clock_ms)
        for stage, q in e.stages_ms.items():
            labels.append(f"{e.endpoint}\n{stage}")
            series.append(q)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels)), 4.5))
    x = np.arange(len(labels))
    for i, q in enumerate(QUANTILES):
        values = [s[f"p{q}"] or 0.0 for s in series]
        ax.bar(x + (i - 1) * 0.27, values, width=0.27, label=f"p{q}")
    ax.set_xticks(x, labels)
    ax.set_ylabel("ms")
    ax.set_title("latency percentiles")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    written.append(out_dir / "latency.png")
    fig.savefig(written[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return written
