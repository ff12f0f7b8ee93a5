"""Gunicorn settings for the farm; every value comes from app.config.Config.

Workers are uvicorn's gunicorn worker (uvloop + httptools) serving Falcon's ASGI app:
measured here at well above gthread's requests per second (docs/ARCHITECTURE.md).
ONNX Runtime sessions are created in the ASGI lifespan startup, i.e. after fork;
nothing heavy is preloaded (ORT thread pools do not survive fork).
"""

import contextlib
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import PROMETHEUS_ENV, load
from app.logconf import dict_config

_config = load()
_config.run_path.mkdir(parents=True, exist_ok=True)
# Metrics in prometheus_client's multiprocess mode: the workers inherit this variable
# (they import the app after fork) and write their samples under the run dir.
os.environ[PROMETHEUS_ENV] = str(_config.metrics_path)

wsgi_app = "app.asgi:app"
bind = [f"unix:{_config.shared_socket}"]
workers = _config.workers
# uvicorn's worker, draining on SIGTERM/SIGINT/SIGQUIT with /ready false (app/lifecycle.py).
worker_class = "app.lifecycle.DrainingWorker"
preload_app = False
keepalive = _config.gunicorn_keepalive_s
graceful_timeout = _config.graceful_timeout_s
timeout = _config.worker_timeout_s
backlog = 2048
pidfile = str(_config.run_path / "gunicorn.pid")
# gunicornc's control socket: per farm, under the run dir (not in $HOME).
control_socket = str(_config.run_path / "gunicorn.ctl")
proc_name = "ctr-farm"
accesslog = None
logconfig_dict = dict_config(_config.log_level)
# The worker heartbeat file lives in memory, not on a possibly slow disk.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None


def pre_fork(server, worker):
    """Give the new worker the lowest free slot (a replacement takes its predecessor's)."""
    used = {getattr(w, "slot", None) for w in server.WORKERS.values()}
    worker.slot = next(i for i in range(len(server.WORKERS) + 1) if i not in used)


def post_fork(server, worker):
    """Bind this worker's own unix socket, so nginx can balance across workers."""
    if not _config.per_worker_sockets:
        return
    path = _config.worker_socket(worker.slot)
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o660)
    sock.listen(backlog)
    sock.setblocking(False)
    worker.sockets = [sock, *worker.sockets]
    server.log.info("worker slot %s listening on %s", worker.slot, path)


def worker_exit(server, worker):
    if _config.per_worker_sockets and hasattr(worker, "slot"):
        _config.worker_socket(worker.slot).unlink(missing_ok=True)


def on_starting(server):
    """Start with an empty metrics directory: counters begin at zero with the master."""
    shutil.rmtree(_config.metrics_path, ignore_errors=True)
    _config.metrics_path.mkdir(parents=True)
    # SIGHUP reloads models inside each worker (app/lifecycle.py), not gunicorn's own
    # HUP: that re-forks every worker, and a new worker whose model fails to load
    # stops the whole farm instead of leaving the old version serving.
    server.handle_hup = lambda: _forward_hup(server)


def _forward_hup(server):
    server.log.info("SIGHUP: reloading models in %d workers", len(server.WORKERS))
    for pid in list(server.WORKERS):
        # A worker gone since then is replaced, and its replacement loads the newest.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGHUP)


def child_exit(server, worker):
    """A worker is gone (exit or kill -9): its live gauges must stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
