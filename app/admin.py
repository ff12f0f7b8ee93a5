"""Admin endpoints: anything that reads the running configuration or changes state.

Two locks on the door. nginx never proxies ``/admin/`` (404 on the public port), so
these routes are reachable only on a worker's own unix socket under the run dir; and
every call needs ``Authorization: Bearer <admin_token>`` (compared in constant time).
With no token configured the endpoints answer 403. Each call acts on the worker that
receives it (one socket per worker).

    GET  /admin/config          the running Config (the token redacted)
    POST /admin/breakers/reset  close every circuit breaker of this worker
    POST /admin/reload          reload the models in every worker (through the gunicorn
                                master's SIGHUP), answer with this worker's outcome
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import time

import falcon.asgi
import msgspec

from app.errors import Forbidden, Unauthorized, Unavailable
from app.lifecycle import RELOAD
from app.service import Farm

log = logging.getLogger(__name__)


def check_token(req: falcon.asgi.Request, token: str) -> None:
    if not token:
        raise Forbidden("admin endpoints are disabled: set admin_token to enable them")
    scheme, _, given = (req.get_header("Authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("admin endpoints need 'Authorization: Bearer <admin_token>'")


class AdminConfig:
    def __init__(self, farm: Farm) -> None:
        self.farm = farm

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        config = self.farm.config
        check_token(req, config.admin_token)
        body = msgspec.structs.asdict(config) | {"admin_token": "<redacted>"}
        resp.data, resp.content_type = msgspec.json.encode(body), falcon.MEDIA_JSON


class AdminBreakersReset:
    def __init__(self, farm: Farm) -> None:
        self.farm = farm

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        check_token(req, self.farm.config.admin_token)
        for breaker in self.farm.breakers.values():
            breaker.success()
        log.warning("breakers reset by admin", extra={"pid": os.getpid()})
        body = {"pid": os.getpid(), "breakers": self.farm.breaker_states()}
        resp.data, resp.content_type = msgspec.json.encode(body), falcon.MEDIA_JSON


class AdminReload:
    """Reload every worker's models; answer once this worker's reload is done.

    Under gunicorn the request becomes a SIGHUP to the master, which forwards it to
    each worker (all reload, each on its own); alone (tests, one process) it reloads here.
    """

    #: Seconds to wait for this worker's reload (loading, warm-up, golden request).
    wait_s = 120.0

    def __init__(self, farm: Farm) -> None:
        self.farm = farm

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        check_token(req, self.farm.config.admin_token)
        asked = time.time()
        log.warning("reload asked by admin", extra={"pid": os.getpid()})
        if RELOAD.master_pid is None:
            status = await asyncio.get_running_loop().run_in_executor(None, self.farm.reload)
        else:
            os.kill(RELOAD.master_pid, signal.SIGHUP)
            status = await self._wait(asked)
        resp.data, resp.content_type = msgspec.json.encode(status), falcon.MEDIA_JSON

    async def _wait(self, asked: float) -> object:
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            status = self.farm.last_reload
            if status is not None and status.at >= asked:
                return status
            await asyncio.sleep(0.05)
        raise Unavailable(f"the reload did not finish within {self.wait_s:.0f} s; see /models")


def register(app: falcon.asgi.App, farm: Farm) -> None:
    app.add_route("/admin/config", AdminConfig(farm))
    app.add_route("/admin/breakers/reset", AdminBreakersReset(farm))
    app.add_route("/admin/reload", AdminReload(farm))
