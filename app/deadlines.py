"""One deadline per request, counted from when nginx received it.

nginx stamps every proxied request with ``X-Request-Start: t=<epoch seconds.ms>``; the
budget comes from the request (``timeout_ms`` field or ``X-Request-Timeout-Ms``
header) or the config default. Time already spent in nginx and in the worker's socket
queue is subtracted, so a request that waited too long is answered at once instead of
being computed for nobody.

The deadline also carries the ``onnxruntime.RunOptions`` of the request's model runs:
:meth:`Deadline.expire` (called by a timer on the event loop) sets ``terminate``, and
ONNX Runtime stops the run between two nodes (``StageTimeout``).
"""

from __future__ import annotations

import time

import onnxruntime as ort

from app.errors import InvalidRequest

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
START_HEADER = "X-Request-Start"
#: A start stamp further in the past than this is a wrong clock, not a queue: ignore it.
MAX_TRUSTED_QUEUE_S = 60.0


def parse_start(header: str | None, now_wall: float) -> float:
    """Seconds the request already spent before the app saw it (0 when unknown)."""
    if not header:
        return 0.0
    value = header.removeprefix("t=")
    try:
        started = float(value)
    except ValueError:
        return 0.0
    waited = now_wall - started
    # nginx's clock is ours (same host); a negative or huge gap is skew or a forged header.
    return waited if 0.0 <= waited <= MAX_TRUSTED_QUEUE_S else 0.0


def parse_timeout(header: str | None, limit_ms: int = 600_000) -> int | None:
    if header is None:
        return None
    try:
        value = int(header.strip())
    except ValueError:
        value = 0
    if not 1 <= value <= limit_ms:
        raise InvalidRequest(
            f"{TIMEOUT_HEADER} must be an integer number of ms in [1, {limit_ms}]",
            field=TIMEOUT_HEADER,
        )
    return value


class Deadline:
    """When a request must be answered, on the monotonic clock."""

    __slots__ = ("budget_ms", "expires_at", "run_options", "started_at")

    def __init__(self, budget_ms: float, already_waited_s: float = 0.0) -> None:
        now = time.monotonic()
        self.budget_ms = budget_ms
        self.started_at = now - already_waited_s
        self.expires_at = self.started_at + budget_ms / 1e3
        self.run_options = ort.RunOptions()

    @classmethod
    def from_request(
        cls,
        field_ms: int | None,
        header_ms: int | None,
        default_ms: int,
        waited_s: float = 0.0,
    ) -> Deadline:
        """The body's budget, else the header's, else the default; ``waited_s`` is the
        time since nginx received the request (``parse_start`` of its stamp)."""
        budget = field_ms or header_ms or default_ms
        return cls(budget, waited_s)

    def remaining_ms(self) -> float:
        return (self.expires_at - time.monotonic()) * 1e3

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.started_at) * 1e3

    def expire(self) -> None:
        """Stop any model run of this request now (thread-safe; ORT polls the flag)."""
        self.run_options.terminate = True

    @property
    def expired(self) -> bool:
        return self.run_options.terminate or time.monotonic() >= self.expires_at
