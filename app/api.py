"""Falcon ASGI resources: read bytes, decode, call the farm, encode. Nothing else.

``create_app(config, farm=None)`` wires the collaborators; tests pass their own farm.
Every error leaves as ``{"error": {"code", "message", "field"}, "request_id"}`` with
the ``X-Request-ID`` header; one catch-all handler logs the traceback and answers a
generic 500 that carries no internals.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import time
from typing import Any

import falcon
import falcon.asgi
import msgspec

from app import metrics, stats
from app.admin import register as register_admin
from app.config import Config
from app.deadlines import START_HEADER, TIMEOUT_HEADER, Deadline, parse_start, parse_timeout
from app.drift import DriftMonitor
from app.errors import (
    FarmError,
    MalformedBody,
    MethodNotAllowed,
    NotFound,
    NotReady,
    PayloadTooLarge,
    Unavailable,
    UnsupportedMediaType,
)
from app.features import DECODE_ERRORS, ContentKind, error_from_msgspec
from app.goodput import Goodput
from app.lifecycle import DRAIN, RELOAD
from app.openapi import register as register_openapi
from app.pipeline import RankResult
from app.requestlog import RequestLog, RequestLogError, Row, export_zeros
from app.schema import (
    REQUEST_ID_MAX,
    ErrorBody,
    ErrorDetail,
    HealthResponse,
    HelloResponse,
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
from app.status import register as register_status
from app.window import Publisher

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
        except DECODE_ERRORS as exc:  # msgspec lets RecursionError, UnicodeDecodeError out
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


class RequestContext:
    """Per request: echo a well-formed ``X-Request-ID`` or mint one (it rides on every
    response), and record the request's metrics, SLA outcome and request-log row (and
    span, when tracing) when it is answered."""

    def __init__(self, farm: Farm, goodput: Goodput, request_log: RequestLog | None = None) -> None:
        self.farm = farm
        self.goodput, self.request_log = goodput, request_log
        #: The queue length last written to ``ctr_farm_queue_waiting``.
        self._queued: int | None = None

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        req.context.t0 = time.perf_counter()
        # PERF: nginx's X-Request-Start parsed once: the deadline and the SLA clock use it.
        req.context.t_wall = t_wall = time.time()
        req.context.waited_s = parse_start(req.get_header(START_HEADER), t_wall)
        metrics.IN_FLIGHT.inc()
        rid = req.get_header("X-Request-ID")
        if rid is None or not _REQUEST_ID_RE.match(rid):
            rid = secrets.token_hex(8)
        req.context.request_id = rid
        resp.set_header("X-Request-ID", rid)
        tracer = self.farm.tracer
        if tracer is not None:
            req.context.span = tracer.start_request(
                req.method, rid, req.get_header("traceparent"), req.get_header("tracestate")
            )

    async def process_response(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, resource: object, ok: bool
    ) -> None:
        t0 = req.context.get("t0")
        if t0 is None:  # process_request did not run (e.g. a lifespan event)
            return
        metrics.IN_FLIGHT.dec()
        endpoint = req.uri_template or "unmatched"
        status = resp.status if isinstance(resp.status, int) else int(str(resp.status)[:3])
        result: RankResult | None = req.context.get("result")
        code = req.context.get("error_code")
        model = req.context.get("model", "")
        if result is not None:
            model = result.models[-1] if result.models else (result.fallback or "")
            metrics.CANDIDATES.observe(result.n_input)
            for i, key in enumerate(result.models):
                ms = result.latency.get(f"stage{i + 1}_ms", 0.0)
                metrics.stage_child(f"stage{i + 1}", key).observe(ms / 1e3)
            if result.reason is not None:
                metrics.DEGRADED.labels(result.answered_by, result.reason).inc()
        admission = self.farm.admission
        if admission is not None and admission.waiting != self._queued:
            # PERF: a gauge write only when the queue length changed (an inline /predict
            # never changes it).
            self._queued = admission.waiting
            metrics.QUEUED.set(self._queued)
        if status == 503 and code is not None:
            metrics.SHED.labels(code).inc()
        elapsed = time.perf_counter() - t0
        metrics.requests_child(endpoint, str(status), model).inc()
        metrics.latency_child(endpoint).observe(elapsed)
        if endpoint in self.goodput.sla_ms:
            self._observe(req, endpoint, status, elapsed, result, model, code)
        span = req.context.get("span")
        if span is not None:
            span.end(endpoint, status, code, result, model)
        variant = req.context.get("variant")
        if variant is not None:
            resp.set_header(VARIANT_HEADER, variant)
            if self.farm.split:
                self._record_variant(req, variant, endpoint, status, result, elapsed)

    def _observe(
        self,
        req: falcon.asgi.Request,
        endpoint: str,
        status: int,
        elapsed_s: float,
        result: RankResult | None,
        model: str,
        code: str | None,
    ) -> None:
        """SLA outcome (timed from nginx's receipt) and the request-log row."""
        waited_s = req.context.waited_s
        outcome = self.goodput.record(endpoint, status, (waited_s + elapsed_s) * 1e3)
        if self.request_log is None:
            return
        scores = req.context.get("ctr")  # /predict's
        self.request_log.record(
            Row(
                request_id=req.context.request_id,
                ts=req.context.t_wall,
                endpoint=endpoint,
                status=status,
                n_candidates=result.n_input if result else None if scores is None else len(scores),
                latency_ms=elapsed_s * 1e3,
                queue_ms=waited_s * 1e3,
                stage_ms=result.latency if result else None,
                models=",".join(result.models) if result else model,
                degraded=result.degraded if result else False,
                answered_by=result.answered_by if result else None,
                reason=result.reason if result else None,
                outcome=outcome,
                error_code=code,
                variant=req.context.get("variant"),
                pid=os.getpid(),
            )
        )

    @staticmethod
    def _record_variant(
        req: falcon.asgi.Request,
        variant: str,
        endpoint: str,
        status: int,
        result: RankResult | None,
        elapsed: float,
    ) -> None:
        """Guardrails per variant (only when traffic is split: A/B or canary)."""
        outcomes, latency, ctr = metrics.variant_children(variant, endpoint)
        if status >= 500 or (result is not None and result.reason in MODEL_FAILURE_REASONS):
            outcome = "error"
        elif status >= 400:
            outcome = "client_error"
        else:
            outcome = "degraded" if result is not None and result.degraded else "ok"
        outcomes[outcome].inc()
        latency.observe(elapsed)
        scores = result.scores if result is not None else req.context.get("ctr")
        if scores is not None and len(scores):
            ctr.observe(float(scores.mean()))


class Lifecycle:
    """ASGI lifespan: sessions are created here, i.e. inside the forked worker; so are the
    window publisher and request-log threads, stopped (and flushed) after the farm."""

    def __init__(
        self, farm: Farm, publisher: Publisher, request_log: RequestLog | None = None
    ) -> None:
        self.farm, self.publisher, self.request_log = farm, publisher, request_log

    async def process_startup(self, scope: dict, event: dict) -> None:
        try:
            self.farm.load()
            if self.request_log is not None:
                self.request_log.start()
        except FarmError as exc:
            # One clear line before the traceback; the failed startup stops the worker
            # (uvicorn exits with gunicorn's boot-error code: gunicorn halts).
            log.critical("worker cannot start: %s", exc.message, extra={"code": exc.code})
            raise
        except RequestLogError as exc:
            log.critical("worker cannot start: %s", exc)
            raise
        self.publisher.start()
        RELOAD.subscribe(self.on_hup)

    async def process_shutdown(self, scope: dict, event: dict) -> None:
        RELOAD.unsubscribe(self.on_hup)
        self.farm.close()
        self.publisher.close()
        if self.request_log is not None:
            self.request_log.close()

    def on_hup(self) -> None:
        """SIGHUP: reload on a worker thread; the event loop goes on serving."""
        asyncio.get_running_loop().run_in_executor(None, self.reload)

    def reload(self) -> None:
        try:
            self.farm.reload()
        except Exception:  # a signal has no caller to answer: log it whole, keep serving
            log.exception("reload failed; the current models go on serving")


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
        rankings=rankings,
        latency=result.latency,
        stats=stats,
        models=result.models,
        degraded=result.degraded,
        answered_by=result.answered_by,
        reason=result.reason,
        fallback=result.fallback,
        variant=result.variant,
    )


#: Degraded answers that count as errors for a variant: its model failed, was stopped,
#: or is shut off by its breaker.
MODEL_FAILURE_REASONS = ("stage_error", "stage_timeout", "breaker_open")
USER_KEY_HEADER, VARIANT_HEADER = "X-User-Key", "X-Variant"


def request_variant(farm: Farm, req: falcon.asgi.Request, user_key: str | None) -> str:
    """The A/B variant: by the ``X-User-Key`` header, the body's ``user_key``, or else
    the request id; recorded for the metrics and sent back as ``X-Variant``."""
    key = req.get_header(USER_KEY_HEADER) or user_key or req.context.request_id
    variant = farm.route(key)
    req.context.variant = variant
    return variant


def request_deadline(farm: Farm, req: falcon.asgi.Request, field_ms: int | None) -> Deadline:
    """The budget from the body or header (or the default), minus the time since nginx."""
    header_ms = parse_timeout(req.get_header(TIMEOUT_HEADER))
    return farm.deadline(field_ms, header_ms, req.context.waited_s)


class RankResource:
    def __init__(self, farm: Farm, codec: Codec) -> None:
        self.farm, self.codec = farm, codec

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        kind = self.codec.request_kind(req)
        body = await read_body(req, self.farm.config.max_body_bytes)
        request = self.codec.decode(body, kind, RankRequest)
        deadline = request_deadline(self.farm, req, request.timeout_ms)
        variant = request_variant(self.farm, req, request.user_key)
        result = await self.farm.call(
            self.farm.rank,
            request,
            kind,
            deadline,
            variant,
            cost_ms=self.farm.estimate_rank_ms(request, kind),
            body_bytes=len(body),
            deadline=deadline,
        )
        req.context.result = result
        answer = rank_response(result)
        self.codec.write(resp, answer, self.codec.response_kind(req, kind))


class PredictResource:
    def __init__(self, farm: Farm, codec: Codec) -> None:
        self.farm, self.codec = farm, codec

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        kind = self.codec.request_kind(req)
        body = await read_body(req, self.farm.config.max_body_bytes)
        request = self.codec.decode(body, kind, PredictRequest)
        deadline = request_deadline(self.farm, req, request.timeout_ms)
        variant = request_variant(self.farm, req, request.user_key)
        scores, model = await self.farm.serve_predict(
            request, kind, variant, body_bytes=len(body), deadline=deadline
        )
        req.context.model = model.key
        req.context.ctr = scores
        answer = PredictResponse(
            ctr=scores.tolist(), model=model.name, version=model.version, variant=variant
        )
        self.codec.write(resp, answer, self.codec.response_kind(req, kind))


class HelloResource:
    """``GET /hello``: a tiny JSON through the same nginx location, middleware and worker
    as ``/predict``, nothing else: the stack's own cost per request (issue 5's ratio)."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.answer = codec.json_encoder.encode(HelloResponse(hello="ctr-farm"))

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.data, resp.content_type = self.answer, JSON


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
        answer = ReadyResponse(
            ready=ready,
            pid=os.getpid(),
            models=models,
            breakers=self.farm.breaker_states(),
            draining=DRAIN.draining,
        )
        self.codec.write(resp, answer)
        if not ready:
            resp.status = falcon.HTTP_503


class ModelsResource:
    def __init__(self, farm: Farm, codec: Codec) -> None:
        self.farm, self.codec = farm, codec

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if not self.farm.ready:
            raise NotReady("models are not loaded yet")
        rejected, last_reload = self.farm.models_status()
        answer = ModelsResponse(
            models=self.farm.summaries(),
            generation=self.farm.generation,
            rejected=rejected,
            last_reload=last_reload,
            pid=os.getpid(),
            traffic=self.farm.traffic_status(),
        )
        self.codec.write(resp, answer)


class StatsResource:
    """The farm's summary (app/stats.py) from every worker's metrics."""

    def __init__(self, farm: Farm, codec: Codec, publisher: Publisher) -> None:
        self.farm, self.codec, self.publisher = farm, codec, publisher

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        self.publisher.publish()  # this worker's windows up to now; the others' <= 1 s old
        fields = self.farm.features.names if self.farm.features else ()
        samples = metrics.Samples(metrics.collect())
        self.codec.write(resp, stats.build(self.farm.config, samples, self.farm.drift, fields))


class MetricsResource:
    """Prometheus text format, merged across every worker of this gunicorn, plus the
    drift gauges computed from the merged windows."""

    def __init__(self, farm: Farm, publisher: Publisher) -> None:
        self.farm, self.publisher = farm, publisher

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        self.publisher.publish()
        families = metrics.collect()
        report = self.farm.drift.report(metrics.Samples(families))
        computed = [
            *DriftMonitor.families(report),
            metrics.front_rejected(self.farm.config.run_path),
        ]
        families = metrics.with_computed(families, computed)
        resp.data, resp.content_type = metrics.render(families), metrics.CONTENT_TYPE


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
        req.context.error_code = ex.code
        if isinstance(ex, Unavailable):
            # PERF: no log line per shed request: under overload that is a log storm that
            # costs the CPU the accepted requests need; sheds are counted in /metrics.
            resp.set_header("Retry-After", str(ex.retry_after_s))
        elif ex.status >= 500:
            log.warning(
                "request failed",
                extra={"code": ex.code, "error": ex.message, "request_id": _rid(req)},
            )
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
    goodput = Goodput(config)
    publisher = Publisher([goodput.publish, farm.drift.publish])
    path = config.request_log_path
    request_log = RequestLog(path, config.request_log_queue) if path else None
    export_zeros()  # the request-log counters are exported (as 0) with the log off too
    middleware: list[object] = [RequestContext(farm, goodput, request_log)]
    if manage_lifecycle:
        middleware.append(Lifecycle(farm, publisher, request_log))
    app = falcon.asgi.App(middleware=middleware, cors_enable=False)
    app.add_route("/rank", RankResource(farm, codec))
    app.add_route("/predict", PredictResource(farm, codec))
    app.add_route("/hello", HelloResource(codec))
    app.add_route("/health", HealthResource(codec))
    app.add_route("/ready", ReadyResource(farm, codec))
    app.add_route("/models", ModelsResource(farm, codec))
    app.add_route("/stats", StatsResource(farm, codec, publisher))
    app.add_route("/metrics", MetricsResource(farm, publisher))
    handlers = ErrorHandlers(codec)
    # Falcon picks the most specific handler; the catch-all must be registered first.
    app.add_error_handler(Exception, handlers.unexpected)
    app.add_error_handler(falcon.HTTPError, handlers.http_error)
    app.add_error_handler(FarmError, handlers.farm_error)
    register_admin(app, farm)
    register_status(app, config)  # /status: the live status page over /stats and /models
    register_openapi(app, farm)  # /openapi.json, /docs: generated from the routes above
    return app
