"""Open-loop load: requests sent on a fixed schedule, whatever the server does.

wrk is closed-loop: a connection sends its next request only when the previous
answer arrived, so when the server stalls the client politely stops asking and the
stall never shows in the percentiles (coordinated omission). Here request *i* is due
at ``start + i / rate``; its latency is measured from that due time, so time spent
waiting for a free connection counts, as it would for a real user.

A minimal HTTP/1.1 client over asyncio streams (keep-alive, Content-Length bodies)
keeps the driver cheap enough for a few thousand requests per second on one core.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np


@dataclass
class OpenLoopResult:
    rate: float
    duration_s: float
    sent: int = 0
    #: (HTTP status, latency from the due time in ms) per completed request.
    samples: list[tuple[int, float]] = field(default_factory=list)
    errors: int = 0
    retry_after: int = 0

    def summary(self, sla_ms: float | None = None) -> dict[str, float]:
        statuses = np.array([s for s, _ in self.samples] or [0])
        lat = np.array([ms for _, ms in self.samples] or [0.0])
        ok_lat = lat[statuses == 200] if (statuses == 200).any() else np.zeros(1)
        out = {
            "offered_rps": self.rate,
            "sent": self.sent,
            "completed_rps": len(self.samples) / self.duration_s,
            "ok_rps": int((statuses == 200).sum()) / self.duration_s,
            "errors": self.errors,
            "retry_after": self.retry_after,
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "ok_p50_ms": float(np.percentile(ok_lat, 50)),
            "ok_p99_ms": float(np.percentile(ok_lat, 99)),
            "max_ms": float(lat.max()),
        }
        for status, count in zip(*np.unique(statuses, return_counts=True), strict=True):
            if self.samples:
                out[f"status_{status}"] = int(count)
        if sla_ms is not None:
            good = int(((statuses == 200) & (lat <= sla_ms)).sum())
            out["goodput_rps"] = good / self.duration_s
        return out


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def request(self, message: bytes) -> tuple[int, bytes]:
        """Send one whole request (head + body); return the status and the raw headers."""
        self.writer.write(message)
        # PERF: one read up to the blank line instead of a readline() per header: the
        # driver shares the farm's two cores, so its cost per request is the farm's loss.
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError("connection closed") from exc
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        length = int(head[at + 17 : head.index(b"\r\n", at + 2)]) if at >= 0 else 0
        await self.reader.readexactly(length)
        return status, lower

    def close(self) -> None:
        self.writer.close()


def _messages(url: str, bodies: list[bytes], content_type: str) -> tuple[str, int, list[bytes]]:
    """Host, port and the complete request bytes per body, built once before the clock."""
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    messages = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        + body
        for body in bodies
    ]
    return host, port, messages


async def _run(
    url: str,
    bodies: list[bytes],
    rate: float,
    duration_s: float,
    max_connections: int,
    timeout_s: float,
    content_type: str,
) -> OpenLoopResult:
    host, port, messages = _messages(url, bodies, content_type)
    result = OpenLoopResult(rate=rate, duration_s=duration_s)
    idle: list[_Conn] = []
    slots = asyncio.Semaphore(max_connections)

    async def one(i: int, due: float) -> None:
        message = messages[i % len(messages)]
        async with slots:
            conn = idle.pop() if idle else None
            try:
                if conn is None:
                    conn = _Conn(*await asyncio.open_connection(host, port))
                status, headers = await asyncio.wait_for(conn.request(message), timeout_s)
            except (TimeoutError, OSError, ConnectionError, ValueError, IndexError):
                result.errors += 1
                if conn is not None:
                    conn.close()
                return
            idle.append(conn)
        result.samples.append((status, (time.perf_counter() - due) * 1e3))
        if b"\r\nretry-after:" in headers:
            result.retry_after += 1

    # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
    start = time.perf_counter() + 0.05
    total = int(rate * duration_s)
    tasks = []
    i = 0
    while i < total:
        now = time.perf_counter()
        # Launch everything due by now (timers are coarse; never fall behind silently).
        while i < total and start + i / rate <= now:
            tasks.append(asyncio.create_task(one(i, start + i / rate)))
            i += 1
        result.sent = i
        await asyncio.sleep(max(0.0, min(start + i / rate - now, 0.002)))
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    return result


async def _closed(
    url: str, bodies: list[bytes], connections: int, duration_s: float, content_type: str
) -> OpenLoopResult:
    host, port, messages = _messages(url, bodies, content_type)
    result = OpenLoopResult(rate=0.0, duration_s=duration_s)
    end = time.perf_counter() + duration_s
    counter = iter(range(10**9))

    async def client() -> None:
        conn = _Conn(*await asyncio.open_connection(host, port))
        try:
            while time.perf_counter() < end:
                message = messages[next(counter) % len(messages)]
                t0 = time.perf_counter()
                status, _ = await conn.request(message)
                result.samples.append((status, (time.perf_counter() - t0) * 1e3))
                result.sent += 1
        finally:
            conn.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    return result


def run_closed_loop(
    url: str,
    bodies: list[bytes],
    connections: int,
    duration_s: float,
    content_type: str = "application/json",
) -> OpenLoopResult:
    """``connections`` clients, each sending its next request when the last one returns:
    the server's capacity at that concurrency (loopback only)."""
    _check_loopback(url)
    _use_uvloop()
    result = asyncio.run(_closed(url, bodies, connections, duration_s, content_type))
    result.rate = len(result.samples) / duration_s
    return result


def _use_uvloop() -> None:
    """The same, cheaper event loop for both drivers (the farm's own: a serving dep)."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if not (host.startswith("127.") or host in ("localhost", "::1")):
        raise ValueError(f"load is only ever sent to loopback, not {host!r}")


def run_open_loop(
    url: str,
    bodies: list[bytes],
    rate: float,
    duration_s: float,
    max_connections: int = 256,
    timeout_s: float = 10.0,
    content_type: str = "application/json",
) -> OpenLoopResult:
    """Offer ``rate`` requests/s for ``duration_s`` to ``url`` (loopback only)."""
    _check_loopback(url)
    _use_uvloop()
    # Rates are per second of the schedule: every request is sent within ``duration_s``
    # (late ones in a burst, never dropped), and answers still arriving after it belong
    # to requests offered inside it.
    return asyncio.run(
        _run(url, bodies, rate, duration_s, max_connections, timeout_s, content_type)
    )
