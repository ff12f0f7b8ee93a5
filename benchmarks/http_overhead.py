"""Where the time between a client and the cascade goes, per body form: /rank through
nginx with two clients, straight to a worker's unix socket, and in-process.

For every form of ``candidates`` (objects, rows, columns) x encoding (JSON, msgpack), the
same /rank body (``n`` candidates from generated logs, ``stage1_k`` kept) goes down every
path, interleaved: each round takes one (form, kind) after another and sends its body down
every path, the order of paths rotating by one every round, so drift on a shared machine
hits all alike. One real stack (nginx + one gunicorn worker, ``app.stack.running``) and
one in-process Farm of the same config are up at once. Paths:

* ``in-process``: what ``app.api.RankResource`` does around the farm, minus Falcon, the
  executor hop and HTTP: decode the RankRequest, ``Farm.rank`` (features + cascade),
  build and encode the response;
* ``worker socket``: stdlib ``http.client`` straight to the worker's unix socket
  (uvicorn + Falcon + the executor hop; no nginx);
* ``nginx``: stdlib ``http.client`` to nginx (adds nginx's buffering and proxying);
* ``nginx (httpx)``: ``httpx`` to nginx, the client of ``ctr-farm bench`` and
  ``ctr_farm.client`` (adds what httpx costs on the client's side).

Per cell: p50/p95/p99 of the end-to-end time, the p50 over in-process's p50, and the
median of the per-round difference to in-process (paired).
"""

from __future__ import annotations

import http.client
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np

from app.api import rank_response
from app.config import Config, load
from app.offline import logs as logs_mod
from app.schema import RankRequest
from app.service import Farm
from app.sessions import read_card
from app.stack import running

FORMS = ("objects", "rows", "columns")
KINDS = ("json", "msgpack")
PATHS = ("in-process", "worker socket", "nginx", "nginx (httpx)")
CONTENT_TYPES = {"json": "application/json", "msgpack": "application/msgpack"}
Send = Callable[[bytes, str], None]


def bodies(
    config: Config, n: int, stage1_k: int, forms: Sequence[str], kinds: Sequence[str]
) -> dict[tuple[str, str], bytes]:
    """(form, kind) -> a /rank body of the same ``n`` candidates (generated logs)."""
    names = list(read_card(config.model_dirs()[config.stages[0].model]).field_names)
    ids = logs_mod.generate(n, seed=7).id_matrix()[:, : len(names)]
    rows = ids.tolist()
    values = {
        "objects": [dict(zip(names, row, strict=True)) for row in rows],
        "rows": rows,
        "columns": {name: ids[:, j].tolist() for j, name in enumerate(names)},
    }
    out = {}
    for form in forms:
        for kind in kinds:
            body = {"candidates": values[form], "top_k": 10, "stage1_k": stage1_k}
            mod = msgspec.json if kind == "json" else msgspec.msgpack
            out[form, kind] = mod.encode(body)
    return out


class InProcess:
    """RankResource's work around the farm, in this process (both encodings)."""

    def __init__(self, config: Config) -> None:
        self.farm = Farm(config)
        self.farm.load()
        self.decoders = {
            "json": msgspec.json.Decoder(RankRequest),
            "msgpack": msgspec.msgpack.Decoder(RankRequest),
        }
        self.encoders = {"json": msgspec.json.Encoder(), "msgpack": msgspec.msgpack.Encoder()}

    def __call__(self, body: bytes, kind: str) -> None:
        request = self.decoders[kind].decode(body)
        result = self.farm.rank(request, kind)  # type: ignore[arg-type]
        self.encoders[kind].encode(rank_response(result))

    def close(self) -> None:
        self.farm.close()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.socket_path)
        self.sock = sock


def _stdlib(conn: http.client.HTTPConnection) -> Send:
    def send(body: bytes, kind: str) -> None:
        conn.request("POST", "/rank", body=body, headers={"Content-Type": CONTENT_TYPES[kind]})
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"/rank answered {resp.status}")

    return send


def _httpx(client: httpx.Client) -> Send:
    def send(body: bytes, kind: str) -> None:
        resp = client.post("/rank", content=body, headers={"Content-Type": CONTENT_TYPES[kind]})
        resp.raise_for_status()

    return send


@contextmanager
def paths_for(overrides: dict[str, Any], wheres: Sequence[str]) -> Iterator[dict[str, Send]]:
    """The sending paths, all up at once: one in-process farm and one stack of one worker."""
    overrides = {"workers": 1, **overrides}
    config = load(overrides=overrides, env={})
    with ExitStack() as stack:
        out: dict[str, Send] = {}
        if "in-process" in wheres:
            local = InProcess(config)
            stack.callback(local.close)
            out["in-process"] = local
        if set(wheres) - {"in-process"}:
            run_dir = Path(tempfile.mkdtemp(prefix="http-"))
            farm = stack.enter_context(running(run_dir, overrides))
            host, port = farm.config.host, farm.config.port
            if "worker socket" in wheres:
                conn = _UnixConnection(str(farm.config.worker_socket(0)))
                stack.callback(conn.close)
                out["worker socket"] = _stdlib(conn)
            if "nginx" in wheres:
                tcp = http.client.HTTPConnection(host, port, timeout=60)
                stack.callback(tcp.close)
                out["nginx"] = _stdlib(tcp)
            if "nginx (httpx)" in wheres:
                client = httpx.Client(base_url=farm.url, timeout=60)
                stack.callback(client.close)
                out["nginx (httpx)"] = _httpx(client)
        yield {w: out[w] for w in wheres}


def measure(
    paths: dict[str, Send],
    payloads: dict[tuple[str, str], bytes],
    rounds: int,
    warmup: int,
) -> dict[tuple[str, str, str], list[float]]:
    """(form, kind, path) -> end-to-end ms per measured round (see the module docstring)."""
    samples: dict[tuple[str, str, str], list[float]] = {}
    wheres = list(paths)
    for r in range(warmup + rounds):
        order = wheres[r % len(wheres) :] + wheres[: r % len(wheres)]
        for (form, kind), body in payloads.items():
            for where in order:
                t0 = time.perf_counter()
                paths[where](body, kind)
                ms = (time.perf_counter() - t0) * 1e3
                if r >= warmup:
                    samples.setdefault((form, kind, where), []).append(ms)
    return samples


def summarize(
    samples: dict[tuple[str, str, str], list[float]], payloads: dict[tuple[str, str], bytes]
) -> list[dict[str, Any]]:
    rows = []
    for (form, kind, where), values in samples.items():
        base = samples.get((form, kind, "in-process"))
        q = np.percentile(values, [50, 95, 99])
        row: dict[str, Any] = {
            "form": form,
            "kind": kind,
            "bytes": len(payloads[form, kind]),
            "path": where,
            "rounds": len(values),
            "p50_ms": float(q[0]),
            "p95_ms": float(q[1]),
            "p99_ms": float(q[2]),
        }
        if base:
            row["vs_in_process_p50"] = float(q[0]) / statistics.median(base)
            row["added_ms_p50"] = statistics.median(np.subtract(values, base).tolist())
        rows.append(row)
    order = {p: i for i, p in enumerate(PATHS)}
    rows.sort(key=lambda r: (FORMS.index(r["form"]), KINDS.index(r["kind"]), order[r["path"]]))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ["form", "kind", "body bytes", "path", "p50 ms", "p95", "p99", "p50 / in-process"]
    head.append("added ms (paired p50)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["form"], r["kind"], str(r["bytes"]), r["path"]]
        cells += [f"{r[k]:.2f}" for k in ("p50_ms", "p95_ms", "p99_ms")]
        cells.append(f"{r['vs_in_process_p50']:.3f}x" if "vs_in_process_p50" in r else "-")
        cells.append(f"{r['added_ms_p50']:+.2f}" if "added_ms_p50" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
