"""Admin endpoints: anything that reads the running configuration or changes state.

Two locks on the door. nginx never proxies ``/admin/`` (404 on the public port), so
these routes are reachable only on a worker's own unix socket under the run dir; and
every call needs ``Authorization: Bearer <admin_token>`` (compared in constant time).
With no token configured the endpoints answer 403. Each call acts on the worker that
receives it (one socket per worker).

    GET  /admin/config          the running Config (the token redacted)
    POST /admin/breakers/reset  close every circuit breaker of this worker
"""

from __future__ import annotations

import hmac
import logging
import os

import falcon.asgi
import msgspec

from app.errors import Forbidden, Unauthorized
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


def register(app: falcon.asgi.App, farm: Farm) -> None:
    app.add_route("/admin/config", AdminConfig(farm))
    app.add_route("/admin/breakers/reset", AdminBreakersReset(farm))
