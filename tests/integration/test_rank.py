"""/rank and /predict through nginx, compared exactly to a brute-force ONNX reference."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

from app.config import Config
from app.schema import ModelCard, RankResponse
from tests.integration.conftest import (
    CONTENT_TYPES,
    FORMS,
    JSON,
    MSGPACK,
    Candidates,
    Reference,
    parse,
    post,
)

pytestmark = pytest.mark.integration


def rank(
    client: httpx.Client,
    candidates: Candidates,
    ids: np.ndarray,
    form: str = "objects",
    content_type: str = JSON,
    **params: Any,
) -> dict[str, Any]:
    body = {"candidates": candidates.form(ids, form), **params}
    resp = post(client, "/rank", body, content_type)
    assert resp.status_code == 200, resp.text[:500]
    return parse(resp)


def assert_matches_reference(
    answer: dict[str, Any], expected: tuple[list[int], np.ndarray]
) -> None:
    """Same indices in the same order, and the same float32 CTRs bit for bit."""
    want_idx, want_ctr = expected
    got_idx = [r["index"] for r in answer["rankings"]]
    got_ctr = np.array([r["ctr"] for r in answer["rankings"]], dtype=np.float64)
    assert got_idx == want_idx
    # The farm's float32 goes out as the shortest double repr: it must round-trip exactly.
    assert np.array_equal(got_ctr.astype(np.float32), want_ctr.astype(np.float32))
    assert np.array_equal(got_ctr, want_ctr.astype(np.float64))


# (n, top_k, stage1_k, multi_stage, form, content type); None = the farm's default.
CASES = [
    pytest.param(1000, 10, 100, True, "objects", JSON, id="n1000-top10-s100"),
    pytest.param(1000, None, None, True, "columns", MSGPACK, id="n1000-defaults"),
    pytest.param(2000, 25, 250, True, "rows", JSON, id="n2000-top25-s250"),
    pytest.param(300, 20, 20, True, "rows", MSGPACK, id="top_k-eq-stage1_k"),
    pytest.param(50, 5, 80, True, "columns", JSON, id="stage1_k-gt-n"),
    pytest.param(50, 50, 50, True, "objects", MSGPACK, id="stage1_k-eq-n-eq-top_k"),
    pytest.param(7, 10, 100, True, "objects", JSON, id="top_k-gt-n"),
    pytest.param(1, 1, 1, True, "rows", JSON, id="n1"),
    pytest.param(1000, 10, 100, False, "objects", JSON, id="single-stage-n1000"),
    pytest.param(400, 15, None, False, "columns", MSGPACK, id="single-stage-n400"),
]


@pytest.mark.parametrize(("n", "top_k", "stage1_k", "multi_stage", "form", "ctype"), CASES)
def test_rank_equals_brute_force_reference(
    client: httpx.Client,
    candidates: Candidates,
    reference: Reference,
    n: int,
    top_k: int | None,
    stage1_k: int | None,
    multi_stage: bool,
    form: str,
    ctype: str,
) -> None:
    ids = candidates.ids(n, seed=n * 7 + (top_k or 0))
    params: dict[str, Any] = {"multi_stage": multi_stage}
    if top_k is not None:
        params["top_k"] = top_k
    if stage1_k is not None:
        params["stage1_k"] = stage1_k
    answer = rank(client, candidates, ids, form, ctype, **params)
    expected = reference.rank(candidates.mapped(ids), top_k, stage1_k, multi_stage)
    assert_matches_reference(answer, expected)


def test_ties_are_broken_by_request_index(
    client: httpx.Client, candidates: Candidates, reference: Reference
) -> None:
    """Many identical candidates score identically: the lowest indices win, in order."""
    base = candidates.ids(20, seed=11, oov_rate=0, dup_rate=0)
    ids = np.concatenate([base] * 10)  # every row 10 times, 200 candidates
    answer = rank(client, candidates, ids, "rows", JSON, top_k=30, stage1_k=60)
    expected = reference.rank(candidates.mapped(ids), 30, 60)
    assert_matches_reference(answer, expected)
    ctrs = [r["ctr"] for r in answer["rankings"]]
    idx = [r["index"] for r in answer["rankings"]]
    for a in range(len(idx) - 1):
        if ctrs[a] == ctrs[a + 1]:
            assert idx[a] < idx[a + 1]


def test_all_forms_and_content_types_give_identical_rankings(
    client: httpx.Client, candidates: Candidates, reference: Reference
) -> None:
    ids = candidates.ids(600, seed=2024)
    expected = reference.rank(candidates.mapped(ids), 12, 120)
    answers = {}
    for form in FORMS:
        for ctype in CONTENT_TYPES:
            answer = rank(client, candidates, ids, form, ctype, top_k=12, stage1_k=120)
            answers[form, ctype] = [(r["index"], r["ctr"], r["rank"]) for r in answer["rankings"]]
            assert_matches_reference(answer, expected)
    first = next(iter(answers.values()))
    assert all(a == first for a in answers.values()), answers.keys()


@pytest.mark.parametrize(
    ("ctype", "accept", "answer_type"),
    [
        (JSON, None, JSON),
        (MSGPACK, None, MSGPACK),
        (MSGPACK, JSON, JSON),
        (JSON, MSGPACK, MSGPACK),
    ],
)
def test_answer_uses_accept_else_request_type(
    client: httpx.Client,
    candidates: Candidates,
    ctype: str,
    accept: str | None,
    answer_type: str,
) -> None:
    ids = candidates.ids(30, seed=5)
    headers = {"Accept": accept} if accept else {}
    body = {"candidates": candidates.form(ids, "rows"), "top_k": 3}
    resp = post(client, "/rank", body, ctype, headers)
    assert resp.status_code == 200, resp.text[:300]
    assert resp.headers["content-type"].split(";")[0] == answer_type
    assert len(parse(resp)["rankings"]) == 3


def stage_keys(cards: dict[str, ModelCard], names: list[str]) -> list[str]:
    return [f"{cards[n].name}/{cards[n].version}" for n in names]


@pytest.mark.parametrize(
    ("n", "top_k", "stage1_k", "multi_stage"),
    [(1000, 10, 100, True), (40, 5, 100, True), (3, 10, 100, True), (250, 8, None, False)],
)
def test_response_shape(
    client: httpx.Client,
    candidates: Candidates,
    config: Config,
    cards: dict[str, ModelCard],
    n: int,
    top_k: int,
    stage1_k: int | None,
    multi_stage: bool,
) -> None:
    ids = candidates.ids(n, seed=n)
    params: dict[str, Any] = {"top_k": top_k, "multi_stage": multi_stage}
    if stage1_k is not None:
        params["stage1_k"] = stage1_k
    answer = rank(client, candidates, ids, "columns", JSON, **params)
    assert set(answer) == {f.name for f in msgspec.structs.fields(RankResponse)}
    assert not answer["degraded"] and answer["answered_by"] == "stage2" and answer["reason"] is None

    k = min(top_k, n)
    k1 = min(stage1_k or config.default_stage1_k, n)
    assert [r["rank"] for r in answer["rankings"]] == list(range(1, k + 1))
    for r in answer["rankings"]:
        assert set(r) == {"index", "ctr", "rank"}
        assert isinstance(r["index"], int) and 0 <= r["index"] < n
        assert isinstance(r["ctr"], float) and 0.0 <= r["ctr"] <= 1.0
    assert len({r["index"] for r in answer["rankings"]}) == k
    ctrs = [r["ctr"] for r in answer["rankings"]]
    assert ctrs == sorted(ctrs, reverse=True)

    latency = answer["latency"]
    assert set(latency) == {"stage1_ms", "stage2_ms", "total_ms"}
    for value in latency.values():
        assert isinstance(value, float) and value >= 0.0
    assert latency["total_ms"] >= latency["stage1_ms"] + latency["stage2_ms"] - 1e-6

    if multi_stage:
        assert answer["stats"] == {"input": n, "after_stage1": k1, "output": k}
        assert answer["models"] == stage_keys(cards, [s.model for s in config.stages])
        assert latency["stage1_ms"] > 0.0 and latency["stage2_ms"] > 0.0
    else:
        # One stage, no cut before it: everything "survives" stage 1; the single stage
        # fills the last latency slot.
        assert answer["stats"] == {"input": n, "after_stage1": n, "output": k}
        assert answer["models"] == stage_keys(cards, [config.predict_model])
        assert latency["stage1_ms"] == 0.0 and latency["stage2_ms"] > 0.0


@pytest.mark.parametrize("ctype", CONTENT_TYPES)
def test_predict_one_candidate_equals_direct_run(
    client: httpx.Client,
    candidates: Candidates,
    reference: Reference,
    config: Config,
    cards: dict[str, ModelCard],
    ctype: str,
) -> None:
    ids = candidates.ids(1, seed=99, oov_rate=0.2)
    resp = post(client, "/predict", {"candidate": candidates.form(ids, "objects")[0]}, ctype)
    assert resp.status_code == 200, resp.text[:300]
    answer = parse(resp)
    card = cards[config.predict_model]
    assert answer["model"] == card.name and answer["version"] == card.version
    want = reference.score(config.predict_model, candidates.mapped(ids))
    assert np.array_equal(np.array(answer["ctr"], dtype=np.float32), want)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("model", [None, "deepfm", "autoint"])
def test_predict_small_list_equals_direct_run(
    client: httpx.Client,
    candidates: Candidates,
    reference: Reference,
    config: Config,
    cards: dict[str, ModelCard],
    form: str,
    model: str | None,
) -> None:
    ids = candidates.ids(9, seed=len(form))
    body: dict[str, Any] = {"candidates": candidates.form(ids, form)}
    if model:
        body["model"] = model
    resp = post(client, "/predict", body, MSGPACK if form == "rows" else JSON)
    assert resp.status_code == 200, resp.text[:300]
    answer = parse(resp)
    name = model or config.predict_model
    assert answer["model"] == cards[name].name and answer["version"] == cards[name].version
    want = reference.score(name, candidates.mapped(ids))
    got = np.array(answer["ctr"], dtype=np.float64)
    assert got.shape == want.shape
    assert np.array_equal(got.astype(np.float32), want)
    assert np.array_equal(got, want.astype(np.float64))
