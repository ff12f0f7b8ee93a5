"""app.tracing through the in-process app: request and stage spans, their parents and
attributes, sampling, the stdout exporter, and no OpenTelemetry at all when off."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import falcon.testing
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from app.config import REPO_ROOT, Config
from app.service import Farm
from app.tracing import Tracer
from tests.conftest import candidate_objects, client_for

ROWS = [[i % 7, i % 24, i % 35, (i * 13) % 400] for i in range(30)]
ONE = candidate_objects(ROWS[:1])[0]
TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


class Traced:
    """A loaded farm whose spans land in memory, and an in-process client over it."""

    def __init__(self, config: Config, sample_ratio: float = 1.0) -> None:
        self.exporter = InMemorySpanExporter()
        tracer = Tracer(SimpleSpanProcessor(self.exporter), sample_ratio)
        self.farm = Farm(config, tracer=tracer)
        self.farm.load()
        self.client = client_for(self.farm)

    def rank(self, **headers: str) -> falcon.testing.Result:
        body = {"candidates": ROWS, "top_k": 3, "stage1_k": 10}
        return self.client.simulate_post("/rank", json=body, headers=headers)

    def spans(self) -> dict[str, ReadableSpan]:
        spans = self.exporter.get_finished_spans()
        by_name = {s.name: s for s in spans}
        assert len(by_name) == len(spans), [s.name for s in spans]
        return by_name


@pytest.fixture
def traced(make_config: Callable[..., Config]) -> Iterator[Callable[..., Traced]]:
    made: list[Traced] = []

    def make(sample_ratio: float = 1.0, **overrides: Any) -> Traced:
        made.append(Traced(make_config(**overrides), sample_ratio))
        return made[-1]

    yield make
    for t in made:
        t.farm.close()


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in (span.attributes or {}).items()}


# -- request and stage spans ---------------------------------------------------------------
@pytest.mark.parametrize("inference", ["inline", "executor"])
@pytest.mark.parametrize("given_id", [None, "my-req.42"])
def test_rank_request_span_has_two_stage_children(
    traced, caplog: pytest.LogCaptureFixture, inference: str, given_id: str | None
) -> None:
    """``executor``: the stages run on an inference thread, so their parent reaches them
    only through the context Farm.call hands over with the job."""
    t = traced(inference=inference)
    caplog.set_level(logging.ERROR, logger="opentelemetry")
    result = t.rank(**({"X-Request-ID": given_id} if given_id else {}))
    assert result.status_code == 200
    rid = result.headers["X-Request-ID"]
    assert rid == (given_id or rid) and len(rid) >= 8

    spans = t.spans()
    assert set(spans) == {"POST /rank", "stage1", "stage2"}
    request, s1, s2 = spans["POST /rank"], spans["stage1"], spans["stage2"]
    assert request.kind is SpanKind.SERVER and request.parent is None
    assert attrs(request) == {
        "http.request.method": "POST",
        "http.route": "/rank",
        "http.response.status_code": 200,
        "ctr_farm.request_id": rid,
        "ctr_farm.candidates": 30,
        "ctr_farm.degraded": False,
        "ctr_farm.answered_by": "stage2",
        "ctr_farm.models": ["deepfm/1", "autoint/1"],
    }
    for stage in (s1, s2):
        assert stage.parent is not None and stage.parent.span_id == request.context.span_id
        assert stage.context.trace_id == request.context.trace_id
        assert request.start_time <= stage.start_time <= stage.end_time <= request.end_time
    assert s1.end_time <= s2.start_time
    assert attrs(s1) == {
        "ctr_farm.stage": 1,
        "ctr_farm.model.name": "deepfm",
        "ctr_farm.model.version": "1",
        "ctr_farm.candidates_in": 30,
        "ctr_farm.candidates_out": 10,
    }
    assert attrs(s2) == {
        "ctr_farm.stage": 2,
        "ctr_farm.model.name": "autoint",
        "ctr_farm.model.version": "1",
        "ctr_farm.candidates_in": 10,
        "ctr_farm.candidates_out": 3,
    }
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]


def test_each_request_is_its_own_trace(traced) -> None:
    t = traced()
    assert t.rank().status_code == 200 and t.rank().status_code == 200
    spans = t.exporter.get_finished_spans()
    requests = [s for s in spans if s.name == "POST /rank"]
    assert len(requests) == 2 and len(spans) == 6
    assert requests[0].context.trace_id != requests[1].context.trace_id
    for s in spans:
        if s.name != "POST /rank":  # every stage under its own request, never a leftover
            (parent,) = [r for r in requests if r.context.trace_id == s.context.trace_id]
            assert s.parent.span_id == parent.context.span_id


@pytest.mark.parametrize("sampled", ["01", "00"])
def test_traceparent_joins_the_callers_trace(traced, sampled: str) -> None:
    t = traced(sample_ratio=0.0)  # our own sampler would record nothing
    result = t.rank(traceparent=f"00-{TRACE_ID}-{PARENT_ID}-{sampled}")
    assert result.status_code == 200
    spans = t.exporter.get_finished_spans()
    if sampled == "00":  # the caller did not sample: neither do we
        assert spans == ()
        return
    request = t.spans()["POST /rank"]
    assert f"{request.context.trace_id:032x}" == TRACE_ID
    assert f"{request.parent.span_id:016x}" == PARENT_ID and request.parent.is_remote
    assert {f"{s.context.trace_id:032x}" for s in spans} == {TRACE_ID}


def test_sample_ratio_zero_records_nothing_and_serves(traced) -> None:
    t = traced(sample_ratio=0.0)
    assert t.rank().status_code == 200
    assert t.exporter.get_finished_spans() == ()


def test_skipped_stage_and_degraded_answer(traced) -> None:
    t = traced(breaker_failures=1)
    t.farm.breakers["autoint/1"].failure()  # open: stage 2 is skipped
    result = t.rank()
    assert result.status_code == 200 and result.json["reason"] == "breaker_open"
    spans = t.spans()
    request, s2 = spans["POST /rank"], spans["stage2"]
    assert attrs(request)["ctr_farm.degraded"] is True
    assert attrs(request)["ctr_farm.reason"] == "breaker_open"
    assert attrs(request)["ctr_farm.answered_by"] == "stage1"
    assert attrs(s2)["ctr_farm.skipped"] == "breaker_open"
    assert "ctr_farm.candidates_out" not in attrs(s2)
    assert s2.status.status_code is StatusCode.UNSET  # skipped, not failed

    # /predict on the open breaker's model: a 503 whose span is an error with the code.
    result = t.client.simulate_post("/predict", json={"candidate": ONE})
    assert result.status_code == 503
    predict = t.spans()["POST /predict"]
    assert attrs(predict)["error.type"] == result.json["error"]["code"] == "model_unavailable"
    assert attrs(predict)["http.response.status_code"] == 503
    assert predict.status.status_code is StatusCode.ERROR


def test_predict_and_client_errors(traced) -> None:
    t = traced()
    ok = t.client.simulate_post("/predict", json={"candidates": ROWS[:2]})
    bad = t.client.simulate_post("/predict", json={"candidate": ONE, "model": "nope"})
    assert (ok.status_code, bad.status_code) == (200, 400)
    spans = t.exporter.get_finished_spans()
    assert [s.name for s in spans] == ["POST /predict", "POST /predict"]
    assert attrs(spans[0])["ctr_farm.models"] == ["autoint/1"]
    assert attrs(spans[0])["ctr_farm.request_id"] == ok.headers["X-Request-ID"]
    assert attrs(spans[1])["error.type"] == "invalid_request"
    assert attrs(spans[1])["ctr_farm.request_id"] == bad.headers["X-Request-ID"]
    assert spans[1].status.status_code is StatusCode.UNSET  # a client error is not ours


def test_unrouted_request_is_named_by_its_route(traced) -> None:
    t = traced()
    assert t.client.simulate_get("/nowhere").status_code == 404
    (span,) = t.exporter.get_finished_spans()
    assert span.name == "GET unmatched" and attrs(span)["http.response.status_code"] == 404


# -- stdout exporter (from the config) -----------------------------------------------------
def test_stdout_writes_one_json_line_per_span(
    make_config: Callable[..., Config], make_farm, capsys: pytest.CaptureFixture[str]
) -> None:
    farm = make_farm(make_config(tracing="stdout"))
    client = client_for(farm)
    result = client.simulate_post("/rank", json={"candidates": ROWS, "top_k": 3, "stage1_k": 10})
    assert result.status_code == 200
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_name = {span["name"]: span for span in lines}
    assert set(by_name) == {"POST /rank", "stage1", "stage2"} and len(lines) == 3
    request = by_name["POST /rank"]
    assert request["attributes"]["ctr_farm.request_id"] == result.headers["X-Request-ID"]
    assert request["resource"]["attributes"]["service.name"] == "ctr-farm"
    for stage in ("stage1", "stage2"):
        assert by_name[stage]["parent_id"] == request["context"]["span_id"]


# -- off: no OpenTelemetry at all ----------------------------------------------------------
OFF_PROBE = """
import json, sys
from pathlib import Path
from tests.conftest import candidate_objects, client_for, config_for
from app.service import Farm

farm = Farm(config_for(Path(sys.argv[1]), inference=sys.argv[2]))
farm.load()
client = client_for(farm)
rows = [[1, 2, 3, 4]] * 20
assert client.simulate_post("/rank", json={"candidates": rows, "top_k": 2}).status_code == 200
one = candidate_objects(rows[:1])[0]
assert client.simulate_post("/predict", json={"candidate": one}).status_code == 200
assert farm.tracer is None and farm.pipeline.tracer is None
farm.close()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")))
"""


@pytest.mark.parametrize("inference", ["inline", "executor"])
def test_off_never_imports_opentelemetry(fake_models: Path, inference: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", OFF_PROBE, str(fake_models), inference],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
