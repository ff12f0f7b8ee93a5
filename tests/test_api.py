"""app.api over falcon's in-process TestClient: wire shapes, headers, every error path."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import falcon.testing
import msgspec
import numpy as np
import pytest

from app.api import create_app, read_body
from app.config import Config
from app.errors import MalformedBody, PayloadTooLarge
from app.schema import RankRequest, RankResponse
from app.service import Farm
from tests.conftest import FIELD_NAMES, as_form, client_for, config_for
from tests.fake_models import write_model

JSON, MSGPACK = "application/json", "application/msgpack"
MINTED = re.compile(r"^[0-9a-f]{16}$")
ROWS = [[1, 2, 3, 4], [6, 23, 34, 399], [0, 0, 0, 0], [3, 12, 7, 150], [2, 5, 20, 30]]


def post(
    client: falcon.testing.TestClient,
    path: str,
    value: Any,
    ctype: str = JSON,
    accept: str | None = None,
    **headers: str,
) -> falcon.testing.Result:
    body = msgspec.msgpack.encode(value) if "msgpack" in ctype else msgspec.json.encode(value)
    hdrs = {"Content-Type": ctype, **headers}
    if accept:
        hdrs["Accept"] = accept
    return client.simulate_post(path, body=body, headers=hdrs)


def decoded(result: falcon.testing.Result) -> Any:
    ctype = result.headers["content-type"]
    if ctype == MSGPACK:
        return msgspec.msgpack.decode(result.content)
    assert ctype == JSON
    return msgspec.json.decode(result.content)


def error_of(result: falcon.testing.Result, status: int, code: str) -> dict[str, Any]:
    """Assert the error shape and return the ``error`` object."""
    assert result.status_code == status
    assert result.headers["content-type"] == JSON
    body = msgspec.json.decode(result.content)
    assert set(body) == {"error", "request_id"}
    assert set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    assert body["request_id"] == result.headers["x-request-id"]
    return body["error"]


@pytest.fixture
def make_client(make_config, make_farm) -> Callable[..., falcon.testing.TestClient]:
    def make(**overrides: Any) -> falcon.testing.TestClient:
        return client_for(make_farm(make_config(**overrides)))

    return make


# -- /rank ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ctype", [JSON, MSGPACK])
@pytest.mark.parametrize("form", ["objects", "rows", "columns"])
def test_rank_response_shape(client, farm: Farm, ctype: str, form: str) -> None:
    value = {"candidates": as_form(ROWS, form), "top_k": 3, "stage1_k": 4}
    result = post(client, "/rank", value, ctype)
    assert result.status_code == 200
    assert result.headers["content-type"] == ctype  # mirrored
    body = decoded(result)
    assert set(body) == {f.name for f in msgspec.structs.fields(RankResponse)}
    assert not body["degraded"] and body["answered_by"] == "stage2" and body["reason"] is None
    assert [set(r) for r in body["rankings"]] == [{"index", "ctr", "rank"}] * 3
    assert [r["rank"] for r in body["rankings"]] == [1, 2, 3]
    ctrs = [r["ctr"] for r in body["rankings"]]
    assert ctrs == sorted(ctrs, reverse=True)
    assert all(0.0 < c < 1.0 for c in ctrs)
    assert set(body["latency"]) == {"stage1_ms", "stage2_ms", "total_ms"}
    assert all(v >= 0 for v in body["latency"].values())
    assert body["stats"] == {"input": 5, "after_stage1": 4, "output": 3}
    assert body["models"] == ["deepfm/1", "autoint/1"]
    # Same answer as the farm gives directly.
    direct = farm.rank(
        RankRequest(candidates=msgspec.Raw(msgspec.json.encode(ROWS)), top_k=3, stage1_k=4), "json"
    )
    assert [r["index"] for r in body["rankings"]] == direct.indices.tolist()
    np.testing.assert_array_equal(np.array(ctrs, dtype=np.float32), direct.scores)


@pytest.mark.parametrize(
    ("ctype", "accept", "expected"),
    [
        (JSON, None, JSON),
        (MSGPACK, None, MSGPACK),
        ("application/x-msgpack", None, MSGPACK),
        ("application/vnd.msgpack", None, MSGPACK),
        ("application/json; charset=utf-8", None, JSON),
        (JSON, MSGPACK, MSGPACK),
        (MSGPACK, JSON, JSON),
        (JSON, "*/*", JSON),
        (MSGPACK, "*/*", MSGPACK),
    ],
)
def test_response_kind_follows_accept_then_request(client, ctype, accept, expected) -> None:
    result = post(client, "/rank", {"candidates": ROWS}, ctype, accept)
    assert result.status_code == 200
    assert result.headers["content-type"] == expected
    assert len(decoded(result)["rankings"]) == 5


def test_no_content_type_means_json(client) -> None:
    result = client.simulate_post("/rank", body=msgspec.json.encode({"candidates": ROWS}))
    assert result.status_code == 200
    assert result.headers["content-type"] == JSON


def test_rank_defaults_top_k(make_client) -> None:
    client = make_client(default_top_k=2)
    body = decoded(post(client, "/rank", {"candidates": ROWS}))
    assert body["stats"] == {"input": 5, "after_stage1": 5, "output": 2}


def test_rank_single_stage(client) -> None:
    body = decoded(post(client, "/rank", {"candidates": ROWS, "multi_stage": False}))
    assert body["models"] == ["autoint/1"]
    assert body["latency"]["stage1_ms"] == 0.0
    assert set(body["latency"]) == {"stage1_ms", "stage2_ms", "total_ms"}


# -- /predict ------------------------------------------------------------------------------
@pytest.mark.parametrize("ctype", [JSON, MSGPACK])
def test_predict_response_shape(client, ctype: str) -> None:
    result = post(client, "/predict", {"candidates": ROWS[:3], "model": "deepfm"}, ctype)
    assert result.status_code == 200
    body = decoded(result)
    assert set(body) == {"ctr", "model", "version", "variant"}
    assert (body["model"], body["version"], body["variant"]) == ("deepfm", "1", "stable")
    assert result.headers["X-Variant"] == "stable"
    assert len(body["ctr"]) == 3
    one = decoded(post(client, "/predict", {"candidate": as_form(ROWS[1:2], "objects")[0]}, ctype))
    assert one["model"] == "autoint"
    assert len(one["ctr"]) == 1


@pytest.mark.parametrize(
    ("value", "field"),
    [
        ({"candidates": ROWS, "model": "gbdt"}, "model"),
        ({"candidates": [ROWS[0]] * 65}, "candidates"),
        ({"candidate": [1, 2, 3, 4]}, "candidate"),
        ({}, None),
    ],
)
def test_predict_invalid(client, value: dict[str, Any], field: str | None) -> None:
    assert error_of(post(client, "/predict", value), 400, "invalid_request")["field"] == field


# -- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        (b"", "malformed_body", None),
        (b"{", "malformed_body", None),
        (b"not json", "malformed_body", None),
        (b'{"candidates": [[1,2,3,4]]} trailing', "malformed_body", None),
        (b"[]", "invalid_request", None),
        (b"{}", "invalid_request", None),
        (b'{"candidates": [[1,2,3,4]], "top_k": 0}', "invalid_request", "top_k"),
        (b'{"candidates": [[1,2,3,4]], "top_k": "3"}', "invalid_request", "top_k"),
        (b'{"candidates": [[1,2,3,4]], "stage1_k": -1}', "invalid_request", "stage1_k"),
        (b'{"candidates": [[1,2,3,4]], "multi_stage": 1}', "invalid_request", "multi_stage"),
        (b'{"candidates": [[1,2,3,4]], "top_k": 11, "stage1_k": 10}', "invalid_request", "top_k"),
        (b'{"candidates": [[1,2,3,4]], "stage1_k": 5001}', "invalid_request", "stage1_k"),
        (b'{"candidates": [[1,2,3,4]], "extra": 1}', "invalid_request", None),
        (b'{"candidates": []}', "invalid_request", "candidates"),
        (b'{"candidates": null}', "invalid_request", "candidates"),
        (b'{"candidates": [[1,2,3,4],[1,2,3]]}', "invalid_request", "candidates[1]"),
        (
            b'{"candidates": [{"weekday":1,"hour":1,"region":1,"city":1},'
            b'{"weekday":1,"hour":1,"region":1,"city":1},{"weekday":1,"hour":1,"region":1,"city":1},'
            b'{"weekday":1,"hour":1.5,"region":1,"city":1}]}',
            "invalid_request",
            "candidates[3].hour",
        ),
        (
            b'{"candidates": {"weekday":[1],"hour":[1,2],"region":[1],"city":[1]}}',
            "invalid_request",
            "candidates.hour",
        ),
    ],
)
def test_rank_400s(client, body: bytes, code: str, field: str | None) -> None:
    result = client.simulate_post("/rank", body=body, headers={"Content-Type": JSON})
    assert error_of(result, 400, code)["field"] == field


@pytest.mark.parametrize(
    "body",
    [b"\x81\xaacandidates", b"\xc1", b"\x81\xaacandidates\x91\x94\x01\x02\x03\x04\x00"],
    ids=["truncated", "never-used-byte", "trailing-byte"],
)
def test_msgpack_malformed_body(client, body: bytes) -> None:
    result = client.simulate_post("/rank", body=body, headers={"Content-Type": MSGPACK})
    error_of(result, 400, "malformed_body")


def test_errors_are_json_even_for_msgpack_requests(client) -> None:
    result = post(client, "/rank", {"candidates": [], "top_k": 1}, MSGPACK, MSGPACK)
    assert error_of(result, 400, "invalid_request")["field"] == "candidates"


@pytest.mark.parametrize("ctype", ["text/plain", "application/xml", "multipart/form-data"])
@pytest.mark.parametrize("path", ["/rank", "/predict"])
def test_unsupported_media_type(client, path: str, ctype: str) -> None:
    result = client.simulate_post(path, body=b"{}", headers={"Content-Type": ctype})
    assert error_of(result, 415, "unsupported_media_type")["field"] == "Content-Type"


@pytest.mark.parametrize(("method", "path"), [("GET", "/nope"), ("POST", "/"), ("GET", "/rank/x")])
def test_404(client, method: str, path: str) -> None:
    error_of(client.simulate_request(method, path), 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/rank", "POST"),
        ("PUT", "/predict", "POST"),
        ("POST", "/health", "GET"),
        ("DELETE", "/models", "GET"),
        ("POST", "/ready", "GET"),
    ],
)
def test_405(client, method: str, path: str, allow: str) -> None:
    result = client.simulate_request(method, path)
    error_of(result, 405, "method_not_allowed")
    assert allow in result.headers["allow"]


@pytest.mark.parametrize("path", ["/rank", "/predict"])
def test_body_over_the_limit_is_413(make_client, path: str) -> None:
    client = make_client(max_body_bytes=300)
    result = client.simulate_post(path, body=b" " * 301, headers={"Content-Type": JSON})
    error_of(result, 413, "payload_too_large")


def test_body_at_the_limit_is_accepted(make_client) -> None:
    client = make_client(max_body_bytes=300)
    body = msgspec.json.encode({"candidates": ROWS})
    body += b" " * (300 - len(body))
    result = client.simulate_post("/rank", body=body, headers={"Content-Type": JSON})
    assert result.status_code == 200
    assert len(decoded(result)["rankings"]) == 5


class FakeStream:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, size: int = -1) -> bytes:
        return self.data[:size] if size >= 0 else self.data


class FakeRequest:
    """A request with no Content-Length (chunked): read_body must still bound it."""

    def __init__(self, data: bytes, length: int | None = None) -> None:
        self.content_length = length
        self.bounded_stream = FakeStream(data)


@pytest.mark.parametrize(
    ("data", "length", "outcome"),
    [
        (b"x" * 10, None, b"x" * 10),
        (b"x" * 11, None, PayloadTooLarge),
        (b"x" * 5, 11, PayloadTooLarge),  # the declared length alone is enough
        (b"", None, MalformedBody),
        (b"", 0, MalformedBody),
    ],
)
def test_read_body(data: bytes, length: int | None, outcome: Any) -> None:
    run = asyncio.run
    if isinstance(outcome, bytes):
        assert run(read_body(FakeRequest(data, length), 10)) == outcome
    else:
        with pytest.raises(outcome):
            run(read_body(FakeRequest(data, length), 10))


# -- X-Request-ID and content type on every response ---------------------------------------
EVERY_RESPONSE = [
    ("POST", "/rank", msgspec.json.encode({"candidates": ROWS}), 200),
    ("POST", "/predict", msgspec.json.encode({"candidates": ROWS}), 200),
    ("GET", "/health", None, 200),
    ("GET", "/ready", None, 200),
    ("GET", "/models", None, 200),
    ("GET", "/stats", None, 200),
    ("POST", "/rank", b"{", 400),
    ("POST", "/rank", b'{"candidates": []}', 400),
    ("GET", "/missing", None, 404),
    ("GET", "/rank", None, 405),
    ("POST", "/rank", b" " * 9000, 413),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    EVERY_RESPONSE,
    ids=[f"{m}-{p}-{s}" for m, p, _, s in EVERY_RESPONSE],
)
@pytest.mark.parametrize(
    ("sent", "echoed"),
    [
        ("abc-123", True),
        ("A.b_c:d-9", True),
        ("x" * 128, True),
        (None, False),
        ("x" * 129, False),
        ("y" * 200, False),
        ("has space", False),
        ("a/b", False),
        ("<script>", False),
        ("", False),
    ],
)
def test_request_id_and_content_type_on_every_response(
    make_client, method: str, path: str, body: bytes | None, status: int, sent, echoed: bool
) -> None:
    client = make_client(max_body_bytes=8000)
    headers = {"Content-Type": JSON}
    if sent is not None:
        headers["X-Request-ID"] = sent
    result = client.simulate_request(method, path, body=body, headers=headers)
    assert result.status_code == status
    assert result.headers["content-type"] == JSON
    rid = result.headers["x-request-id"]
    assert rid == sent if echoed else MINTED.match(rid)
    if status >= 400:
        assert msgspec.json.decode(result.content)["request_id"] == rid


def test_minted_request_ids_differ(client) -> None:
    ids = {client.simulate_get("/health").headers["x-request-id"] for _ in range(20)}
    assert len(ids) == 20


# -- health, readiness, models, stats ------------------------------------------------------
def test_health(client) -> None:
    import os

    body = decoded(client.simulate_get("/health"))
    assert body == {"status": "ok", "pid": os.getpid()}


def test_ready_when_loaded(client) -> None:
    result = client.simulate_get("/ready")
    assert result.status_code == 200
    body = decoded(result)
    assert body["ready"] is True
    assert body["models"] == ["deepfm/1", "autoint/1"]


@pytest.fixture
def unloaded_client(config: Config) -> falcon.testing.TestClient:
    return client_for(Farm(config))


def test_ready_503_before_load(unloaded_client) -> None:
    result = unloaded_client.simulate_get("/ready")
    assert result.status_code == 503
    assert decoded(result)["ready"] is False
    assert decoded(result)["models"] == []


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/models", None),
        ("POST", "/rank", msgspec.json.encode({"candidates": ROWS})),
        ("POST", "/predict", msgspec.json.encode({"candidates": ROWS})),
    ],
)
def test_not_ready_is_503_with_retry_after(unloaded_client, method, path, body) -> None:
    result = unloaded_client.simulate_request(method, path, body=body)
    error_of(result, 503, "not_ready")
    assert result.headers["retry-after"] == "1"


def test_health_and_stats_answer_before_load(unloaded_client) -> None:
    assert unloaded_client.simulate_get("/health").status_code == 200
    stats = unloaded_client.simulate_get("/stats")
    assert stats.status_code == 200
    assert decoded(stats)["oov_ids"] == {}


@pytest.mark.parametrize("inference", ["executor", "inline"])
def test_after_close_everything_is_503(make_config, make_farm, inference: str) -> None:
    farm = make_farm(make_config(inference=inference))
    client = client_for(farm)
    assert client.simulate_get("/ready").status_code == 200
    farm.close()  # draining
    assert client.simulate_get("/ready").status_code == 503
    for path in ("/rank", "/predict"):
        error_of(post(client, path, {"candidates": ROWS}), 503, "not_ready")


def test_models(client, farm: Farm) -> None:
    body = decoded(client.simulate_get("/models"))
    models = {m["name"]: m for m in body["models"]}
    assert set(models) == {"deepfm", "autoint"}
    assert models["deepfm"]["stages"] == [1]
    assert models["autoint"]["stages"] == [2]
    assert models["autoint"]["fields"] == list(FIELD_NAMES)
    assert models["autoint"]["sha256"] == farm.models["autoint"].card.sha256
    assert set(models["deepfm"]["metrics"]) == {"valid_auc", "test_auc", "test_logloss"}
    assert models["deepfm"]["pool_size"] == 1


def test_stats_oov_counts_grow(client) -> None:
    """Farm-wide counts (the metrics of every worker; here, of this test process)."""

    def oov() -> dict[str, int]:
        return decoded(client.simulate_get("/stats"))["oov_ids"]

    before = oov()
    assert set(before) == set(FIELD_NAMES)
    cands = [[-1, 2, 3, 4], [7, 24, 3, 4], [1, 2, 3, 2**62]]
    assert post(client, "/rank", {"candidates": cands}).status_code == 200
    after = oov()
    assert {f: after[f] - before[f] for f in FIELD_NAMES} == {
        "weekday": 2,
        "hour": 1,
        "region": 0,
        "city": 1,
    }
    candidate = {"weekday": 9, "hour": 1, "region": 1, "city": 1}
    assert post(client, "/predict", {"candidate": candidate}).status_code == 200
    assert oov()["weekday"] - before["weekday"] == 3


# -- 500s ----------------------------------------------------------------------------------
@pytest.fixture
def nan_client(tmp_path: Path, make_farm) -> falcon.testing.TestClient:
    write_model(tmp_path, "deepfm", kind="nan")
    write_model(tmp_path, "autoint", seed=2)
    return client_for(make_farm(config_for(tmp_path)))


@pytest.mark.parametrize(
    ("path", "value"),
    [("/rank", {"candidates": ROWS}), ("/predict", {"candidates": ROWS, "model": "deepfm"})],
)
def test_nan_model_is_a_500_model_error(nan_client, tmp_path: Path, path: str, value) -> None:
    result = post(nan_client, path, value)
    error = error_of(result, 500, "model_error")
    assert "deepfm/1" in error["message"]
    assert str(tmp_path) not in result.text
    assert "Traceback" not in result.text
    assert "model.onnx" not in result.text
    # The other model still serves.
    assert post(nan_client, "/predict", {"candidates": ROWS}).status_code == 200


class ExplodingFarm(Farm):
    def rank(self, request, kind, deadline=None):
        raise RuntimeError("secret detail at /etc/ctr-farm/internal.py line 3")


def test_unexpected_exception_is_a_generic_500(config: Config, make_farm) -> None:
    farm = ExplodingFarm(config)
    farm.load()
    try:
        client = client_for(farm)
        result = post(client, "/rank", {"candidates": ROWS}, **{"X-Request-ID": "boom-1"})
        error = error_of(result, 500, "internal_error")
        assert error == {
            "code": "internal_error",
            "message": "internal server error",
            "field": None,
        }
        assert "secret" not in result.text
        assert "RuntimeError" not in result.text
        assert result.headers["x-request-id"] == "boom-1"
        # The app keeps serving.
        assert client.simulate_get("/health").status_code == 200
    finally:
        farm.close()


# -- /metrics ------------------------------------------------------------------------------
def sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_requests_errors_and_sheds(make_client) -> None:
    client = make_client()
    before = client.simulate_get("/metrics").text
    assert post(client, "/rank", {"candidates": ROWS, "top_k": 2}).status_code == 200
    assert post(client, "/rank", {"candidates": []}).status_code == 400
    after = client.simulate_get("/metrics")
    assert after.status_code == 200 and after.headers["content-type"].startswith("text/plain")
    ok = {"endpoint": "/rank", "status": "200", "model": "autoint/1"}
    bad = {"endpoint": "/rank", "status": "400"}
    name = "ctr_farm_requests_total"
    assert sample(after.text, name, **ok) == sample(before, name, **ok) + 1
    assert sample(after.text, name, **bad) == sample(before, name, **bad) + 1
    stage = "ctr_farm_stage_duration_seconds_count"
    assert sample(after.text, stage, stage="stage1") >= sample(before, stage, stage="stage1") + 1
    assert "ctr_farm_breaker_state" in after.text and "ctr_farm_queue_waiting" in after.text


# -- the request log, through the ASGI lifespan ------------------------------------------------
def test_request_log_rows_through_the_lifespan(tmp_path: Path, fake_models: Path) -> None:
    """The lifespan starts the log's writer thread and, at shutdown, flushes it: one row
    per /rank and /predict request, none for other endpoints. The SLA clock starts at
    nginx's X-Request-Start stamp, not when the app saw the request."""
    config = config_for(fake_models, run_dir=str(tmp_path), request_log="requests.db")
    app = create_app(config)  # manage_lifecycle: the lifespan loads the farm
    late = f"t={time.time() - 0.2:.3f}"  # nginx received it 200 ms ago

    async def drive() -> list[int]:
        async with falcon.testing.ASGIConductor(app) as conductor:
            statuses = []
            for rid, path, value, extra in [
                ("log-1", "/rank", {"candidates": ROWS, "top_k": 2}, {}),
                ("log-2", "/rank", {"candidates": []}, {}),
                ("log-3", "/predict", {"candidates": ROWS[:2]}, {}),
                ("log-4", "/predict", {"candidates": ROWS[:1]}, {"X-Request-Start": late}),
            ]:
                headers = {"Content-Type": JSON, "X-Request-ID": rid, **extra}
                body = msgspec.json.encode(value)
                result = await conductor.simulate_post(path, body=body, headers=headers)
                statuses.append(result.status_code)
            assert (await conductor.simulate_get("/health")).status_code == 200
            return statuses

    assert asyncio.run(drive()) == [200, 400, 200, 200]
    with sqlite3.connect(tmp_path / "requests.db") as conn:
        conn.row_factory = sqlite3.Row
        rows = {r["request_id"]: dict(r) for r in conn.execute("SELECT * FROM requests")}
    assert set(rows) == {"log-1", "log-2", "log-3", "log-4"}
    ranked = rows["log-1"]
    assert (ranked["endpoint"], ranked["status"], ranked["n_candidates"]) == ("/rank", 200, 5)
    assert (ranked["models"], ranked["degraded"], ranked["answered_by"]) == (
        "deepfm/1,autoint/1",
        0,
        "stage2",
    )
    assert ranked["outcome"] == "within" and ranked["pid"] == os.getpid()
    assert set(msgspec.json.decode(ranked["stage_ms"])) == {"stage1_ms", "stage2_ms", "total_ms"}
    bad = rows["log-2"]
    assert (bad["status"], bad["outcome"], bad["error_code"]) == (400, "invalid", "invalid_request")
    assert bad["n_candidates"] is None and bad["stage_ms"] is None
    predicted = rows["log-3"]
    assert (predicted["n_candidates"], predicted["models"]) == (2, "autoint/1")
    assert predicted["outcome"] == "within" and predicted["queue_ms"] == 0.0
    late_row = rows["log-4"]
    assert late_row["queue_ms"] >= 150 and late_row["outcome"] == "over"


# -- /hello --------------------------------------------------------------------------------
def test_hello_is_a_tiny_json_through_the_middleware(client) -> None:
    result = client.simulate_get("/hello", headers={"X-Request-ID": "hello-1"})
    assert result.status_code == 200
    assert result.headers["content-type"] == JSON
    assert msgspec.json.decode(result.content) == {"hello": "ctr-farm"}
    assert result.headers["x-request-id"] == "hello-1"  # the request middleware ran
    error_of(client.simulate_post("/hello", body=b"{}"), 405, "method_not_allowed")
