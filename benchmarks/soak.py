"""Soak: a steady open-loop mix of ``/rank`` and ``/predict``, and each worker's RSS.

``soak(stack, duration_s, rate)`` offers ``rate`` requests/s for ``duration_s`` through
nginx, samples every worker's resident set size (``VmRSS`` in ``/proc/<pid>/status``)
once a second, and fits a least-squares line to each worker's samples after a warm-up
window: the slope in MiB/min is the leak signal (~0 for a farm that does not grow).

:class:`OpenLoad` is the load driver, also used by the fault tests: open loop (request
*i* is due at ``start + i / rate`` whatever the server does, as in
:mod:`benchmarks.openloop`), in a background thread so the caller can kill processes
while it runs, and one record per request with its due and end times (``time.monotonic``)
so each can be placed before or after a signal. Loopback only.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec
import numpy as np

from app.config import Config
from app.sessions import read_card
from app.stack import Stack
from benchmarks.ranking import candidates

#: (path, JSON body) pairs; request *i* sends ``mix[i % len(mix)]``.
Mix = Sequence[tuple[str, bytes]]


@dataclass(frozen=True)
class Shot:
    """One request: when it was due and ended (monotonic s), and how it ended."""

    path: str
    due: float
    #: When the whole request had been handed to the kernel.
    sent: float
    end: float
    #: HTTP status; 0 when no answer came (connection error or timeout).
    status: int
    #: The error's name, or the start of a non-2xx body.
    detail: str = ""


#: A connection idle this long is closed, not reused: nginx closes idle client
#: connections after 75 s, and a request written as it does so gets no answer (what
#: every HTTP client avoids or retries; a 10-minute soak without this saw 13 such).
IDLE_MAX_S = 30.0


class _Conn:
    """HTTP/1.1 over one asyncio stream: Content-Length bodies, keep-alive."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.reusable = True
        self.idle_since = time.monotonic()

    async def send(self, head: bytes, body: bytes) -> float:
        self.writer.write(head + body)
        await self.writer.drain()
        return time.monotonic()

    async def receive(self) -> tuple[int, bytes]:
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("connection closed before an answer")
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                self.reusable = False
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


class OpenLoad:
    """``rate`` requests/s of ``mix`` to ``url`` for ``duration_s``, in a thread.

    ``start()``, then ``join()`` for the shots; ``stop()`` ends the schedule early.
    """

    def __init__(
        self,
        url: str,
        mix: Mix,
        rate: float,
        duration_s: float,
        max_connections: int = 64,
        timeout_s: float = 30.0,
    ) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "", parts.port or 80
        if not (self.host.startswith("127.") or self.host in ("localhost", "::1")):
            raise ValueError(f"load is only ever sent to loopback, not {self.host!r}")
        self.mix, self.rate, self.duration_s = list(mix), rate, duration_s
        self.max_connections, self.timeout_s = max_connections, timeout_s
        self.shots: list[Shot] = []
        self.started_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="open-load", daemon=True)
        self._crash: BaseException | None = None

    # -- control -------------------------------------------------------------------------
    def start(self) -> OpenLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float | None = None) -> list[Shot]:
        self._thread.join(timeout_s if timeout_s is not None else self.duration_s + 120)
        if self._thread.is_alive():
            raise TimeoutError("the load did not finish")
        if self._crash is not None:
            raise RuntimeError("the load driver crashed") from self._crash
        return self.shots

    def done(self, since: float = 0.0, status: int = 200) -> int:
        """Requests answered ``status`` so far that were due at or after ``since``."""
        return sum(1 for s in list(self.shots) if s.status == status and s.due >= since)

    # -- the loop ------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # surfaced by join()
            self._crash = exc

    async def _run(self) -> None:
        idle: list[_Conn] = []
        slots = asyncio.Semaphore(self.max_connections)
        heads = [
            (
                f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            for path, body in self.mix
        ]

        async def one(i: int, due: float) -> None:
            path, body = self.mix[i % len(self.mix)]
            head = heads[i % len(self.mix)]
            async with slots:
                conn, idle_s = None, 0.0
                while idle and conn is None:
                    conn = idle.pop()
                    idle_s = time.monotonic() - conn.idle_since
                    if idle_s > IDLE_MAX_S:
                        conn.close()
                        conn, idle_s = None, 0.0
                sent = float("nan")
                try:
                    if conn is None:
                        conn = _Conn(*await asyncio.open_connection(self.host, self.port))
                    sent = await asyncio.wait_for(conn.send(head, body), self.timeout_s)
                    status, answer = await asyncio.wait_for(conn.receive(), self.timeout_s)
                except (TimeoutError, OSError, EOFError, ValueError, IndexError) as exc:
                    # EOFError: asyncio.IncompleteReadError, a connection cut mid-answer.
                    end, what = time.monotonic(), type(exc).__name__
                    if conn is not None and idle_s:
                        what += f" on a connection reused after {idle_s:.1f} s idle"
                    self.shots.append(Shot(path, due, sent, end, 0, what))
                    if conn is not None:
                        conn.close()
                    return
                if conn.reusable:
                    conn.idle_since = time.monotonic()
                    idle.append(conn)
                else:
                    conn.close()
            detail = "" if 200 <= status < 300 else answer[:200].decode(errors="replace")
            self.shots.append(Shot(path, due, sent, time.monotonic(), status, detail))

        self.started_at = start = time.monotonic() + 0.05
        total = int(self.rate * self.duration_s)
        tasks: list[asyncio.Task[None]] = []
        i = 0
        while i < total and not self._stop.is_set():
            now = time.monotonic()
            while i < total and start + i / self.rate <= now:
                tasks.append(asyncio.create_task(one(i, start + i / self.rate)))
                i += 1
            await asyncio.sleep(max(0.0, min(start + i / self.rate - now, 0.002)))
        await asyncio.gather(*tasks)
        for conn in idle:
            conn.close()


# -- memory ------------------------------------------------------------------------------
def rss_mib(pid: int) -> float | None:
    """A process's resident set size in MiB (``None`` once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@dataclass
class RssSampler:
    """Every ``interval_s``, the RSS of each pid ``pids()`` names, in a thread."""

    pids: Callable[[], list[int]]
    interval_s: float = 1.0
    #: (monotonic s, pid, MiB)
    samples: list[tuple[float, int, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for pid in self.pids():
                mib = rss_mib(pid)
                if mib is not None:
                    self.samples.append((now, pid, mib))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def rss_fit(
    samples: Sequence[tuple[float, int, float]], since: float
) -> dict[int, dict[str, float]]:
    """Per pid: the least-squares RSS slope (MiB/min) over the samples from ``since`` on,
    and the RSS at the start of the warm-up, of the fit, at the end, and its peak."""
    out: dict[int, dict[str, float]] = {}
    for pid in sorted({p for _, p, _ in samples}):
        mine = [(t, m) for t, p, m in samples if p == pid]
        fit = [(t, m) for t, m in mine if t >= since]
        if len(fit) < 3:
            continue
        t = np.array([x for x, _ in fit])
        m = np.array([y for _, y in fit])
        slope, _ = np.polyfit((t - t[0]) / 60.0, m, 1)
        out[pid] = {
            "slope_mib_per_min": round(float(slope), 4),
            "rss_first_mib": round(mine[0][1], 1),
            "rss_fit_start_mib": round(float(m[0]), 1),
            "rss_end_mib": round(float(m[-1]), 1),
            "rss_peak_mib": round(float(m.max()), 1),
            "samples": len(fit),
        }
    return out


# -- the soak ----------------------------------------------------------------------------
def mixed_bodies(config: Config, seed: int = 0, count: int = 16) -> list[tuple[str, bytes]]:
    """Varied requests, alternating: a 200-candidate two-stage ``/rank`` (stage1_k 50),
    a single ``/predict``, a 1000-candidate ``/rank``, a 16-candidate ``/predict``."""
    card = read_card(config.model_dirs()[config.predict_model])
    rng = np.random.default_rng(seed)
    out: list[tuple[str, bytes]] = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            body: dict[str, Any] = {"candidates": candidates(card, 200, rng), "stage1_k": 50}
            out.append(("/rank", msgspec.json.encode(body)))
        elif kind == 1:
            out.append(
                ("/predict", msgspec.json.encode({"candidate": candidates(card, 1, rng)[0]}))
            )
        elif kind == 2:
            body = {"candidates": candidates(card, 1000, rng), "top_k": 20}
            out.append(("/rank", msgspec.json.encode(body)))
        else:
            out.append(("/predict", msgspec.json.encode({"candidates": candidates(card, 16, rng)})))
    return out


def latency_ms(shots: Sequence[Shot]) -> dict[str, float]:
    lat = np.array([(s.end - s.due) * 1e3 for s in shots if s.status == 200] or [0.0])
    return {q: round(float(np.percentile(lat, p)), 2) for q, p in (("p50", 50), ("p99", 99))} | {
        "max": round(float(lat.max()), 2)
    }


def soak(
    stack: Stack,
    duration_s: float,
    rate: float = 100.0,
    warmup_s: float = 30.0,
    mix: Mix | None = None,
) -> dict[str, Any]:
    """Run the soak against a running ``stack``; the figures as a JSON-able dict."""
    mix = mix or mixed_bodies(stack.config)
    pids_before = sorted(stack.worker_pids())
    load = OpenLoad(stack.url, mix, rate, duration_s)
    with RssSampler(stack.worker_pids) as sampler:
        load.start()
        shots = load.join()
    assert load.started_at is not None
    statuses = Counter(s.status for s in shots)
    failed = [s for s in shots if s.status != 200]
    return {
        "duration_s": duration_s,
        "rate": rate,
        "warmup_s": warmup_s,
        "workers": stack.config.workers,
        "requests": len(shots),
        "by_path": dict(Counter(s.path for s in shots)),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "failed": len(failed),
        "failed_examples": [f"{s.path} {s.status} {s.detail[:120]}" for s in failed[:5]],
        "latency_ms": latency_ms(shots),
        "worker_pids_before": pids_before,
        "worker_pids_after": sorted(stack.worker_pids()),
        "rss": {
            str(pid): fit
            for pid, fit in rss_fit(sampler.samples, load.started_at + warmup_s).items()
        },
    }


def markdown(result: dict[str, Any]) -> str:
    """A short report of a :func:`soak` result."""
    lines = [
        f"Soak: {result['duration_s']:.0f} s at {result['rate']:.0f} req/s "
        f"({result['workers']} workers; RSS fit after a {result['warmup_s']:.0f} s warm-up)",
        "",
        f"- requests: {result['requests']} {result['by_path']}, statuses {result['statuses']}, "
        f"failed {result['failed']}",
        f"- latency of the 200s (from the due time): {result['latency_ms']}",
        f"- workers before {result['worker_pids_before']}, after {result['worker_pids_after']}",
        "",
        "| worker pid | RSS slope MiB/min | RSS first | fit start | end | peak | samples |",
        "|---|---|---|---|---|---|---|",
    ]
    for pid, fit in result["rss"].items():
        lines.append(
            f"| {pid} | {fit['slope_mib_per_min']:+.3f} | {fit['rss_first_mib']} "
            f"| {fit['rss_fit_start_mib']} | {fit['rss_end_mib']} | {fit['rss_peak_mib']} "
            f"| {fit['samples']} |"
        )
    return "\n".join(lines) + "\n"
