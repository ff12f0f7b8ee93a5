"""The request log: one SQLite row per ``/rank`` and ``/predict`` request, off the hot path.

A request only puts a tuple on a bounded ``queue.Queue`` (``put_nowait``): when the
queue is full the row is dropped and counted (``ctr_farm_request_log_rows_total
{result="dropped"}``), and the request is never delayed. One writer thread per worker
wakes every ``FLUSH_INTERVAL_S`` and inserts what is queued, ``BATCH_ROWS`` per
transaction. Every worker writes the same file: SQLite in WAL mode lets them take turns
(``busy_timeout``) while readers (``scripts/report.py``) read without blocking them.
Closing (the worker's ASGI lifespan shutdown, after its last request) writes what is
still queued.

The schema is versioned with ``PRAGMA user_version``; a file of another version is
refused at start-up (the worker does not start: move the file away or name another).
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from app import metrics

if TYPE_CHECKING:
    import sqlite3

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
TABLE = "requests"
BATCH_ROWS = 512
FLUSH_INTERVAL_S = 0.25
BUSY_TIMEOUT_MS = 5000
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    ts REAL NOT NULL,            -- unix time the worker received the request
    endpoint TEXT NOT NULL,
    status INTEGER NOT NULL,
    n_candidates INTEGER,        -- null when the body never decoded
    latency_ms REAL NOT NULL,    -- time in the app
    queue_ms REAL NOT NULL,      -- time from nginx's receipt to the app (X-Request-Start)
    stage_ms TEXT,               -- JSON {{"stage1_ms": ..., "stage2_ms": ..., "total_ms": ...}}
    models TEXT NOT NULL,        -- comma-separated name/version that answered
    degraded INTEGER NOT NULL,
    answered_by TEXT,
    reason TEXT,
    outcome TEXT,                -- within / over / failed / invalid (app/goodput.py)
    error_code TEXT,
    variant TEXT,                -- the A/B variant (stable, canary, ...) that answered
    pid INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS {TABLE}_ts ON {TABLE} (ts);
"""
COLUMNS = (
    "request_id",
    "ts",
    "endpoint",
    "status",
    "n_candidates",
    "latency_ms",
    "queue_ms",
    "stage_ms",
    "models",
    "degraded",
    "answered_by",
    "reason",
    "outcome",
    "error_code",
    "variant",
    "pid",
)
_INSERT = f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


class Row(NamedTuple):
    """One request, as the hot path hands it over (``stage_ms`` still a dict)."""

    request_id: str
    ts: float
    endpoint: str
    status: int
    n_candidates: int | None
    latency_ms: float
    queue_ms: float
    stage_ms: dict[str, float] | None
    models: str
    degraded: bool
    answered_by: str | None
    reason: str | None
    outcome: str | None
    error_code: str | None
    variant: str | None
    pid: int


class RequestLogError(Exception):
    """The log file cannot be opened or is of another schema version."""


def connect(path: Path) -> sqlite3.Connection:
    """A connection in WAL mode that waits its turn behind the other workers' writers.

    sqlite3 is imported here, not at the top: a worker without ``request_log`` never
    loads it (~0.9 MiB of RSS, docs/results/issue5_decode_memory.md)."""
    import sqlite3

    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1e3, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode = WAL")
    # WAL + NORMAL: a commit is not fsynced (an OS crash may lose the last rows; the
    # database stays consistent). The log is telemetry, not a ledger.
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def create(path: Path) -> None:
    """Create the file and schema if needed; refuse a file of another schema version."""
    import sqlite3

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(path)
    except (OSError, sqlite3.Error) as exc:
        raise RequestLogError(f"request_log: cannot open {path}: {exc}") from exc
    try:
        conn.execute("BEGIN IMMEDIATE")  # the workers start together: one creates
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise RequestLogError(
                f"request_log: {path} has schema version {version}, this farm writes"
                f" {SCHEMA_VERSION}; move the file away or name another"
            )
        for statement in filter(str.strip, SCHEMA.split(";")):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise RequestLogError(f"request_log: cannot create the schema in {path}: {exc}") from exc
    finally:
        conn.close()


def _db_row(row: Row) -> tuple[Any, ...]:
    stage = None if row.stage_ms is None else msgspec.json.encode(row.stage_ms).decode()
    return (*row[:7], stage, row.models, int(row.degraded), *row[10:])


def export_zeros() -> None:
    """Create the row counters (at 0), so they are exported before the first row."""
    for result in ("written", "dropped", "failed"):
        metrics.REQUEST_LOG_ROWS.labels(result)


class RequestLog:
    """The per-worker sink: ``record()`` from the event loop, a writer thread behind."""

    def __init__(self, path: Path, queue_size: int) -> None:
        self.path = path
        self._queue: queue.Queue[Row] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dropped = metrics.REQUEST_LOG_ROWS.labels("dropped")
        self._written = metrics.REQUEST_LOG_ROWS.labels("written")
        self._failed = metrics.REQUEST_LOG_ROWS.labels("failed")

    def start(self) -> None:
        create(self.path)  # errors here stop the worker's start-up, naming the setting
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def record(self, row: Row) -> None:
        """Queue one row; never blocks (a full queue drops the row and counts it)."""
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self._dropped.inc()

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the thread (bounded by ``timeout_s``)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout_s)
        self._thread = None

    def _run(self) -> None:
        # PERF: the writer wakes every FLUSH_INTERVAL_S and drains the queue; it never
        # waits on the queue itself. Waiting there woke it at every put (a thread switch
        # per request): +113 us per in-process /predict, against +20 us now, inside the
        # noise (scripts/bench_observe.py; the put itself is 1 us).
        conn = connect(self.path)
        try:
            while not self._stop.wait(FLUSH_INTERVAL_S):
                self._drain(conn)
            self._drain(conn)
        finally:
            conn.close()

    def _drain(self, conn: sqlite3.Connection) -> None:
        """Write every queued row, in transactions of up to ``BATCH_ROWS``."""
        while True:
            batch: list[Row] = []
            try:
                while len(batch) < BATCH_ROWS:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            if batch:
                self._write(conn, batch)
            if len(batch) < BATCH_ROWS:
                return

    def _write(self, conn: sqlite3.Connection, batch: list[Row]) -> None:
        import sqlite3  # loaded by connect() already: a dict lookup

        try:
            with conn:  # one transaction per batch
                conn.execute("BEGIN")
                conn.executemany(_INSERT, map(_db_row, batch))
        except sqlite3.Error as exc:
            self._failed.inc(len(batch))
            log.warning(
                "request log write failed",
                extra={"rows": len(batch), "error": str(exc), "path": str(self.path)},
            )
            return
        self._written.inc(len(batch))
