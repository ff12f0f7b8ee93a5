"""Start and stop the real stack (gunicorn workers + nginx) as child processes.

Used by the integration tests and the benchmark harness: the same
``deploy/gunicorn.conf.py`` and ``deploy/nginx.conf`` as ``serve``, on a port and run
directory of the caller's choosing, with no honcho in between. Loopback only.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec

from app.config import REPO_ROOT, Config, load, to_env
from app.proxy import prepare

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """A running farm: ``url``, ``config``, the two processes and their logs."""

    def __init__(self, config: Config, log_dir: Path) -> None:
        self.config = config
        self.url = f"http://{config.host}:{config.port}"
        self.log_dir = log_dir
        self.gunicorn: subprocess.Popen[bytes] | None = None
        self.nginx: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.config.run_path.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **to_env(self.config)}
        gunicorn = str(Path(sys.executable).with_name("gunicorn"))
        # The children get their own copy of each log fd: close ours (no leaked files).
        with (self.log_dir / "gunicorn.log").open("ab") as out:
            self.gunicorn = subprocess.Popen(
                [gunicorn, "--config", str(REPO_ROOT / "deploy" / "gunicorn.conf.py")],
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        argv = prepare(self.config)
        with (self.log_dir / "nginx.log").open("ab") as out:
            self.nginx = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until every worker says ready on its socket, and nginx answers."""
        deadline = time.monotonic() + timeout_s
        seen: set[int] = set()
        while time.monotonic() < deadline:
            for proc, name in ((self.gunicorn, "gunicorn"), (self.nginx, "nginx")):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode}; see {self.log_dir}/{name}.log"
                    )
            seen.update(pid for pid in map(_ready_pid, self._probe_sockets()) if pid)
            if len(seen) >= self.config.workers and _ready_pid(self.url):
                return
            time.sleep(0.1)
        raise TimeoutError(f"farm not ready after {timeout_s}s (workers ready: {sorted(seen)})")

    def _probe_sockets(self) -> list[str]:
        if self.config.per_worker_sockets:
            return [str(self.config.worker_socket(i)) for i in range(self.config.workers)]
        # One shared socket: fresh connections land on arbitrary workers; try a few.
        return [str(self.config.shared_socket)] * (4 * self.config.workers)

    def worker_pids(self) -> list[int]:
        """Live gunicorn worker pids (children of the master)."""
        assert self.gunicorn is not None
        path = Path(f"/proc/{self.gunicorn.pid}/task/{self.gunicorn.pid}/children")
        return [int(p) for p in path.read_text().split()]

    def stop(self, timeout_s: float = 30.0) -> None:
        for proc in (self.nginx, self.gunicorn):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGQUIT if proc is self.nginx else signal.SIGTERM)
        for proc in (self.nginx, self.gunicorn):
            if proc is None:
                continue
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("killing unresponsive process", extra={"pid": proc.pid})
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=2)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(2)
        self.sock.connect(self._path)


def _ready_pid(target: str) -> int | None:
    """GET /ready on a URL or a unix socket path; the worker pid if it is ready."""
    if target.startswith("http"):
        host, _, port = target.split("//", 1)[1].partition(":")
        conn: http.client.HTTPConnection = http.client.HTTPConnection(host, int(port), timeout=2)
    else:
        conn = _UnixHTTPConnection(target)
    try:
        conn.request("GET", "/ready")
        resp = conn.getresponse()
        body = resp.read()
        return msgspec.json.decode(body)["pid"] if resp.status == 200 else None
    except (OSError, http.client.HTTPException, msgspec.DecodeError):
        return None
    finally:
        conn.close()


@contextlib.contextmanager
def running(
    run_dir: Path, overrides: Mapping[str, Any] | None = None, timeout_s: float = 120.0
) -> Iterator[Stack]:
    """A farm on a free loopback port with its own run dir; stopped on exit.

    Keep ``run_dir`` short (``tempfile.mkdtemp(prefix="farm-")``): unix socket paths
    are limited to 107 bytes.
    """
    config = load(
        overrides={"port": free_port(), "run_dir": str(run_dir), **(overrides or {})},
        env={k: v for k, v in os.environ.items() if not k.startswith("CTR_FARM_")},
    )
    stack = Stack(config, run_dir / "logs")
    try:
        stack.start(timeout_s)
        yield stack
    finally:
        stack.stop()
