"""Graceful lifecycle of one worker process: drain on SIGTERM, SIGINT and SIGQUIT.

What the stack does by itself (read from uvicorn 0.54, uvicorn-worker 0.4, gunicorn 27):

- SIGTERM / SIGINT to a worker: uvicorn's ``Server.handle_exit`` sets ``should_exit``;
  the server's main loop sees it on its next tick (every 0.1 s). Its ``shutdown()`` then
  stops accepting (the listening sockets are closed: new connections are refused),
  closes every *idle* keep-alive connection at once, lets each connection with a request
  in flight finish it (the answer carries ``Connection: close``; a request pipelined
  behind it is dropped), waits for those requests, and only then runs the ASGI lifespan
  shutdown (``Farm.close()``). So until the drain is over ``Farm.ready`` stays true,
  and between the signal and the tick a request on an open connection is still served.
  A second SIGINT forces the exit.
- SIGQUIT to a worker: uvicorn-worker only sets gunicorn's ``worker.alive = False``,
  which uvicorn never reads: the worker keeps serving. The master sends SIGQUIT to its
  workers on its own SIGINT or SIGQUIT ("quick shutdown") and SIGKILLs whatever is left
  after ``graceful_timeout``, so in-flight requests would be cut.
- The master: SIGTERM closes its listeners, sends SIGTERM to the workers and waits up to
  ``graceful_timeout`` before SIGKILL; SIGINT / SIGQUIT do the same with SIGQUIT (a SIGINT
  during a SIGTERM drain shortens the wait to 2 s). The per-worker sockets belong to the
  workers (``deploy/gunicorn.conf.py``) and close with their drain.

What this module adds (``worker_class = "app.lifecycle.DrainingWorker"``):

- ``DRAIN`` records the first exit signal at once (before uvicorn's tick), and
  ``/ready`` answers 503 ``{"ready": false}`` from then on, while requests in flight and
  ``/rank`` / ``/predict`` go on being served until the drain ends.
- SIGQUIT drains like SIGTERM, so a master SIGINT (Ctrl-C) or SIGQUIT is graceful too,
  bounded by ``graceful_timeout_s`` like SIGTERM.
- uvicorn's own drain deadline is set just below gunicorn's ``graceful_timeout``, so a
  stuck request is cancelled and the lifespan shutdown still runs before the SIGKILL.
- SIGHUP reloads the models in place (``RELOAD``; ``Farm.reload``) instead of killing the
  worker (uvicorn-worker resets it to the default action, which is to exit). The master
  forwards its own SIGHUP to every worker (``deploy/gunicorn.conf.py``) rather than
  re-forking them all, so a reload never leaves a moment without a ready worker.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

log = logging.getLogger(__name__)

#: Seconds between uvicorn's drain deadline and gunicorn's SIGKILL (lifespan shutdown).
_SHUTDOWN_MARGIN_S = 1.0


class Drain:
    """Whether this process has been asked to exit, by which signal, and since when."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.since: float | None = None

    @property
    def draining(self) -> bool:
        return self.signal is not None

    def begin(self, signum: int) -> None:
        # Runs inside a signal handler: set two attributes, no logging (not reentrant).
        if self.signal is None:
            self.since = time.monotonic()
            self.signal = signal.Signals(signum).name


#: One per process: signals are delivered to processes.
DRAIN = Drain()


class ReloadSignal:
    """SIGHUP in a worker: whoever subscribed (the app's lifespan) reloads its models.

    ``master_pid`` is the gunicorn master that forwards SIGHUP to every worker (None
    outside gunicorn): ``POST /admin/reload`` on one worker reaches all through it.
    """

    def __init__(self) -> None:
        self.master_pid: int | None = None
        self._handlers: list[Callable[[], object]] = []

    def subscribe(self, handler: Callable[[], object]) -> None:
        self._handlers.append(handler)

    def unsubscribe(self, handler: Callable[[], object]) -> None:
        if handler in self._handlers:
            self._handlers.remove(handler)

    def fire(self) -> None:
        """Runs in the event loop (``add_signal_handler``), not in a signal handler."""
        log.info("SIGHUP: reloading models", extra={"handlers": len(self._handlers)})
        for handler in list(self._handlers):
            handler()


RELOAD = ReloadSignal()


class DrainingServer(Server):
    """uvicorn's server, marking ``DRAIN`` when an exit signal arrives."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        DRAIN.begin(sig)
        super().handle_exit(sig, frame)

    def handle_quit(self) -> None:
        """SIGQUIT: the same graceful drain as SIGTERM, and the same end.

        Recorded as a SIGTERM, which uvicorn re-raises once the drain is over: the worker
        then dies by it like a SIGTERM'd one. (Returning normally instead was measured to
        hang in a futex at interpreter exit until the master's SIGKILL.)
        """
        DRAIN.begin(signal.SIGQUIT)
        super().handle_exit(signal.SIGTERM, None)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        state = self.server_state
        log.info(
            "drain started",
            extra={
                "signal": DRAIN.signal,
                "connections": len(state.connections),
                "requests_in_flight": len(state.tasks),
            },
        )
        await super().shutdown(sockets)
        since = DRAIN.since or time.monotonic()
        log.info(
            "drain finished",
            extra={"signal": DRAIN.signal, "drain_s": round(time.monotonic() - since, 3)},
        )


class DrainingWorker(UvicornWorker):
    """uvicorn's gunicorn worker with :class:`DrainingServer` and a draining SIGQUIT."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.config.timeout_graceful_shutdown = max(
            1.0, self.cfg.graceful_timeout - _SHUTDOWN_MARGIN_S
        )

    def init_signals(self) -> None:
        super().init_signals()
        # SIG_DFL would end the worker; until _serve takes it over, a SIGHUP is a no-op.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    async def _serve(self) -> None:
        # uvicorn-worker 0.4's _serve, with our server and SIGQUIT handler (pinned in
        # pyproject.toml; re-read this when upgrading it).
        self.config.app = self.wsgi
        server = DrainingServer(config=self.config)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGQUIT, server.handle_quit)
        RELOAD.master_pid = self.ppid
        loop.add_signal_handler(signal.SIGHUP, RELOAD.fire)
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
