"""Micro-batching of concurrent single-candidate ``/predict`` calls inside a worker.

``Config.predict_batch_max`` > 1 turns it on. A ``/predict`` of one candidate that runs
inline (``inference`` ``inline``, or ``auto`` with a small body) decodes its candidate
on the event loop as before, then joins the pending batch of its model version instead
of running the model alone. The batch runs as one ONNX Runtime call, on the event loop
thread like any inline run, when it holds ``predict_batch_max`` rows or at the loop's
next turn after its first row arrived, plus ``predict_batch_wait_us`` if set: the
requests whose bytes arrived in the same turn of the loop share one run. Each caller
gets its own row's score.

Why: one row of the AutoInt /predict model costs ~220 us of ORT, two rows ~225 us, eight
~630 us (docs/results/issue5_predict.md).

What stays as without batching: a request's bad input fails only that request (it is
decoded before it joins); a request whose deadline passed while it waited is answered
503 ``deadline_exceeded`` and not run; a client that went away (its task cancelled) is
dropped from the batch; the breaker is asked once per run, and a failed run fails every
request in it, as it fails a lone one. Batched scores can differ from a one-row run in
the last bit (ONNX Runtime's one-row batches round differently; app/cache.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from app.deadlines import Deadline
from app.errors import DeadlineExceeded

#: ``run(key, ids) -> scores``: one model run over the batch's rows (breaker, failures).
RunBatch = Callable[[str, np.ndarray], np.ndarray]


@dataclass(slots=True)
class _Batch:
    run: RunBatch
    rows: list[np.ndarray] = field(default_factory=list)
    waiters: list[asyncio.Future[np.ndarray]] = field(default_factory=list)
    deadlines: list[Deadline | None] = field(default_factory=list)
    timer: asyncio.Handle | None = None


class PredictBatcher:
    """Pending batches by model version, for one event loop (one worker's)."""

    def __init__(
        self,
        max_rows: int,
        wait_us: int,
        retry_after_s: int = 1,
        on_run: Callable[[str, int], None] | None = None,
    ) -> None:
        self.max_rows, self.wait_s = max_rows, wait_us / 1e6
        self.retry_after_s = retry_after_s
        #: ``on_run(key, rows)`` after each successful run (the batch-size metric).
        self.on_run = on_run
        self._pending: dict[str, _Batch] = {}
        #: Runs and rows so far (``rows / runs``: the mean batch size).
        self.runs = 0
        self.rows = 0

    def submit(
        self, key: str, ids: np.ndarray, run: RunBatch, deadline: Deadline | None = None
    ) -> asyncio.Future[np.ndarray]:
        """Add ``ids`` (``[1, fields]``, decoded) to ``key``'s batch; its scores later."""
        loop = asyncio.get_running_loop()
        batch = self._pending.get(key)
        if batch is None:
            batch = self._pending[key] = _Batch(run)
            if self.wait_s > 0:
                batch.timer = loop.call_later(self.wait_s, self.flush, key)
            else:
                batch.timer = loop.call_soon(self.flush, key)
        waiter: asyncio.Future[np.ndarray] = loop.create_future()
        batch.rows.append(ids)
        batch.waiters.append(waiter)
        batch.deadlines.append(deadline)
        if len(batch.rows) >= self.max_rows:
            self.flush(key)
        return waiter

    def flush(self, key: str) -> None:
        """Run ``key``'s pending batch now and answer its callers."""
        batch = self._pending.pop(key, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        rows, waiters = [], []
        for ids, waiter, deadline in zip(batch.rows, batch.waiters, batch.deadlines, strict=True):
            if waiter.done():  # cancelled: the client went away
                continue
            if deadline is not None and deadline.remaining_ms() <= 0:
                waiter.set_exception(
                    DeadlineExceeded(
                        f"the request waited {deadline.elapsed_ms():.0f} ms; its budget was"
                        f" {deadline.budget_ms:.0f} ms",
                        retry_after_s=self.retry_after_s,
                    )
                )
                continue
            rows.append(ids)
            waiters.append(waiter)
        if not rows:
            return
        try:
            scores = batch.run(key, rows[0] if len(rows) == 1 else np.concatenate(rows))
        except Exception as exc:  # every caller of a failed run gets its failure
            for waiter in waiters:
                waiter.set_exception(exc)
            return
        self.runs += 1
        self.rows += len(rows)
        if self.on_run is not None:
            self.on_run(key, len(rows))
        for i, waiter in enumerate(waiters):
            waiter.set_result(scores[i : i + 1])
