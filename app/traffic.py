"""Where a request's traffic goes besides "the models": A/B variants, a canary rollout,
and shadow comparisons. Knows nothing of HTTP or of ONNX Runtime.

- :class:`Router` picks a request's variant by a stable hash of its key, against
  cumulative weights. Keys are placed on [0, 1) once; the canary is the first interval,
  so as its share grows a key that was on the canary stays there.
- :class:`Comparator` runs another lineup's cascade on the same candidates on one
  low-priority background thread, after the answer is computed, and records how much
  the two agree (top-k overlap, stage-1 overlap) and how long the other took. Its queue
  is bounded: when it is full, the comparison is dropped and counted, never waited for.
- :class:`CanaryController` walks the rollout plan. One worker leads (an exclusive
  ``flock`` on ``run/canary.lock``; another takes over if it dies) and writes the state
  to ``run/canary.json``; every worker reads it and sets its router's canary weight.
  Each step is judged on farm-wide metrics since the step began: error rate and p99
  against stable's, and agreement with stable; a breach rolls the canary back to 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec
import numpy as np

from app import metrics
from app.config import CanaryConfig

log = logging.getLogger(__name__)

STABLE, CANARY, SHADOW = "stable", "canary", "shadow"


def key_point(key: str, salt: str) -> float:
    """A key's place on [0, 1): the same on every worker, every run, every machine."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, key=salt.encode()[:64]).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class Router:
    """Variant of a key, by cumulative weights over :func:`key_point`."""

    def __init__(self, weights: Sequence[tuple[str, float]], salt: str) -> None:
        self.salt = salt
        self.set_weights(weights)

    def set_weights(self, weights: Sequence[tuple[str, float]]) -> None:
        bounds, total = [], 0.0
        for name, weight in weights:
            total += weight
            bounds.append((total, name))
        # One assignment: a concurrent choose() sees the old table or the new one.
        self._bounds = tuple(bounds)
        self.weights = dict(weights)

    def choose(self, key: str) -> str:
        bounds = self._bounds
        if len(bounds) == 1:
            return bounds[0][1]  # PERF: no split, no hash
        point = key_point(key, self.salt)
        for upper, name in bounds:
            if point < upper:
                return name
        return bounds[-1][1]  # rounding: weights summing to 0.9999999


# -- comparisons ---------------------------------------------------------------------------
class Ranked(Protocol):
    indices: np.ndarray
    stage1_kept: np.ndarray | None


def overlap(ours: np.ndarray | None, theirs: np.ndarray | None) -> float | None:
    """Share of ``ours`` that ``theirs`` also holds (None if either is missing or empty)."""
    if ours is None or theirs is None or len(ours) == 0:
        return None
    return len(np.intersect1d(ours, theirs, assume_unique=True)) / len(ours)


@dataclass(frozen=True, slots=True)
class Comparison:
    label: str  # "shadow" or "canary": what the metrics are labelled with
    rank: Callable[[], Ranked]  # the other lineup's ranking of the same request
    reference: Ranked  # the answer the client got


class Comparator:
    """One background thread that runs comparisons, niced so serving goes first."""

    def __init__(self, max_queue: int = 8, nice: int = 10) -> None:
        self._queue: queue.Queue[Comparison | None] = queue.Queue(maxsize=max_queue)
        self._nice = nice
        self.done = 0
        self._thread = threading.Thread(target=self._main, name="comparator", daemon=True)
        self._thread.start()

    def submit(self, comparison: Comparison) -> bool:
        try:
            self._queue.put_nowait(comparison)
        except queue.Full:
            metrics.COMPARE_DROPPED.labels(comparison.label).inc()
            return False
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        self._thread.join(timeout_s)

    def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until every submitted comparison is done (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def _main(self) -> None:
        # Linux nices threads one by one: the comparisons yield the CPU to serving.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._run(job)
            finally:
                self._queue.task_done()

    def _run(self, job: Comparison) -> None:
        t0 = time.perf_counter()
        try:
            other = job.rank()
        except Exception as exc:  # the other lineup failing is a finding, not a crash
            metrics.COMPARE_FAILED.labels(job.label).inc()
            log.warning("comparison failed", extra={"label": job.label, "error": str(exc)})
            return
        metrics.COMPARE_LATENCY.labels(job.label).observe(time.perf_counter() - t0)
        for what, value in (
            ("topk", overlap(job.reference.indices, other.indices)),
            ("stage1", overlap(job.reference.stage1_kept, other.stage1_kept)),
        ):
            if value is not None:
                metrics.AGREEMENT.labels(job.label, what).observe(value)
        self.done += 1


def sampled(share: float) -> bool:
    return share >= 1.0 or (share > 0.0 and random.random() < share)


# -- canary --------------------------------------------------------------------------------
class CanaryState(msgspec.Struct):
    """``run/canary.json``: where the rollout is, written by the leading worker."""

    status: str = "running"  # running | promoted | rolled_back
    step: int = 0
    weight: float = 0.0
    step_started: float = 0.0
    reason: str | None = None
    #: Farm-wide counters when the step began (the step is judged on what came since).
    baseline: dict[str, Any] = {}
    #: The last judgement: canary and stable figures of the current step.
    figures: dict[str, Any] = {}


class CanaryController:
    """Leads (or follows) the rollout; :meth:`tick` once a second from a thread."""

    def __init__(
        self,
        plan: CanaryConfig,
        run_dir: Path,
        router: Router,
        snapshot: Callable[[], dict[str, Any]] = lambda: metrics.variant_snapshot(),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.plan, self.router, self.snapshot, self.clock = plan, router, snapshot, clock
        self.path = run_dir / "canary.json"
        self.lock_path = run_dir / "canary.lock"
        self._lock_fd: int | None = None
        self._mtime = 0.0
        self.state = CanaryState(weight=plan.steps[0], step_started=clock())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._apply(self.state)

    # -- threads ---------------------------------------------------------------------------
    def start(self, interval_s: float = 1.0) -> None:
        self._thread = threading.Thread(
            target=self._loop, args=(interval_s,), name="canary", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock: another worker leads
            self._lock_fd = None

    def _loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.tick()
            except Exception:  # a broken tick must not end the rollout thread silently
                log.exception("canary tick failed")

    # -- one step of the controller ------------------------------------------------------
    @property
    def leading(self) -> bool:
        if self._lock_fd is None:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            self._lock_fd = fd
            self._take_over()
        return True

    def _take_over(self) -> None:
        """A new leader continues from the file (or starts the plan if there is none)."""
        try:
            self.state = msgspec.json.decode(self.path.read_bytes(), type=CanaryState)
        except (OSError, msgspec.DecodeError):
            self.state = CanaryState(
                weight=self.plan.steps[0], step_started=self.clock(), baseline=self.snapshot()
            )
            self._write()
        log.info("canary: leading", extra={"pid": os.getpid(), "step": self.state.step})

    def tick(self) -> CanaryState:
        if self.leading:
            if self.state.status == "running":
                self._judge()
        else:
            self._follow()
        return self.state

    def _follow(self) -> None:
        try:
            mtime = self.path.stat().st_mtime
            if mtime == self._mtime:
                return
            state = msgspec.json.decode(self.path.read_bytes(), type=CanaryState)
        except (OSError, msgspec.DecodeError):
            return  # not written yet, or mid-rename: next tick
        self._mtime = mtime
        self.state = state
        self._apply(state)

    def _judge(self) -> None:
        now, plan, state = self.clock(), self.plan, self.state
        figures = step_figures(state.baseline, self.snapshot())
        state.figures = figures
        breach = breached(plan, figures)
        if breach is not None:
            self._set(status="rolled_back", weight=0.0, reason=breach)
            log.error("canary rolled back", extra={"reason": breach, "figures": figures})
            return
        enough = figures[CANARY]["requests"] >= plan.min_requests
        if now - state.step_started >= plan.step_s and enough:
            if state.step + 1 >= len(plan.steps):
                self._set(status="promoted", reason=None)
                log.warning("canary promoted", extra={"weight": state.weight})
                return
            self._set(
                step=state.step + 1,
                weight=plan.steps[state.step + 1],
                step_started=now,
                baseline=self.snapshot(),
            )
            log.warning("canary advanced", extra={"step": state.step, "weight": state.weight})
            return
        self._write()

    def _set(self, **changes: Any) -> None:
        for name, value in changes.items():
            setattr(self.state, name, value)
        self._apply(self.state)
        self._write()

    def _apply(self, state: CanaryState) -> None:
        self.router.set_weights([(CANARY, state.weight), (STABLE, 1.0 - state.weight)])
        metrics.CANARY_WEIGHT.set(state.weight)
        metrics.CANARY_STATUS.set(CANARY_STATUS_LEVEL[state.status])

    def _write(self) -> None:
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(msgspec.json.encode(self.state))
        os.replace(tmp, self.path)  # readers see the old file or the new one


CANARY_STATUS_LEVEL = {"running": 0, "promoted": 1, "rolled_back": 2}


def step_figures(before: dict[str, Any], now: dict[str, Any]) -> dict[str, Any]:
    """Per variant, what happened between two :func:`metrics.variant_snapshot` calls:
    requests, errors, error rate, p99 (from the histogram's buckets), mean agreement."""
    out: dict[str, Any] = {}
    for variant in (CANARY, STABLE):
        a, b = before.get(variant, {}), now.get(variant, {})
        requests = b.get("requests", 0) - a.get("requests", 0)
        errors = b.get("errors", 0) - a.get("errors", 0)
        buckets = [
            (le, b.get("buckets", {}).get(le, 0) - a.get("buckets", {}).get(le, 0))
            for le in sorted(b.get("buckets", {}), key=float)
        ]
        out[variant] = {
            "requests": requests,
            "errors": errors,
            "error_rate": errors / requests if requests else 0.0,
            "p99_s": quantile(buckets, 0.99),
        }
    for what in ("topk", "stage1"):
        a, b = before.get("agreement", {}).get(what, {}), now.get("agreement", {}).get(what, {})
        count = b.get("count", 0) - a.get("count", 0)
        total = b.get("sum", 0.0) - a.get("sum", 0.0)
        out[CANARY][f"{what}_overlap"] = total / count if count else None
        out[CANARY][f"{what}_compared"] = count
    return out


def quantile(cumulative: list[tuple[str, float]], q: float) -> float | None:
    """Quantile ``q`` from cumulative histogram buckets ``(le, count)``, interpolated
    within its bucket as Prometheus' ``histogram_quantile`` does (None without samples)."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    target = q * cumulative[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in cumulative:
        upper = float(le)
        if count >= target:
            if upper == float("inf"):
                return prev_le
            if count == prev_count:
                return upper
            return prev_le + (upper - prev_le) * (target - prev_count) / (count - prev_count)
        prev_le, prev_count = upper, count
    return prev_le


#: Comparisons a step needs before agreement is judged.
MIN_COMPARED = 10


def breached(plan: CanaryConfig, figures: dict[str, Any]) -> str | None:
    """Why the canary must roll back now, or None."""
    canary, stable = figures[CANARY], figures[STABLE]
    if canary["requests"] >= plan.min_requests:
        excess = canary["error_rate"] - stable["error_rate"]
        if excess > plan.max_error_rate_delta:
            return (
                f"error rate {canary['error_rate']:.3f} vs stable {stable['error_rate']:.3f}"
                f" (allowed +{plan.max_error_rate_delta})"
            )
        c99, s99 = canary["p99_s"], stable["p99_s"]
        judged = stable["requests"] >= plan.min_requests and c99 and s99
        if judged and c99 > plan.max_p99_ratio * s99:
            return f"p99 {c99 * 1e3:.1f} ms vs stable {s99 * 1e3:.1f} ms"
    for what, bound in (("topk", plan.min_topk_overlap), ("stage1", plan.min_stage1_overlap)):
        value = canary[f"{what}_overlap"]
        if canary[f"{what}_compared"] >= MIN_COMPARED and value is not None and value < bound:
            return f"{what} overlap with stable {value:.2f} < {bound}"
    return None
