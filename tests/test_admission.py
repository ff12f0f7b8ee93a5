"""app.admission: bounded slots, a bounded cheapest-first queue, aging, shedding."""

from __future__ import annotations

import asyncio

import pytest

from app.admission import Admission
from app.deadlines import Deadline
from app.errors import Overloaded


def admission(**kw) -> Admission:
    opts = {"slots": 1, "max_queue": 8, "max_wait_ms": 2000, "aging_ms": 10_000}
    opts.update(kw)
    return Admission(**opts)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_free_slot_admits_at_once_and_release_frees_it() -> None:
    async def go() -> None:
        adm = admission(slots=2)
        await adm.acquire(5, Deadline(1000))
        await adm.acquire(5, Deadline(1000))
        assert adm.running == 2 and adm.waiting == 0
        adm.release()
        adm.release()
        assert adm.running == 0

    run(go())


def test_waiters_are_served_cheapest_first() -> None:
    async def go() -> list[float]:
        adm = admission()
        await adm.acquire(1, Deadline(10_000))  # holds the only slot
        order: list[float] = []

        async def job(cost: float) -> None:
            await adm.acquire(cost, Deadline(10_000))
            order.append(cost)
            adm.release()

        tasks = [asyncio.create_task(job(c)) for c in (50, 5, 500, 1)]
        await asyncio.sleep(0.01)
        assert adm.waiting == 4 and adm.queued_cost_ms == 556
        adm.release()
        await asyncio.gather(*tasks)
        assert adm.running == 0 and adm.waiting == 0 and adm.queued_cost_ms == 0
        return order

    assert run(go()) == [1, 5, 50, 500]


def test_an_aged_waiter_goes_before_cheaper_ones() -> None:
    async def go() -> list[float]:
        adm = admission(aging_ms=30)
        await adm.acquire(1, Deadline(10_000))
        order: list[float] = []

        async def job(cost: float) -> None:
            await adm.acquire(cost, Deadline(10_000))
            order.append(cost)
            adm.release()

        big = asyncio.create_task(job(400))
        await asyncio.sleep(0.05)  # the big one is now older than aging_ms
        small = [asyncio.create_task(job(c)) for c in (3, 2)]
        await asyncio.sleep(0.005)
        adm.release()
        await asyncio.gather(big, *small)
        return order

    assert run(go()) == [400, 2, 3]


def test_full_queue_is_shed_at_once() -> None:
    async def go() -> None:
        adm = admission(max_queue=2, retry_after_s=3)
        await adm.acquire(1, Deadline(10_000))
        waiters = [asyncio.create_task(adm.acquire(1, Deadline(10_000))) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as info:
            await adm.acquire(1, Deadline(10_000))
        assert info.value.retry_after_s == 3 and info.value.status == 503
        assert adm.stats.shed_queue_full == 1
        for _ in range(3):
            adm.release()
            await asyncio.sleep(0)
        await asyncio.gather(*waiters)

    run(go())


def test_work_that_cannot_fit_the_deadline_is_shed_without_waiting() -> None:
    async def go() -> None:
        adm = admission()
        await adm.acquire(1, Deadline(10_000))
        queued = asyncio.create_task(adm.acquire(80, Deadline(10_000)))
        await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(Overloaded, match="deadline"):
            await adm.acquire(30, Deadline(100))  # 80 ms queued + 30 ms > 100 ms budget
        assert loop.time() - t0 < 0.01
        assert adm.stats.shed_no_time == 1
        adm.release()
        await queued
        adm.release()

    run(go())


def test_wait_is_bounded_by_max_wait_and_the_waiter_leaves_the_queue() -> None:
    async def go() -> None:
        adm = admission(max_wait_ms=50)
        await adm.acquire(1, Deadline(10_000))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(Overloaded, match="waited"):
            await adm.acquire(1, Deadline(10_000))
        assert 0.04 < loop.time() - t0 < 0.5
        assert adm.waiting == 0 and adm.queued_cost_ms == 0 and adm.stats.shed_waited == 1
        adm.release()
        assert adm.running == 0

    run(go())


def test_cancelled_waiter_does_not_leak_its_place_or_a_slot() -> None:
    async def go() -> None:
        adm = admission()
        await adm.acquire(1, Deadline(10_000))
        task = asyncio.create_task(adm.acquire(7, Deadline(10_000)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert adm.waiting == 0 and adm.queued_cost_ms == 0
        adm.release()
        assert adm.running == 0
        await adm.acquire(1, Deadline(10_000))  # the slot is really free
        assert adm.running == 1

    run(go())
