"""A circuit breaker per model: closed -> open -> half-open -> closed.

``breaker_failures`` consecutive failures open it; while open, :meth:`allow` says no
at once (the cascade answers from the previous stage without waiting). After
``reset_s`` exactly one caller gets a trial: its success closes the breaker, its
failure opens it again. Thread-safe: stages run on executor threads.

Why not pybreaker: its ``CircuitBreaker.call`` holds one lock around the guarded
function, which would serialise every model run of the worker (the session pool would
become one lane). Here the lock guards only the state change, never a run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Breaker:
    def __init__(
        self,
        name: str,
        failures: int,
        reset_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, str], None] | None = None,
    ) -> None:
        self.name = name
        self.max_failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_out = False

    @property
    def state(self) -> str:
        with self._lock:
            if self._state == OPEN and self._clock() - self._opened_at >= self.reset_s:
                return HALF_OPEN
            return self._state

    @property
    def failures(self) -> int:
        return self._failures

    def opened_for_s(self) -> float | None:
        with self._lock:
            return None if self._state == CLOSED else self._clock() - self._opened_at

    def retry_after_s(self) -> float:
        """Seconds until a trial may run (0 when closed)."""
        with self._lock:
            if self._state == CLOSED:
                return 0.0
            return max(0.0, self.reset_s - (self._clock() - self._opened_at))

    def allow(self) -> bool:
        """May a call run now? In half-open, True for exactly one caller (the trial)."""
        if self._state == CLOSED:  # PERF: the common case takes no lock
            return True
        with self._lock:
            if self._state == OPEN:
                if self._clock() - self._opened_at < self.reset_s:
                    return False
                self._set(HALF_OPEN)
            if self._trial_out:
                return False
            self._trial_out = True
            return True

    def release(self) -> None:
        """An allowed call did not run after all (e.g. it did not fit the deadline)."""
        if self._state != CLOSED:
            with self._lock:
                self._trial_out = False

    def success(self) -> None:
        if self._state == CLOSED and not self._failures:
            return
        with self._lock:
            self._failures = 0
            self._trial_out = False
            if self._state != CLOSED:
                self._set(CLOSED)

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            self._trial_out = False
            if self._state == HALF_OPEN or (
                self._state == CLOSED and self._failures >= self.max_failures
            ):
                self._opened_at = self._clock()
                self._set(OPEN)

    def _set(self, state: str) -> None:
        old, self._state = self._state, state
        if self._on_change is not None and old != state:
            self._on_change(self.name, state)
