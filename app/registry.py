"""The model repository: ``models/<name>/<version>/``, which version to serve, and how a
new version gets in.

A model setting (``deepfm_model``, ``autoint_model``) names either one version directory
(it holds ``card.json``: that version is *pinned*) or a model's repository directory (its
numbered subdirectories are the versions; the newest that passes validation is served).

Validation of a version, at boot and at every reload, before it serves a request:
the card parses, the file's sha256 matches the card, ONNX Runtime loads it with the
card's signature, warm-up runs, and the *golden request* (``golden.json``: a few fixed
rows and the scores recorded when the version was made) scores the same within
``GOLDEN_RTOL``. A version failing any step is rejected with its reason; an older one
(or the one already serving) goes on serving.

Publishing is atomic: :func:`publish` copies the files to a hidden directory inside the
repository, validates them there, then renames it to the version's number, so a worker
never sees half a version. Hidden and non-numeric directories are never versions.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np

from app.errors import ModelLoadError
from app.sessions import CARD_FILE, LoadedModel, read_card

log = logging.getLogger(__name__)

GOLDEN_FILE = "golden.json"
#: Relative tolerance of the golden request (float32 through another build of the
#: same ORT on another CPU: kernels may sum in another order).
GOLDEN_RTOL, GOLDEN_ATOL = 1e-4, 1e-6
GOLDEN_ROWS = 16


class Golden(msgspec.Struct, frozen=True):
    """A fixed request and the scores its version gave when it was made."""

    ids: list[list[int]]
    ctr: list[float]


def is_version(path: Path) -> bool:
    return (path / CARD_FILE).is_file()


def versions(repo: Path) -> list[Path]:
    """The version directories of a model repository, oldest first (numeric order)."""
    if not repo.is_dir():
        return []
    found = [p for p in repo.iterdir() if p.name.isdigit() and is_version(p)]
    return sorted(found, key=lambda p: int(p.name))


def candidates(setting: Path) -> list[Path]:
    """Versions a model setting may serve, in order of preference (newest first)."""
    if is_version(setting):
        return [setting]
    found = versions(setting)
    if not found:
        raise ModelLoadError(f"{setting.name}: no model version (no */{CARD_FILE}) found")
    return found[::-1]


def newest(setting: Path) -> Path:
    """The version dir a setting names: itself if pinned, else the newest (unvalidated)."""
    return candidates(setting)[0]


def golden_rows(model: LoadedModel, rows: int = GOLDEN_ROWS, seed: int = 0) -> np.ndarray:
    """Deterministic ids across each field's range, including its OOV index."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f.vocab_size for f in model.card.fields])
    ids = (rng.random((rows, len(vocab))) * (vocab + 1)).astype(np.int64)
    return np.minimum(ids, vocab)


def write_golden(model: LoadedModel) -> Path:
    """Record the golden request of a version (scores from this model as loaded now)."""
    ids = golden_rows(model)
    scores = model.run(ids)
    path = model.dir / GOLDEN_FILE
    path.write_bytes(msgspec.json.encode(Golden(ids=ids.tolist(), ctr=scores.tolist())))
    return path


def check_golden(model: LoadedModel) -> bool:
    """Score the version's golden request; False if it has none, ModelLoadError if it
    scores differently."""
    path = model.dir / GOLDEN_FILE
    if not path.is_file():
        return False
    try:
        golden = msgspec.json.decode(path.read_bytes(), type=Golden)
    except (OSError, msgspec.DecodeError) as exc:
        raise ModelLoadError(f"{model.key}: unreadable {GOLDEN_FILE}: {exc}") from exc
    ids = np.asarray(golden.ids, dtype=np.int64)
    want = np.asarray(golden.ctr, dtype=np.float32)
    try:
        got = model.run(ids)
    except Exception as exc:  # a ModelError, or a golden file of the wrong width
        raise ModelLoadError(f"{model.key}: the golden request fails: {exc}") from exc
    if got.shape != want.shape or not np.allclose(got, want, rtol=GOLDEN_RTOL, atol=GOLDEN_ATOL):
        worst = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("nan")
        raise ModelLoadError(
            f"{model.key}: the golden request scores differently (max abs diff {worst:.3g})"
        )
    return True


def next_version(repo: Path) -> str:
    existing = [int(p.name) for p in repo.iterdir() if p.name.isdigit()] if repo.is_dir() else []
    return str(max(existing, default=0) + 1)


def publish(src: Path, repo: Path, load: Callable[[Path], LoadedModel]) -> Path:
    """Copy the version in ``src`` into ``repo`` under its card's version, atomically.

    ``load(path)`` loads and validates the copy (raising ModelLoadError); only a copy
    that passes is renamed into place. A version without ``golden.json`` gets one,
    recorded from the validated copy, so every later load is checked against today's
    scores. The card's version must be a new number.
    """
    card = read_card(src)
    if not card.version.isdigit():
        raise ModelLoadError(f"card version {card.version!r} is not a number")
    target = repo / card.version
    if target.exists():
        raise ModelLoadError(f"{card.name}/{card.version} already exists; versions are immutable")
    repo.mkdir(parents=True, exist_ok=True)
    staging = repo / f".incoming-{card.version}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(src, staging)
        model = load(staging)
        try:
            if not (staging / GOLDEN_FILE).is_file():
                write_golden(model)
        finally:
            model.close()
        os.rename(staging, target)  # atomic within one file system; fails if target exists
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fd = os.open(repo, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename survives a crash
    finally:
        os.close(fd)
    log.info("model version published", extra={"model": card.name, "version": card.version})
    return target
