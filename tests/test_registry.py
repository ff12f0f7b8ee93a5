"""The model repository: versions, the golden request, atomic publish (app/registry.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app import registry
from app.errors import ModelLoadError
from app.sessions import LoadedModel
from tests.fake_models import write_model


def load(path: Path) -> LoadedModel:
    return LoadedModel(path, pool_size=1)


def test_versions_are_numbered_dirs_with_a_card_in_numeric_order(tmp_path: Path) -> None:
    for version in ("2", "10", "1"):
        write_model(tmp_path, "m", version=version)
    (tmp_path / "m" / "11").mkdir()  # no card: not a version
    shutil.copytree(tmp_path / "m" / "2", tmp_path / "m" / ".incoming-12-abcd")
    shutil.copytree(tmp_path / "m" / "2", tmp_path / "m" / "latest")
    assert [p.name for p in registry.versions(tmp_path / "m")] == ["1", "2", "10"]
    assert [p.name for p in registry.candidates(tmp_path / "m")] == ["10", "2", "1"]


def test_a_version_dir_is_pinned(tmp_path: Path) -> None:
    write_model(tmp_path, "m", version="1")
    write_model(tmp_path, "m", version="2")
    assert registry.candidates(tmp_path / "m" / "1") == [tmp_path / "m" / "1"]


def test_a_repository_without_versions_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelLoadError, match="no model version"):
        registry.candidates(tmp_path / "m")


def test_golden_request_round_trip_and_mismatch(tmp_path: Path) -> None:
    model = load(write_model(tmp_path, "m", seed=3))
    assert registry.check_golden(model) is False  # none yet
    registry.write_golden(model)
    assert registry.check_golden(model) is True
    golden = json.loads((model.dir / registry.GOLDEN_FILE).read_text())
    assert len(golden["ids"]) == registry.GOLDEN_ROWS == len(golden["ctr"])
    # Every field's OOV index is among the golden ids (the OOV rows are exercised).
    columns = list(zip(*golden["ids"], strict=True))
    assert any(max(col) == f.vocab_size for col, f in zip(columns, model.card.fields, strict=True))
    golden["ctr"][0] += 0.01
    (model.dir / registry.GOLDEN_FILE).write_text(json.dumps(golden))
    with pytest.raises(ModelLoadError, match="scores differently"):
        registry.check_golden(model)


def test_golden_request_from_another_model_fails(tmp_path: Path) -> None:
    a = load(write_model(tmp_path, "a", seed=1))
    b = load(write_model(tmp_path, "b", seed=2))
    registry.write_golden(a)
    shutil.copy(a.dir / registry.GOLDEN_FILE, b.dir / registry.GOLDEN_FILE)
    with pytest.raises(ModelLoadError, match="scores differently"):
        registry.check_golden(b)


def test_publish_is_atomic_and_records_a_golden(tmp_path: Path) -> None:
    src = write_model(tmp_path / "build", "m", version="2", seed=5)
    repo = tmp_path / "repo" / "m"
    write_model(tmp_path / "repo", "m", version="1")
    target = registry.publish(src, repo, load)
    assert target == repo / "2"
    assert (target / registry.GOLDEN_FILE).is_file()
    assert registry.check_golden(load(target)) is True
    assert sorted(p.name for p in repo.iterdir()) == ["1", "2"]  # no staging dir left
    with pytest.raises(ModelLoadError, match="already exists"):
        registry.publish(src, repo, load)


def test_publish_of_a_broken_version_leaves_nothing_behind(tmp_path: Path) -> None:
    src = write_model(tmp_path / "build", "m", version="3", kind="corrupt")
    repo = tmp_path / "repo" / "m"
    write_model(tmp_path / "repo", "m", version="1")
    with pytest.raises(ModelLoadError):
        registry.publish(src, repo, load)
    assert sorted(p.name for p in repo.iterdir()) == ["1"]  # no "3", no staging dir


def test_publish_needs_a_numeric_version(tmp_path: Path) -> None:
    src = write_model(tmp_path / "build", "m", version="beta")
    with pytest.raises(ModelLoadError, match="not a number"):
        registry.publish(src, tmp_path / "repo" / "m", load)


def test_committed_models_pass_their_golden_request() -> None:
    root = Path(__file__).resolve().parent.parent / "models"
    for name in ("deepfm", "autoint"):
        for version_dir in registry.versions(root / name):
            assert registry.check_golden(load(version_dir)) is True, version_dir
