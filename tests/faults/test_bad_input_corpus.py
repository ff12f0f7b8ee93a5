"""Fault suite item 1 (issue 6): the bad-input corpus through nginx -> gunicorn -> app.

Every case of :mod:`tests.faults.corpus` is sent to ``/rank`` (and ``/predict`` where the
case means the same there) and must get its documented 4xx: JSON body
``{"error": {"code", "message", "field"}, "request_id"}``, the ``X-Request-ID`` header
(ours, echoed), the code and field of the README, and no traceback or file path. The
last test checks the whole run: no 5xx at all in nginx's access log, no unhandled error
in gunicorn's log, and the same worker pids as before the first case (no restart).
Figures are printed at the end (``-s`` not needed).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import pytest

from app.config import REPO_ROOT
from app.stack import Stack
from tests.faults.corpus import CASES, CONTROLS, JSON, Case, Control, Kit
from tests.integration.conftest import Candidates, access_log, parse, wait_for_log

pytestmark = pytest.mark.integration

#: Things an error body must never carry: tracebacks, source paths, module files.
LEAKS = re.compile(
    r"Traceback|File \"|\.py\b|site-packages|/work/|/tmp/|/usr/|" + re.escape(str(REPO_ROOT))
)
#: The 4xx codes README "Errors" documents.
DOCUMENTED = {
    "malformed_body": 400,
    "invalid_request": 400,
    "payload_too_large": 413,
    "unsupported_media_type": 415,
}
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
STARTED = time.monotonic()


def request_id(name: str, path: str) -> str:
    return f"corpus-{name}-{path.strip('/')}"


def params() -> list[Any]:
    return [pytest.param(case, p, id=f"{case.name}:{p}") for case in CASES for p in case.paths]


@pytest.fixture(scope="module")
def kit(fault_candidates: Candidates, fault_stack: Stack) -> Kit:
    row = [int(v) for v in fault_candidates.ids(1, seed=3, oov_rate=0)[0]]
    names = fault_candidates.names
    return Kit(names, dict(zip(names, row, strict=True)), row, fault_stack.config)


@pytest.fixture(scope="module")
def pids_before(fault_stack: Stack, worker_pids: Callable[[], list[int]]) -> list[int]:
    pids = worker_pids()
    assert len(pids) == fault_stack.config.workers
    return pids


@pytest.fixture(scope="module")
def ledger() -> dict[str, int]:
    """request id -> status, for every request this module sent."""
    return {}


def send(
    client: httpx.Client, path: str, body: bytes, content_type: str | None, rid: str
) -> httpx.Response:
    headers = {"X-Request-ID": rid}
    if content_type is not None:
        headers["Content-Type"] = content_type
    try:
        return client.post(path, content=body, headers=headers)
    except httpx.TransportError as exc:  # nginx must answer, not hang up
        pytest.fail(f"{rid}: no answer: {exc!r}")


def assert_error_shape(resp: httpx.Response, status: int, code: str, rid: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text[:500]
    assert resp.headers["content-type"].split(";")[0] == JSON, resp.text[:300]
    assert resp.headers.get("x-request-id") == rid
    body = msgspec.json.decode(resp.content)
    assert set(body) == {"error", "request_id"}, body
    assert set(body["error"]) == {"code", "message", "field"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert body["error"]["field"] is None or isinstance(body["error"]["field"], str), body
    assert body["request_id"] == rid, body
    assert not LEAKS.search(resp.text), resp.text[:500]
    return body


def test_the_corpus_is_the_issue_s() -> None:
    """At least 40 named cases, unique request ids, only documented 4xx codes."""
    names = [c.name for c in CASES]
    assert len(names) >= 40
    assert len(set(names)) == len(names)
    for case in CASES:
        assert DOCUMENTED[case.code] == case.status, case.name
        for path in case.paths:
            assert REQUEST_ID.match(request_id(case.name, path)), case.name


@pytest.mark.parametrize(("case", "path"), params())
def test_bad_input_gets_its_documented_4xx(
    fault_client: httpx.Client,
    kit: Kit,
    pids_before: list[int],
    ledger: dict[str, int],
    case: Case,
    path: str,
) -> None:
    rid = request_id(case.name, path)
    resp = send(fault_client, path, case.build(kit), case.content_type, rid)
    ledger[rid] = resp.status_code
    answer = assert_error_shape(resp, case.status, case.code, rid)
    if case.field is not ...:
        assert answer["error"]["field"] == case.want_field(kit), answer


@pytest.mark.parametrize("control", CONTROLS, ids=[c.name for c in CONTROLS])
def test_documented_non_errors_stay_200(
    fault_client: httpx.Client,
    kit: Kit,
    pids_before: list[int],
    ledger: dict[str, int],
    control: Control,
) -> None:
    rid = request_id(control.name, "rank")
    resp = send(fault_client, "/rank", control.body(kit), control.content_type, rid)
    ledger[rid] = resp.status_code
    assert resp.status_code == 200, resp.text[:500]
    assert resp.headers.get("x-request-id") == rid
    answer = parse(resp)  # msgpack in, msgpack out
    assert answer["stats"]["input"] == control.n_input, answer
    assert 1 <= len(answer["rankings"]) <= control.n_input


def test_zero_5xx_and_no_worker_restarted(
    fault_stack: Stack,
    fault_client: httpx.Client,
    worker_pids: Callable[[], list[int]],
    pids_before: list[int],
    ledger: dict[str, int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Runs after the corpus (definition order): the run as a whole, from nginx's log."""
    assert ledger, "run the whole module: this test checks what the corpus sent"
    assert worker_pids() == pids_before, "a worker was restarted"
    assert fault_client.get("/ready").status_code == 200
    logged = wait_for_log(fault_stack, set(ledger))
    assert set(logged) == set(ledger), f"not in access.log: {sorted(set(ledger) - set(logged))}"
    statuses = {rid: entry["status"] for rid, entry in logged.items()}
    assert statuses == ledger
    fives = sorted(rid for rid, s in statuses.items() if s >= 500)
    assert not fives, f"5xx answers: {fives}"
    every = [e["status"] for e in access_log(fault_stack)]
    five_any = sum(s >= 500 for s in every)
    assert five_any == 0, f"{five_any} 5xx in access.log"
    log = (fault_stack.log_dir / "gunicorn.log").read_text()
    assert log.count('"unhandled error"') == 0
    seen = dict(sorted(Counter(ledger.values()).items()))
    with capsys.disabled():
        print(
            f"\nbad-input corpus: {len(CASES)} cases, {len(ledger)} requests "
            f"(+{len(CONTROLS)} controls), statuses {seen},"
            f" 5xx {five_any}, workers {pids_before} -> "
            f"{worker_pids()} (restarts 0), {time.monotonic() - STARTED:.1f} s since import"
        )
