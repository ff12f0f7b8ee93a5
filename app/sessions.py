"""ONNX Runtime session pools: load after fork, run, close.

A :class:`LoadedModel` is one model version (card + ``pool_size`` sessions). ORT
sessions are thread-safe, so in Python the pool is a concurrency bound with a free
list, not a lock workaround: a caller checks a session out, runs, and returns it.
Sessions are created inside the worker process (never before fork: ORT's thread
pools do not survive ``fork``).
"""

from __future__ import annotations

import hashlib
import logging
import queue
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec
import numpy as np
import onnxruntime as ort

from app.errors import ModelError, ModelLoadError
from app.schema import ModelCard

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CARD_FILE = "card.json"
WARMUP_BATCHES = (1, 100, 1000)


def session_options(intra_threads: int, inter_threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_threads
    opts.inter_op_num_threads = inter_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn the cores that the other worker process needs.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def read_card(model_dir: Path) -> ModelCard:
    path = model_dir / CARD_FILE
    try:
        return msgspec.json.decode(path.read_bytes(), type=ModelCard)
    except (OSError, msgspec.MsgspecError) as exc:
        raise ModelLoadError(f"cannot read model card {path}: {exc}") from exc


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LoadedModel:
    """One model version with its pool of sessions."""

    def __init__(
        self,
        model_dir: Path,
        pool_size: int,
        intra_threads: int = 1,
        inter_threads: int = 1,
        verify_sha256: bool = True,
    ) -> None:
        self.dir = model_dir
        self.card = read_card(model_dir)
        self.name, self.version = self.card.name, self.card.version
        self.pool_size = pool_size
        model_path = model_dir / MODEL_FILE
        if verify_sha256:
            try:
                actual = sha256_of(model_path)
            except OSError as exc:
                raise ModelLoadError(f"cannot read {model_path}: {exc}") from exc
            if actual != self.card.sha256:
                raise ModelLoadError(
                    f"{model_path}: sha256 {actual} does not match card {self.card.sha256}"
                )
        opts = session_options(intra_threads, inter_threads)
        try:
            self._sessions = [
                ort.InferenceSession(
                    str(model_path), sess_options=opts, providers=["CPUExecutionProvider"]
                )
                for _ in range(pool_size)
            ]
        except Exception as exc:  # ORT raises its own pybind types; translate all at boot
            raise ModelLoadError(f"{model_path}: onnxruntime cannot load it: {exc}") from exc
        self._check_signature()
        # PERF: LIFO hands out the most recently used, cache-warm session; FIFO rotated
        # through all of them and paid for pool_size weight copies in the CPU caches.
        self._free: queue.LifoQueue[ort.InferenceSession] = queue.LifoQueue()
        for sess in self._sessions:
            self._free.put(sess)
        self._input, self._output = self.card.input.name, self.card.output.name

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    def _check_signature(self) -> None:
        sess = self._sessions[0]
        inputs = {i.name: i for i in sess.get_inputs()}
        outputs = {o.name for o in sess.get_outputs()}
        want = self.card.input
        if want.name not in inputs or inputs[want.name].type != "tensor(int64)":
            raise ModelLoadError(
                f"{self.key}: graph has no int64 input {want.name!r} (has {sorted(inputs)})"
            )
        if self.card.output.name not in outputs:
            raise ModelLoadError(f"{self.key}: graph has no output {self.card.output.name!r}")
        width = inputs[want.name].shape[-1]
        if isinstance(width, int) and width != len(self.card.fields):
            raise ModelLoadError(
                f"{self.key}: graph takes {width} fields, card lists {len(self.card.fields)}"
            )

    @contextmanager
    def session(self) -> Iterator[ort.InferenceSession]:
        sess = self._free.get()
        try:
            yield sess
        finally:
            self._free.put(sess)

    def run(self, ids: np.ndarray) -> np.ndarray:
        """Score an ``[n, k]`` int64 matrix -> float32 CTRs ``[n]``; errors as ModelError."""
        with self.session() as sess:
            try:
                out = sess.run([self._output], {self._input: ids})[0]
            except Exception as exc:  # onnxruntime's pybind errors have no common base
                log.error("model run failed", extra={"model": self.key, "error": str(exc)})
                raise ModelError(f"model {self.key} failed to score the batch") from exc
        scores = out.reshape(-1)
        if scores.shape[0] != ids.shape[0]:
            raise ModelError(f"model {self.key} returned {scores.shape[0]} scores for {len(ids)}")
        if not np.isfinite(scores).all():
            log.error("non-finite scores", extra={"model": self.key, "rows": len(ids)})
            raise ModelError(f"model {self.key} produced non-finite scores")
        return scores

    def warm_up(self, runs: int, seed: int = 0) -> None:
        """Run every session on a few batch sizes so first requests do not pay for it."""
        rng = np.random.default_rng(seed)
        vocab = np.array([f.vocab_size for f in self.card.fields])
        for batch in WARMUP_BATCHES:
            ids = (rng.random((batch, len(vocab))) * vocab).astype(np.int64)
            for sess in self._sessions:
                for _ in range(runs):
                    sess.run([self._output], {self._input: ids})

    def close(self) -> None:
        self._sessions.clear()
        while not self._free.empty():
            self._free.get_nowait()
