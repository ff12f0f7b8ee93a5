"""Two model lineups over HTTP, side by side: single- and multi-stage /rank, alternated.

Each lineup (a DeepFM and an AutoInt version dir) gets its own full farm
(``python -m app serve``: nginx + gunicorn workers) on its own loopback port; both run
at once and the client sends one request at a time, alternating lineups and variants
(single-stage AutoInt on n, the cascade with ``stage1_k``) on the same payloads, so the
two farms share the machine's noise. Ids come from held-out generated logs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import numpy as np

from app.config import REPO_ROOT
from app.offline import logs
from app.sessions import read_card


@dataclass(frozen=True)
class Lineup:
    deepfm: Path
    autoint: Path

    @property
    def label(self) -> str:
        return f"deepfm/{self.deepfm.name}+autoint/{self.autoint.name}"


@contextlib.contextmanager
def serving(lineup: Lineup, port: int) -> Iterator[str]:
    run_dir = Path(tempfile.mkdtemp(prefix="ab-"))  # short: unix socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTR_FARM_")}
    cmd = [sys.executable, "-m", "app", "serve", "--port", str(port), "--run-dir", str(run_dir)]
    cmd += ["--deepfm-model", str(lineup.deepfm), "--autoint-model", str(lineup.autoint)]
    with (run_dir / "serve.log").open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"{lineup.label} never became ready (see {run_dir}/serve.log)")
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def payloads(card_dir: Path, n: int, count: int, seed: int) -> list[bytes]:
    """``count`` candidate lists in the rows form (ids in the card's field order)."""
    card = read_card(card_dir)
    ids = logs.generate(n * count, seed).id_matrix()
    assert ids.shape[1] == len(card.fields)
    return [msgspec.json.encode(ids[i * n : (i + 1) * n].tolist()) for i in range(count)]


def measure(
    lineups: Sequence[Lineup],
    n: int = 1000,
    stage1_k: int = 100,
    rounds: int = 100,
    warmup: int = 10,
    count: int = 10,
    seed: int = 1000,
    base_port: int = 18500,
) -> dict[tuple[str, str], list[float]]:
    """Seconds per request, per (lineup label, "single" | "multi")."""
    bodies = payloads(lineups[0].autoint, n, count, seed)
    samples: dict[tuple[str, str], list[float]] = {}
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(serving(x, base_port + i)) for i, x in enumerate(lineups)]
        client = stack.enter_context(httpx.Client(timeout=30))
        for r in range(warmup + rounds):
            body = bodies[r % count]
            for lineup, url in zip(lineups, urls, strict=True):
                for variant, multi in (("single", False), ("multi", True)):
                    request = (
                        b'{"multi_stage":' + (b"true" if multi else b"false")
                        + b',"top_k":10,"stage1_k":' + str(stage1_k).encode()
                        + b',"candidates":' + body + b"}"
                    )  # fmt: skip
                    t0 = time.perf_counter()
                    resp = client.post(
                        f"{url}/rank", content=request, headers={"Content-Type": "application/json"}
                    )
                    dt = time.perf_counter() - t0
                    resp.raise_for_status()
                    if r >= warmup:
                        samples.setdefault((lineup.label, variant), []).append(dt)
    return samples


def markdown(samples: dict[tuple[str, str], list[float]]) -> str:
    lines = [
        "| lineup | variant | p50 ms | p95 | p99 | single/multi (p50) |",
        "|---|---|---|---|---|---|",
    ]
    labels = list(dict.fromkeys(label for label, _ in samples))
    for label in labels:
        single = np.median(samples[(label, "single")])
        for variant in ("single", "multi"):
            ms = np.asarray(samples[(label, variant)]) * 1e3
            ratio = (
                f"{single / np.median(samples[(label, 'multi')]):.2f}x"
                if variant == "multi"
                else ""
            )
            lines.append(
                f"| {label} | {variant} | {np.percentile(ms, 50):.2f} | {np.percentile(ms, 95):.2f}"
                f" | {np.percentile(ms, 99):.2f} | {ratio} |"
            )
    if len(labels) == 2:
        a, b = labels
        lines += ["", f"{b} vs {a}, p50 speed-up (first / second):", ""]
        for variant in ("single", "multi"):
            ratio = np.median(samples[(a, variant)]) / np.median(samples[(b, variant)])
            lines.append(f"- {variant}: {ratio:.2f}x")
    return "\n".join(lines) + "\n"
