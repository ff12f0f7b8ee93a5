"""Falcon ASGI resources: read bytes, decode, call the farm, encode. Nothing else.

``create_app(config, farm=None)`` wires the collaborators; tests pass their own farm.
Every error leaves as ``{"error": {"code", "message", "field"}, "request_id"}`` with
the ``X-Request-ID`` header; one catch-all handler logs the traceback and answers a
generic 500 that carries no internals.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from typing import Any

import falcon
import falcon.asgi
import msgspec

from app.config import Config
from app.errors import (
    FarmError,
    MalformedBody,
    MethodNotAllowed,
    NotFound,
    NotReady,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from app.features import ContentKind, error_from_msgspec
from app.lifecycle import DRAIN
from app.openapi import register as register_openapi
from app.pipeline import RankResult
from app.schema import (
    REQUEST_ID_MAX,
    ErrorBody,
    ErrorDetail,
    HealthResponse,
    ModelsResponse,
    PredictRequest,
    PredictResponse,
    Ranking,
    RankRequest,
    RankResponse,
    RankStats,
    ReadyResponse,
)
from app.service import Farm

log = logging.getLogger(__name__)

JSON = "application/json"
MSGPACK = "application/msgpack"
_KINDS: dict[str, ContentKind] = {
    JSON: "json",
    MSGPACK: "msgpack",
    "application/x-msgpack": "msgpack",
    "application/vnd.msgpack": "msgpack",
}
_REQUEST_ID_RE = re.compile(rf"^[A-Za-z0-9._:\-]{{1,{REQUEST_ID_MAX}}}$")


class Codec:
    """Encoders and decoders built once; picks the wire format per request."""

    def __init__(self) -> None:
        self.json_encoder = msgspec.json.Encoder()
        self.msgpack_encoder = msgspec.msgpack.Encoder()
        self.decoders: dict[tuple[ContentKind, type], Any] = {}
        for typ in (RankRequest, PredictRequest):
            self.decoders["json", typ] = msgspec.json.Decoder(typ)
            self.decoders["msgpack", typ] = msgspec.msgpack.Decoder(typ)

    @staticmethod
    def request_kind(req: falcon.asgi.Request) -> ContentKind:
        ctype = req.content_type
        if not ctype:
            return "json"  # curl-style clients that send no type get JSON
        kind = _KINDS.get(ctype.split(";", 1)[0].strip().lower())
        if kind is None:
            raise UnsupportedMediaType(
                f"Content-Type must be {JSON} or {MSGPACK}, not {ctype[:64]!r}",
                field="Content-Type",
            )
        return kind

    @staticmethod
    def response_kind(req: falcon.asgi.Request, request_kind: ContentKind) -> ContentKind:
        accept = req.accept
        if "msgpack" in accept:
            return "msgpack"
        if JSON in accept:
            return "json"
        return request_kind

    def decode(self, body: bytes, kind: ContentKind, typ: type) -> Any:
        try:
            return self.decoders[kind, typ].decode(body)
        except msgspec.MsgspecError as exc:
            raise error_from_msgspec(exc, "") from exc

    def write(self, resp: falcon.asgi.Response, value: Any, kind: ContentKind = "json") -> None:
        if kind == "msgpack":
            resp.data, resp.content_type = self.msgpack_encoder.encode(value), MSGPACK
        else:
            resp.data, resp.content_type = self.json_encoder.encode(value), JSON


async def read_body(req: falcon.asgi.Request, limit: int) -> bytes:
    if req.content_length is not None and req.content_length > limit:
        raise PayloadTooLarge(f"body is {req.content_length} bytes; the limit is {limit}")
    body = await req.bounded_stream.read(limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
    if not body:
        raise MalformedBody("request body is empty")
    return body


class RequestId:
    """Echo a well-formed ``X-Request-ID`` or mint one; it rides on every response."""

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        rid = req.get_header("X-Request-ID")
        if rid is None or not _REQUEST_ID_RE.match(rid):
            rid = secrets.token_hex(8)
        req.context.request_id = rid
        resp.set_header("X-Request-ID", rid)


class Lifecycle:
    """ASGI lifespan: sessions are created here, i.e. inside the forked worker."""

    def __init__(self, farm: Farm) -> None:
        self.farm = farm

    async def process_startup(self, scope: dict, event: dict) -> None:
        try:
            self.farm.load()
        except FarmError as exc:
            # One clear line before the traceback; the failed startup stops the worker
            # (uvicorn exits with gunicorn's boot-error code: gunicorn halts).
            log.critical("worker cannot start: %s", exc.message, extra={"code": exc.code})
            raise

    async def process_shutdown(self, scope: dict, event: dict) -> None:
        self.farm.close()


def rank_response(result: RankResult) -> RankResponse:
    """The ``/rank`` answer for a pipeline result (also used by the benchmarks)."""
    rankings = [
        Ranking(index=i, ctr=c, rank=r)
        for r, (i, c) in enumerate(
            zip(result.indices.tolist(), result.scores.tolist(), strict=True), 1
        )
    ]
    stats = RankStats(input=result.n_input, after_stage1=result.after_stage1, output=len(rankings))
    return RankResponse(
        rankings=rankings, latency=result.latency, stats=stats, models=result.models
    )


class RankResource:
    def __init__(self, farm: Farm, codec: Codec) -> None:
        self.farm, self.codec = farm, codec

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        kind = self.codec.request_kind(req)
        body = await read_body(req, self.farm.config.max_body_bytes)
        request = self.codec.decode(body, kind, RankRequest)
        result = await self.farm.call(self.farm.rank, request, kind, cost=len(body))
        answer = rank_response(result)
        self.codec.write(resp, answer, self.codec.response_kind(req, kind))


class PredictResource:
    def __init__(self, farm: Farm, codec: Codec) -> None:
        self.farm, self.codec = farm, codec

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        kind = self.codec.request_kind(req)
        body = await read_body(req, self.farm.config.max_body_bytes)
        request = self.codec.decode(body, kind, PredictRequest)
        scores, model = await self.farm.call(self.farm.predict, request, kind, cost=len(body))
        name, _, version = model.key.partition("/")
        answer = PredictResponse(ctr=scores.tolist(), model=name, version=version)
        self.codec.write(resp, answer, self.codec.response_kind(req, kind))


class HealthResource:
    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        self.codec.write(resp, HealthResponse(status="ok", pid=os.getpid()))


class ReadyResource:
    def __init__(self, farm: Farm, codec: Codec) -> None:
        self.farm, self.codec = farm, codec

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        ready = self.farm.ready and not DRAIN.draining  # false from the exit signal on
        models = [m.key for m in self.farm.models.values()]
        self.codec.write(resp, ReadyResponse(ready=ready, pid=os.getpid(), models=models))
        if not ready:
            resp.status = falcon.HTTP_503


class ModelsResource:
    def __init__(self, farm: Farm, codec: Codec) -> None:
        self.farm, self.codec = farm, codec

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if not self.farm.ready:
            raise NotReady("models are not loaded yet")
        self.codec.write(resp, ModelsResponse(models=self.farm.summaries()))


class StatsResource:
    """Per-worker counters (this process only; /metrics aggregates across workers)."""

    def __init__(self, farm: Farm, codec: Codec) -> None:
        self.farm, self.codec = farm, codec

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        oov = self.farm.features.oov_counter.snapshot() if self.farm.features else {}
        self.codec.write(resp, {"pid": os.getpid(), "oov_ids": oov})


class ErrorHandlers:
    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    def _write(self, req: Any, resp: Any, status: int, detail: ErrorDetail) -> None:
        rid = getattr(req.context, "request_id", None)
        resp.status = status
        self.codec.write(resp, ErrorBody(error=detail, request_id=rid))
        if rid:
            resp.set_header("X-Request-ID", rid)

    async def farm_error(self, req: Any, resp: Any, ex: FarmError, params: dict) -> None:
        if ex.status >= 500:
            log.warning(
                "request failed",
                extra={"code": ex.code, "error": ex.message, "request_id": _rid(req)},
            )
        if ex.status == 503:
            resp.set_header("Retry-After", "1")
        self._write(req, resp, ex.status, ErrorDetail(ex.code, ex.message, ex.field))

    async def http_error(self, req: Any, resp: Any, ex: falcon.HTTPError, params: dict) -> None:
        status = ex.status_code
        for key, value in (ex.headers or {}).items():
            resp.set_header(key, value)  # e.g. Allow on 405
        if status == 404:
            detail = ErrorDetail(NotFound.code, f"no route {req.path[:100]!r}")
        elif status == 405:
            detail = ErrorDetail(
                MethodNotAllowed.code, f"{req.method} is not allowed on {req.path[:100]!r}"
            )
        else:
            detail = ErrorDetail("http_error", ex.title or "error")
        self._write(req, resp, status, detail)

    async def unexpected(self, req: Any, resp: Any, ex: Exception, params: dict) -> None:
        log.exception("unhandled error", extra={"request_id": _rid(req)})
        self._write(req, resp, 500, ErrorDetail("internal_error", "internal server error"))


def _rid(req: Any) -> str | None:
    return getattr(req.context, "request_id", None)


def create_app(
    config: Config, farm: Farm | None = None, manage_lifecycle: bool = True
) -> falcon.asgi.App:
    """The ASGI app. With ``manage_lifecycle`` the lifespan events load and close the
    farm (the server case); tests that drive a farm themselves pass False."""
    farm = farm or Farm(config)
    codec = Codec()
    middleware: list[object] = [RequestId()]
    if manage_lifecycle:
        middleware.append(Lifecycle(farm))
    app = falcon.asgi.App(middleware=middleware, cors_enable=False)
    app.add_route("/rank", RankResource(farm, codec))
    app.add_route("/predict", PredictResource(farm, codec))
    app.add_route("/health", HealthResource(codec))
    app.add_route("/ready", ReadyResource(farm, codec))
    app.add_route("/models", ModelsResource(farm, codec))
    app.add_route("/stats", StatsResource(farm, codec))
    handlers = ErrorHandlers(codec)
    # Falcon picks the most specific handler; the catch-all must be registered first.
    app.add_error_handler(Exception, handlers.unexpected)
    app.add_error_handler(falcon.HTTPError, handlers.http_error)
    app.add_error_handler(FarmError, handlers.farm_error)
    register_openapi(app, farm)  # /openapi.json, /docs: generated from the routes above
    return app
