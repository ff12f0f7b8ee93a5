"""Start and stop the peers (what a user would pick instead of the farm) for a benchmark.

The peers run in their own venv, ``.venv-peers``, built from
``benchmarks/peers/requirements.txt`` by :func:`ensure_venv` (idempotent: a stamp file
named after the requirements' hash, like ``scripts/install``), so the farm's pinned
``.venv`` never sees FastAPI or LitServe. Each peer is a standalone module of this
folder, started as its usual deployment (uvicorn, gunicorn, LitServe's own launcher)
on 127.0.0.1, directly, without nginx in front.

:func:`start_peer` is a context manager: it starts the peer in a new session (process
group), waits until every worker process has loaded the models (each one drops a file
in ``PEER_READY_DIR``) and ``GET /ready`` answers 200, and stops the whole group on exit
(the peer's shutdown signal, then SIGKILL after a bounded wait).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.config import REPO_ROOT
from app.stack import free_port

log = logging.getLogger(__name__)

PEERS_DIR = Path(__file__).resolve().parent
REQUIREMENTS = PEERS_DIR / "requirements.txt"
VENV = REPO_ROOT / ".venv-peers"
ENDPOINTS = ("predict", "rank")
PIP_R = ("-r", str(REQUIREMENTS))


# -- the peers' venv -------------------------------------------------------------------------
def _stamp() -> Path:
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:16]
    return VENV / f".installed-{digest}"


def venv_ready() -> bool:
    return (VENV / "bin" / "python").exists() and _stamp().exists()


def ensure_venv(timeout_s: float = 900.0) -> Path:
    """Create or refresh ``.venv-peers`` from the requirements; its python. Idempotent.

    Built with the farm's own base interpreter (same Python version on both sides).
    A lock file serializes concurrent callers (a test run and a benchmark, say).
    Raises ``subprocess.CalledProcessError``/``TimeoutExpired``/``OSError`` on failure.
    """
    python = VENV / "bin" / "python"
    if venv_ready():
        return python
    VENV.mkdir(parents=True, exist_ok=True)  # venv accepts an existing (empty) dir
    with (VENV / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if venv_ready():
            return python
        base = getattr(sys, "_base_executable", None) or shutil.which("python3") or "python3"
        if not python.exists():
            print(f"benchmarks.peers: creating {VENV}", file=sys.stderr, flush=True)
            subprocess.run([base, "-m", "venv", str(VENV)], check=True, timeout=300)
        print(f"benchmarks.peers: pip install -r {REQUIREMENTS}", file=sys.stderr, flush=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PIP_R],
            check=True,
            timeout=timeout_s,
        )
        for old in VENV.glob(".installed-*"):
            old.unlink()
        _stamp().touch()
    return python


# -- the peers ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PeerSpec:
    """How to start one peer: its argv, how many processes report ready, how to stop it."""

    name: str
    argv: Callable[[int, int, Sequence[str]], list[str]]
    ready_processes: Callable[[int, Sequence[str]], int]
    stop_signal: signal.Signals
    description: str


def _bin(name: str) -> str:
    return str(VENV / "bin" / name)


PEERS: dict[str, PeerSpec] = {
    "fastapi": PeerSpec(
        "fastapi",
        lambda port, workers, _: [
            _bin("uvicorn"),
            "fastapi_naive:app",
            "--app-dir",
            str(PEERS_DIR),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        lambda workers, _: workers,
        signal.SIGTERM,
        "FastAPI + uvicorn, stdlib json, Python-loop decoding, one session per process",
    ),
    "litserve": PeerSpec(
        "litserve",
        lambda port, workers, endpoints: [
            _bin("python"),
            str(PEERS_DIR / "litserve_batched.py"),
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--endpoints",
            ",".join(endpoints),
        ],
        # One set of inference workers per endpoint (LitServe's design).
        lambda workers, endpoints: workers * len(endpoints),
        signal.SIGTERM,  # litserve_batched.py turns it into LitServe's KeyboardInterrupt
        "LitServe, batching on, API servers + inference workers",
    ),
    "gthread-falcon": PeerSpec(
        "gthread-falcon",
        lambda port, workers, _: [
            _bin("gunicorn"),
            "--worker-class",
            "gthread",
            "--workers",
            str(workers),
            "--threads",
            os.environ.get("PEER_GTHREAD_THREADS", "4"),
            "--bind",
            f"127.0.0.1:{port}",
            "--chdir",
            str(PEERS_DIR),
            "--log-level",
            "warning",
            "--no-control-socket",
            "gthread_falcon:app",
        ],
        lambda workers, _: workers,
        signal.SIGINT,  # quick shutdown: no in-flight request matters here
        "gunicorn gthread + Falcon WSGI, msgspec decoding, one session per process",
    ),
}


@dataclass
class Peer:
    """A running peer: where it listens and its process group (for CPU accounting)."""

    name: str
    url: str
    workers: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def session_ids(self) -> list[int]:
        """Session ids of every process serving (the peer runs in its own session)."""
        return [self.proc.pid]

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _ready_status(url: str) -> int | None:
    host, _, port = url.split("//", 1)[1].partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=2)
    try:
        conn.request("GET", "/ready")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _wait_ready(peer: Peer, ready_dir: Path, expected: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if peer.proc.poll() is not None:
            raise RuntimeError(
                f"peer {peer.name} exited with {peer.proc.returncode}:\n{peer.log_tail()}"
            )
        loaded = len(list(ready_dir.glob("*.ready")))
        if loaded >= expected and _ready_status(peer.url) == 200:
            return
        time.sleep(0.2)
    raise TimeoutError(f"peer {peer.name} not ready after {timeout_s}s:\n{peer.log_tail()}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - not ours any more
        return False
    return True


def stop_process_group(proc: subprocess.Popen[bytes], sig: int, timeout_s: float = 20.0) -> None:
    """Signal the group leader, wait (bounded), then SIGKILL whatever is left of its group."""
    pgid = proc.pid  # started with start_new_session: the leader's pid is the group id
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("peer did not stop in %ss; killing its group %s", timeout_s, pgid)
    deadline = time.monotonic() + 5.0
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)  # children finishing their own shutdown
    if _group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


@contextlib.contextmanager
def start_peer(
    name: str,
    port: int | None = None,
    workers: int = 2,
    endpoints: Sequence[str] = ENDPOINTS,
    timeout_s: float = 120.0,
    env: Mapping[str, str] | None = None,
) -> Iterator[Peer]:
    """Start peer ``name`` on 127.0.0.1:``port`` (a free one if None) with ``workers``
    processes; yield it once every worker has loaded the models; stop it on exit.

    ``endpoints`` matters to LitServe only (it runs inference workers per endpoint);
    the other peers always serve both. ``env`` adds variables, e.g.
    ``PEER_DEEPFM_MODEL``/``PEER_AUTOINT_MODEL`` (model dirs other than ``models/*/1``)
    or ``PEER_INTRA_THREADS``.
    """
    spec = PEERS[name]
    ensure_venv()
    port = port or free_port()
    tmp = Path(tempfile.mkdtemp(prefix=f"peer-{name}-"))
    ready_dir = tmp / "ready"
    ready_dir.mkdir()
    child_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CTR_FARM_", "PEER_READY")) and k not in ("VIRTUAL_ENV", "PYTHONPATH")
    }
    child_env.update(env or {})
    child_env["PEER_READY_DIR"] = str(ready_dir)
    child_env["PYTHONUNBUFFERED"] = "1"
    log_path = tmp / "peer.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            spec.argv(port, workers, endpoints),
            cwd=REPO_ROOT,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    peer = Peer(name, f"http://127.0.0.1:{port}", workers, proc, log_path)
    failed = True
    try:
        _wait_ready(peer, ready_dir, spec.ready_processes(workers, endpoints), timeout_s)
        yield peer
        failed = False
    finally:
        stop_process_group(proc, spec.stop_signal)
        if failed:
            print(f"peer {name} log kept in {log_path}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# -- CPU accounting ---------------------------------------------------------------------------
def session_cpu_seconds(session_ids: Sequence[int]) -> float:
    """CPU seconds (user + system) used so far by every live process of these sessions."""
    wanted = set(session_ids)
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) in wanted:  # field 6 of stat: the session id
            total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")
