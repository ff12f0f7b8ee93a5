"""app.breaker: closed -> open after N failures -> one trial after reset_s -> closed/open."""

from __future__ import annotations

import threading

from app.breaker import CLOSED, HALF_OPEN, OPEN, Breaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(failures: int = 3, reset_s: float = 5.0):
    clock, changes = Clock(), []
    breaker = Breaker("m/1", failures, reset_s, clock, on_change=lambda n, s: changes.append(s))
    return breaker, clock, changes


def test_opens_after_consecutive_failures_only() -> None:
    breaker, _, changes = make(failures=3)
    breaker.failure()
    breaker.failure()
    breaker.success()  # resets the count: failures must be consecutive
    breaker.failure()
    breaker.failure()
    assert breaker.state == CLOSED and breaker.allow()
    breaker.failure()
    assert breaker.state == OPEN
    assert not breaker.allow()
    assert changes == [OPEN]


def test_one_trial_after_reset_then_close_on_success() -> None:
    breaker, clock, changes = make(failures=1, reset_s=5.0)
    breaker.failure()
    clock.now += 4.9
    assert not breaker.allow()
    assert 0 < breaker.retry_after_s() <= 0.11
    clock.now += 0.2
    assert breaker.state == HALF_OPEN
    assert breaker.allow()  # the trial
    assert not breaker.allow()  # only one at a time
    breaker.success()
    assert breaker.state == CLOSED and breaker.allow()
    assert changes == [OPEN, HALF_OPEN, CLOSED]
    assert breaker.retry_after_s() == 0.0 and breaker.opened_for_s() is None


def test_failed_trial_reopens_for_a_full_period() -> None:
    breaker, clock, changes = make(failures=1, reset_s=5.0)
    breaker.failure()
    clock.now += 5.0
    assert breaker.allow()
    clock.now += 1.0
    breaker.failure()
    assert breaker.state == OPEN
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()
    assert changes == [OPEN, HALF_OPEN, OPEN, HALF_OPEN]


def test_released_trial_lets_the_next_caller_try() -> None:
    breaker, clock, _ = make(failures=1, reset_s=1.0)
    breaker.failure()
    clock.now += 1.0
    assert breaker.allow()
    breaker.release()  # the trial did not run (e.g. no time left)
    assert breaker.allow()


def test_concurrent_half_open_admits_exactly_one() -> None:
    breaker, clock, _ = make(failures=1, reset_s=1.0)
    breaker.failure()
    clock.now += 2.0
    allowed: list[bool] = []
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        allowed.append(breaker.allow())

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert allowed.count(True) == 1
