"""app.service.Farm: lifecycle, model agreement, rank and predict over fake ONNX models."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from app.config import Config
from app.errors import InvalidRequest, ModelLoadError, NotReady
from app.schema import PredictRequest, RankRequest
from app.service import Farm, load_model
from tests.conftest import as_form, config_for
from tests.fake_models import FIELDS, write_model
from tests.test_sessions import direct_run


def raw(value: Any, kind: str = "json") -> msgspec.Raw:
    enc = msgspec.json.encode if kind == "json" else msgspec.msgpack.encode
    return msgspec.Raw(enc(value))


def rows(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, [7, 24, 35, 400], size=(n, 4)).tolist()


# -- lifecycle -----------------------------------------------------------------------------
def test_not_ready_before_load(config: Config) -> None:
    farm = Farm(config)
    assert not farm.ready
    with pytest.raises(NotReady):
        farm.rank(RankRequest(candidates=raw(rows(3))), "json")
    with pytest.raises(NotReady):
        farm.predict(PredictRequest(candidate=raw(as_form(rows(1), "objects")[0])), "json")


def test_load_then_close(config: Config) -> None:
    farm = Farm(config)
    farm.load()
    assert farm.ready
    assert set(farm.models) == {"deepfm", "autoint"}
    assert farm.features is not None
    assert farm.features.names == tuple(n for n, _ in FIELDS)
    farm.close()
    assert not farm.ready
    with pytest.raises(NotReady):
        farm.rank(RankRequest(candidates=raw(rows(3))), "json")


@pytest.mark.parametrize("inference", ["executor", "inline"])
def test_call_after_close_is_not_ready(make_config, inference: str) -> None:
    farm = Farm(make_config(inference=inference))
    farm.load()
    farm.close()
    request = RankRequest(candidates=raw(rows(3)))
    with pytest.raises(NotReady):
        asyncio.run(farm.call(farm.rank, request, "json"))


def test_each_model_is_loaded_once(make_config: Callable[..., Config]) -> None:
    config = make_config(
        stages=[
            {"model": "deepfm", "keep_k": 50},
            {"model": "deepfm", "keep_k": 20},
            {"model": "autoint"},
        ],
        predict_model="deepfm",
        warmup_runs=2,
    )
    loaded: list[str] = []

    def factory(name: str, model_dir: Path, cfg: Config):
        loaded.append(name)
        return load_model(name, model_dir, cfg)

    farm = Farm(config, model_factory=factory)
    farm.load()
    try:
        assert loaded == ["deepfm", "autoint"]
        assert [s.scorer for s in farm.pipeline.stages] == [
            farm.models["deepfm"],
            farm.models["deepfm"],
            farm.models["autoint"],
        ]
        assert farm.pipeline.baseline is farm.models["deepfm"]
    finally:
        farm.close()


def test_models_disagreeing_on_fields(tmp_path: Path) -> None:
    write_model(tmp_path, "deepfm")
    write_model(tmp_path, "autoint", fields=(*FIELDS[:3], ("device", 5)))
    farm = Farm(config_for(tmp_path))
    with pytest.raises(ModelLoadError, match="disagree"):
        farm.load()
    assert not farm.ready


def test_models_with_the_same_fields_in_another_order_disagree(tmp_path: Path) -> None:
    write_model(tmp_path, "deepfm")
    write_model(tmp_path, "autoint", fields=tuple(reversed(FIELDS)))
    with pytest.raises(ModelLoadError, match="disagree"):
        Farm(config_for(tmp_path)).load()


def test_model_dir_holding_another_models_card(fake_models: Path) -> None:
    config = config_for(fake_models, autoint_model=str(fake_models / "deepfm" / "1"))
    with pytest.raises(ModelLoadError, match="holds a card named 'deepfm'"):
        Farm(config).load()


def test_a_broken_model_stops_the_load(tmp_path: Path) -> None:
    write_model(tmp_path, "deepfm")
    write_model(tmp_path, "autoint", kind="corrupt")
    farm = Farm(config_for(tmp_path))
    with pytest.raises(ModelLoadError):
        farm.load()
    assert not farm.ready


# -- rank ----------------------------------------------------------------------------------
def reference_rank(fake_models: Path, ids: np.ndarray, top_k: int, stage1_k: int):
    s1 = direct_run(fake_models / "deepfm" / "1", ids)
    order = sorted(range(len(ids)), key=lambda i: (-s1[i], i))[:stage1_k]
    alive = sorted(order)
    s2 = direct_run(fake_models / "autoint" / "1", ids[alive])
    best = sorted(range(len(alive)), key=lambda j: (-s2[j], alive[j]))[:top_k]
    return [alive[j] for j in best], [float(s2[j]) for j in best]


@pytest.mark.parametrize("kind", ["json", "msgpack"])
@pytest.mark.parametrize("form", ["objects", "rows", "columns"])
def test_rank_matches_the_models(farm: Farm, fake_models: Path, form: str, kind: str) -> None:
    cands = rows(300, seed=4)
    request = RankRequest(candidates=raw(as_form(cands, form), kind), top_k=7, stage1_k=40)
    result = farm.rank(request, kind)
    want_idx, want_scores = reference_rank(fake_models, np.array(cands), 7, 40)
    assert result.indices.tolist() == want_idx
    assert result.scores.tolist() == want_scores
    assert (result.n_input, result.after_stage1) == (300, 40)
    assert result.models == ["deepfm/1", "autoint/1"]


def test_rank_defaults_come_from_config(make_config, make_farm) -> None:
    farm = make_farm(
        make_config(
            default_top_k=4, stages=[{"model": "deepfm", "keep_k": 25}, {"model": "autoint"}]
        )
    )
    result = farm.rank(RankRequest(candidates=raw(rows(100))), "json")
    assert len(result.indices) == 4
    assert result.after_stage1 == 25


@pytest.mark.parametrize(("stage1_k", "top_k", "expected"), [(5, None, 5), (50, None, 10)])
def test_default_top_k_never_exceeds_an_explicit_stage1_k(
    farm: Farm, stage1_k: int, top_k: int | None, expected: int
) -> None:
    request = RankRequest(candidates=raw(rows(100)), stage1_k=stage1_k, top_k=top_k)
    result = farm.rank(request, "json")
    assert (len(result.indices), result.after_stage1) == (expected, stage1_k)


def test_rank_single_stage_uses_predict_model(farm: Farm, fake_models: Path) -> None:
    cands = rows(50, seed=9)
    result = farm.rank(RankRequest(candidates=raw(cands), top_k=5, multi_stage=False), "json")
    scores = direct_run(fake_models / "autoint" / "1", np.array(cands))
    assert result.indices.tolist() == sorted(range(50), key=lambda i: (-scores[i], i))[:5]
    assert result.models == ["autoint/1"]


def test_rank_maps_oov_before_scoring(farm: Farm, fake_models: Path) -> None:
    cands = [[-1, 99, 2**40, 400], [6, 23, 34, 399]]
    result = farm.rank(RankRequest(candidates=raw(cands), top_k=2, stage1_k=2), "json")
    mapped = np.array([[7, 24, 35, 400], [6, 23, 34, 399]])
    want, _ = reference_rank(fake_models, mapped, 2, 2)
    assert result.indices.tolist() == want
    assert farm.features.oov_counter.snapshot() == {
        "weekday": 1,
        "hour": 1,
        "region": 1,
        "city": 1,
    }


# -- predict -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "used"), [(None, "autoint"), ("deepfm", "deepfm"), ("autoint", "autoint")]
)
def test_predict_scores_with_the_named_model(
    farm: Farm, fake_models: Path, model: str | None, used: str
) -> None:
    cands = rows(5, seed=2)
    scores, scorer = farm.predict(PredictRequest(candidates=raw(cands), model=model), "json")
    assert scorer.key == f"{used}/1"
    np.testing.assert_array_equal(scores, direct_run(fake_models / used / "1", np.array(cands)))


@pytest.mark.parametrize("kind", ["json", "msgpack"])
def test_predict_one_candidate(farm: Farm, fake_models: Path, kind: str) -> None:
    one = as_form(rows(1, seed=3), "objects")[0]
    scores, _ = farm.predict(PredictRequest(candidate=raw(one, kind)), kind)
    assert scores.shape == (1,)
    want = direct_run(fake_models / "autoint" / "1", np.array([list(one.values())]))
    np.testing.assert_array_equal(scores, want)


@pytest.mark.parametrize("model", ["gbdt", "DEEPFM", "deepfm/1", " autoint"])
def test_predict_unknown_model(farm: Farm, model: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        farm.predict(PredictRequest(candidates=raw(rows(2)), model=model), "json")
    assert info.value.field == "model"
    assert "autoint" in info.value.message  # lists what is loaded


@pytest.mark.parametrize(
    "request_",
    [
        PredictRequest(),
        PredictRequest(candidate=raw(as_form(rows(1), "objects")[0]), candidates=raw(rows(2))),
    ],
    ids=["neither", "both"],
)
def test_predict_needs_exactly_one_of_candidate_or_candidates(
    farm: Farm, request_: PredictRequest
) -> None:
    with pytest.raises(InvalidRequest, match="exactly one"):
        farm.predict(request_, "json")


def test_max_predict_candidates(make_config, make_farm) -> None:
    farm = make_farm(make_config(max_predict_candidates=5))
    scores, _ = farm.predict(PredictRequest(candidates=raw(rows(5))), "json")
    assert scores.shape == (5,)
    with pytest.raises(InvalidRequest, match="at most 5") as info:
        farm.predict(PredictRequest(candidates=raw(rows(6))), "json")
    assert info.value.field == "candidates"


# -- introspection and call ----------------------------------------------------------------
def test_summaries(make_config, make_farm) -> None:
    farm = make_farm(
        make_config(
            stages=[{"model": "autoint", "keep_k": 30}, {"model": "autoint"}],
            predict_model="deepfm",
            pool_size=2,
        )
    )
    by_name = {s.name: s for s in farm.summaries()}
    assert set(by_name) == {"autoint", "deepfm"}
    assert by_name["autoint"].stages == [1, 2]
    assert by_name["deepfm"].stages == []
    assert by_name["deepfm"].pool_size == 2
    assert by_name["deepfm"].fields == [n for n, _ in FIELDS]
    assert by_name["deepfm"].sha256 == farm.models["deepfm"].card.sha256


@pytest.mark.parametrize(("inference", "in_executor"), [("executor", True), ("inline", False)])
def test_call_runs_where_configured(make_config, make_farm, inference: str, in_executor: bool):
    farm = make_farm(make_config(inference=inference))

    async def where() -> str:
        return await farm.call(lambda: threading.current_thread().name)

    name = asyncio.run(where())
    assert name.startswith("infer") == in_executor
    assert (name == threading.current_thread().name) == (not in_executor)


@pytest.mark.parametrize(
    ("inference", "cost", "on_loop_thread"),
    [
        ("auto", 100, True),  # a single prediction: inline, no thread hop
        ("auto", 16 * 1024, True),
        ("auto", 16 * 1024 + 1, False),  # a ranking body: off the event loop
        ("executor", 100, False),
        ("inline", 10**7, True),
    ],
)
def test_call_runs_inline_or_on_the_executor_by_cost(
    make_config, make_farm, inference: str, cost: int, on_loop_thread: bool
) -> None:
    farm = make_farm(make_config(inference=inference))

    async def where() -> bool:
        loop_thread = threading.get_ident()
        ran_on = await farm.call(threading.get_ident, body_bytes=cost)
        return ran_on == loop_thread

    assert asyncio.run(where()) is on_loop_thread
