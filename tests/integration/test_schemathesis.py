"""Property-based API tests driven by GET /openapi.json, against the real stack.

schemathesis reads the document the farm serves and sends generated requests (valid
and invalid; JSON and msgpack bodies) through nginx to the workers. Every answer must
be a documented status with a documented content type, headers and body schema; no
5xx (but a 503 ``deadline_exceeded`` for a request that set a deadline under a second);
invalid bodies are rejected with 4xx. Bounded: at most ``MAX_EXAMPLES`` generated
requests per operation and mode (positive, negative), on a stack with small limits
so that generated bodies stay small.

``positive_data_acceptance`` is left out on purpose: the schema cannot express two
rules the server enforces (``top_k <= stage1_k``; columns of equal length), so some
schema-valid bodies are rightly answered 400.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import msgspec
import pytest
import requests
import schemathesis
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from app.openapi import OPERATIONS
from app.stack import Stack, running
from tests.integration.conftest import snapshot_models

pytestmark = pytest.mark.integration
#: Generated requests per operation and mode (GETs without parameters have one to send).
MAX_EXAMPLES = {"body": 100, "other": 5}
#: Small limits: negative examples that exceed them stay small to generate and send.
LIMITS = {
    "max_candidates": 40,
    "max_predict_candidates": 8,
    "stages": [{"model": "deepfm", "keep_k": 20}, {"model": "autoint"}],
}
#: A request may set its own deadline (``timeout_ms``); one under this may rightly be
#: answered 503 ``deadline_exceeded``. Above it, a 503 is a failure like any 5xx.
DEADLINE_FLOOR_MS = 1000


@schemathesis.check
def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """``not_a_server_error``, except the 503 a too-short requested deadline earns."""
    if response.status_code < 500:
        return None
    code = None
    with contextlib.suppress(ValueError, TypeError, KeyError):
        code = json.loads(response.content)["error"]["code"]
    timeout = case.body.get("timeout_ms") if isinstance(case.body, dict) else None
    if (
        response.status_code == 503
        and code == "deadline_exceeded"
        and isinstance(timeout, int)
        and timeout < DEADLINE_FLOOR_MS
    ):
        return None
    raise AssertionError(f"{response.status_code} {code}: {response.content[:300]!r}")


CHECKS = [
    no_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    unsupported_method,
]


@schemathesis.serializer("application/msgpack")
def _to_msgpack(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    try:
        return msgspec.msgpack.encode(value)
    except OverflowError:
        # Negative data with an int msgpack cannot hold (beyond 64 bits): send bytes that
        # are not msgpack at all; the farm must still answer 400, not 5xx.
        return msgspec.json.encode(value)


@schemathesis.deserializer("application/msgpack")
def _from_msgpack(ctx: schemathesis.DeserializationContext, response: Any) -> Any:
    return msgspec.msgpack.decode(response.content)


@pytest.fixture(scope="module")
def small_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    run_dir = Path(tempfile.mkdtemp(prefix="farm-st-"))
    overrides = {"workers": 1, **snapshot_models(run_dir / "models"), **LIMITS}
    failed_before = request.session.testsfailed
    with running(run_dir, overrides, timeout_s=180.0) as stack:
        yield stack
    if request.session.testsfailed == failed_before:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def api_schema(small_stack: Stack) -> Any:
    config = schemathesis.Config.from_dict({"seed": 8})
    return schemathesis.openapi.from_url(
        f"{small_stack.url}/openapi.json", config=config, timeout=30
    )


@pytest.fixture(scope="module")
def tally() -> Iterator[dict[str, float]]:
    t: dict[str, float] = {"requests": 0, "start": time.monotonic()}
    yield t
    print(f"\nschemathesis: {t['requests']:.0f} requests in {time.monotonic() - t['start']:.1f} s")


# Parametrized from the operation table; test_openapi checks the served document has
# exactly these operations. (Not schemathesis's own pytest loader: its lazy
# ``from_fixture`` mode sets ``node._nodeid``, which pytest 9.2 no longer has.)
# Negative data needs something to break: a body or a parameter.
CASES = [
    (path, method, mode)
    for (path, method), op in sorted(OPERATIONS.items())
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or op.request is not None or op.parameters
]


@pytest.mark.parametrize(("path", "method", "mode"), CASES)
def test_api_conforms_to_its_openapi_document(
    api_schema: Any, tally: dict[str, float], path: str, method: str, mode: GenerationMode
) -> None:
    if path not in api_schema.raw_schema["paths"]:
        pytest.skip(f"{method} {path} is not served by this app")
    operation = api_schema[path][method]
    op = OPERATIONS[path, method]
    examples = MAX_EXAMPLES["body" if op.request is not None else "other"]
    session = requests.Session()

    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        tally["requests"] += 1
        case.call_and_validate(session=session, checks=CHECKS, timeout=30)

    with session:
        run()
