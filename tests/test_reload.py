"""Farm versions and hot reload over fake ONNX models (app/service.py, app/registry.py).

Model settings name repositories (``<root>/<name>``), so the newest valid version
serves and ``Farm.reload()`` moves to a newer one; broken versions are rejected with
their reason while the serving version stays.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app import registry
from app.config import Config, load
from app.errors import ModelLoadError
from app.service import Farm
from app.sessions import LoadedModel
from tests.fake_models import FIELDS, write_model
from tests.test_sessions import direct_run


def repo_config(root: Path, **overrides: object) -> Config:
    base = {
        "deepfm_model": str(root / "deepfm"),
        "autoint_model": str(root / "autoint"),
        "warmup_runs": 0,
        "inference": "inline",
    }
    return load(overrides={**base, **overrides}, env={})


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_model(tmp_path, "deepfm", seed=1)
    write_model(tmp_path, "autoint", seed=2)
    return tmp_path


@pytest.fixture
def farm(root: Path) -> Iterator[Farm]:
    farm = Farm(repo_config(root))
    farm.load()
    yield farm
    farm.close()


def batch(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, [v for _, v in FIELDS], size=(n, len(FIELDS))).astype(np.int64)


def test_the_newest_version_serves(root: Path) -> None:
    write_model(root, "autoint", version="2", seed=3)
    write_model(root, "autoint", version="10", seed=4)
    farm = Farm(repo_config(root))
    farm.load()
    try:
        assert farm.models["autoint"].key == "autoint/10"
        assert farm.generation == 1 and farm.rejected == {}
    finally:
        farm.close()


def test_a_broken_newest_version_at_boot_falls_back_to_the_previous(root: Path) -> None:
    write_model(root, "autoint", version="2", kind="corrupt")
    farm = Farm(repo_config(root))
    farm.load()
    try:
        assert farm.models["autoint"].key == "autoint/1"
        assert "onnxruntime cannot load it" in farm.rejected["autoint/2"]
        rejected, _ = farm.models_status()
        assert [(r.name, r.version) for r in rejected] == [("autoint", "2")]
        assert str(root) not in rejected[0].reason  # no file system paths in answers
    finally:
        farm.close()


def test_no_valid_version_stops_the_boot(tmp_path: Path) -> None:
    write_model(tmp_path, "deepfm", seed=1)
    write_model(tmp_path, "autoint", kind="corrupt")
    with pytest.raises(ModelLoadError, match="no valid version of model 'autoint'"):
        Farm(repo_config(tmp_path)).load()


def test_reload_switches_to_a_new_version(root: Path, farm: Farm) -> None:
    ids = batch(40)
    before = farm.pipeline
    assert before is not None
    old = before.rank(ids, top_k=5, stage1_k=20)
    new_dir = write_model(root, "autoint", version="2", seed=7)

    status = farm.reload()

    assert status.changed == ["autoint/2"] and status.generation == 2 == farm.generation
    assert farm.models["autoint"].key == "autoint/2"
    assert farm.models["deepfm"] is before.stages[0].scorer  # unchanged versions stay
    result = farm.pipeline.rank(ids, top_k=5, stage1_k=20)
    assert result.models == ["deepfm/1", "autoint/2"]
    # Stage 2 is the new model: its top 5 of stage 1's 20, brute force.
    # (top_k = stage1_k: every stage-1 survivor comes back, i.e. the set stage 2 sees.)
    kept = np.sort(before.rank(ids, top_k=20, stage1_k=20).indices)
    s2 = direct_run(new_dir, ids[kept])
    want = kept[np.lexsort((kept, -s2))][:5]
    assert result.indices.tolist() == want.tolist()
    # A request that took the old lineup before the switch still finishes on it.
    assert before.rank(ids, top_k=5, stage1_k=20).indices.tolist() == old.indices.tolist()


def test_reload_with_nothing_new_is_a_no_op(farm: Farm) -> None:
    lineup = farm._lineup
    status = farm.reload()
    assert status.changed == [] and status.generation == 1
    assert farm._lineup is lineup


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("corrupt", "onnxruntime cannot load it"),
        ("hash", "does not match card"),
        ("fields", "takes fields"),
        ("golden", "golden request"),
        ("card", "holds a card for version"),
    ],
)
def test_a_bad_version_is_rejected_and_the_old_keeps_serving(
    root: Path, farm: Farm, kind: str, reason: str
) -> None:
    if kind == "corrupt":
        write_model(root, "autoint", version="2", kind="corrupt")
    elif kind == "hash":
        out = write_model(root, "autoint", version="2", seed=5)
        (out / "model.onnx").write_bytes((out / "model.onnx").read_bytes() + b"\0")
    elif kind == "fields":
        write_model(root, "autoint", version="2", fields=(*FIELDS[:3], ("device", 5)))
    elif kind == "golden":
        out = write_model(root, "autoint", version="2", seed=5)
        gold = write_model(root / "other", "autoint", seed=6)
        registry.write_golden(LoadedModel(gold, pool_size=1))
        (out / registry.GOLDEN_FILE).write_bytes((gold / registry.GOLDEN_FILE).read_bytes())
    else:  # a card that says version 3 in dir 2
        out = write_model(root / "other", "autoint", version="3", seed=5)
        (root / "autoint" / "2").mkdir()
        for f in out.iterdir():
            (root / "autoint" / "2" / f.name).write_bytes(f.read_bytes())
    lineup = farm._lineup

    status = farm.reload()

    assert status.changed == [] and farm._lineup is lineup
    assert farm.models["autoint"].key == "autoint/1"
    assert [(r.name, r.version) for r in status.rejected] == [("autoint", "2")]
    assert reason in status.rejected[0].reason
    assert farm.pipeline.rank(batch(30), top_k=3, stage1_k=10).models == ["deepfm/1", "autoint/1"]


def test_reload_keeps_breakers_and_costs_of_unchanged_versions(root: Path, farm: Farm) -> None:
    breaker = farm.breakers["deepfm/1"]
    cost = farm.pipeline.costs["deepfm/1"]
    write_model(root, "autoint", version="2", seed=7)
    farm.reload()
    assert farm.breakers["deepfm/1"] is breaker
    assert farm.pipeline.costs["deepfm/1"] is cost
    assert set(farm.breakers) == {"deepfm/1", "autoint/2"}


def test_pinned_versions_do_not_move(root: Path) -> None:
    farm = Farm(repo_config(root, autoint_model=str(root / "autoint" / "1")))
    farm.load()
    try:
        write_model(root, "autoint", version="2", seed=7)
        assert farm.reload().changed == []
        assert farm.models["autoint"].key == "autoint/1"
    finally:
        farm.close()


def test_concurrent_reloads_run_one_at_a_time(root: Path, farm: Farm) -> None:
    write_model(root, "autoint", version="2", seed=7)
    results = []
    threads = [threading.Thread(target=lambda: results.append(farm.reload())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(r.changed) for r in results) == [0, 0, 0, 1]
    assert farm.generation == 2
