"""Counts over the last N seconds, shared across gunicorn's workers as live gauges.

Prometheus counters answer "how many since the start"; ``/stats`` and the drift monitor
need "how many lately", farm-wide, from whichever worker answers. So each worker keeps
:class:`SlidingCounts`: a ring of ``slices`` count vectors, one per ``window_s /
slices`` seconds, with slice boundaries on the wall clock (every worker's ring turns at
the same instants). :class:`Publisher`, a background thread per worker, writes each
window's totals (the whole ring, the current partial slice included) into gauges with
``multiprocess_mode="livesum"`` once a second: the merged gauge is then the farm's
count over the window, and a dead worker's share leaves it with its gauge file.

Recording is one locked vector increment; publishing sets only the gauges that changed.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

#: Seconds between two publications of every worker's windows.
PUBLISH_INTERVAL_S = 1.0


class SlidingCounts:
    """``size`` float counters summed over the last ``window_s`` seconds (thread-safe)."""

    def __init__(
        self,
        size: int,
        window_s: float,
        slices: int = 12,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.size, self.window_s, self.slices = size, float(window_s), slices
        self.slice_s = self.window_s / slices
        self._clock = clock
        self._ring = np.zeros((slices, size), dtype=np.float64)
        self._epoch = int(clock() // self.slice_s)
        self._lock = threading.Lock()

    def _advance(self) -> np.ndarray:
        """Under the lock: zero the slices that ended since the last call; the current one."""
        epoch = int(self._clock() // self.slice_s)
        gap = epoch - self._epoch
        if gap > 0:
            if gap >= self.slices:
                self._ring[:] = 0.0
            else:
                for e in range(self._epoch + 1, epoch + 1):
                    self._ring[e % self.slices] = 0.0
            self._epoch = epoch
        return self._ring[self._epoch % self.slices]

    def add(self, index: int, value: float = 1.0) -> None:
        with self._lock:
            self._advance()[index] += value

    def add_many(self, parts: Sequence[tuple[int, np.ndarray]]) -> None:
        """Add each ``(start, values)`` to ``[start, start + len(values))`` at once."""
        with self._lock:
            row = self._advance()
            for start, values in parts:
                row[start : start + len(values)] += values

    def totals(self) -> np.ndarray:
        with self._lock:
            self._advance()
            return self._ring.sum(axis=0)

    def clear(self) -> None:
        with self._lock:
            self._ring[:] = 0.0


def covered_s(window_s: float, slices: int, now: float, since: float | None = None) -> float:
    """Seconds a window published at ``now`` covers: its full slices plus the current one
    so far (the same for every worker: slices turn on the wall clock), never more than
    the time since ``since`` (the farm's start)."""
    slice_s = window_s / slices
    covered = (slices - 1) * slice_s + (now - math.floor(now / slice_s) * slice_s)
    return max(0.0, min(covered, now - since)) if since is not None else covered


class PublishedWindow:
    """A :class:`SlidingCounts` whose entry ``i`` is published to ``children[i]`` (a gauge
    child per label set)."""

    def __init__(self, counts: SlidingCounts, children: Sequence[object]) -> None:
        if len(children) != counts.size:
            raise ValueError(f"{len(children)} gauges for a window of {counts.size}")
        self.counts = counts
        self._children = list(children)
        self._last = np.full(counts.size, np.nan)
        self._lock = threading.Lock()

    def publish(self) -> None:
        with self._lock:  # the thread and a /stats handler may publish at once
            totals = self.counts.totals()
            for i in np.flatnonzero(totals != self._last):
                self._children[i].set(float(totals[i]))  # type: ignore[attr-defined]
            self._last = totals

    def clear(self) -> None:
        """Zero the window and publish the zeros (a retired window leaves the sums)."""
        self.counts.clear()
        self.publish()


class Publisher:
    """A daemon thread calling ``publish`` of each window every ``interval_s`` seconds."""

    def __init__(
        self, windows: Sequence[Callable[[], None]], interval_s: float = PUBLISH_INTERVAL_S
    ) -> None:
        self._publish = list(windows)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self) -> None:
        for fn in self._publish:
            fn()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="window-publisher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.publish()
            except Exception:  # a failed publication must not end the thread: next second
                log.exception("window publication failed")

    def close(self) -> None:
        """Stop the thread, then publish once more (the last requests' counts)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        self.publish()
