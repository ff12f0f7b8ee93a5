"""app.catalog: the versions under a root, validation as a worker validates (bundled models
and broken copies, each failing with a clear reason), and what the config serves."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from app import registry
from app.catalog import resolve, roles, validate, version_dirs
from app.config import REPO_ROOT, Config, load
from app.errors import ModelLoadError
from app.sessions import CARD_FILE, MODEL_FILE, LoadedModel, sha256_of
from tests.fake_models import write_model

MODELS = REPO_ROOT / "models"


@pytest.fixture
def settings() -> Config:
    return load(env={})


@pytest.fixture
def bundled_copy(tmp_path: Path) -> Path:
    """A copy of the bundled deepfm/1 (card, onnx, golden.json) in ``<tmp>/models``."""
    dest = tmp_path / "models" / "deepfm" / "1"
    shutil.copytree(MODELS / "deepfm" / "1", dest)
    return dest


def edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# -- finding -------------------------------------------------------------------------------------
def test_version_dirs_at_every_level(tmp_path: Path) -> None:
    for version in ("1", "2", "10"):
        write_model(tmp_path, "deepfm", version)
    write_model(tmp_path, "autoint", "3")
    shutil.copytree(tmp_path / "deepfm" / "2", tmp_path / "deepfm" / ".incoming-11-ab")
    keys = [f"{p.parent.name}/{p.name}" for p in version_dirs(tmp_path)]
    assert keys == ["autoint/3", "deepfm/1", "deepfm/2", "deepfm/10"]  # numeric, no hidden
    assert [p.name for p in version_dirs(tmp_path / "deepfm")] == ["1", "2", "10"]
    assert version_dirs(tmp_path / "deepfm" / "2") == [tmp_path / "deepfm" / "2"]
    assert version_dirs(tmp_path / "nothing") == []


def test_resolve_name_version_and_path(tmp_path: Path) -> None:
    for version in ("1", "2", "10"):
        write_model(tmp_path, "deepfm", version)
    assert resolve(tmp_path, "deepfm") == tmp_path / "deepfm" / "10"  # the newest
    assert resolve(tmp_path, "deepfm/2") == tmp_path / "deepfm" / "2"
    assert resolve(tmp_path, str(tmp_path / "deepfm" / "1")) == tmp_path / "deepfm" / "1"
    with pytest.raises(ModelLoadError, match=r"no model 'deepfm/9' .*known: deepfm/1, deepfm/2"):
        resolve(tmp_path, "deepfm/9")


def test_roles_follow_the_settings(tmp_path: Path) -> None:
    for version in ("1", "2"):
        write_model(tmp_path, "deepfm", version)
        write_model(tmp_path, "autoint", version)
    config = load(
        overrides={
            "deepfm_model": str(tmp_path / "deepfm"),  # the repository: its newest
            "autoint_model": str(tmp_path / "autoint" / "1"),  # pinned
            "stages": [{"model": "deepfm", "keep_k": 50}, {"model": "autoint"}],
        },
        env={},
    )
    assert roles(config) == {
        (tmp_path / "deepfm" / "2").resolve(): ["stage 1 (keeps 50)"],
        (tmp_path / "autoint" / "1").resolve(): ["stage 2", "/predict"],
    }


# -- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["deepfm", "autoint"])
def test_bundled_models_validate_with_their_golden_request(name: str, settings: Config) -> None:
    check = validate(MODELS / name / "1", settings)
    assert check.ok, check.error
    assert check.key == f"{name}/1" and check.golden_rows == registry.GOLDEN_ROWS


def flip_a_byte(version: Path) -> None:
    data = bytearray((version / MODEL_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (version / MODEL_FILE).write_bytes(bytes(data))


def not_onnx_with_a_matching_card(version: Path) -> None:
    (version / MODEL_FILE).write_bytes(b"not an onnx model at all")

    def match(card: dict) -> None:
        card["sha256"] = sha256_of(version / MODEL_FILE)
        card["size_bytes"] = (version / MODEL_FILE).stat().st_size

    edit_json(version / CARD_FILE, match)


def golden_moved(version: Path) -> None:
    edit_json(version / registry.GOLDEN_FILE, lambda g: g["ctr"].__setitem__(3, g["ctr"][3] * 1.01))


BREAKAGES: list[tuple[str, Callable[[Path], None], str]] = [
    ("flipped byte", flip_a_byte, r"sha256 [0-9a-f]{64} does not match card 3d52c260"),
    ("not onnx", not_onnx_with_a_matching_card, r"onnxruntime cannot load it"),
    ("golden moved", golden_moved, r"deepfm/1: the golden request scores differently"),
    (
        "golden unreadable",
        lambda v: (v / registry.GOLDEN_FILE).write_text("{"),
        r"unreadable golden\.json",
    ),
    ("card not json", lambda v: (v / CARD_FILE).write_text("{oops"), r"cannot read model card"),
    (
        "card lacks sha256",
        lambda v: edit_json(v / CARD_FILE, lambda c: c.pop("sha256")),
        r"cannot read model card .*sha256",
    ),
    ("no model file", lambda v: (v / MODEL_FILE).unlink(), r"cannot read .*model\.onnx"),
    (
        "card of another version",
        lambda v: edit_json(v / CARD_FILE, lambda c: c.update(version="2")),
        r"deepfm/1 holds a card for version '2'",
    ),
    (
        "card of another model",
        lambda v: edit_json(v / CARD_FILE, lambda c: c.update(name="autoint")),
        r"model dir for 'deepfm' holds a card named 'autoint'",
    ),
]


@pytest.mark.parametrize(
    ("fault", "message"), [b[1:] for b in BREAKAGES], ids=[b[0] for b in BREAKAGES]
)
def test_a_broken_copy_fails_with_a_clear_message(
    bundled_copy: Path, settings: Config, fault: Callable[[Path], None], message: str
) -> None:
    assert validate(bundled_copy, settings).ok
    fault(bundled_copy)
    check = validate(bundled_copy, settings)
    assert not check.ok
    assert re.search(message, check.error or ""), check.error


def test_validation_checks_sha256_even_when_the_farm_would_not(
    bundled_copy: Path, settings: Config
) -> None:
    flip_a_byte(bundled_copy)
    lax = load(overrides={"verify_sha256": False}, env={})
    assert not validate(bundled_copy, lax).ok


def test_a_version_without_golden_json_passes_and_says_so(tmp_path: Path, settings) -> None:
    version = write_model(tmp_path, "deepfm")
    check = validate(version, settings)
    assert check.ok, check.error
    assert check.golden_rows == 0
    registry.write_golden(LoadedModel(version, pool_size=1))
    assert validate(version, settings).golden_rows == registry.GOLDEN_ROWS


def test_a_model_scoring_nan_fails(tmp_path: Path, settings: Config) -> None:
    check = validate(write_model(tmp_path, "deepfm", kind="nan"), settings)
    assert not check.ok
    assert "non-finite scores" in (check.error or "")
