"""Admission control for one worker: bounded, cost-aware, deadline-aware.

A worker runs at most ``slots`` inferences at once (the session pool). A request that
finds no free slot waits in a bounded queue, or is shed at once with 503 +
``Retry-After`` when waiting cannot end in time:

* the queue is full (``max_queue``), or
* the work already queued ahead (estimated ms, spread over the slots) plus the
  request's own cost does not fit in what is left of its deadline (less a
  ``headroom`` share kept for the rest of the request: encoding, the way back).

Cost estimates are model time; what a request really holds its slot for (decoding,
cutting, CPU shared with the other worker) is learned as a ratio, ``scale``, from every
request that ran (:meth:`observe`), and applied to all estimates here.

Waiters are served cheapest first (shortest job first, by estimated ms), so one large
ranking does not hold back many small ones; a waiter older than ``aging_ms`` goes
before any cheaper one, and nobody waits longer than ``max_wait_ms`` or its deadline
(then 503). Everything here runs on the worker's event loop thread: no locks.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from app.deadlines import Deadline
from app.errors import Overloaded


@dataclass(order=True)
class _Waiter:
    cost_ms: float
    seq: int
    enqueued: float = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)
    done: bool = field(default=False, compare=False)


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
    ) -> None:
        self.slots = slots
        self.max_queue = max_queue
        self.max_wait_ms = max_wait_ms
        self.aging_ms = aging_ms
        self.retry_after_s = retry_after_s
        self.headroom = headroom
        #: Slot time / estimated cost, a moving average (>= 1 once decode is counted).
        self.scale = 1.0
        self.running = 0
        self.queued_cost_ms = 0.0
        self.waiting = 0
        self.stats = AdmissionStats()
        self._heap: list[_Waiter] = []  # cheapest first
        self._fifo: deque[_Waiter] = deque()  # oldest first (aging)
        self._seq = itertools.count()

    def _shed(self, message: str) -> Overloaded:
        return Overloaded(message, retry_after_s=self.retry_after_s)

    async def acquire(self, cost_ms: float, deadline: Deadline) -> None:
        """Return when the request holds a slot; raise :class:`Overloaded` to shed it."""
        if self.running < self.slots and not self.waiting:
            self.running += 1
            self.stats.admitted += 1
            return
        if self.waiting >= self.max_queue:
            self.stats.shed_queue_full += 1
            raise self._shed(f"worker queue is full ({self.max_queue} waiting)")
        remaining = deadline.remaining_ms() * (1.0 - self.headroom)
        expected_wait = self.queued_cost_ms * self.scale / self.slots
        own_ms = cost_ms * self.scale
        if expected_wait + own_ms > remaining:
            self.stats.shed_no_time += 1
            raise self._shed(
                f"cannot answer within the deadline: ~{expected_wait:.0f} ms queued ahead"
                f" + ~{own_ms:.0f} ms of work > {max(remaining, 0):.0f} ms left"
            )
        waiter = _Waiter(
            cost_ms, next(self._seq), time.monotonic(), asyncio.get_running_loop().create_future()
        )
        heapq.heappush(self._heap, waiter)
        self._fifo.append(waiter)
        self.queued_cost_ms += cost_ms
        self.waiting += 1
        self.stats.queued += 1
        limit_s = max(0.0, min(self.max_wait_ms, remaining - own_ms)) / 1e3
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), limit_s)
        except TimeoutError:
            if waiter.future.done():  # granted at the last moment: keep the slot
                self.stats.admitted += 1
                return
            self._forget(waiter)
            self.stats.shed_waited += 1
            raise self._shed(f"waited {limit_s * 1e3:.0f} ms for a free slot") from None
        except asyncio.CancelledError:  # client gone while waiting
            if waiter.future.done():
                self.release()
            else:
                self._forget(waiter)
            raise
        self.stats.admitted += 1

    def observe(self, cost_ms: float, held_ms: float) -> None:
        """A request held its slot ``held_ms`` for an estimated ``cost_ms``."""
        if cost_ms > 0.5:  # tiny estimates are mostly noise
            ratio = min(max(held_ms / cost_ms, 0.5), 20.0)
            self.scale += 0.05 * (ratio - self.scale)

    def release(self) -> None:
        """Give the slot back; hand it straight to the next waiter if any."""
        waiter = self._next()
        if waiter is None:
            self.running -= 1
            return
        # The slot passes on: ``running`` is unchanged.
        waiter.future.set_result(None)

    def _next(self) -> _Waiter | None:
        now = time.monotonic()
        while self._fifo and self._fifo[0].done:
            self._fifo.popleft()
        waiter: _Waiter | None = None
        if self._fifo and (now - self._fifo[0].enqueued) * 1e3 >= self.aging_ms:
            waiter = self._fifo.popleft()
            self.stats.aged += 1
        while waiter is None and self._heap:
            top = heapq.heappop(self._heap)
            if not top.done:
                waiter = top
        if waiter is None:
            return None
        self._mark_done(waiter)
        return waiter

    def _mark_done(self, waiter: _Waiter) -> None:
        waiter.done = True
        self.waiting -= 1
        self.queued_cost_ms -= waiter.cost_ms

    def _forget(self, waiter: _Waiter) -> None:
        """Drop a waiter that gave up (lazy: it stays in the heap/deque marked done)."""
        if not waiter.done:
            self._mark_done(waiter)
        # Keep the heap small when many give up at once.
        if len(self._heap) > 4 * self.max_queue + 16:
            self._heap = [w for w in self._heap if not w.done]
            heapq.heapify(self._heap)
