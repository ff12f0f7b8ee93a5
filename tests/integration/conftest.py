"""Fixtures for the integration tests: ONE real stack (nginx + 2 gunicorn workers + the
real ONNX models) for the whole session, an HTTP client, candidate payloads built from
the model cards, and a brute-force reference made of plain ONNX Runtime sessions.

The models are snapshotted into the run dir before the stack starts, and both the
stack and the reference load that snapshot: a retrain that overwrites ``models/`` while
the tests run cannot make the farm and the reference disagree.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app import registry
from app.config import Config, load
from app.schema import CardField, ModelCard
from app.sessions import CARD_FILE, MODEL_FILE, read_card
from app.stack import Stack, running

JSON = "application/json"
MSGPACK = "application/msgpack"
CONTENT_TYPES = (JSON, MSGPACK)
FORMS = ("objects", "rows", "columns")
#: Every request of the integration tests is bounded by these (the machine may be busy).
TIMEOUT = httpx.Timeout(60.0, connect=5.0)


# -- the stack -------------------------------------------------------------------------------
def snapshot_models(dest: Path, attempts: int = 20) -> dict[str, str]:
    """Copy each served model version (card, onnx, golden request) into a repository
    under ``dest``; the config overrides that serve from it (newest version, reloadable).

    A retrain may be rewriting ``models/`` right now: copy until the copied model's
    sha256 matches the copied card (bounded retries).

    The served version is stored as version 1 of the snapshot (its card's ``version``
    rewritten, nothing else): the tests that publish, re-version or corrupt versions
    2 and up above it, and expect ``deepfm/1`` / ``autoint/1`` in answers, stay
    independent of how many versions ``models/`` holds, while every test, the
    brute-force reference included, runs the version the farm really serves.
    """
    overrides: dict[str, str] = {}
    for name, setting in load(env={}).model_dirs().items():
        src = registry.newest(setting)
        out = dest / name / "1"
        out.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):
            card_bytes = (src / CARD_FILE).read_bytes()
            model_bytes = (src / MODEL_FILE).read_bytes()
            card = msgspec.json.decode(card_bytes, type=ModelCard)
            if hashlib.sha256(model_bytes).hexdigest() == card.sha256:
                break
            time.sleep(1.0)
        else:
            pytest.fail(f"{src}: model.onnx never matched card.json's sha256 (retrain running?)")
        card_json = msgspec.json.decode(card_bytes)
        (out / CARD_FILE).write_bytes(msgspec.json.encode({**card_json, "version": "1"}))
        (out / MODEL_FILE).write_bytes(model_bytes)
        if (src / registry.GOLDEN_FILE).is_file():
            shutil.copy(src / registry.GOLDEN_FILE, out / registry.GOLDEN_FILE)
        overrides[f"{name}_model"] = str(dest / name)
    return overrides


def start_stack(
    request: pytest.FixtureRequest,
    prefix: str = "farm-",
    settings: Mapping[str, Any] | Callable[[Path], dict[str, Any]] | None = None,
) -> Iterator[Stack]:
    """A real stack on a free loopback port over a snapshot of the real models.

    ``settings`` override the config; a callable gets the snapshot's models dir first
    (to add versions to it) and returns them. The run dir (sockets, logs, access.log)
    is removed afterwards unless a test failed.
    """
    run_dir = Path(tempfile.mkdtemp(prefix=prefix))  # short: unix socket paths < 107 bytes
    overrides = snapshot_models(run_dir / "models")
    if callable(settings):
        settings = settings(run_dir / "models")
    failed_before = request.session.testsfailed
    with running(
        run_dir, {"workers": 2, **overrides, **(settings or {})}, timeout_s=180.0
    ) as stack:
        yield stack
    if request.session.testsfailed == failed_before:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        print(f"\nintegration run dir kept for inspection: {run_dir}")


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    yield from start_stack(request)


@pytest.fixture(scope="session")
def config(stack: Stack) -> Config:
    return stack.config


@pytest.fixture(scope="session")
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="session")
def cards(config: Config) -> dict[str, ModelCard]:
    """The cards of the models the stack serves (read from the snapshot it loaded)."""
    return {name: read_card(path) for name, path in config.model_dirs().items()}


# -- payloads --------------------------------------------------------------------------------
class Candidates:
    """Realistic candidates for a card's field layout, in any of the three forms."""

    def __init__(self, fields: Sequence[CardField]) -> None:
        self.fields = list(fields)
        self.names = [f.name for f in fields]
        self.width = len(fields)
        self.vocab = np.array([f.vocab_size for f in fields], dtype=np.int64)
        self.oov = np.array([f.oov_index for f in fields], dtype=np.int64)

    def ids(self, n: int, seed: int, oov_rate: float = 0.01, dup_rate: float = 0.05) -> np.ndarray:
        """``[n, width]`` int64 ids drawn within each vocabulary, with a few OOV ids
        (at, above and below the vocabulary) and a few duplicated rows (score ties)."""
        rng = np.random.default_rng(seed)
        ids = (rng.random((n, self.width)) * self.vocab).astype(np.int64)
        n_oov = max(1, round(n * self.width * oov_rate)) if oov_rate else 0
        for cell in rng.choice(n * self.width, size=min(n_oov, n * self.width), replace=False):
            i, j = divmod(int(cell), self.width)
            ids[i, j] = rng.choice(
                [self.vocab[j], self.vocab[j] + rng.integers(1, 10**6), -1, 2**40]
            )
        n_dup = round(n * dup_rate)
        if n >= 4 and n_dup:
            src = rng.integers(0, n, size=n_dup)
            dst = rng.integers(0, n, size=n_dup)
            ids[dst] = ids[src]
        return ids

    def mapped(self, ids: np.ndarray) -> np.ndarray:
        """What the farm feeds the models: out-of-vocabulary ids -> the field's oov_index."""
        bad = (ids < 0) | (ids >= self.vocab)
        return np.where(bad, self.oov, ids).astype(np.int64)

    def form(self, ids: np.ndarray, form: str) -> Any:
        rows = ids.tolist()
        if form == "objects":
            return [dict(zip(self.names, row, strict=True)) for row in rows]
        if form == "rows":
            return rows
        if form == "columns":
            return {name: ids[:, j].tolist() for j, name in enumerate(self.names)}
        raise ValueError(form)


@pytest.fixture(scope="session")
def candidates(cards: dict[str, ModelCard]) -> Candidates:
    layouts = {card.field_names for card in cards.values()}
    assert len(layouts) == 1, f"the cards disagree on their fields: {layouts}"
    return Candidates(next(iter(cards.values())).fields)


def encode(value: Any, content_type: str = JSON) -> bytes:
    return msgspec.msgpack.encode(value) if content_type == MSGPACK else msgspec.json.encode(value)


def post(
    client: httpx.Client,
    path: str,
    value: Any,
    content_type: str = JSON,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST ``value`` encoded as ``content_type`` (bytes are sent as they are)."""
    body = value if isinstance(value, bytes) else encode(value, content_type)
    return client.post(
        path, content=body, headers={"Content-Type": content_type, **(headers or {})}
    )


def parse(resp: httpx.Response) -> Any:
    """Decode a response by its content type (the farm answers in the request's type)."""
    ctype = resp.headers.get("content-type", "").split(";")[0].strip()
    if ctype == MSGPACK:
        return msgspec.msgpack.decode(resp.content)
    assert ctype == JSON, f"unexpected content type {ctype!r}: {resp.text[:200]!r}"
    return msgspec.json.decode(resp.content)


# -- the brute-force reference ---------------------------------------------------------------
class Reference:
    """The cascade recomputed from scratch with plain ONNX Runtime sessions.

    It reproduces the farm's batches exactly (stage 1 on all rows in request order,
    stage 2 on the survivors in ascending index order), so the scores must be equal
    bit for bit; ordering is a plain Python sort by (-score, index).
    """

    def __init__(self, config: Config, cards: dict[str, ModelCard]) -> None:
        self.config = config
        self.cards = cards
        self.sessions: dict[str, ort.InferenceSession] = {}
        for name, setting in config.model_dirs().items():
            path = registry.newest(setting)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            self.sessions[name] = ort.InferenceSession(
                str(path / MODEL_FILE), sess_options=opts, providers=["CPUExecutionProvider"]
            )

    def score(self, name: str, ids: np.ndarray) -> np.ndarray:
        card = self.cards[name]
        out = self.sessions[name].run([card.output.name], {card.input.name: ids})[0]
        scores = np.asarray(out, dtype=np.float32).reshape(-1)
        assert scores.shape == (len(ids),)
        return scores

    @staticmethod
    def best(scores: np.ndarray, positions: Sequence[int], k: int) -> list[int]:
        """Indices into ``scores`` of the ``k`` best by (-score, position)."""
        order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), positions[j]))
        return order[:k]

    def rank(
        self,
        ids: np.ndarray,
        top_k: int | None = None,
        stage1_k: int | None = None,
        multi_stage: bool = True,
    ) -> tuple[list[int], np.ndarray]:
        """(request indices best first, their final float32 scores) for mapped ``ids``."""
        n = len(ids)
        top_k = min(self.config.default_top_k if top_k is None else top_k, n)
        stage1_k = min(self.config.default_stage1_k if stage1_k is None else stage1_k, n)
        if not multi_stage:
            scores = self.score(self.config.predict_model, ids)
            final = self.best(scores, range(n), top_k)
            return final, scores[final]
        first, second = (s.model for s in self.config.stages)
        s1 = self.score(first, ids)
        survivors = sorted(self.best(s1, range(n), stage1_k))
        s2 = self.score(second, ids[survivors])
        final = self.best(s2, survivors, top_k)
        return [survivors[j] for j in final], s2[final]


@pytest.fixture(scope="session")
def reference(config: Config, cards: dict[str, ModelCard]) -> Reference:
    assert len(config.stages) == 2, "the reference implements the two-stage cascade"
    return Reference(config, cards)


# -- metrics ---------------------------------------------------------------------------------
def metric_sum(client: httpx.Client, name: str, **labels: str) -> float:
    """The farm's own ``/metrics`` (every worker merged): the sum of the samples called
    ``name`` whose labels include ``labels`` (0.0 when there are none)."""
    resp = client.get("/metrics")
    assert resp.status_code == 200, resp.text[:300]
    return sum(
        sample.value
        for family in text_string_to_metric_families(resp.text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def metric_sum_at(url: str, name: str, **labels: str) -> float:
    """:func:`metric_sum` of the farm at ``url`` (a connection of its own)."""
    with httpx.Client(base_url=url, timeout=10) as client:
        return metric_sum(client, name, **labels)


# -- logs ------------------------------------------------------------------------------------
def access_log(stack: Stack) -> list[dict[str, Any]]:
    """nginx's JSON access log lines (buffered: flushed every second)."""
    path = stack.config.run_path / "access.log"
    if not path.exists():
        return []
    return [msgspec.json.decode(line) for line in path.read_bytes().splitlines() if line.strip()]


def wait_for_log(stack: Stack, request_ids: set[str], timeout_s: float = 15.0) -> dict[str, dict]:
    """The access-log lines of ``request_ids`` once all are written (nginx buffers them
    and flushes every second: poll, bounded)."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = {e["request_id"]: e for e in access_log(stack) if e["request_id"] in request_ids}
        if len(found) == len(request_ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.25)
