"""The deployment around the app: request ids, nginx's balance over the workers, a worker
killed under traffic, and the introspection endpoints, all through nginx."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
import pytest

from app.config import Config
from app.schema import ModelCard
from app.sessions import MODEL_FILE
from app.stack import Stack
from tests.integration.conftest import (
    JSON,
    TIMEOUT,
    Candidates,
    access_log,
    parse,
    start_stack,
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
        served = config.model_dirs()[name] / MODEL_FILE
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


# -- a worker killed under traffic (its own stack, last in this module) ----------------------
@pytest.fixture(scope="module")
def kill_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    yield from start_stack(request, prefix="farm-k-")


@dataclass
class Traffic:
    """A bounded request loop on a few keep-alive connections, in threads."""

    url: str
    body: bytes
    threads: int = 3
    max_per_thread: int = 5000
    stop: threading.Event = field(default_factory=threading.Event)
    results: list[tuple[float, bool, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pool: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        headers = {"Content-Type": JSON}
        with httpx.Client(base_url=self.url, timeout=TIMEOUT) as c:
            for _ in range(self.max_per_thread):
                if self.stop.is_set():
                    return
                t0 = time.monotonic()
                try:
                    r = c.post("/rank", content=self.body, headers=headers)
                    ok, detail = r.status_code == 200, r.status_code
                except httpx.HTTPError as exc:
                    ok, detail = False, repr(exc)
                with self._lock:
                    self.results.append((t0, ok, detail))

    def start(self) -> None:
        self._pool = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]
        for t in self._pool:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self._pool:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in self._pool), "traffic threads did not stop"

    def successes(self, since: float = 0.0) -> int:
        with self._lock:
            return sum(1 for t0, ok, _ in self.results if ok and t0 >= since)


def wait_until(predicate: Any, timeout_s: float, what: str, step: float = 0.05) -> float:
    """Poll ``predicate`` until true; seconds it took (fails after ``timeout_s``)."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(step)
    return time.monotonic() - t0


def ready_pid_on(socket_path: str) -> int | None:
    """The pid answering /ready on one worker's own unix socket, if it is ready."""
    transport = httpx.HTTPTransport(uds=socket_path)
    try:
        with httpx.Client(transport=transport, base_url="http://worker", timeout=2.0) as c:
            r = c.get("/ready")
            return parse(r)["pid"] if r.status_code == 200 else None
    except httpx.HTTPError:
        return None


def test_killed_worker_is_replaced_without_failed_requests(
    kill_stack: Stack, candidates: Candidates, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = kill_stack
    before = sorted(stack.worker_pids())
    assert len(before) == stack.config.workers == 2
    body = msgspec.json.encode(
        {"candidates": candidates.form(candidates.ids(200, 8), "rows"), "top_k": 5}
    )
    traffic = Traffic(stack.url, body)
    traffic.start()
    try:
        wait_until(lambda: traffic.successes() >= 30, 60, "traffic to flow")
        victim = before[0]
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            pids = stack.worker_pids()
            return victim not in pids and len(pids) == len(before)

        replaced_s = wait_until(replaced, 10, "gunicorn to replace the killed worker")
        (new_pid,) = set(stack.worker_pids()) - set(before)
        sockets = [str(stack.config.worker_socket(i)) for i in range(stack.config.workers)]
        ready_s = replaced_s + wait_until(
            lambda: new_pid in map(ready_pid_on, sockets), 60, "the new worker to be ready", 0.2
        )
        t_ready = time.monotonic()
        wait_until(lambda: traffic.successes(since=t_ready) >= 150, 60, "traffic after recovery")
    finally:
        traffic.finish()

    results = traffic.results
    failures = [(round(t0 - t_kill, 3), d) for t0, ok, d in results if not ok]
    during = sum(1 for t0, _, _ in results if t_kill <= t0 < t_kill + ready_s)
    time.sleep(1.5)  # access_log flush=1s
    retried = [e for e in access_log(stack) if "," in e["upstream"]]  # nginx tried twice
    with capsys.disabled():
        print(
            f"\nkill -9 {victim}: replaced by {new_pid} after {replaced_s:.2f}s, ready after "
            f"{ready_s:.2f}s; {len(results)} requests ({during} between kill and ready), "
            f"{len(retried)} retried by nginx on the other worker, "
            f"{len(failures)} failed {failures[:5]}"
        )
    # nginx retries a request whose worker died (proxy_next_upstream error
    # non_idempotent) and skips the dead socket: no client sees the kill.
    assert failures == [], failures[:10]

    # The replacement answers through nginx again: nginx left its socket out for
    # fail_timeout (1 s) after the kill, then sequential requests alternate (least_conn).
    with httpx.Client(base_url=stack.url, timeout=TIMEOUT) as c:
        wait_until(
            lambda: parse(c.get("/health"))["pid"] == new_pid,
            30,
            "the replacement worker to answer through nginx",
        )
