"""ctr_farm.client against the real stack (rankings, predictions, errors), and its retry
and timeout behaviour against a tiny scripted HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import http.server
import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

from app import schema as server_schema
from app.stack import Stack
from ctr_farm import (
    APIError,
    AsyncClient,
    BadRequest,
    Client,
    PredictResponse,
    Ranking,
    RankResponse,
    RequestTimeout,
    TooManyRequests,
    TransportError,
    Unavailable,
    results,
)
from tests.integration.conftest import Candidates, parse, post
from tests.test_imports import imported_after

pytestmark = pytest.mark.integration
WIRES = ("msgpack", "json")
TIMEOUT = 60.0


def direct_rank(client: httpx.Client, ids: np.ndarray, **params: Any) -> dict[str, Any]:
    resp = post(client, "/rank", {"candidates": ids.tolist(), **params})
    assert resp.status_code == 200, resp.text
    return parse(resp)


def same_ranking(result: RankResponse, direct: dict[str, Any]) -> None:
    assert isinstance(result, RankResponse)
    assert all(isinstance(r, Ranking) for r in result.rankings)
    assert msgspec.to_builtins(result.rankings) == direct["rankings"]
    assert msgspec.to_builtins(result.stats) == direct["stats"]
    assert result.models == direct["models"]


# -- against the real stack ------------------------------------------------------------------
@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize("given", ["array-rows", "array-columns", "dicts", "array-int32"])
def test_rank_equals_a_direct_call(
    stack: Stack, client: httpx.Client, candidates: Candidates, wire: str, given: str
) -> None:
    ids = candidates.ids(300, seed=81)
    direct = direct_rank(client, ids, top_k=12, stage1_k=60)
    array_form = "columns" if given == "array-columns" else "rows"
    value: Any = ids
    if given == "dicts":
        value = candidates.form(ids, "objects")
    elif given == "array-int32":
        value = np.clip(ids, -(2**31), 2**31 - 1).astype(np.int32)
        direct = direct_rank(client, value.astype(np.int64), top_k=12, stage1_k=60)
    with Client(stack.url, wire=wire, array_form=array_form, timeout=TIMEOUT) as farm:
        same_ranking(farm.rank(value, top_k=12, stage1_k=60), direct)
        # a second call reuses the connection and the cached field names
        same_ranking(farm.rank(value, top_k=12, stage1_k=60), direct)


def test_rank_single_stage_and_defaults(
    stack: Stack, client: httpx.Client, candidates: Candidates
) -> None:
    ids = candidates.ids(150, seed=82)
    with Client(stack.url, timeout=TIMEOUT) as farm:
        same_ranking(farm.rank(ids), direct_rank(client, ids))
        single = farm.rank(ids, top_k=5, multi_stage=False)
    same_ranking(single, direct_rank(client, ids, top_k=5, multi_stage=False))
    assert single.stats.after_stage1 == 150
    assert len(single.models) == 1


@pytest.mark.parametrize("wire", WIRES)
def test_predict_equals_a_direct_call(
    stack: Stack, client: httpx.Client, candidates: Candidates, wire: str
) -> None:
    ids = candidates.ids(6, seed=83)
    resp = post(client, "/predict", {"candidates": ids.tolist(), "model": "deepfm"})
    direct = parse(resp)
    with Client(stack.url, wire=wire, timeout=TIMEOUT) as farm:
        result = farm.predict(ids, model="deepfm")
        one = farm.predict(candidate=candidates.form(ids[:1], "objects")[0], model="deepfm")
        models = farm.models()
        ready = farm.ready()
    assert isinstance(result, PredictResponse)
    assert result.ctr == direct["ctr"]
    assert (result.model, result.version) == (direct["model"], direct["version"])
    assert one.ctr == direct["ctr"][:1]
    assert ready.ready is True
    assert {m.name for m in models.models} == {"deepfm", "autoint"}


@pytest.mark.parametrize("wire", WIRES)
def test_a_400_raises_bad_request_with_the_servers_code_and_request_id(
    stack: Stack, candidates: Candidates, wire: str
) -> None:
    rows = candidates.ids(3, seed=84).tolist()
    rows[1] = rows[1][:-1]  # one id short
    with Client(stack.url, wire=wire, timeout=TIMEOUT) as farm:
        with pytest.raises(BadRequest) as info:
            farm.rank(rows, request_id="client-test-400")
        with pytest.raises(BadRequest) as model_info:
            farm.predict(rows[:1], model="nope")
    err = info.value
    assert (err.status, err.code) == (400, "invalid_request")
    assert err.field is not None and err.field.startswith("candidates[1]")
    assert err.request_id == "client-test-400"
    assert err.attempts == 1
    assert "invalid_request" in str(err)
    assert (model_info.value.code, model_info.value.field) == ("invalid_request", "model")
    assert model_info.value.request_id  # minted by the client when not given


def test_array_input_is_checked_before_sending(stack: Stack) -> None:
    with Client(stack.url) as farm:
        with pytest.raises(ValueError, match="2-D integer"):
            farm.rank(np.zeros((3, 16), dtype=np.float32))
        with pytest.raises(ValueError, match="exactly one"):
            farm.predict()


def test_async_client_equals_a_direct_call(
    stack: Stack, client: httpx.Client, candidates: Candidates
) -> None:
    ids = candidates.ids(200, seed=85)
    direct = direct_rank(client, ids, top_k=7)

    async def main() -> tuple[list[RankResponse], PredictResponse]:
        async with AsyncClient(stack.url, array_form="columns", timeout=TIMEOUT) as farm:
            ranked = await asyncio.gather(*(farm.rank(ids, top_k=7) for _ in range(4)))
            with pytest.raises(BadRequest) as info:
                await farm.rank(ids, top_k=0, request_id="async-400")
            assert (info.value.code, info.value.request_id) == ("invalid_request", "async-400")
            return list(ranked), await farm.predict(ids[:3])

    ranked, predicted = asyncio.run(main())
    for result in ranked:
        same_ranking(result, direct)
    assert len(predicted.ctr) == 3


def test_the_client_does_not_import_the_server() -> None:
    modules = imported_after(["ctr_farm", "ctr_farm.client"])
    assert "httpx" in modules
    assert not {m for m in modules if m.split(".")[0] in ("app", "onnxruntime", "falcon", "torch")}


@pytest.mark.parametrize(
    "name", ["RankResponse", "PredictResponse", "ErrorBody", "ReadyResponse", "ModelsResponse"]
)
def test_client_structs_match_the_servers(name: str) -> None:
    """Every field the server sends is in the client's struct with the same schema; the
    client requires nothing the server might not send."""
    _, server = msgspec.json.schema_components([getattr(server_schema, name)])
    _, client = msgspec.json.schema_components([getattr(results, name)])
    assert set(server) <= set(client)
    for component, theirs in server.items():
        ours = client[component]
        for field, schema in theirs["properties"].items():
            assert ours["properties"].get(field) == schema, f"{component}.{field}"
        assert set(ours.get("required", [])) <= set(theirs.get("required", []))


# -- retries and timeouts, against a scripted server -----------------------------------------
OK_BODY = {
    "rankings": [{"index": 0, "ctr": 0.25, "rank": 1}],
    "latency": {"total_ms": 1.0},
    "stats": {"input": 1, "after_stage1": 1, "output": 1},
    "models": ["m/1"],
}


def error_body(code: str, rid: str = "srv") -> dict[str, Any]:
    return {"error": {"code": code, "message": code, "field": None}, "request_id": rid}


class Scripted(http.server.ThreadingHTTPServer):
    """Answers each request with the next scripted (status, headers, body, delay_s);
    the last entry repeats. Records (monotonic time, headers) of every request."""

    daemon_threads = True

    def __init__(self, script: list[tuple[int, dict[str, str], Any, float]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script = script
        self.seen: list[tuple[float, dict[str, str]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Scripted

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        srv = self.server
        srv.seen.append((time.monotonic(), dict(self.headers)))
        status, headers, body, delay = srv.script[min(len(srv.seen), len(srv.script)) - 1]
        time.sleep(delay)
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: list[Scripted] = []

    def make(*script: tuple[int, dict[str, str], Any, float]) -> Scripted:
        server = Scripted(list(script))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def gaps(server: Scripted) -> list[float]:
    times = [t for t, _ in server.seen]
    return [b - a for a, b in itertools.pairwise(times)]


def test_503_is_retried_after_retry_after(scripted) -> None:
    server = scripted(
        (503, {"Retry-After": "1"}, error_body("not_ready"), 0.0), (200, {}, OK_BODY, 0.0)
    )
    with Client(server.url, wire="json") as farm:
        result = farm.rank([[1, 2]], request_id="retry-me")
    assert result.rankings[0].ctr == 0.25
    assert len(server.seen) == 2
    assert 0.95 <= gaps(server)[0] < 2.5  # waited Retry-After (1 s), not a quick backoff
    assert {h["X-Request-ID"] for _, h in server.seen} == {"retry-me"}
    assert server.seen[0][1]["Content-Type"] == "application/json"


def test_retries_are_bounded_in_attempts(scripted) -> None:
    server = scripted((503, {"Retry-After": "0"}, error_body("overloaded", "r1"), 0.0))
    with Client(server.url, max_retries=2) as farm, pytest.raises(Unavailable) as info:
        farm.rank([[1, 2]])
    assert len(server.seen) == 3  # 1 + max_retries
    err = info.value
    assert (err.status, err.code, err.request_id, err.attempts) == (503, "overloaded", "r1", 3)
    assert err.retry_after == 0.0
    assert server.seen[0][1]["Content-Type"] == "application/msgpack"  # the default wire


def test_retries_are_bounded_in_time(scripted) -> None:
    server = scripted((429, {"Retry-After": "5"}, error_body("too_many_requests"), 0.0))
    started = time.monotonic()
    with Client(server.url, retry_budget_s=2.0) as farm, pytest.raises(TooManyRequests) as info:
        farm.rank([[1, 2]])
    assert time.monotonic() - started < 1.5  # a 5 s wait would pass the 2 s budget: no wait
    assert len(server.seen) == 1
    assert (info.value.status, info.value.retry_after) == (429, 5.0)


def test_a_long_retry_after_is_capped(scripted) -> None:
    server = scripted(
        (429, {"Retry-After": "30"}, error_body("too_many_requests"), 0.0),
        (200, {}, OK_BODY, 0.0),
    )
    with Client(server.url, max_retry_delay_s=0.2, retry_budget_s=5.0) as farm:
        farm.rank([[1, 2]])
    assert len(server.seen) == 2
    assert 0.15 <= gaps(server)[0] < 1.5


def test_a_400_is_not_retried_and_a_foreign_error_body_still_maps(scripted) -> None:
    server = scripted((400, {"X-Request-ID": "x1"}, error_body("invalid_request", "x1"), 0.0))
    with Client(server.url) as farm, pytest.raises(BadRequest) as info:
        farm.rank([[1]])
    assert len(server.seen) == 1
    assert (info.value.code, info.value.request_id) == ("invalid_request", "x1")
    proxy = scripted((502, {"X-Request-ID": "x2"}, "<html>bad gateway</html>", 0.0))
    with Client(proxy.url) as farm, pytest.raises(APIError) as info:
        farm.rank([[1]])
    assert (info.value.status, info.value.code, info.value.request_id) == (502, "http_502", "x2")


def test_timeout_raises_request_timeout(scripted) -> None:
    server = scripted((200, {}, OK_BODY, 1.0))
    with Client(server.url, timeout=0.2) as farm:
        with pytest.raises(RequestTimeout):
            farm.rank([[1, 2]])
        assert farm.rank([[1, 2]], timeout=5.0).stats.output == 1  # per-call timeout


def test_connection_refused_is_retried_then_raised() -> None:
    server = Scripted([])
    url = server.url
    server.server_close()  # nothing listens there now
    started = time.monotonic()
    with Client(url, max_retries=2) as farm, pytest.raises(TransportError) as info:
        farm.rank([[1, 2]])
    assert not isinstance(info.value, RequestTimeout)
    assert time.monotonic() - started < 3.0


def test_async_client_retries_too(scripted) -> None:
    server = scripted(
        (503, {"Retry-After": "1"}, error_body("not_ready"), 0.0), (200, {}, OK_BODY, 0.0)
    )

    async def main() -> RankResponse:
        async with AsyncClient(server.url) as farm:
            return await farm.rank([[1, 2]])

    assert asyncio.run(main()).rankings[0].index == 0
    assert len(server.seen) == 2
    assert gaps(server)[0] >= 0.95
