"""app.window: sliding counts on the wall clock, published as gauges."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from app.window import PublishedWindow, Publisher, SlidingCounts, covered_s


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Child:
    """A gauge child that remembers every value it was set to."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def set(self, value: float) -> None:
        self.values.append(value)


def test_counts_expire_slice_by_slice() -> None:
    clock = Clock(1000.0)  # slices of 5 s: [1000, 1005), [1005, 1010), ...
    counts = SlidingCounts(2, window_s=20, slices=4, clock=clock)
    counts.add(0)
    clock.now = 1006.0
    counts.add(0, 2.0)
    counts.add(1, 5.0)
    assert counts.totals().tolist() == [3.0, 5.0]
    clock.now = 1019.9  # the first slice is still one of the last four
    assert counts.totals().tolist() == [3.0, 5.0]
    clock.now = 1020.0  # ... and now it is gone
    assert counts.totals().tolist() == [2.0, 5.0]
    clock.now = 1025.0
    assert counts.totals().tolist() == [0.0, 0.0]


def test_a_long_idle_gap_clears_the_ring() -> None:
    clock = Clock(0.0)
    counts = SlidingCounts(1, window_s=10, slices=5, clock=clock)
    counts.add(0, 7.0)
    clock.now = 1e6
    counts.add(0)
    assert counts.totals().tolist() == [1.0]


def test_add_many_adds_ranges_at_once() -> None:
    counts = SlidingCounts(5, window_s=60)
    counts.add_many(((0, np.array([1.0, 2.0])), (3, np.array([4.0, 5.0]))))
    assert counts.totals().tolist() == [1.0, 2.0, 0.0, 4.0, 5.0]


def test_concurrent_adds_are_not_lost() -> None:
    counts = SlidingCounts(1, window_s=60)

    def work() -> None:
        for _ in range(5000):
            counts.add(0)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts.totals()[0] == 20000


@pytest.mark.parametrize(
    ("now", "since", "expected"),
    [
        (1003.0, None, 58.0),  # 11 full slices of 5 s + 3 s of the current one
        (1000.0, None, 55.0),  # a slice just turned
        (1003.0, 990.0, 13.0),  # the farm started 13 s ago
        (1003.0, 1010.0, 0.0),  # a clock step: never negative
    ],
)
def test_covered_seconds(now: float, since: float | None, expected: float) -> None:
    assert covered_s(60, 12, now, since) == pytest.approx(expected)


def test_published_window_sets_only_what_changed() -> None:
    clock = Clock()
    children = [Child(), Child(), Child()]
    window = PublishedWindow(SlidingCounts(3, 60, clock=clock), children)
    window.publish()
    assert [c.values for c in children] == [[0.0], [0.0], [0.0]]
    window.counts.add(1, 2.0)
    window.publish()
    window.publish()
    assert [c.values for c in children] == [[0.0], [0.0, 2.0], [0.0]]


def test_published_window_needs_one_gauge_per_entry() -> None:
    with pytest.raises(ValueError, match="2 gauges for a window of 3"):
        PublishedWindow(SlidingCounts(3, 60), [Child(), Child()])


def test_publisher_publishes_periodically_and_once_more_at_close() -> None:
    calls: list[int] = []
    ticked = threading.Event()

    def publish() -> None:
        calls.append(1)
        ticked.set()

    publisher = Publisher([publish], interval_s=0.01)
    publisher.start()
    assert ticked.wait(5.0)
    publisher.close()
    after_close = len(calls)
    assert after_close >= 2  # at least one tick, then the final publication
    publisher.close()  # idempotent: publishes again, no thread to stop
    assert len(calls) == after_close + 1


def test_publisher_survives_a_failing_publication(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []
    twice = threading.Event()

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        twice.set()

    publisher = Publisher([flaky], interval_s=0.01)
    publisher.start()
    assert twice.wait(5.0)
    publisher.close()
    assert "window publication failed" in caplog.text
