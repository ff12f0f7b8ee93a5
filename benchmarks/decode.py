"""Decode time of ``candidates`` per form and encoding: ``FeatureSpace.decode`` on a Raw.

For each form (objects, rows, columns) x encoding (JSON, msgpack), one payload of ``n``
candidates (ids from generated logs, the served first stage's card) is cut from a /rank
body into a ``msgspec.Raw`` as the API does, and decoded by ``FeatureSpace.decode`` into
the OOV-mapped int64 matrix: what a request pays between its body and the cascade.

With ``against`` (a git revision), ``app/features.py`` of that revision is loaded beside
the working tree's as a second module and both are timed side by side: every round times
a batch of calls of each implementation in turn (the first alternating), so drift on a
shared machine hits both alike; ratios are of their medians (p50 of per-call times).
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import numpy as np

from app.config import REPO_ROOT, Config
from app.offline import logs as logs_mod
from app.schema import CardField, RankRequest
from app.sessions import read_card

FORMS = ("objects", "rows", "columns")
KINDS = ("json", "msgpack")
CURRENT = "working tree"


def features_at(revision: str) -> ModuleType:
    """``app/features.py`` as it was at ``revision``, loaded as its own module."""
    source = subprocess.run(
        ["git", "show", f"{revision}:app/features.py"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="features-")) / "features.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"_features_{revision}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def payloads(fields: Sequence[CardField], n: int, seed: int = 0) -> dict[tuple[str, str], Any]:
    """(form, kind) -> the ``candidates`` Raw of a /rank body of ``n`` candidates."""
    names = [f.name for f in fields]
    ids = logs_mod.generate(n, seed).id_matrix()[:, : len(names)]
    rows = ids.tolist()
    values = {
        "objects": [dict(zip(names, row, strict=True)) for row in rows],
        "rows": rows,
        "columns": {name: ids[:, j].tolist() for j, name in enumerate(names)},
    }
    out: dict[tuple[str, str], Any] = {}
    for kind in KINDS:
        mod = msgspec.json if kind == "json" else msgspec.msgpack
        for form, value in values.items():
            body = mod.encode({"candidates": value, "top_k": 10})
            out[form, kind] = mod.decode(body, type=RankRequest).candidates
    return out


def measure(
    implementations: dict[str, Callable[[Sequence[CardField], int], Any]],
    config: Config,
    n: int = 1000,
    rounds: int = 30,
    batch: int = 20,
    forms: Sequence[str] = FORMS,
    kinds: Sequence[str] = KINDS,
) -> list[dict[str, Any]]:
    """One row per (form, kind, implementation): per-call ms quantiles over the rounds."""
    card = read_card(config.model_dirs()[config.stages[0].model])
    raws = payloads(card.fields, n)
    spaces = {name: make(card.fields, max(n, 1)) for name, make in implementations.items()}
    reference = None
    rows = []
    for form in forms:
        for kind in kinds:
            raw = raws[form, kind]
            samples: dict[str, list[float]] = {name: [] for name in spaces}
            for name, fs in spaces.items():  # same matrix from every implementation
                ids, detected = fs.decode(raw, kind)
                assert detected == form, (detected, form)
                if reference is None or name == next(iter(spaces)):
                    reference = ids
                np.testing.assert_array_equal(ids, reference)
            for r in range(rounds + 1):  # round 0 is warm-up
                order = list(spaces) if r % 2 == 0 else list(spaces)[::-1]
                for name in order:
                    decode, times = spaces[name].decode, samples[name]
                    for _ in range(batch):
                        t0 = time.perf_counter()
                        decode(raw, kind)
                        t1 = time.perf_counter()
                        if r:
                            times.append((t1 - t0) * 1e3)
            base = statistics.median(samples[next(iter(spaces))])
            for name, times in samples.items():
                q = np.percentile(times, [50, 95, 99])
                rows.append(
                    {
                        "form": form,
                        "kind": kind,
                        "n": n,
                        "bytes": len(raw),
                        "implementation": name,
                        "calls": len(times),
                        "min_ms": min(times),
                        "p50_ms": float(q[0]),
                        "p95_ms": float(q[1]),
                        "p99_ms": float(q[2]),
                        "vs_first_p50": float(q[0]) / base,
                    }
                )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    names = list(dict.fromkeys(r["implementation"] for r in rows))
    head = ["form", "kind", "bytes", "implementation", "min ms", "p50", "p95", "p99"]
    if len(names) > 1:
        head.append(f"p50 vs {names[0]}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["form"], r["kind"], str(r["bytes"]), r["implementation"]]
        cells += [f"{r[k]:.3f}" for k in ("min_ms", "p50_ms", "p95_ms", "p99_ms")]
        if len(names) > 1:
            cells.append(f"{r['vs_first_p50']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parts(config: Config, n: int = 1000, rounds: int = 30, batch: int = 20) -> list[dict[str, Any]]:
    """The objects form's decode in parts, old and new way side by side (interleaved):
    msgspec into ``list[Candidate]`` with ids typed ``Id`` (bounded) vs ``int``; the
    structs into the int64 matrix by ``np.fromiter(chain(astuple))`` vs ``struct`` packing;
    the repeated-key colon count. Per part and kind: p50 ms per call."""
    import itertools
    import struct

    from app.features import _COLON, Id

    card = read_card(config.model_dirs()[config.stages[0].model])
    names = [f.name for f in card.fields]
    raws = payloads(card.fields, n)
    width = len(names)
    row = struct.Struct(f"={width}q")
    astuple = msgspec.structs.astuple

    def structs(id_type: Any) -> Any:
        return msgspec.defstruct(
            "Candidate", [(f, id_type) for f in names], forbid_unknown_fields=True, gc=False
        )

    rows = []
    for kind in KINDS:
        mod = msgspec.json if kind == "json" else msgspec.msgpack
        raw = raws["objects", kind]
        bounded = mod.Decoder(list[structs(Id)])  # type: ignore[valid-type]
        plain = mod.Decoder(list[structs(int)])  # type: ignore[valid-type]
        value = plain.decode(raw)
        cases: dict[str, Callable[[], Any]] = {
            "msgspec decode, ids Id (before)": lambda b=bounded, r=raw: b.decode(r),
            "msgspec decode, ids int (after)": lambda p=plain, r=raw: p.decode(r),
            "to matrix, fromiter(chain) (before)": lambda v=value: np.fromiter(
                itertools.chain.from_iterable(map(astuple, v)), np.int64, count=len(v) * width
            ),
            "to matrix, struct pack (after)": lambda v=value: np.frombuffer(
                bytearray().join(itertools.starmap(row.pack, map(astuple, v))), np.int64
            ),
        }
        if kind == "json":
            cases["repeated-key colon count"] = lambda r=raw: np.count_nonzero(
                np.frombuffer(r, np.uint8) == _COLON
            )
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for r in range(rounds + 1):
            order = list(cases) if r % 2 == 0 else list(cases)[::-1]
            for name in order:
                fn, times = cases[name], samples[name]
                for _ in range(batch):
                    t0 = time.perf_counter()
                    fn()
                    t1 = time.perf_counter()
                    if r:
                        times.append((t1 - t0) * 1e3)
        for name, times in samples.items():
            rows.append({"kind": kind, "part": name, "p50_ms": statistics.median(times)})
    return rows
