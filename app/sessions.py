"""ONNX Runtime session pools: load after fork, run, close.

A :class:`LoadedModel` is one model version (card + ``pool_size`` sessions). ORT
sessions are thread-safe, so in Python the pool is a concurrency bound with a free
list, not a lock workaround: a caller checks a session out, runs, and returns it.
Sessions are created inside the worker process (never before fork: ORT's thread
pools do not survive ``fork``).

With ``share_weights`` the pool's sessions share one copy of the model's initializers:
they are read from model.onnx once, wrapped as OrtValues that the model keeps alive, and
handed to every session with ``SessionOptions.add_initializer`` (ORT then uses that memory
in place instead of its own per-session copy). ORT's prepacked-weights container, which
would also share the pre-packed GEMM copies, is not exposed by the Python API.
With ``shared_arena`` the sessions of the process allocate their intermediate tensors from
one CPU arena registered on ORT's environment (``session.use_env_allocators``) instead of
an arena each: an arena only grows, so per-session arenas each keep the peak of the
largest batch that session ever ran (the warm-up's 1000 rows included).
With a ``profile_dir`` every session writes an ORT profile (JSON, Chrome trace format)
there, ended and flushed by :meth:`LoadedModel.close`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec
import numpy as np
import onnxruntime as ort

from app import metrics
from app.errors import ModelError, ModelLoadError, StageTimeout
from app.schema import ModelCard

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CARD_FILE = "card.json"
WARMUP_BATCHES = (1, 100, 1000)
#: ONNX ``TensorProto.DataType`` -> numpy, for the initializers shared across a pool.
ONNX_DTYPES = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
    12: np.uint32,
    13: np.uint64,
}


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
    """The card of a version dir, or of a model repository's newest version."""
    path = model_dir / CARD_FILE
    if not path.exists() and model_dir.is_dir():
        from app.registry import newest  # (registry builds on this module)

        path = newest(model_dir) / CARD_FILE
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


# -- shared weights: the initializers of an .onnx file, without the onnx package ------------
# ModelProto.graph = 7; GraphProto.initializer = 5; TensorProto: dims = 1, data_type = 2,
# name = 8, raw_data = 9, data_location = 14 (1 = EXTERNAL). The serving environment has no
# `onnx` (a dev dependency, and importing it costs every worker RSS), so the few fields
# needed are read straight from the protobuf wire format.
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_T_DIMS, _T_TYPE, _T_NAME, _T_RAW, _T_LOCATION = 1, 2, 8, 9, 14


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of one protobuf message: ints for varints, else the bytes."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, value
            continue
        if wire == 2:
            size, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, buf[pos : pos + size]
        pos += size


def _packed_varints(buf: memoryview) -> list[int]:
    out, pos = [], 0
    while pos < len(buf):
        value, pos = _varint(buf, pos)
        out.append(value)
    return out


def _tensor(buf: memoryview) -> tuple[str, np.ndarray | None]:
    """A TensorProto -> (name, array); None for data kept elsewhere than ``raw_data``."""
    name, dims, dtype, raw, external = "", [], 0, None, False
    for number, value in _proto_fields(buf):
        if number == _T_NAME and isinstance(value, memoryview):
            name = bytes(value).decode()
        elif number == _T_DIMS:
            dims += [value] if isinstance(value, int) else _packed_varints(value)
        elif number == _T_TYPE:
            dtype = value
        elif number == _T_RAW and isinstance(value, memoryview):
            raw = value
        elif number == _T_LOCATION:
            external = value == 1
    if raw is None or external or dtype not in ONNX_DTYPES:
        return name, None
    native = np.dtype(ONNX_DTYPES[dtype])
    # raw_data is little-endian; astype copies into an aligned array the pool owns.
    return name, np.frombuffer(raw, dtype=native.newbyteorder("<")).astype(native).reshape(dims)


def read_initializers(model_path: Path) -> dict[str, np.ndarray]:
    """The graph's initializers stored as ``raw_data`` (all of them for torch exports).

    Others (typed fields, external data, exotic dtypes) are left out: sessions keep their
    own copy of those. Raises ValueError for bytes that are not a protobuf message."""
    out: dict[str, np.ndarray] = {}
    for number, graph in _proto_fields(memoryview(model_path.read_bytes())):
        if number != _MODEL_GRAPH or not isinstance(graph, memoryview):
            continue
        for field, value in _proto_fields(graph):
            if field == _GRAPH_INITIALIZER and isinstance(value, memoryview):
                name, array = _tensor(value)
                if array is not None:
                    out[name] = array
    return out


def release_free_heap() -> None:
    """Hand the heap pages freed while building sessions back to the OS (glibc only).

    Every session parses model.onnx and drops the protobuf after initialisation; glibc
    keeps those pages mapped in holes of the heap, so RSS would count them forever."""
    # CDLL(None): the symbols already loaded (libc's among them), no library search.
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


_ENV_ARENA_LOCK = threading.Lock()
_env_arena_registered = False


def register_env_arena() -> None:
    """Register the process-wide CPU arena that ``shared_arena`` sessions use (once).

    ``kSameAsRequested`` extends the arena by what a run asks for, not the next power of
    two, so the one arena stays close to the concurrent peak."""
    global _env_arena_registered
    with _ENV_ARENA_LOCK:
        if _env_arena_registered:
            return
        info = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        # max_mem 0 (no cap), extend strategy 1 (kSameAsRequested), defaults for the rest.
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
        _env_arena_registered = True


class LoadedModel:
    """One model version with its pool of sessions."""

    def __init__(
        self,
        model_dir: Path,
        pool_size: int,
        intra_threads: int = 1,
        inter_threads: int = 1,
        verify_sha256: bool = True,
        share_weights: bool = False,
        shared_arena: bool = False,
        mem_pattern: bool = True,
        prepack: bool = True,
        profile_dir: Path | None = None,
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
        #: The one copy of the weights the pool's sessions use (kept alive as long as they).
        self._shared: dict[str, ort.OrtValue] = {}
        self.profile_dir = profile_dir
        self.shared_arena = shared_arena
        self.mem_pattern = mem_pattern
        self.prepack = prepack
        self.profiles: list[Path] = []
        try:
            if shared_arena:
                register_env_arena()
            if share_weights:
                self._shared = {
                    name: ort.OrtValue.ortvalue_from_numpy(array)
                    for name, array in read_initializers(model_path).items()
                }
            self._sessions = [
                ort.InferenceSession(
                    str(model_path),
                    sess_options=self._options(i, intra_threads, inter_threads),
                    providers=["CPUExecutionProvider"],
                )
                for i in range(pool_size)
            ]
        except Exception as exc:  # ORT raises its own pybind types; translate all at boot
            raise ModelLoadError(f"{model_path}: onnxruntime cannot load it: {exc}") from exc
        release_free_heap()
        self._check_signature()
        # PERF: LIFO hands out the most recently used, cache-warm session; FIFO rotated
        # through all of them and paid for pool_size weight copies in the CPU caches.
        self._free: queue.LifoQueue[ort.InferenceSession] = queue.LifoQueue()
        for sess in self._sessions:
            self._free.put(sess)
        self._input, self._output = self.card.input.name, self.card.output.name
        metrics.session_wait_child(self.key)  # exported from 0, before the first wait

    @property
    def key(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def shared_initializers(self) -> int:
        """How many initializers the pool's sessions share (0 without ``share_weights``)."""
        return len(self._shared)

    def _options(self, slot: int, intra_threads: int, inter_threads: int) -> ort.SessionOptions:
        opts = session_options(intra_threads, inter_threads)
        for name, value in self._shared.items():
            opts.add_initializer(name, value)
        if self.shared_arena:
            opts.add_session_config_entry("session.use_env_allocators", "1")
        opts.enable_mem_pattern = self.mem_pattern
        if not self.prepack:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        if self.profile_dir is not None:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            opts.enable_profiling = True
            # ORT appends _<date>_<time>.json; pid and slot keep workers and sessions apart.
            prefix = f"{self.name}-{self.version}-pid{os.getpid()}-s{slot}"
            opts.profile_file_prefix = str(self.profile_dir / prefix)
        return opts

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
        try:
            sess = self._free.get_nowait()
        except queue.Empty:  # every session busy: wait, and count the wait
            t0 = time.perf_counter()
            sess = self._free.get()
            metrics.session_wait_child(self.key).observe(time.perf_counter() - t0)
        try:
            yield sess
        finally:
            self._free.put(sess)

    def run(self, ids: np.ndarray, run_options: ort.RunOptions | None = None) -> np.ndarray:
        """Score an ``[n, k]`` int64 matrix -> float32 CTRs ``[n]``; errors as ModelError.

        ``run_options.terminate`` set from another thread (the request's deadline
        watchdog) aborts the run between nodes: that surfaces as :class:`StageTimeout`.
        """
        with self.session() as sess:
            try:
                out = sess.run([self._output], {self._input: ids}, run_options)[0]
            except Exception as exc:  # onnxruntime's pybind errors have no common base
                if run_options is not None and run_options.terminate:
                    raise StageTimeout(f"model {self.key} stopped at the deadline") from exc
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
        if self.profile_dir is not None:
            for sess in self._sessions:
                self.profiles.append(Path(sess.end_profiling()))
            log.info("ort profiles written", extra={"model": self.key, "files": len(self.profiles)})
        self._sessions.clear()
        while not self._free.empty():
            self._free.get_nowait()
