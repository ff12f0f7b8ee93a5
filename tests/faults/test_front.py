"""The front proxy under abuse, through the real stack (issue 6, "Never fall over").

- The per-client rate limit answers 429 in the farm's JSON error shape, with
  ``Retry-After`` and ``X-Request-ID``; other clients are unaffected; it recovers.
- nginx's own answers to malformed request heads (400, 414, 431, 501, 505) are JSON too.
- Slow clients are cut after ``client_header_timeout_s`` / ``client_body_timeout_s``
  and never reach a worker; a body trickled under the timeout reaches one only complete.
- Fault test 5: 200 slowloris clients (100 trickling heads, 100 trickling bodies) leave
  normal traffic's p99 within 1.5x of its p99 alone, with no errors.

Each test group starts its own stack over a snapshot of the real models, on loopback.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import selectors
import shutil
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

from app.sessions import read_card
from app.stack import Stack, running
from benchmarks.openloop import run_open_loop
from benchmarks.ranking import candidates
from tests.integration.conftest import access_log, metric_sum_at, snapshot_models, wait_for_log

pytestmark = pytest.mark.integration

#: Low limits, so that the tests hit them quickly.
LIMITS = {
    "rate_limit_rps": 20,
    "rate_limit_burst": 10,
    "client_header_timeout_s": 2,
    "client_body_timeout_s": 2,
    "send_timeout_s": 2,
}
#: How late nginx may cut a slow client (its timers are checked once per event-loop turn;
#: the machine may be busy).
CUT_SLACK_S = 1.0


@contextlib.contextmanager
def farm(prefix: str, overrides: dict[str, Any]) -> Iterator[Stack]:
    """A real stack (2 workers) over a snapshot of the real models, with ``overrides``."""
    run_dir = Path(tempfile.mkdtemp(prefix=prefix))  # short: unix socket paths < 107 bytes
    models = snapshot_models(run_dir / "models")
    with running(run_dir, {"workers": 2, **models, **overrides}, timeout_s=180.0) as stack:
        yield stack
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def front() -> Iterator[Stack]:
    """A stack with the low ``LIMITS``."""
    with farm("front-", LIMITS) as stack:
        yield stack


# -- raw HTTP ----------------------------------------------------------------------------------
def connect(stack: Stack, source: str | None = None) -> socket.socket:
    src = (source, 0) if source else None
    return socket.create_connection(("127.0.0.1", stack.config.port), 5, source_address=src)


def exchange(stack: Stack, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; (status, lower-cased headers, body) of the one answer."""
    with connect(stack) as sock:
        sock.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"closed without an answer to {data[:60]!r}"
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
        while len(body) < int(headers["content-length"]):
            chunk = sock.recv(65536)
            assert chunk, "closed in the middle of the body"
            body += chunk
    return int(status_line.split(" ")[1]), headers, body


def trickle_until_closed(
    sock: socket.socket, byte: bytes, every_s: float, limit_s: float
) -> tuple[bytes, float]:
    """Send ``byte`` every ``every_s`` (none if empty) until the peer closes; (what it sent
    back, seconds until it closed). Fails if it is still open after ``limit_s``."""
    start = time.monotonic()
    received = b""
    sock.settimeout(every_s)
    while time.monotonic() - start < limit_s:
        try:
            if byte:
                sock.sendall(byte)
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if not chunk:
            break
        received += chunk
    else:
        pytest.fail(f"the connection is still open after {limit_s}s")
    return received, time.monotonic() - start


def log_entry(stack: Stack, key: str, value: str, timeout_s: float = 15.0) -> dict[str, Any]:
    """The access-log line whose ``key`` is ``value`` (nginx flushes the log every second)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [e for e in access_log(stack) if e[key] == value]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.25)
    pytest.fail(f"no access-log line with {key}={value!r}")


def assert_json_error(status: int, headers: dict[str, str], body: bytes, code: str) -> str:
    """The farm's error shape; returns the request id (equal in header and body)."""
    assert headers["content-type"] == "application/json", (status, body[:200])
    doc = msgspec.json.decode(body)
    assert set(doc) == {"error", "request_id"}
    assert doc["error"] == {"code": code, "message": doc["error"]["message"], "field": None}
    assert doc["error"]["message"]
    assert doc["request_id"] == headers["x-request-id"]
    return doc["request_id"]


# -- the rate limit ----------------------------------------------------------------------------
def client_from(stack: Stack, source: str) -> httpx.Client:
    """An HTTP client whose connections come from ``source`` (another loopback address is
    another client to nginx: the limit is keyed on the client address)."""
    transport = httpx.HTTPTransport(local_address=source)
    return httpx.Client(base_url=stack.url, transport=transport, timeout=10.0)


def test_a_client_above_its_rate_gets_json_429_then_recovers(front: Stack) -> None:
    rate, burst = LIMITS["rate_limit_rps"], LIMITS["rate_limit_burst"]
    n = 6 * (burst + 1)
    refused = ("ctr_farm_front_rejected_total",)
    counted_before = metric_sum_at(front.url, *refused, status="429")
    with client_from(front, "127.0.0.2") as greedy, client_from(front, "127.0.0.3") as other:
        start = time.monotonic()
        resps = [greedy.get("/health", headers={"X-Request-ID": f"greedy-{i}"}) for i in range(n)]
        elapsed = time.monotonic() - start
        # Another address is another client: its own, untouched allowance.
        assert other.get("/health").status_code == 200

        statuses = [r.status_code for r in resps]
        assert set(statuses) == {200, 429}, statuses
        # nginx admits the first request plus the burst at once, then `rate` per second.
        assert statuses[: burst + 1] == [200] * (burst + 1), statuses
        assert statuses.count(200) <= burst + 1 + math.ceil(rate * elapsed) + 1, (statuses, elapsed)
        limited = [(i, r) for i, r in enumerate(resps) if r.status_code == 429]
        for i, r in limited:
            rid = assert_json_error(429, dict(r.headers), r.content, "rate_limited")
            assert rid == f"greedy-{i}"
            assert r.headers["retry-after"] == "1"

        # After Retry-After the allowance is back; after (burst + 1) / rate s, all of it.
        time.sleep(max(1.0, (burst + 1) / rate) + 0.2)
        again = [greedy.get("/health").status_code for _ in range(burst + 1)]
        assert again == [200] * (burst + 1)

    # Rejected requests never reached a worker.
    entries = wait_for_log(front, {f"greedy-{i}" for i, _ in limited})
    assert len(entries) == len(limited)
    for entry in entries.values():
        assert (entry["status"], entry["upstream"], entry["remote"]) == (429, "", "127.0.0.2")
    # ... and yet /metrics counts every one of them (from nginx's tally log).
    assert metric_sum_at(
        front.url, "ctr_farm_front_rejected_total", status="429"
    ) - counted_before == len(limited)


# -- nginx's own error answers -----------------------------------------------------------------
HOST = b"Host: 127.0.0.1\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GET /health HTTP/1.1\r\n\r\n", 400, "bad_request"),  # HTTP/1.1 without Host
        (b"HELLO\r\n\r\n", 400, "bad_request"),  # no request line nginx can parse
        (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n" + HOST + b"\r\n", 414, "uri_too_long"),
        (b"GET / HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431,
         "header_too_large"),
        (b"GET / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip\r\n\r\n", 501,
         "not_implemented"),
        (b"GET / HTTP/2.0\r\n" + HOST + b"\r\n", 505, "http_version_not_supported"),
        (b"GET /_farm/errors/bad_request HTTP/1.1\r\n" + HOST + b"\r\n", 404, "not_found"),
    ],
    ids=["no-host", "garbage", "uri-414", "header-431", "te-501", "version-505", "internal-404"],
)  # fmt: skip
def test_nginx_answers_malformed_heads_in_json(
    front: Stack, request_bytes: bytes, status: int, code: str
) -> None:
    got, headers, body = exchange(front, request_bytes)
    assert got == status, body[:300]
    rid = assert_json_error(got, headers, body, code)
    assert len(rid) == 32  # minted by nginx: the head that would carry one was not read


def test_a_readable_head_keeps_its_request_id(front: Stack) -> None:
    got, headers, body = exchange(
        front,
        b"POST /rank HTTP/1.1\r\n" + HOST + b"X-Request-ID: bad-length-1\r\n"
        b"Content-Length: many\r\n\r\n",
    )
    assert got == 400
    assert assert_json_error(got, headers, body, "bad_request") == "bad-length-1"


# -- slow clients ------------------------------------------------------------------------------
def test_a_slow_head_is_cut_after_client_header_timeout(front: Stack) -> None:
    timeout = LIMITS["client_header_timeout_s"]
    pids = front.worker_pids()
    uri = f"/slow-head-{uuid.uuid4().hex}"
    with connect(front) as sock:
        sock.sendall(f"GET {uri} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".encode())
        # One byte every 0.25 s: progress does not reset the timer, the whole head counts.
        received, elapsed = trickle_until_closed(sock, b"a", 0.25, timeout + 5)
    assert received == b""  # nginx closes without an answer
    assert timeout - 0.1 <= elapsed <= timeout + CUT_SLACK_S
    entry = log_entry(front, "uri", uri)
    assert (entry["status"], entry["upstream"], entry["upstream_status"]) == (408, "", "")
    assert front.worker_pids() == pids


def test_a_stalled_body_is_cut_after_client_body_timeout(front: Stack) -> None:
    timeout = LIMITS["client_body_timeout_s"]
    rid = f"stalled-{uuid.uuid4().hex}"
    with connect(front) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
            b"Content-Length: 1000\r\nX-Request-ID: " + rid.encode() + b"\r\n\r\n"
            b'{"candidate": {'
        )
        received, elapsed = trickle_until_closed(sock, b"", 0.25, timeout + 5)
    assert received == b""
    assert timeout - 0.1 <= elapsed <= timeout + CUT_SLACK_S
    entry = log_entry(front, "request_id", rid)
    assert (entry["status"], entry["upstream"], entry["upstream_status"]) == (408, "", "")


def test_a_trickled_body_reaches_a_worker_only_when_complete(front: Stack) -> None:
    """client_body_timeout bounds pauses, not the body: a trickle under it is not cut, but
    nginx buffers the body, so the worker spends milliseconds on it, not seconds."""
    timeout = LIMITS["client_body_timeout_s"]
    rid = f"trickled-{uuid.uuid4().hex}"
    body = b'{"candidates": []}'
    pause = 0.75 * timeout  # each pause inside the timeout, the two together beyond it
    with connect(front) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"X-Request-ID: " + rid.encode() + b"\r\n\r\n"
        )
        sock.sendall(body[:6])
        time.sleep(pause)
        sock.sendall(body[6:12])
        time.sleep(pause)
        sock.sendall(body[12:])
        sock.settimeout(10)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 "), answer[:100]  # answered, not cut
    entry = log_entry(front, "request_id", rid)
    assert entry["request_time"] >= 2 * pause - 0.1 > timeout
    assert entry["upstream"].startswith("unix:")
    assert float(entry["upstream_time"]) < 1.0
    assert entry["status"] == int(answer.split(b" ")[1])


# -- fault test 5: slowloris while normal traffic runs -----------------------------------------
#: Slow clients in the attack: half trickle their head, half their body.
SLOW_CLIENTS = 200
#: Each slow client sends one byte this often (well inside the 10 s default timeouts).
TRICKLE_S = 0.5
#: Normal traffic: open-loop /predict (8 candidates each) at this rate, per phase.
RATE = 250.0
PHASE_S = 3.0
ROUNDS = 3
MAX_P99_RATIO = 1.5


def _slow_head(i: int) -> bytes:
    return f"GET /slowloris-{i} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".encode()


def _slow_body(i: int) -> bytes:
    return (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: 1000000\r\nX-Request-ID: slowloris-{i}\r\n\r\n"
    ).encode()


class _SlowClients:
    """``n`` connections to nginx that never finish their request: odd ones trickle their
    head, even ones their body. A connection nginx closes is reopened (and counted)."""

    def __init__(self, port: int, n: int) -> None:
        self.port = port
        self.heads = [_slow_head(i) if i % 2 else _slow_body(i) for i in range(n)]
        self.socks: list[socket.socket | None] = [None] * n
        self.sel = selectors.DefaultSelector()
        self.counts = {"opened": 0, "cut": 0, "bytes": 0}
        for i in range(n):
            self.open(i)

    def open(self, i: int) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), 5)
        sock.sendall(self.heads[i])
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ, i)
        self.socks[i] = sock
        self.counts["opened"] += 1

    def reopen(self, i: int) -> None:
        sock = self.socks[i]
        if sock is not None:
            self.sel.unregister(sock)
            sock.close()
        self.counts["cut"] += 1
        self.open(i)

    def step(self, turn: int, groups: int, wait_s: float) -> None:
        """Reopen what nginx closed (a readable slow socket is a closed one: nginx answers
        none of them), then send one byte on every ``groups``-th connection."""
        for key, _ in self.sel.select(timeout=wait_s):
            with contextlib.suppress(OSError):
                if key.fileobj.recv(4096):  # type: ignore[union-attr]
                    continue
            self.reopen(key.data)
        for i in range(turn % groups, len(self.socks), groups):
            try:
                self.counts["bytes"] += self.socks[i].send(b"a")  # type: ignore[union-attr]
            except OSError:
                self.reopen(i)

    def close(self) -> None:
        for sock in self.socks:
            if sock is not None:
                sock.close()
        self.sel.close()


def _attacker(pipe: Connection, port: int, n: int, every_s: float) -> None:
    """Child process (the attacker is another client, not threads sharing the driver's
    GIL): on "attack" open ``n`` slow clients, say "ready", trickle one byte per client
    every ``every_s`` (spread over the interval) until "stop", close them and answer the
    counts. "exit" ends it."""
    groups = 50
    while pipe.recv() == "attack":
        clients = _SlowClients(port, n)
        pipe.send(("ready", dict(clients.counts)))
        turn = 0
        while not pipe.poll():
            clients.step(turn, groups, every_s / groups)
            turn += 1
        pipe.recv()  # "stop"
        clients.close()
        pipe.send(("stopped", clients.counts))


def _predict_bodies(stack: Stack, count: int) -> list[bytes]:
    card = read_card(stack.config.model_dirs()[stack.config.predict_model])
    rng = np.random.default_rng(5)
    return [msgspec.json.encode({"candidates": candidates(card, 8, rng)}) for _ in range(count)]


def test_slowloris_leaves_normal_traffic_p99_within_1_5x() -> None:
    """Fault test 5 at the default limits: phases alone (A) and under attack (B) alternate
    A B A B A B; the medians of the phases' p99s are compared, so that one noisy phase (the
    machine is shared) cannot decide alone."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    with farm("slow-", {}) as stack:
        attacker = ctx.Process(
            target=_attacker, args=(child, stack.config.port, SLOW_CLIENTS, TRICKLE_S)
        )
        attacker.start()
        try:
            bodies = _predict_bodies(stack, 64)
            url = f"{stack.url}/predict"
            run_open_loop(url, bodies, RATE, 1.0)  # warm-up: connections, caches
            phases: dict[str, list[dict[str, float]]] = {"alone": [], "attacked": []}
            attack_counts = []
            for _ in range(ROUNDS):
                phases["alone"].append(run_open_loop(url, bodies, RATE, PHASE_S).summary())
                parent.send("attack")
                tag, opened = parent.recv()
                assert tag == "ready" and opened["opened"] == SLOW_CLIENTS, (tag, opened)
                phases["attacked"].append(run_open_loop(url, bodies, RATE, PHASE_S).summary())
                parent.send("stop")
                tag, counts = parent.recv()
                assert tag == "stopped"
                attack_counts.append(counts)
            parent.send("exit")
            attacker.join(10)
        finally:
            if attacker.is_alive():
                attacker.kill()
    report = {
        name: {
            "p99_ms": [round(s["p99_ms"], 2) for s in runs],
            "p50_ms": [round(s["p50_ms"], 2) for s in runs],
            "sent": [s["sent"] for s in runs],
        }
        for name, runs in phases.items()
    }
    report["attack"] = attack_counts  # type: ignore[assignment]
    print(f"\nslowloris: {report}")
    for runs in phases.values():
        for s in runs:
            # Every normal request answered 200, none failed or timed out.
            assert s["errors"] == 0, report
            assert s.get("status_200") == s["sent"] == int(RATE * PHASE_S), report
    for counts in attack_counts:
        # The slow clients kept trickling the whole phase, and were never answered.
        assert counts["bytes"] >= SLOW_CLIENTS * (PHASE_S / TRICKLE_S - 1), report
    alone = statistics.median(s["p99_ms"] for s in phases["alone"])
    attacked = statistics.median(s["p99_ms"] for s in phases["attacked"])
    print(f"slowloris: p99 alone {alone:.2f} ms, attacked {attacked:.2f} ms, "
          f"ratio {attacked / alone:.2f}")  # fmt: skip
    assert attacked <= MAX_P99_RATIO * alone, report
