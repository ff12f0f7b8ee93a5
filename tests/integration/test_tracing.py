"""Tracing through the real stack (nginx + gunicorn + the real models).

``tracing = "stdout"``: the worker writes one JSON line per span to its stdout, i.e.
the stack's ``gunicorn.log``, parsed here. ``tracing = "otlp"``: the worker posts
OTLP/HTTP protobuf to a receiver on 127.0.0.1 in this test, which decodes it with the
OpenTelemetry protobuf classes. Either way: the request span carries the request id
the client got back, joins the trace of the ``traceparent`` it was sent, and has the
two stage spans as children, with their candidates in and out.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from app.sessions import read_card
from app.stack import Stack
from tests.integration.conftest import TIMEOUT, Candidates, start_stack

pytestmark = pytest.mark.integration

TRACE_ID, PARENT_ID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"

#: A span as both tests read it: ids as lowercase hex, attributes as plain values.
Span = dict[str, Any]


def send(stack: Stack) -> dict[str, httpx.Response]:
    """One traced /rank of 1000 candidates (our request id and traceparent), one /predict
    (nginx mints its id)."""
    config = stack.config
    candidates = Candidates(read_card(config.model_dirs()[config.predict_model]).fields)
    ids = candidates.ids(1000, seed=11, oov_rate=0.0, dup_rate=0.0)
    with httpx.Client(base_url=stack.url, timeout=TIMEOUT) as client:
        rank = client.post(
            "/rank",
            json={"candidates": candidates.form(ids, "columns"), "top_k": 10},
            headers={"X-Request-ID": "trace-me-1", "traceparent": TRACEPARENT},
        )
        predict = client.post("/predict", json={"candidates": candidates.form(ids[:5], "rows")})
    assert rank.status_code == 200 and predict.status_code == 200, (rank.text, predict.text)
    assert rank.headers["X-Request-ID"] == "trace-me-1"
    return {"/rank": rank, "/predict": predict}


def wait_for(read: Callable[[], list[Span]], request_ids: set[str], timeout_s: float) -> list[Span]:
    """All spans once the request span of each of ``request_ids`` is there (bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = read()
        seen = {s["attributes"].get("ctr_farm.request_id") for s in spans}
        if request_ids <= seen or time.monotonic() > deadline:
            return spans
        time.sleep(0.25)


def check_trace(spans: list[Span], answers: dict[str, httpx.Response], pids: list[int]) -> None:
    rank_rid = answers["/rank"].headers["X-Request-ID"]
    predict_rid = answers["/predict"].headers["X-Request-ID"]
    requests = {s["attributes"].get("ctr_farm.request_id"): s for s in spans if s["server"]}
    rank, predict = requests[rank_rid], requests[predict_rid]

    assert rank["name"] == "POST /rank"
    assert (rank["trace_id"], rank["parent_id"]) == (TRACE_ID, PARENT_ID)
    assert rank["attributes"] == {
        "http.request.method": "POST",
        "http.route": "/rank",
        "http.response.status_code": 200,
        "ctr_farm.request_id": "trace-me-1",
        "ctr_farm.candidates": 1000,
        "ctr_farm.degraded": False,
        "ctr_farm.answered_by": "stage2",
        "ctr_farm.models": ["deepfm/1", "autoint/1"],
    }
    stages = {s["name"]: s for s in spans if s["parent_id"] == rank["span_id"]}
    assert set(stages) == {"stage1", "stage2"}
    want = {"stage1": ("deepfm", 1000, 100), "stage2": ("autoint", 100, 10)}
    for name, (model, n_in, n_out) in want.items():
        attrs = stages[name]["attributes"]
        assert stages[name]["trace_id"] == TRACE_ID
        assert (attrs["ctr_farm.model.name"], attrs["ctr_farm.model.version"]) == (model, "1")
        assert (attrs["ctr_farm.candidates_in"], attrs["ctr_farm.candidates_out"]) == (n_in, n_out)

    assert predict["name"] == "POST /predict" and predict["parent_id"] is None
    assert predict["trace_id"] != TRACE_ID  # no traceparent: a trace of its own
    assert predict["attributes"]["ctr_farm.models"] == ["autoint/1"]
    # Each worker traces with its own provider, built after fork.
    assert {rank["pid"], predict["pid"]} <= set(pids)


# -- stdout ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stdout_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    yield from start_stack(request, prefix="farm-t-", settings={"tracing": "stdout"})


def stdout_spans(stack: Stack) -> list[Span]:
    """The span lines of the workers' stdout (the log also holds JSON log lines)."""
    spans = []
    for line in (stack.log_dir / "gunicorn.log").read_text().splitlines():
        if not line.startswith('{"name"'):
            continue
        raw = json.loads(line)
        spans.append(
            {
                "name": raw["name"],
                "trace_id": raw["context"]["trace_id"].removeprefix("0x"),
                "span_id": raw["context"]["span_id"].removeprefix("0x"),
                "parent_id": (raw["parent_id"] or "").removeprefix("0x") or None,
                "server": raw["kind"] == "SpanKind.SERVER",
                "attributes": raw["attributes"],
                "pid": raw["resource"]["attributes"]["process.pid"],
            }
        )
    return spans


def test_stdout_spans_in_the_worker_log(stdout_stack: Stack) -> None:
    answers = send(stdout_stack)
    rids = {r.headers["X-Request-ID"] for r in answers.values()}
    spans = wait_for(lambda: stdout_spans(stdout_stack), rids, timeout_s=10)
    check_trace(spans, answers, stdout_stack.worker_pids())


# -- OTLP/HTTP -------------------------------------------------------------------------------
class Receiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP traces endpoint on 127.0.0.1 that keeps what it is sent."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[ExportTraceServiceRequest] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"

    def spans(self) -> list[Span]:
        with self.lock:
            requests = list(self.requests)
        out = []
        for export in requests:
            for rs in export.resource_spans:
                resource = {kv.key: value_of(kv.value) for kv in rs.resource.attributes}
                for ss in rs.scope_spans:
                    out.extend(span_of(span, resource["process.pid"]) for span in ss.spans)
        return out


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        ok = self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
        if ok:
            export = ExportTraceServiceRequest()
            export.ParseFromString(body)
            with self.server.lock:
                self.server.requests.append(export)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200 if ok else 400)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:  # quiet
        pass


def value_of(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in value.array_value.values]
    return getattr(value, kind)


def span_of(span: Any, pid: int) -> Span:
    return {
        "name": span.name,
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_id": span.parent_span_id.hex() or None,
        "server": span.kind == span.SPAN_KIND_SERVER,
        "attributes": {kv.key: value_of(kv.value) for kv in span.attributes},
        "pid": pid,
    }


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def otlp_stack(request: pytest.FixtureRequest, receiver: Receiver) -> Iterator[Stack]:
    settings = {"tracing": "otlp", "workers": 1, "otlp_endpoint": receiver.url}
    yield from start_stack(request, prefix="farm-o-", settings=settings)


def test_otlp_spans_reach_a_receiver(otlp_stack: Stack, receiver: Receiver) -> None:
    answers = send(otlp_stack)
    rids = {r.headers["X-Request-ID"] for r in answers.values()}
    # The batch processor exports every 5 s (OTEL_BSP_SCHEDULE_DELAY's default).
    spans = wait_for(receiver.spans, rids, timeout_s=20)
    check_trace(spans, answers, otlp_stack.worker_pids())
