"""What tracing costs on the request path, in process: the Falcon ASGI app over a loaded
:class:`~app.service.Farm` (the configured models), driven by ``falcon.testing``'s
ASGI conductor on one event loop; no nginx, no sockets.

Variants, one farm each, all alive at once:

    off          ``tracing = "off"`` (the default): no OpenTelemetry at all
    off-again    a second farm like ``off``: the noise floor between two identical farms
    sampled-out  a tracer with ``trace_sample_ratio = 0``: non-recording spans
    memory       every span recorded and exported to a counter (the SDK's cost, no I/O)
    stdout       every span written as a JSON line (``tracing = "stdout"``) to /dev/null

Each round sends ``batch`` requests of each endpoint through every variant, the order
rotating by one each round, so drift of the machine hits all variants alike. The figure
is microseconds per request, the median over rounds, and its ratio to ``off``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import falcon.testing
import msgspec
import numpy as np

from app.api import create_app
from app.config import Config
from app.service import Farm

VARIANTS = ("off", "off-again", "sampled-out", "memory", "stdout")
JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Endpoint:
    name: str  # "/predict 1", "/rank 1000"
    path: str
    body: bytes


def endpoints(farm: Farm, rank_n: int, seed: int = 0) -> list[Endpoint]:
    """A one-candidate ``/predict`` (inline) and a ``rank_n``-candidate ``/rank`` in the
    columns form (on the inference thread above ``inline_max_body_bytes``)."""
    fields = farm.models[farm.config.predict_model].card.fields
    rng = np.random.default_rng(seed)
    one = {f.name: int(rng.integers(0, f.vocab_size)) for f in fields}
    cols = {f.name: rng.integers(0, f.vocab_size, rank_n).tolist() for f in fields}
    rank = {"candidates": cols, "top_k": 10, "stage1_k": min(100, rank_n)}
    return [
        Endpoint("/predict 1", "/predict", msgspec.json.encode({"candidate": one})),
        Endpoint(f"/rank {rank_n}", "/rank", msgspec.json.encode(rank)),
    ]


def tracer_for(variant: str, stack: ExitStack) -> Any:
    """The variant's tracer (None for ``off``); OpenTelemetry is imported only here."""
    if variant in ("off", "off-again"):
        return None
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    from app.tracing import Tracer, json_line

    if variant == "stdout":
        devnull = stack.enter_context(open(os.devnull, "w"))  # noqa: SIM115 (closed by stack)
        exporter: Any = ConsoleSpanExporter(out=devnull, formatter=json_line)
    else:
        exporter = _Counting()
    return Tracer(SimpleSpanProcessor(exporter), 0.0 if variant == "sampled-out" else 1.0)


class _Counting:
    """A span exporter that counts what it is handed and keeps nothing: every span is
    recorded and exported, with no I/O and no memory growing over a long run."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


@contextmanager
def farms(config: Config, variants: tuple[str, ...]) -> Iterator[dict[str, Farm]]:
    with ExitStack() as stack:
        out = {}
        for variant in variants:
            tracer = tracer_for(variant, stack)
            # off: built exactly as serving builds it (and as a checkout without tracing can).
            farm = Farm(config) if tracer is None else Farm(config, tracer=tracer)
            farm.load()
            stack.callback(farm.close)
            out[variant] = farm
        yield out


async def _measure(
    farms_: dict[str, Farm], eps: list[Endpoint], rounds: int, batch: int
) -> dict[tuple[str, str], list[float]]:
    """(variant, endpoint name) -> microseconds per request, one value per round."""
    out: dict[tuple[str, str], list[float]] = {}
    variants = list(farms_)
    async with AsyncExitStack() as stack:
        conductors = {
            v: await stack.enter_async_context(
                falcon.testing.ASGIConductor(create_app(f.config, f, manage_lifecycle=False))
            )
            for v, f in farms_.items()
        }
        for ep in eps:  # every path answers, before timing anything
            for variant in variants:
                result = await conductors[variant].simulate_post(
                    ep.path, body=ep.body, headers=JSON
                )
                assert result.status_code == 200, (variant, ep.name, result.text[:200])
        for r in range(rounds + 1):  # round 0 warms up
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for ep in eps:
                for variant in order:
                    post = conductors[variant].simulate_post
                    t0 = time.perf_counter()
                    for _ in range(batch):
                        await post(ep.path, body=ep.body, headers=JSON)
                    us = (time.perf_counter() - t0) / batch * 1e6
                    if r:
                        out.setdefault((variant, ep.name), []).append(us)
    return out


def measure(
    config: Config,
    variants: tuple[str, ...] = VARIANTS,
    rank_n: int = 1000,
    rounds: int = 20,
    predict_batch: int = 200,
    rank_batch: int = 10,
) -> list[dict[str, Any]]:
    """One row per (endpoint, variant): median us per request over rounds, ratio to off."""
    with farms(config, variants) as farms_:
        eps = endpoints(next(iter(farms_.values())), rank_n)
        per_ep = {eps[0].name: predict_batch, eps[1].name: rank_batch}
        raw: dict[tuple[str, str], list[float]] = {}
        for ep in eps:
            raw |= asyncio.run(_measure(farms_, [ep], rounds, per_ep[ep.name]))
    rows = []
    for ep in eps:
        base = statistics.median(raw["off", ep.name]) if "off" in variants else None
        for variant in variants:
            samples = raw[variant, ep.name]
            median = statistics.median(samples)
            rows.append(
                {
                    "endpoint": ep.name,
                    "variant": variant,
                    "us_per_request": median,
                    "min_us": min(samples),
                    "rounds": len(samples),
                    "vs_off": median / base if base else None,
                    "extra_us": median - base if base is not None else None,
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| endpoint | variant | µs per request (median) | min | vs off | extra µs |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ratio = f"{row['vs_off']:.3f}x" if row["vs_off"] is not None else "-"
        extra = f"{row['extra_us']:+.1f}" if row["extra_us"] is not None else "-"
        lines.append(
            f"| {row['endpoint']} | {row['variant']} | {row['us_per_request']:.1f}"
            f" | {row['min_us']:.1f} | {ratio} | {extra} |"
        )
    return "\n".join(lines)
