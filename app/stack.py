"""Start and stop the real stack (gunicorn workers + nginx) as child processes.

Used by the integration tests and the benchmark harness: the same
``deploy/gunicorn.conf.py`` and ``deploy/nginx.conf`` as ``serve``, on a port and run
directory of the caller's choosing, with no honcho in between. Loopback only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
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
        self.gunicorn = subprocess.Popen(
            [gunicorn, "--config", str(REPO_ROOT / "deploy" / "gunicorn.conf.py")],
            cwd=REPO_ROOT,
            env=env,
            stdout=(self.log_dir / "gunicorn.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        argv = prepare(self.config)
        self.nginx = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            stdout=(self.log_dir / "nginx.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until every worker answers ``/ready`` through nginx."""
        deadline = time.monotonic() + timeout_s
        seen: set[int] = set()
        while time.monotonic() < deadline:
            for proc, name in ((self.gunicorn, "gunicorn"), (self.nginx, "nginx")):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode}; see {self.log_dir}/{name}.log"
                    )
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=2) as resp:
                    body = resp.read()
                    if resp.status == 200:
                        seen.add(msgspec.json.decode(body)["pid"])
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if len(seen) >= self.config.workers:
                return
            time.sleep(0.1)
        raise TimeoutError(f"farm not ready after {timeout_s}s (saw workers {sorted(seen)})")

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
