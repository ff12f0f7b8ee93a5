"""app.admission: inference threads, a bounded cheapest-first queue, aging, shedding."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from app.admission import Admission
from app.deadlines import Deadline
from app.errors import NotReady, Overloaded


@pytest.fixture
def make() -> Iterator:
    made: list[Admission] = []

    def build(**kw) -> Admission:
        opts = {"slots": 1, "max_queue": 8, "max_wait_ms": 2000, "aging_ms": 10_000}
        opts.update(kw)
        made.append(Admission(**opts))
        return made[-1]

    yield build
    for adm in made:
        adm.close(5)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


class Gate:
    """A job that holds its inference thread until opened."""

    def __init__(self) -> None:
        self.started, self.opened = threading.Event(), threading.Event()

    def __call__(self) -> str:
        self.started.set()
        self.opened.wait(10)
        return "gate"


async def hold(adm: Admission, gate: Gate) -> asyncio.Task:
    task = asyncio.create_task(adm.run(1, Deadline(60_000), gate))
    while not gate.started.is_set():
        await asyncio.sleep(0.001)
    return task


def test_runs_on_an_inference_thread_and_returns_the_result(make) -> None:
    adm = make(slots=2)

    async def go() -> tuple[str, str]:
        name = await adm.run(5, Deadline(1000), lambda: threading.current_thread().name)
        return name, threading.current_thread().name

    name, loop_thread = run(go())
    assert name.startswith("infer") and name != loop_thread
    assert adm.running == 0 and adm.waiting == 0


def test_errors_reach_the_caller(make) -> None:
    adm = make()

    def boom() -> None:
        raise ValueError("model said no")

    with pytest.raises(ValueError, match="model said no"):
        run(adm.run(1, Deadline(1000), boom))
    assert run(adm.run(1, Deadline(1000), lambda: 7)) == 7  # the thread lives on


def test_waiters_are_served_cheapest_first(make) -> None:
    adm = make()
    order: list[float] = []

    async def go() -> None:
        gate = Gate()
        first = await hold(adm, gate)
        jobs = [
            asyncio.create_task(adm.run(c, Deadline(60_000), order.append, c))
            for c in (50, 5, 500, 1)
        ]
        await asyncio.sleep(0.02)
        assert adm.waiting == 4 and adm.queued_cost_ms == 556
        gate.opened.set()
        await asyncio.gather(first, *jobs)
        assert adm.running == 0 and adm.waiting == 0 and adm.queued_cost_ms == 0

    run(go())
    assert order == [1, 5, 50, 500]


def test_an_aged_waiter_goes_before_cheaper_ones(make) -> None:
    adm = make(aging_ms=30)
    order: list[float] = []

    async def go() -> None:
        gate = Gate()
        first = await hold(adm, gate)
        big = asyncio.create_task(adm.run(400, Deadline(60_000), order.append, 400))
        await asyncio.sleep(0.06)  # the big one is now older than aging_ms
        small = [asyncio.create_task(adm.run(c, Deadline(60_000), order.append, c)) for c in (3, 2)]
        await asyncio.sleep(0.01)
        gate.opened.set()
        await asyncio.gather(first, big, *small)

    run(go())
    assert order == [400, 2, 3]


def test_full_queue_is_shed_at_once(make) -> None:
    adm = make(max_queue=2, retry_after_s=3)

    async def go() -> None:
        gate = Gate()
        first = await hold(adm, gate)
        waiters = [asyncio.create_task(adm.run(1, Deadline(60_000), int)) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as info:
            await adm.run(1, Deadline(60_000), int)
        assert info.value.retry_after_s == 3 and info.value.status == 503
        assert adm.stats.shed_queue_full == 1
        gate.opened.set()
        await asyncio.gather(first, *waiters)

    run(go())


def test_work_that_cannot_fit_the_deadline_is_shed_without_waiting(make) -> None:
    adm = make()

    async def go() -> None:
        gate = Gate()
        first = await hold(adm, gate)
        queued = asyncio.create_task(adm.run(80, Deadline(60_000), int))
        await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(Overloaded, match="deadline"):
            await adm.run(30, Deadline(100), int)  # 80 ms queued + 30 ms > 90% of 100 ms
        assert loop.time() - t0 < 0.01
        assert adm.stats.shed_no_time == 1
        gate.opened.set()
        await asyncio.gather(first, queued)

    run(go())


def test_wait_is_bounded_and_the_waiter_leaves_the_queue(make) -> None:
    adm = make(max_wait_ms=50)

    async def go() -> None:
        gate = Gate()
        first = await hold(adm, gate)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(Overloaded, match="waited"):
            await adm.run(1, Deadline(60_000), int)
        assert 0.04 < loop.time() - t0 < 0.5
        assert adm.waiting == 0 and adm.queued_cost_ms == 0 and adm.stats.shed_waited == 1
        gate.opened.set()
        await first

    run(go())
    assert adm.running == 0


def test_cancelled_waiter_never_runs(make) -> None:
    adm = make()
    ran: list[int] = []

    async def go() -> None:
        gate = Gate()
        first = await hold(adm, gate)
        task = asyncio.create_task(adm.run(7, Deadline(60_000), ran.append, 1))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert adm.waiting == 0 and adm.queued_cost_ms == 0
        gate.opened.set()
        await first
        assert await adm.run(1, Deadline(1000), lambda: 5) == 5  # the slot is free

    run(go())
    assert ran == []


def test_close_refuses_the_waiting(make) -> None:
    adm = make()

    async def go() -> None:
        gate = Gate()
        first = await hold(adm, gate)
        waiter = asyncio.create_task(adm.run(1, Deadline(60_000), int))
        await asyncio.sleep(0.01)
        closer = asyncio.get_running_loop().run_in_executor(None, adm.close, 5)
        await asyncio.sleep(0.01)
        with pytest.raises(NotReady):
            await waiter
        gate.opened.set()
        assert await first == "gate"  # what had started finishes
        await closer

    run(go())


def test_on_start_reports_each_jobs_wait(make) -> None:
    """The queue-wait metric's source: a job behind a held thread waited about as long."""
    waits: list[float] = []
    adm = make(on_start=waits.append)
    gate = Gate()

    async def go() -> str:
        holder = await hold(adm, gate)
        waiter = asyncio.create_task(adm.run(1, Deadline(60_000), lambda: "second"))
        await asyncio.sleep(0.1)
        gate.opened.set()
        await holder
        return await waiter

    assert run(go()) == "second"
    assert len(waits) == 2
    assert waits[0] < 0.05  # the first found a free thread
    assert waits[1] >= 0.09  # the second waited for the gate
