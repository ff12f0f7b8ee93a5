"""The deployment around the app: request ids, nginx's balance over the workers, and the
introspection endpoints, all through nginx. (A worker killed under load, and the drain on
SIGTERM / SIGINT, are in tests/faults/test_lifecycle.py, each on its own stack.)"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import msgspec
import pytest

from app import registry
from app.config import Config
from app.schema import ModelCard
from app.sessions import MODEL_FILE
from app.stack import Stack
from tests.integration.conftest import (
    JSON,
    TIMEOUT,
    Candidates,
    parse,
    wait_for_log,
)

pytestmark = pytest.mark.integration

NGINX_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


def loaded_models(config: Config) -> list[str]:
    """Model names in the farm's load order: the stages', then the /predict model."""
    return list(dict.fromkeys([s.model for s in config.stages] + [config.predict_model]))


# -- request ids -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/rank", "valid", 200),
        ("POST", "/rank", b'{"candidates": []}', 400),
        ("POST", "/predict", "valid", 200),
        ("GET", "/health", None, 200),
        ("GET", "/nowhere", None, 404),
    ],
)
def test_client_request_id_is_echoed(
    client: httpx.Client,
    stack: Stack,
    candidates: Candidates,
    method: str,
    path: str,
    body: Any,
    status: int,
) -> None:
    rid = f"it-echo.{path.strip('/')}:{status}-0001"
    if body == "valid":
        body = msgspec.json.encode({"candidates": candidates.form(candidates.ids(5, 1), "rows")})
    headers = {"X-Request-ID": rid, "Content-Type": JSON}
    resp = client.request(method, path, content=body, headers=headers)
    assert resp.status_code == status, resp.text[:300]
    assert resp.headers["x-request-id"] == rid
    if status >= 400:
        assert parse(resp)["request_id"] == rid
    assert wait_for_log(stack, {rid})[rid]["status"] == status  # the log shares the id


@pytest.mark.parametrize("bad", ["has space", 'quo"te', "x" * 129, "semi;colon"])
def test_malformed_request_id_is_replaced_everywhere(
    client: httpx.Client, stack: Stack, bad: str
) -> None:
    """A client id that is not safe to echo is replaced by nginx's; the answer, the error
    body and the access log all carry the same replacement."""
    resp = client.post("/rank", content=b"{}", headers={"X-Request-ID": bad, "Content-Type": JSON})
    assert resp.status_code == 400
    rid = resp.headers["x-request-id"]
    assert rid != bad and NGINX_REQUEST_ID.match(rid)
    assert parse(resp)["request_id"] == rid
    assert wait_for_log(stack, {rid})[rid]["status"] == 400


# -- balance ---------------------------------------------------------------------------------
def test_both_workers_serve_a_share(
    stack: Stack, candidates: Candidates, capsys: pytest.CaptureFixture[str]
) -> None:
    """~400 /predict requests over 4 keep-alive client connections: nginx (least_conn
    over one unix socket per worker) gives every worker at least a quarter.

    least_conn follows the faster worker when requests overlap: with no think time and
    the CPUs oversubscribed (load ~5 on 2 cores) one worker got as little as 26%. A short
    think time keeps this a test of the balancing, not of the scheduler."""
    threads, per_thread = 4, 100
    body = msgspec.json.encode({"candidates": candidates.form(candidates.ids(8, 4), "objects")})
    tag = f"split-{os.getpid()}-{time.monotonic_ns()}"

    def run(t: int) -> list[int]:
        statuses = []
        with httpx.Client(base_url=stack.url, timeout=TIMEOUT) as c:
            for i in range(per_thread):
                headers = {"Content-Type": JSON, "X-Request-ID": f"{tag}-{t}-{i}"}
                statuses.append(c.post("/predict", content=body, headers=headers).status_code)
                time.sleep(0.02)  # think time: fewer overlaps, so least_conn mostly alternates
        return statuses

    with ThreadPoolExecutor(threads) as pool:
        statuses = [s for part in pool.map(run, range(threads)) for s in part]
    assert statuses == [200] * (threads * per_thread)

    ids = {f"{tag}-{t}-{i}" for t in range(threads) for i in range(per_thread)}
    entries = wait_for_log(stack, ids)
    assert len(entries) == len(ids), "access log lines missing"
    split = Counter(e["upstream"] for e in entries.values())
    sockets = {f"unix:{stack.config.worker_socket(i)}" for i in range(stack.config.workers)}
    assert set(split) == sockets, split  # one worker socket each, never the backup
    shares = {s.rsplit("/", 1)[-1]: n / len(ids) for s, n in sorted(split.items())}
    with capsys.disabled():
        print(f"\nper-worker split of {len(ids)} /predict requests: {shares}")
    assert all(share >= 0.25 for share in shares.values()), shares


# -- introspection ---------------------------------------------------------------------------
def test_health(client: httpx.Client, stack: Stack) -> None:
    resp = client.get("/health")
    assert resp.status_code == 200
    assert resp.headers.get("x-request-id")
    body = parse(resp)
    assert body["status"] == "ok"
    assert body["pid"] in stack.worker_pids()


def test_ready(client: httpx.Client, stack: Stack, cards: dict[str, ModelCard]) -> None:
    resp = client.get("/ready")
    assert resp.status_code == 200
    body = parse(resp)
    assert body["ready"] is True
    assert body["pid"] in stack.worker_pids()
    want = [f"{cards[n].name}/{cards[n].version}" for n in loaded_models(stack.config)]
    assert body["models"] == want


def test_models_match_the_cards(
    client: httpx.Client, stack: Stack, cards: dict[str, ModelCard]
) -> None:
    resp = client.get("/models")
    assert resp.status_code == 200
    models = {m["name"]: m for m in parse(resp)["models"]}
    config = stack.config
    assert sorted(models) == sorted(loaded_models(config)) == sorted(["deepfm", "autoint"])
    for name, summary in models.items():
        card = cards[name]
        served = registry.newest(config.model_dirs()[name]) / MODEL_FILE
        assert summary["sha256"] == card.sha256
        assert summary["sha256"] == hashlib.sha256(served.read_bytes()).hexdigest()
        assert summary["version"] == card.version
        assert summary["architecture"] == card.architecture
        assert summary["fields"] == list(card.field_names)
        assert summary["size_bytes"] == card.size_bytes == served.stat().st_size
        assert summary["metrics"] == msgspec.to_builtins(card.metrics)
        assert summary["pool_size"] == config.pool_size
        want_stages = [i + 1 for i, s in enumerate(config.stages) if s.model == name]
        assert summary["stages"] == want_stages
