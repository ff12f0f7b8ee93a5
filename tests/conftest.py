"""Shared fixtures for the unit tests: fake ONNX models, a loaded Farm, an in-process client.

The fake models (``tests/fake_models.py``) are small real ONNX graphs, so these tests
never depend on the trained models under ``models/``. The integration tests have their
own conftest; the fixtures here are generic enough for them to reuse.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import falcon.testing
import pytest

from app.api import create_app
from app.config import Config, load
from app.service import Farm
from tests.fake_models import FIELDS, write_model

#: Seeds of the two fake models: different, so the stages disagree on the order.
DEEPFM_SEED, AUTOINT_SEED = 1, 2
FIELD_NAMES = tuple(name for name, _ in FIELDS)
VOCAB = {name: size for name, size in FIELDS}


@pytest.fixture(scope="session")
def fake_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models root with ``deepfm/1`` and ``autoint/1`` fake models (shared, read-only)."""
    root = tmp_path_factory.mktemp("models")
    write_model(root, "deepfm", seed=DEEPFM_SEED)
    write_model(root, "autoint", seed=AUTOINT_SEED)
    return root


def config_for(models: Path, **overrides: Any) -> Config:
    """A Config over a fake models root, ignoring the real environment."""
    base: dict[str, Any] = {
        "deepfm_model": str(models / "deepfm" / "1"),
        "autoint_model": str(models / "autoint" / "1"),
        "warmup_runs": 0,
    }
    return load(overrides={**base, **overrides}, env={})


@pytest.fixture
def make_config(fake_models: Path) -> Callable[..., Config]:
    """``make_config(pool_size=2, ...)`` -> a Config over the shared fake models."""

    def make(**overrides: Any) -> Config:
        return config_for(fake_models, **overrides)

    return make


@pytest.fixture
def config(make_config: Callable[..., Config]) -> Config:
    return make_config()


@pytest.fixture
def make_farm() -> Iterator[Callable[[Config], Farm]]:
    """``make_farm(config)`` -> a loaded Farm, closed at teardown."""
    farms: list[Farm] = []

    def make(config: Config) -> Farm:
        farm = Farm(config)
        farms.append(farm)
        farm.load()
        return farm

    yield make
    for farm in farms:
        farm.close()


@pytest.fixture
def farm(config: Config, make_farm: Callable[[Config], Farm]) -> Farm:
    return make_farm(config)


def client_for(farm: Farm, config: Config | None = None) -> falcon.testing.TestClient:
    """An in-process client over ``create_app`` for a farm the caller manages."""
    app = create_app(config or farm.config, farm, manage_lifecycle=False)
    return falcon.testing.TestClient(app)


@pytest.fixture
def client(farm: Farm) -> falcon.testing.TestClient:
    return client_for(farm)


def candidate_objects(rows: Any) -> list[dict[str, int]]:
    """Rows of ids (card field order) -> the ``objects`` form."""
    return [dict(zip(FIELD_NAMES, map(int, row), strict=True)) for row in rows]


def candidate_columns(rows: Any) -> dict[str, list[int]]:
    """Rows of ids (card field order) -> the ``columns`` form."""
    return {name: [int(row[i]) for row in rows] for i, name in enumerate(FIELD_NAMES)}


def as_form(rows: Any, form: str) -> Any:
    if form == "objects":
        return candidate_objects(rows)
    if form == "columns":
        return candidate_columns(rows)
    return [[int(v) for v in row] for row in rows]
