"""Admission control for one worker: bounded, cost-aware, deadline-aware.

A worker runs at most ``slots`` inferences at once, on ``slots`` inference threads of
its own. A request that finds no free thread waits in a bounded queue, or is shed at
once with 503 + ``Retry-After`` when waiting cannot end in time:

* the queue is full (``max_queue``), or
* the work already queued ahead (estimated ms, spread over the slots) plus the
  request's own cost does not fit in what is left of its deadline (less a
  ``headroom`` share kept for the rest of the request: encoding, the way back).

Waiters are served cheapest first (shortest job first, by estimated ms), so one large
ranking does not hold back many small ones; a waiter older than ``aging_ms`` goes
before any cheaper one, and nobody waits longer than ``max_wait_ms`` or its deadline
(then 503).

The inference threads take their next job from the queue themselves, so a finished
thread starts the next job without waiting for the event loop (busy refusing requests
under overload). Measured at 2x capacity it made no difference to goodput (0.73-0.80
either way; docs/RELIABILITY.md): the two cores were simply full.

Cost estimates are model time; what a request really keeps a thread busy for
(decoding, cutting, CPU shared with the other worker) is learned as a ratio, ``scale``,
from every job that ran, and applied to all estimates.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from app.deadlines import Deadline
from app.errors import NotReady, Overloaded

T = TypeVar("T")
_WAITING, _RUNNING, _GONE = 0, 1, 2


@dataclass(order=True)
class _Job:
    cost_ms: float
    seq: int
    enqueued: float = field(compare=False)
    fn: Callable[..., Any] = field(compare=False)
    args: tuple[Any, ...] = field(compare=False)
    future: asyncio.Future[Any] = field(compare=False)
    loop: asyncio.AbstractEventLoop = field(compare=False)
    state: int = field(default=_WAITING, compare=False)


@dataclass
class AdmissionStats:
    admitted: int = 0
    queued: int = 0
    shed_queue_full: int = 0
    shed_no_time: int = 0
    shed_waited: int = 0
    aged: int = 0


class Admission:
    def __init__(
        self,
        slots: int,
        max_queue: int,
        max_wait_ms: float,
        aging_ms: float,
        retry_after_s: int = 1,
        headroom: float = 0.1,
        thread_name: str = "infer",
        on_start: Callable[[float], None] | None = None,
    ) -> None:
        self.slots = slots
        self.max_queue = max_queue
        self.max_wait_ms = max_wait_ms
        self.aging_ms = aging_ms
        self.retry_after_s = retry_after_s
        self.headroom = headroom
        #: Called with the seconds a job waited, when its thread starts it (a metric).
        self.on_start = on_start
        #: Thread time / estimated cost, a moving average.
        self.scale = 1.0
        self.running = 0
        self.waiting = 0
        self.queued_cost_ms = 0.0
        self.stats = AdmissionStats()
        self._heap: list[_Job] = []  # cheapest first
        self._fifo: deque[_Job] = deque()  # oldest first (aging)
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"{thread_name}_{i}", daemon=True)
            for i in range(slots)
        ]
        for thread in self._threads:
            thread.start()

    def _shed(self, message: str) -> Overloaded:
        return Overloaded(message, retry_after_s=self.retry_after_s)

    async def run(self, cost_ms: float, deadline: Deadline, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on an inference thread; raise :class:`Overloaded` to shed it."""
        loop = asyncio.get_running_loop()
        job = _Job(cost_ms, next(self._seq), time.monotonic(), fn, args, loop.create_future(), loop)
        with self._cv:
            limit_s = self._admit(job, deadline)
            heapq.heappush(self._heap, job)
            self._fifo.append(job)
            self.waiting += 1
            self.queued_cost_ms += cost_ms
            self._cv.notify()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), limit_s)
        except TimeoutError:
            with self._cv:
                gave_up = job.state == _WAITING
                if gave_up:
                    self._forget(job)
                    self.stats.shed_waited += 1
            if gave_up:
                raise self._shed(f"waited {limit_s * 1e3:.0f} ms for a free slot") from None
            return await job.future  # it started at the last moment: let it finish
        except asyncio.CancelledError:  # the client is gone
            with self._cv:
                if job.state == _WAITING:
                    self._forget(job)
            raise

    def _admit(self, job: _Job, deadline: Deadline) -> float | None:
        """Under the lock: may the job wait? Its wait limit in s (None: a thread is free)."""
        if self.running + self.waiting < self.slots:
            self.stats.admitted += 1
            return None
        if self.waiting >= self.max_queue:
            self.stats.shed_queue_full += 1
            raise self._shed(f"worker queue is full ({self.max_queue} waiting)")
        remaining = deadline.remaining_ms() * (1.0 - self.headroom)
        expected_wait = self.queued_cost_ms * self.scale / self.slots
        own_ms = job.cost_ms * self.scale
        if expected_wait + own_ms > remaining:
            self.stats.shed_no_time += 1
            raise self._shed(
                f"cannot answer within the deadline: ~{expected_wait:.0f} ms queued ahead"
                f" + ~{own_ms:.0f} ms of work > {max(remaining, 0):.0f} ms left"
            )
        self.stats.queued += 1
        self.stats.admitted += 1
        return max(0.0, min(self.max_wait_ms, remaining - own_ms)) / 1e3

    def _forget(self, job: _Job) -> None:
        job.state = _GONE
        self.waiting -= 1
        self.queued_cost_ms -= job.cost_ms
        # Lazy deletion; keep the heap small when many give up at once.
        if len(self._heap) > 4 * self.max_queue + 16:
            self._heap = [j for j in self._heap if j.state == _WAITING]
            heapq.heapify(self._heap)
            self._fifo = deque(j for j in self._fifo if j.state == _WAITING)

    def _next(self) -> _Job | None:
        """Under the lock: the aged-out oldest waiter, else the cheapest."""
        while self._fifo and self._fifo[0].state != _WAITING:
            self._fifo.popleft()
        job = None
        if self._fifo and (time.monotonic() - self._fifo[0].enqueued) * 1e3 >= self.aging_ms:
            job = self._fifo.popleft()
            self.stats.aged += 1
        while job is None and self._heap:
            top = heapq.heappop(self._heap)
            if top.state == _WAITING:
                job = top
        if job is not None:
            job.state = _RUNNING
            self.waiting -= 1
            self.queued_cost_ms -= job.cost_ms
            self.running += 1
        return job

    def _serve(self) -> None:
        while True:
            with self._cv:
                job = self._next()
                while job is None:
                    if self._closed:
                        return
                    self._cv.wait()
                    job = self._next()
            if self.on_start is not None:
                self.on_start(time.monotonic() - job.enqueued)
            t0 = time.perf_counter()
            try:
                result, error = job.fn(*job.args), None
            except BaseException as exc:  # delivered to the awaiting request, not lost
                result, error = None, exc
            held_ms = (time.perf_counter() - t0) * 1e3
            with self._cv:
                self.running -= 1
                if job.cost_ms > 0.5:  # tiny estimates are mostly noise
                    ratio = min(max(held_ms / job.cost_ms, 0.5), 20.0)
                    self.scale += 0.05 * (ratio - self.scale)
            # A closed loop (RuntimeError) means nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                job.loop.call_soon_threadsafe(_settle, job.future, result, error)

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish the jobs already started; refuse to start new ones; join the threads."""
        with self._cv:
            self._closed = True
            for job in self._heap:
                if job.state == _WAITING:
                    job.state = _GONE
                    gone = NotReady("the worker is shutting down", retry_after_s=self.retry_after_s)
                    job.loop.call_soon_threadsafe(_settle, job.future, None, gone)
            self._heap.clear()
            self._fifo.clear()
            self.waiting, self.queued_cost_ms = 0, 0.0
            self._cv.notify_all()
        for thread in self._threads:
            thread.join(timeout_s)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
