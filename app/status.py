"""``GET /status``: a live status page over ``/stats`` and ``/models``, served by the farm.

One static HTML page and its script and style sheet (``app/static/``, package data; an
editable install serves them from the repository). They are read and rendered once, when
the app is built, never per request:

- the page gets the settings its script needs (poll interval, drift thresholds) and
  references its assets by content hash (``status/status.js?v=<etag>``), so a browser
  may keep the assets for a day and still never runs a stale script after an upgrade;
- every answer has an ``ETag`` and answers ``If-None-Match`` with 304; the page itself
  is ``no-cache`` (revalidated on each load);
- a Content-Security-Policy allows the farm's own origin only: the page loads and
  fetches nothing from elsewhere.

The script (``status.js``) polls ``stats`` and ``models`` every ``POLL_MS`` and draws
rolling SVG line charts; no chart library.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import falcon
import falcon.asgi

from app.config import Config
from app.errors import NotFound

STATIC = Path(__file__).with_name("static")
PAGE = "status.html"
#: asset -> content type: the only files ``/status/{asset}`` serves.
ASSETS = {
    "status.js": "text/javascript; charset=utf-8",
    "status.css": "text/css; charset=utf-8",
}
#: How often the page asks ``/stats`` and ``/models`` (each poll waits for the answers).
POLL_MS = 1500
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class Static:
    data: bytes
    content_type: str
    cache_control: tuple[str, ...]

    @property
    def etag(self) -> str:
        return hashlib.sha256(self.data).hexdigest()[:16]


def render(config: Config, root: Path = STATIC) -> dict[str, Static]:
    """The page (key ``""``) and its assets, as served."""
    assets = {
        name: Static((root / name).read_bytes(), ctype, ("public", "max-age=86400"))
        for name, ctype in ASSETS.items()
    }
    values = {
        "poll_ms": str(POLL_MS),
        "psi_warn": repr(config.drift_psi_warn),
        "psi_alert": repr(config.drift_psi_alert),
        "js_etag": assets["status.js"].etag,
        "css_etag": assets["status.css"].etag,
    }
    page = (root / PAGE).read_text(encoding="utf-8")
    for key, value in values.items():
        page = page.replace("{{" + key + "}}", value)
    if "{{" in page:
        raise ValueError(f"{root / PAGE}: a placeholder was left unrendered")
    html = Static(page.encode(), "text/html; charset=utf-8", ("no-cache",))
    return {"": html, **assets}


class StatusResource:
    """``GET /status`` and ``GET /status/{asset}``."""

    def __init__(self, files: dict[str, Static]) -> None:
        self.files = files

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        self._send(req, resp, self.files[""])

    async def on_get_asset(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, asset: str
    ) -> None:
        if not asset or asset not in self.files:
            raise NotFound(f"no status asset {asset[:64]!r}")
        self._send(req, resp, self.files[asset])

    @staticmethod
    def _send(req: falcon.asgi.Request, resp: falcon.asgi.Response, file: Static) -> None:
        resp.etag = file.etag
        resp.cache_control = list(file.cache_control)
        resp.set_header("Content-Security-Policy", CSP)
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.content_type = file.content_type
        wanted = req.if_none_match or []
        if any(str(tag) in (file.etag, "*") for tag in wanted):
            resp.status = falcon.HTTP_304
            return
        resp.data = file.data


def register(app: falcon.asgi.App, config: Config) -> None:
    """Add ``/status`` and ``/status/{asset}`` to ``app``."""
    resource = StatusResource(render(config))
    app.add_route("/status", resource)
    app.add_route("/status/{asset}", resource, suffix="asset")
