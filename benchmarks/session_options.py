"""ORT time per call of the served models under different session settings, side by side.

Each labelled set of Config overrides (e.g. ``prepack_weights=false``) builds its own
:class:`~app.sessions.LoadedModel` per model through ``app.service.load_model`` (the
farm's plumbing), all in this one process; for every case (model @ rows) the runs
alternate between the settings (the first alternating), on the same id batches, so drift
on a shared machine hits all alike. The scores of every setting are checked against the
first's (float rounding apart).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from app import registry
from app.config import load
from app.service import load_model

#: (label, Config overrides)
Setting = tuple[str, dict[str, Any]]
DEFAULT_CASES = ("deepfm@1000", "autoint@100", "autoint@1000", "autoint@1", "deepfm@1")


def parse_case(text: str) -> tuple[str, int]:
    name, _, rows = text.partition("@")
    return name.strip(), int(rows)


def measure(
    settings: Sequence[Setting], cases: Sequence[str], runs: int, warmup: int = 5
) -> list[dict[str, Any]]:
    rows_out = []
    for case in cases:
        name, rows = parse_case(case)
        models = {}
        for label, overrides in settings:
            config = load(overrides={"pool_size": 1, **overrides}, env={})
            newest = registry.candidates(config.model_dirs()[name])[0]
            models[label] = load_model(name, newest, config)
        first = next(iter(models.values()))
        vocab = np.array([f.vocab_size for f in first.card.fields])
        rng = np.random.default_rng(0)
        batches = [(rng.random((rows, len(vocab))) * vocab).astype(np.int64) for _ in range(8)]
        want = first.run(batches[0])
        for model in models.values():
            np.testing.assert_allclose(model.run(batches[0]), want, rtol=1e-4, atol=1e-6)
        samples: dict[str, list[float]] = {label: [] for label in models}
        labels = list(models)
        for i in range(warmup + runs):
            for label in labels if i % 2 == 0 else labels[::-1]:
                ids = batches[i % len(batches)]
                t0 = time.perf_counter()
                models[label].run(ids)
                ms = (time.perf_counter() - t0) * 1e3
                if i >= warmup:
                    samples[label].append(ms)
        base = float(np.median(samples[labels[0]]))
        for label, values in samples.items():
            q = np.percentile(values, [50, 95, 99])
            rows_out.append(
                {
                    "case": case,
                    "setting": label,
                    "runs": len(values),
                    "p50_ms": float(q[0]),
                    "p95_ms": float(q[1]),
                    "p99_ms": float(q[2]),
                    "vs_first_p50": float(q[0]) / base,
                }
            )
    return rows_out


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| case | setting | runs | p50 ms | p95 | p99 | p50 vs first |"
    lines = [head, "|---|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['setting']} | {r['runs']} | {r['p50_ms']:.3f}"
            f" | {r['p95_ms']:.3f} | {r['p99_ms']:.3f} | {r['vs_first_p50']:.3f}x |"
        )
    return "\n".join(lines)
