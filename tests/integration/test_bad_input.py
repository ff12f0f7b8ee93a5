"""Bad requests through nginx: the documented 4xx, the JSON error shape, no internals,
and no worker harmed."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import pytest

from app.config import REPO_ROOT, Config
from app.stack import Stack
from tests.faults.corpus import INT64_MAX, Kit, mp
from tests.integration.conftest import JSON, MSGPACK, Candidates, access_log, parse, wait_for_log

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Kit], bytes]
    status: int
    code: str
    #: Expected ``error.field``; a callable gets the Kit; ``...`` = do not check.
    field: Any = None
    content_type: str = JSON
    path: str = "/rank"


def too_large(k: Kit) -> bytes:
    """A syntactically valid JSON body one byte over ``max_body_bytes``."""
    head, tail = b'{"candidates": [', b"]}"
    return head + b" " * (k.config.max_body_bytes + 1 - len(head) - len(tail)) + tail


CASES = [
    # -- not JSON / not msgpack ----------------------------------------------------------------
    Case("malformed-json", lambda k: b'{"candidates": [', 400, "malformed_body"),
    Case("not-json-at-all", lambda k: b"hello world", 400, "malformed_body"),
    Case("trailing-garbage", lambda k: k.rank() + b"}", 400, "malformed_body"),
    Case("empty-body", lambda k: b"", 400, "malformed_body"),
    Case("nan-literal", lambda k: k.raw_last_id(b"NaN"), 400, "malformed_body"),
    Case("infinity-literal", lambda k: k.raw_last_id(b"Infinity"), 400, "malformed_body"),
    Case("minus-infinity", lambda k: k.raw_last_id(b"-Infinity"), 400, "malformed_body"),
    Case(
        "nan-top_k",
        lambda k: k.rank()[:-1] + b', "top_k": NaN}',
        400,
        "malformed_body",
    ),
    Case("msgpack-garbage", lambda k: b"\xc1\xff\x00garbage", 400, "malformed_body", None, MSGPACK),
    Case(
        "msgpack-truncated",
        lambda k: mp({"candidates": [k.row]})[:-3],
        400,
        "malformed_body",
        None,
        MSGPACK,
    ),
    # -- wrong types -----------------------------------------------------------------------
    *[
        Case(
            f"id-{name}",
            (lambda v: lambda k: k.with_id(v))(value),
            400,
            "invalid_request",
            lambda k: f"candidates[0].{k.names[1]}",
        )
        for name, value in [
            ("string", "3"),
            ("float-1.5", 1.5),
            ("float-1.0", 1.0),
            ("bool", True),
            ("null", None),
            ("list", [1]),
        ]
    ],
    Case(
        "id-string-msgpack",
        lambda k: mp({"candidates": [{**k.obj, k.names[1]: "3"}]}),
        400,
        "invalid_request",
        lambda k: f"candidates[0].{k.names[1]}",
        MSGPACK,
    ),
    Case(
        "id-float-msgpack",
        lambda k: mp({"candidates": [[*k.row[:-1], 1.0]]}),
        400,
        "invalid_request",
        "candidates[0][15]",
        MSGPACK,
    ),
    Case(
        "id-nan-msgpack",
        lambda k: mp({"candidates": [[*k.row[:-1], math.nan]]}),
        400,
        "invalid_request",
        "candidates[0][15]",
        MSGPACK,
    ),
    Case("top_k-string", lambda k: k.rank(top_k="3"), 400, "invalid_request", "top_k"),
    Case("top_k-float", lambda k: k.rank(top_k=3.0), 400, "invalid_request", "top_k"),
    Case(
        "multi_stage-string",
        lambda k: k.rank(multi_stage="yes"),
        400,
        "invalid_request",
        "multi_stage",
    ),
    # -- ids beyond int64 ------------------------------------------------------------------
    Case(
        "id-int64-max-plus-1",
        lambda k: k.raw_last_id(str(INT64_MAX + 1).encode()),
        400,
        "invalid_request",
        "candidates[0][15]",
    ),
    Case(
        "id-int64-min-minus-1",
        lambda k: k.raw_last_id(str(-INT64_MAX - 2).encode()),
        400,
        "invalid_request",
        "candidates[0][15]",
    ),
    Case(
        "id-1e40",
        lambda k: k.raw_last_id(b"1" + b"0" * 40),
        400,
        "invalid_request",
        "candidates[0][15]",
    ),
    Case(
        "id-uint64-msgpack",
        lambda k: mp({"candidates": [[*k.row[:-1], 2**64 - 1]]}),
        400,
        "invalid_request",
        "candidates[0][15]",
        MSGPACK,
    ),
    # -- shape -----------------------------------------------------------------------------
    Case(
        "missing-field",
        lambda k: msgspec.json.encode({"candidates": [{n: 1 for n in k.names[:-1]}]}),
        400,
        "invalid_request",
        "candidates[0]",
    ),
    Case(
        "missing-column",
        lambda k: msgspec.json.encode({"candidates": {n: [1] for n in k.names[:-1]}}),
        400,
        "invalid_request",
        "candidates",
    ),
    Case(
        "unknown-field-in-candidate",
        lambda k: msgspec.json.encode({"candidates": [k.obj, {**k.obj, "zzz": 1}]}),
        400,
        "invalid_request",
        "candidates[1]",
    ),
    Case(
        "unknown-column",
        lambda k: msgspec.json.encode({"candidates": {**{n: [1] for n in k.names}, "zzz": [1]}}),
        400,
        "invalid_request",
        "candidates",
    ),
    Case("unknown-top-level", lambda k: k.rank(foo=1), 400, "invalid_request", None),
    Case(
        "no-candidates",
        lambda k: msgspec.json.encode({"top_k": 3}),
        400,
        "invalid_request",
        None,
    ),
    Case("body-is-array", lambda k: msgspec.json.encode([k.row]), 400, "invalid_request", None),
    Case(
        "empty-list",
        lambda k: msgspec.json.encode({"candidates": []}),
        400,
        "invalid_request",
        "candidates",
    ),
    Case(
        "empty-list-msgpack",
        lambda k: mp({"candidates": []}),
        400,
        "invalid_request",
        "candidates",
        MSGPACK,
    ),
    Case(
        "empty-columns",
        lambda k: msgspec.json.encode({"candidates": {n: [] for n in k.names}}),
        400,
        "invalid_request",
        lambda k: f"candidates.{k.names[0]}",
    ),
    *[
        Case(
            f"candidates-{name}",
            (lambda v: lambda k: msgspec.json.encode({"candidates": v}))(value),
            400,
            "invalid_request",
            "candidates",
        )
        for name, value in [("int", 5), ("string", "abc"), ("null", None), ("bool", True)]
    ],
    Case(
        "mixed-forms",
        lambda k: msgspec.json.encode({"candidates": [k.obj, k.row]}),
        400,
        "invalid_request",
        "candidates[1]",
    ),
    Case(
        "too-many-candidates-rows",
        lambda k: msgspec.json.encode({"candidates": [k.row] * (k.config.max_candidates + 1)}),
        400,
        "invalid_request",
        "candidates",
    ),
    Case(
        "too-many-candidates-columns",
        lambda k: mp({"candidates": {n: [1] * (k.config.max_candidates + 1) for n in k.names}}),
        400,
        "invalid_request",
        lambda k: f"candidates.{k.names[0]}",
        MSGPACK,
    ),
    Case(
        "ragged-columns",
        lambda k: msgspec.json.encode(
            {"candidates": {**{n: [1, 2] for n in k.names}, k.names[3]: [1, 2, 3]}}
        ),
        400,
        "invalid_request",
        lambda k: f"candidates.{k.names[3]}",
    ),
    Case(
        "row-too-short",
        lambda k: msgspec.json.encode({"candidates": [k.row, k.row[:-1]]}),
        400,
        "invalid_request",
        "candidates[1]",
    ),
    Case(
        "row-too-long",
        lambda k: mp({"candidates": [k.row, [*k.row, 1]]}),
        400,
        "invalid_request",
        "candidates[1]",
        MSGPACK,
    ),
    # -- k values --------------------------------------------------------------------------
    Case(
        "top_k-gt-stage1_k", lambda k: k.rank(top_k=5, stage1_k=4), 400, "invalid_request", "top_k"
    ),
    Case(
        "top_k-gt-default-stage1_k",
        lambda k: k.rank(top_k=k.config.default_stage1_k + 1),
        400,
        "invalid_request",
        "top_k",
    ),
    Case("top_k-zero", lambda k: k.rank(top_k=0), 400, "invalid_request", "top_k"),
    Case("top_k-negative", lambda k: k.rank(top_k=-3), 400, "invalid_request", "top_k"),
    Case("stage1_k-negative", lambda k: k.rank(stage1_k=-1), 400, "invalid_request", "stage1_k"),
    Case(
        "stage1_k-zero", lambda k: k.rank(top_k=1, stage1_k=0), 400, "invalid_request", "stage1_k"
    ),
    Case(
        "stage1_k-over-max_candidates",
        lambda k: k.rank(top_k=1, stage1_k=k.config.max_candidates + 1),
        400,
        "invalid_request",
        "stage1_k",
    ),
    # -- transport -------------------------------------------------------------------------
    Case(
        "text-plain",
        lambda k: k.rank(),
        415,
        "unsupported_media_type",
        "Content-Type",
        "text/plain",
    ),
    Case(
        "form-urlencoded",
        lambda k: b"candidates=1",
        415,
        "unsupported_media_type",
        "Content-Type",
        "application/x-www-form-urlencoded",
    ),
    Case("body-too-large", too_large, 413, "payload_too_large", None),
    Case("body-too-large-predict", too_large, 413, "payload_too_large", None, path="/predict"),
    # -- /predict --------------------------------------------------------------------------
    Case(
        "predict-both-forms",
        lambda k: msgspec.json.encode({"candidate": k.obj, "candidates": [k.obj]}),
        400,
        "invalid_request",
        None,
        path="/predict",
    ),
    Case("predict-nothing", lambda k: b"{}", 400, "invalid_request", None, path="/predict"),
    Case(
        "predict-too-many",
        lambda k: msgspec.json.encode(
            {"candidates": [k.row] * (k.config.max_predict_candidates + 1)}
        ),
        400,
        "invalid_request",
        "candidates",
        path="/predict",
    ),
    Case(
        "predict-unknown-model",
        lambda k: msgspec.json.encode({"candidate": k.obj, "model": "nope"}),
        400,
        "invalid_request",
        "model",
        path="/predict",
    ),
    Case(
        "predict-candidate-is-row",
        lambda k: msgspec.json.encode({"candidate": k.row}),
        400,
        "invalid_request",
        "candidate",
        path="/predict",
    ),
]

#: Things an error body must never carry: tracebacks, source paths, module files.
LEAKS = re.compile(
    r"Traceback|File \"|\.py\b|site-packages|/work/|/tmp/|/usr/|" + re.escape(str(REPO_ROOT))
)


@pytest.fixture(scope="module")
def kit(candidates: Candidates, config: Config) -> Kit:
    row = [int(v) for v in candidates.ids(1, seed=3, oov_rate=0)[0]]
    return Kit(candidates.names, dict(zip(candidates.names, row, strict=True)), row, config)


@pytest.fixture(scope="module")
def pids_before(stack: Stack) -> Iterator[list[int]]:
    pids = sorted(stack.worker_pids())
    assert len(pids) == stack.config.workers
    yield pids


def assert_error_shape(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text[:500]
    assert resp.headers["content-type"].split(";")[0] == JSON, resp.text[:300]
    rid = resp.headers.get("x-request-id")
    assert rid, "no X-Request-ID header"
    body = parse(resp)
    assert set(body) == {"error", "request_id"}
    assert set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["field"] is None or isinstance(body["error"]["field"], str)
    assert body["request_id"] == rid
    assert not LEAKS.search(resp.text), resp.text[:500]
    return body


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_request_gets_documented_error(
    client: httpx.Client, kit: Kit, pids_before: list[int], case: Case
) -> None:
    body = case.build(kit)
    resp = client.post(case.path, content=body, headers={"Content-Type": case.content_type})
    answer = assert_error_shape(resp, case.status, case.code)
    if case.field is not ...:
        want = case.field(kit) if callable(case.field) else case.field
        assert answer["error"]["field"] == want, answer


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/rank", 405, "method_not_allowed"),
        ("DELETE", "/models", 405, "method_not_allowed"),
        ("POST", "/health", 405, "method_not_allowed"),
        ("GET", "/no-such-route", 404, "not_found"),
    ],
)
def test_unknown_route_and_method(
    client: httpx.Client, pids_before: list[int], method: str, path: str, status: int, code: str
) -> None:
    resp = client.request(method, path)
    assert_error_shape(resp, status, code)


def test_oversized_body_never_reaches_the_app(
    client: httpx.Client, stack: Stack, kit: Kit, pids_before: list[int]
) -> None:
    """nginx answers 413 itself, with the app's JSON error shape (deploy/nginx.conf)."""
    rid = "too-large-check-1"
    resp = client.post(
        "/rank", content=too_large(kit), headers={"Content-Type": JSON, "X-Request-ID": rid}
    )
    body = assert_error_shape(resp, 413, "payload_too_large")
    assert body["request_id"] == rid
    entry = wait_for_log(stack, {rid})[rid]
    assert entry["status"] == 413
    assert entry["upstream"] == ""  # no worker was asked


def test_oversized_chunked_body_is_refused(
    client: httpx.Client, kit: Kit, pids_before: list[int]
) -> None:
    """No Content-Length (chunked): nginx counts while reading and still answers 413."""
    data = too_large(kit)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(data), 1 << 20):
            yield data[start : start + (1 << 20)]

    try:
        resp = client.post("/rank", content=chunks(), headers={"Content-Type": JSON})
    except httpx.TransportError as exc:  # nginx may close before the client is done
        pytest.fail(f"nginx closed the connection without an answer: {exc!r}")
    assert_error_shape(resp, 413, "payload_too_large")


def test_no_worker_crashed(stack: Stack, pids_before: list[int], client: httpx.Client) -> None:
    """Runs after the table (definition order): the same workers, still serving."""
    assert sorted(stack.worker_pids()) == pids_before
    assert client.get("/ready").status_code == 200
    log = (stack.log_dir / "gunicorn.log").read_text()
    assert "Traceback" not in log
    assert '"unhandled error"' not in log
    assert all(e["status"] < 500 for e in access_log(stack)), "a request got a 5xx"
