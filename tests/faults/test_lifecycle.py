"""Process faults under load, each test on its own real stack (they kill processes).

- kill -9 of a worker during an open-loop ``/rank`` load: non-2xx <= 0.1 %, and gunicorn's
  replacement answers ``/ready`` on its own socket within 2 s;
- a worker's drain: ``/ready`` answers 503 ``{"ready": false}`` from the signal on, while
  the request in flight finishes with 200;
- SIGTERM and SIGINT of the gunicorn master under load: every request accepted before
  the signal ends 200; what arrives once the workers are gone gets nginx's JSON 503.

Figures are printed (``-s`` not needed); the load driver is :class:`benchmarks.soak.OpenLoad`.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

from app.config import Config
from app.sessions import read_card
from app.stack import Stack
from benchmarks.ranking import candidates
from benchmarks.soak import OpenLoad, Shot
from tests.integration.conftest import access_log, start_stack

pytestmark = pytest.mark.integration

#: The bounded load: /rank of 100 candidates (inline in the worker), well within what two
#: workers serve on this 2-core machine (~1/4 of their capacity), so failures are faults.
RATE, SECONDS = 100.0, 5.0
#: Requests due this long before a signal were sent, and reached a worker, before it.
MARGIN_S = 0.05
#: Budget header for the slow requests (the app's default deadline is shorter).
SLOW_HEADERS = {"Content-Type": "application/json", "X-Request-Timeout-Ms": "60000"}


@pytest.fixture
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A fresh stack per test: nginx + 2 workers over a snapshot of the real models."""
    yield from start_stack(request, prefix="farm-f-")


# -- helpers -----------------------------------------------------------------------------
def rank_body(config: Config, n: int, seed: int, **extra: Any) -> bytes:
    card = read_card(config.model_dirs()[config.predict_model])
    cands = candidates(card, n, np.random.default_rng(seed))
    return msgspec.json.encode({"candidates": cands, **extra})


class UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 keep-alive on one worker's own unix socket (nginx bypassed).

    Not httpx's uds transport: it leaks the socket when the connect fails, which is what
    a draining or dead worker's socket does (a ResourceWarning, an error here).
    """

    def __init__(self, path: str, timeout_s: float = 2.0) -> None:
        super().__init__("worker", timeout=timeout_s)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)  # on failure, close() still closes self.sock


def get_ready(conn: http.client.HTTPConnection) -> tuple[int, dict[str, Any]]:
    conn.request("GET", "/ready")
    resp = conn.getresponse()
    return resp.status, msgspec.json.decode(resp.read())


def ready_on(path: str) -> tuple[int, int] | None:
    """(status, pid) of ``GET /ready`` on a fresh connection to a worker socket."""
    conn = UnixConnection(path, 1.0)
    try:
        status, body = get_ready(conn)
        return status, body["pid"]
    except (OSError, http.client.HTTPException, msgspec.DecodeError):
        return None
    finally:
        conn.close()


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, what: str, step: float = 0.02
) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(step)
    return value


def is_nginx_503(shot: Shot) -> bool:
    """nginx's own answer when no worker could take the request (deploy/nginx.conf)."""
    return shot.status == 503 and '"code":"upstream_unavailable"' in shot.detail


class Slow:
    """A large single-stage /rank (0.2-0.5 s) in a thread; ``sent`` is set
    once the whole request is written (nginx buffers it, then hands it to a worker)."""

    def __init__(self, conn: http.client.HTTPConnection, body: bytes) -> None:
        self.conn, self.body = conn, body
        self.sent = threading.Event()
        self.result: tuple[int, str | None, float] | str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.conn.request("POST", "/rank", body=self.body, headers=SLOW_HEADERS)
            self.sent.set()
            resp = self.conn.getresponse()
            resp.read()
            self.result = (resp.status, resp.getheader("connection"), time.monotonic())
        except (OSError, http.client.HTTPException) as exc:
            self.result = repr(exc)
        finally:
            self.sent.set()
            self.conn.close()

    def join(self) -> tuple[int, str | None, float] | str | None:
        self.thread.join(60)
        return self.result


# -- kill -9 -------------------------------------------------------------------------------
def test_kill9_worker_under_load(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    socket0 = str(stack.config.worker_socket(0))
    status, victim = wait_until(lambda: ready_on(socket0), 10, "worker slot 0 ready")
    assert status == 200 and victim in stack.worker_pids()
    other = set(stack.worker_pids()) - {victim}

    load = OpenLoad(stack.url, [("/rank", rank_body(stack.config, 100, 1))], RATE, SECONDS)
    load.start()
    wait_until(lambda: load.done() >= 100, 30, "the load to flow")
    t_kill = time.monotonic()
    os.kill(victim, signal.SIGKILL)

    def replacement_ready() -> int | None:
        answer = ready_on(socket0)
        return answer[1] if answer and answer[0] == 200 and answer[1] != victim else None

    new_pid = wait_until(replacement_ready, 10, "a replacement ready on worker-0.sock", 0.01)
    ready_s = time.monotonic() - t_kill
    shots = load.join()

    failed = [s for s in shots if not 200 <= s.status < 300]
    share = len(failed) / len(shots)
    time.sleep(1.5)  # nginx flushes its access log every second
    retried = [e for e in access_log(stack) if "," in e["upstream"]]  # two upstreams tried
    with capsys.disabled():
        print(
            f"\nkill -9 of worker {victim} at {RATE:.0f} req/s: replacement {new_pid} ready on "
            f"its socket {ready_s:.3f} s after the kill; {len(shots)} requests, "
            f"{len(failed)} non-2xx ({share:.3%}), {len(retried)} retried by nginx; "
            f"statuses {dict(Counter(s.status for s in shots))}"
        )
    assert len(shots) == int(RATE * SECONDS)
    assert share <= 0.001, [(round(s.due - t_kill, 3), s.status, s.detail) for s in failed[:5]]
    assert ready_s <= 2.0
    assert set(stack.worker_pids()) == other | {new_pid}

    # nginx put the replacement's socket back in rotation (fail_timeout=1s).
    with httpx.Client(base_url=stack.url, timeout=10) as c:
        wait_until(
            lambda: msgspec.json.decode(c.get("/health").content)["pid"] == new_pid,
            30,
            "the replacement to answer through nginx",
        )


# -- a worker's drain: /ready false while a request finishes ---------------------------------
def drain_one_worker(stack: Stack, slow_body: bytes) -> tuple[list[Any], Any, float]:
    """SIGTERM the worker of slot 0 while a slow request is in flight on its socket, and
    poll /ready on an open keep-alive connection to it until the connection is gone."""
    socket0 = str(stack.config.worker_socket(0))
    status, pid = wait_until(lambda: ready_on(socket0), 30, "worker slot 0 ready")
    assert status == 200
    poller = UnixConnection(socket0)
    try:
        assert get_ready(poller)[0] == 200  # the keep-alive connection is open
        poller.auto_open = 0  # never reconnect: a closed connection ends the polling
        slow = Slow(UnixConnection(socket0, 60.0), slow_body)
        assert slow.sent.wait(30)
        time.sleep(0.05)  # the worker is running it now (a few hundred ms)
        t_sig = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        polls: list[Any] = []
        while time.monotonic() - t_sig < 5:
            try:
                polls.append(get_ready(poller))
            except (OSError, http.client.HTTPException) as exc:
                polls.append(type(exc).__name__)
                break
    finally:
        poller.close()
    return polls, slow.join(), t_sig


def test_ready_is_false_while_a_worker_drains(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    slow_body = rank_body(stack.config, 5000, 2, multi_stage=False)
    # uvicorn stops reading open connections at its next 0.1 s tick after the signal; a
    # poll sent within ~1 ms of the signal usually lands before it. Up to three workers
    # are drained (each replaced by gunicorn) to see one 503; a 200 is never allowed.
    attempts: list[dict[str, Any]] = []
    for _ in range(3):
        polls, slow, t_sig = drain_one_worker(stack, slow_body)
        answers = [p for p in polls if isinstance(p, tuple)]
        attempts.append(
            Counter(f"{c} ready={b['ready']}" for c, b in answers) | {"then": polls[-1]}
        )
        assert all(code == 503 and body["ready"] is False for code, body in answers), polls
        assert isinstance(slow, tuple), slow
        code, connection, t_end = slow
        assert code == 200 and t_end > t_sig  # the request in flight finished, after it
        assert connection == "close"  # uvicorn's drain closes its connection after it
        if answers:
            break
    with capsys.disabled():
        print(f"\n/ready polls on an open connection after SIGTERM, per drained worker: {attempts}")
    assert answers, "no /ready answer landed before the drain closed the connection"


# -- SIGTERM / SIGINT of the master ----------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_master_signal_drains_requests_in_flight(
    stack: Stack, sig: signal.Signals, capsys: pytest.CaptureFixture[str]
) -> None:
    assert stack.gunicorn is not None
    body = rank_body(stack.config, 100, 3)
    # Two slower rankings (~0.15 s: AutoInt on 3000) in flight at the signal; not more:
    # requests that wait past max_queue_wait_ms for the worker's inference slot would be
    # shed (an app 503). (2000 candidates, ~0.1 s with autoint/2, could finish before it.)
    slow_body = rank_body(stack.config, 3000, 4, multi_stage=False)
    load = OpenLoad(stack.url, [("/rank", body)], RATE, SECONDS)
    load.start()
    wait_until(lambda: load.done() >= 100, 30, "the load to flow")
    host, port = stack.config.host, stack.config.port
    slows = [Slow(http.client.HTTPConnection(host, port, timeout=60), slow_body) for _ in range(2)]
    assert all(s.sent.wait(30) for s in slows)
    time.sleep(0.05)  # nginx has handed them to the workers (balanced over both)
    t_sig = time.monotonic()
    os.kill(stack.gunicorn.pid, sig)
    rc = stack.gunicorn.wait(stack.config.graceful_timeout_s + 10)
    drain_s = time.monotonic() - t_sig
    slow_results = [s.join() for s in slows]
    shots = load.join()

    # Accepted before the signal: written to nginx at least MARGIN_S before it.
    before = [s for s in shots if s.sent < t_sig - MARGIN_S]
    boundary = [s for s in shots if s not in before and s.due < t_sig]
    after = [s for s in shots if s.due >= t_sig]
    after_ok = sum(s.status == 200 for s in after)
    after_503 = sum(is_nginx_503(s) for s in after)
    log = (stack.log_dir / "gunicorn.log").read_text()
    events = [msgspec.json.decode(line) for line in log.splitlines() if '"app.lifecycle"' in line]
    started = [e for e in events if e["message"] == "drain started"]
    in_flight = sum(e["requests_in_flight"] for e in started)
    drains = sum(e["message"] == "drain finished" for e in events)
    with capsys.disabled():
        slow_codes = [r[0] if isinstance(r, tuple) else r for r in slow_results]
        print(
            f"\nmaster {sig.name} at {RATE:.0f} req/s: rc={rc} after {drain_s:.3f} s; in flight"
            f" in the workers at the drain's start {in_flight}; 2 slow requests: {slow_codes};"
            f" accepted before the signal {len(before)}"
            f" (failed {sum(s.status != 200 for s in before)}), boundary {len(boundary)}"
            f" {dict(Counter(s.status for s in boundary))}, after {len(after)}: {after_ok} x 200,"
            f" {after_503} x nginx JSON 503; worker drains logged {drains}"
        )
    assert rc == 0
    for result in slow_results:
        assert isinstance(result, tuple), result
        assert result[0] == 200 and result[2] > t_sig, result  # in flight through the drain
    assert [s for s in before if s.status != 200] == []
    assert [s for s in shots if s.status != 200 and not is_nginx_503(s)] == []
    assert after_503 > 0  # the load went on after the master was gone
    assert drain_s < stack.config.graceful_timeout_s  # drained, not SIGKILLed
    assert "SIGKILL" not in log
    worker_signal = "SIGTERM" if sig == signal.SIGTERM else "SIGQUIT"
    assert drains == len(started) == stack.config.workers
    assert {e["signal"] for e in started} == {worker_signal}
    assert in_flight >= 2  # the drain had requests to wait for
