"""Optional OpenTelemetry tracing: a span per request, a child span per cascade stage.

Off by default (``Config.tracing = "off"``): then nothing imports OpenTelemetry (the
``tracing`` extra need not be installed) and the request path pays an ``is None`` check
per request and per stage. On, each worker builds its own ``TracerProvider`` in the
ASGI lifespan startup (``Farm.load``), i.e. after fork, never in the gunicorn master:
the batch exporter's thread would not survive the fork.

- ``stdout``: every span, as it ends, is one JSON line (``ReadableSpan.to_json``) on the
  worker's standard output (the terminal under ``scripts/serve``).
- ``otlp``: spans are batched and posted as OTLP/HTTP protobuf to ``otlp_endpoint`` by a
  background thread (the SDK's ``OTEL_BSP_*`` variables tune the batching).

The spans (attributes under ``ctr_farm.`` are ours, the others OpenTelemetry's HTTP
conventions)::

    POST /rank   kind SERVER: http.request.method, http.route, http.response.status_code,
                 ctr_farm.request_id (= X-Request-ID), ctr_farm.candidates,
                 ctr_farm.degraded, ctr_farm.answered_by, ctr_farm.reason,
                 ctr_farm.models, error.type (the error code), status ERROR on a 5xx
      stage1     ctr_farm.stage, ctr_farm.model.name, ctr_farm.model.version,
                 ctr_farm.candidates_in, ctr_farm.candidates_out or ctr_farm.skipped
      stage2     (the same)

A request carrying a W3C ``traceparent`` header joins the caller's trace. The request
span is the current span (a context variable) from the request middleware until the
answer; ``Farm.call`` hands a job to an inference thread inside a copy of the request's
context, so a stage span started there finds its parent.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # OpenTelemetry is imported only when tracing is on
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.trace import Span

    from app.config import Config
    from app.pipeline import RankResult

SERVICE_NAME = "ctr-farm"
SCOPE = "ctr_farm"


def from_config(config: Config) -> Tracer | None:
    """The worker's tracer for ``config.tracing``, or None when it is off."""
    if config.tracing == "off":
        return None
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    processor: SpanProcessor
    if config.tracing == "stdout":
        # Written as each span ends, so a line is there as soon as its request answered.
        processor = SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stdout, formatter=json_line))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint))
    return Tracer(processor, config.trace_sample_ratio)


def json_line(span: Any) -> str:
    """A span as one JSON line (the SDK's default is indented over many lines)."""
    return span.to_json(indent=None) + "\n"


class Tracer:
    """Request and stage spans over one ``TracerProvider`` (one per worker process)."""

    def __init__(self, processor: SpanProcessor, sample_ratio: float = 1.0) -> None:
        from opentelemetry import context, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create({"service.name": SERVICE_NAME, "process.pid": os.getpid()})
        self.provider = TracerProvider(
            resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio))
        )
        self.provider.add_span_processor(processor)
        self._tracer = self.provider.get_tracer(SCOPE)
        self._propagator = TraceContextTextMapPropagator()
        self._attach, self._in_context = context.attach, trace.set_span_in_context
        self._server = trace.SpanKind.SERVER
        #: For the spans this tracer starts: ``opentelemetry.context.detach``, status ERROR.
        self.detach, self.error = context.detach, trace.StatusCode.ERROR

    def start_request(
        self,
        method: str,
        request_id: str,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> RequestSpan:
        """Start the request's span and make it the current span of this context."""
        parent = None
        if traceparent:
            carrier = {"traceparent": traceparent, "tracestate": tracestate or ""}
            parent = self._propagator.extract(carrier)
        span = self._tracer.start_span(
            method,  # renamed "METHOD /route" once routed
            context=parent,
            kind=self._server,
            attributes={"http.request.method": method, "ctr_farm.request_id": request_id},
        )
        token = self._attach(self._in_context(span, parent))
        return RequestSpan(self, span, token, method)

    def start_stage(self, slot: int, model: str, candidates_in: int) -> StageSpan:
        """A child of the current (request) span for cascade stage ``slot``."""
        name, _, version = model.partition("/")
        span = self._tracer.start_span(
            f"stage{slot}",
            attributes={
                "ctr_farm.stage": slot,
                "ctr_farm.model.name": name,
                "ctr_farm.model.version": version,
                "ctr_farm.candidates_in": candidates_in,
            },
        )
        return StageSpan(self, span)

    def shutdown(self) -> None:
        """Export what is buffered, stop the exporter (the worker is closing)."""
        self.provider.shutdown()


class RequestSpan:
    __slots__ = ("_method", "_span", "_token", "_tracer")

    def __init__(self, tracer: Tracer, span: Span, token: object, method: str) -> None:
        self._tracer, self._span, self._token, self._method = tracer, span, token, method

    @property
    def span(self) -> Span:
        return self._span

    def end(
        self,
        route: str,
        status: int,
        error_code: str | None = None,
        result: RankResult | None = None,
        model: str = "",
    ) -> None:
        """Record the answer, end the span and restore the context it replaced."""
        span = self._span
        if span.is_recording():
            span.update_name(f"{self._method} {route}")
            attrs: dict[str, Any] = {"http.route": route, "http.response.status_code": status}
            if result is not None:
                attrs["ctr_farm.candidates"] = result.n_input
                attrs["ctr_farm.degraded"] = result.degraded
                attrs["ctr_farm.answered_by"] = result.answered_by
                attrs["ctr_farm.models"] = result.models
                if result.reason is not None:
                    attrs["ctr_farm.reason"] = result.reason
            elif model:
                attrs["ctr_farm.models"] = [model]
            if error_code is not None:
                attrs["error.type"] = error_code
            span.set_attributes(attrs)
            if status >= 500:
                span.set_status(self._tracer.error, error_code or str(status))
        span.end()
        self._tracer.detach(self._token)


class StageSpan:
    __slots__ = ("_span", "_tracer")

    def __init__(self, tracer: Tracer, span: Span) -> None:
        self._tracer, self._span = tracer, span

    def end(self, candidates_out: int) -> None:
        self._span.set_attribute("ctr_farm.candidates_out", candidates_out)
        self._span.end()

    def skip(self, reason: str) -> None:
        """The stage did not answer (``deadline``, ``breaker_open``, ``stage_error``, ...)."""
        self._span.set_attribute("ctr_farm.skipped", reason)
        if reason in ("stage_error", "stage_timeout"):
            self._span.set_status(self._tracer.error, reason)
        self._span.end()
