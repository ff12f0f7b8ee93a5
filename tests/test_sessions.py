"""app.sessions: loading fake ONNX models, running them, and every way a load can fail."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from app import metrics
from app.errors import ModelError, ModelLoadError
from app.metrics import Samples
from app.sessions import (
    LoadedModel,
    read_card,
    read_initializers,
    register_env_arena,
    sha256_of,
)
from tests.fake_models import FIELDS, write_model


def batch(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, [7, 24, 35, 400], size=(n, 4)).astype(np.int64)


def direct_run(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(["ctr"], {"ids": ids})[0]


def edit_card(model_dir: Path, **changes: object) -> None:
    path = model_dir / "card.json"
    card = json.loads(path.read_text())
    card.update(changes)
    path.write_text(json.dumps(card))


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model(tmp_path, "deepfm", seed=5)


# -- loading and running -------------------------------------------------------------------
def test_loads_the_card(model_dir: Path) -> None:
    model = LoadedModel(model_dir, pool_size=1)
    assert (model.name, model.version, model.key) == ("deepfm", "1", "deepfm/1")
    assert model.card.field_names == tuple(n for n, _ in FIELDS)
    assert model.card.sha256 == sha256_of(model_dir / "model.onnx")
    assert model.pool_size == 1


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_run_matches_a_direct_onnxruntime_run(model_dir: Path, n: int) -> None:
    ids = batch(n, seed=n)
    scores = LoadedModel(model_dir, pool_size=1).run(ids)
    assert scores.dtype == np.float32
    assert scores.shape == (n,)
    np.testing.assert_array_equal(scores, direct_run(model_dir, ids))
    assert ((scores > 0) & (scores < 1)).all()


def test_different_seeds_score_differently(tmp_path: Path) -> None:
    a = LoadedModel(write_model(tmp_path / "a", "deepfm", seed=1), 1)
    b = LoadedModel(write_model(tmp_path / "b", "deepfm", seed=2), 1)
    ids = batch(20)
    assert not np.allclose(a.run(ids), b.run(ids))


@pytest.mark.parametrize("pool_size", [1, 3])
def test_pool_size_distinct_sessions(model_dir: Path, pool_size: int) -> None:
    model = LoadedModel(model_dir, pool_size=pool_size)
    assert len(model._sessions) == pool_size
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(model.session()) for _ in range(pool_size)]
        assert len({id(s) for s in held}) == pool_size
        assert model._free.empty()  # all checked out
    assert model._free.qsize() == pool_size  # and all returned


class CountingSession:
    """Wraps a session to record how many runs overlap."""

    def __init__(self, inner: ort.InferenceSession, state: dict[str, int], lock) -> None:
        self.inner, self.state, self.lock = inner, state, lock

    def run(self, *args, **kwargs):
        with self.lock:
            self.state["now"] += 1
            self.state["max"] = max(self.state["max"], self.state["now"])
        try:
            time.sleep(0.002)
            return self.inner.run(*args, **kwargs)
        finally:
            with self.lock:
                self.state["now"] -= 1


def test_pool_bounds_concurrent_runs(model_dir: Path) -> None:
    model = LoadedModel(model_dir, pool_size=2)
    state, lock = {"now": 0, "max": 0}, threading.Lock()
    while not model._free.empty():
        model._free.get()
    for sess in model._sessions:
        model._free.put(CountingSession(sess, state, lock))
    ids = batch(5)
    threads = [
        threading.Thread(target=lambda: [model.run(ids) for _ in range(10)]) for _ in range(6)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
        assert not th.is_alive(), "a run never got a session back"
    assert state["max"] == 2


def test_concurrent_runs_from_threads_agree(model_dir: Path) -> None:
    model = LoadedModel(model_dir, pool_size=2)
    inputs = [batch(1 + 13 * t, seed=t) for t in range(8)]
    expected = [direct_run(model_dir, ids) for ids in inputs]
    failures: list[str] = []
    start = threading.Barrier(8)

    def work(t: int) -> None:
        start.wait()
        for r in range(50):
            got = model.run(inputs[t])
            if not np.array_equal(got, expected[t]):
                failures.append(f"thread {t} run {r}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
        assert not th.is_alive(), "a run never got a session back"
    assert failures == []
    assert model._free.qsize() == 2  # every session came back


def test_warm_up_runs_every_session(model_dir: Path) -> None:
    model = LoadedModel(model_dir, pool_size=2)
    model.warm_up(1)
    assert model.run(batch(3)).shape == (3,)


def test_close_empties_the_pool(model_dir: Path) -> None:
    model = LoadedModel(model_dir, pool_size=2)
    model.close()
    assert model._sessions == []
    assert model._free.empty()


def test_sha256_of_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    data = bytes(range(256)) * 9000  # > 1 MiB: several chunks
    path.write_bytes(data)
    assert sha256_of(path) == hashlib.sha256(data).hexdigest()


# -- load failures -------------------------------------------------------------------------
def test_sha256_mismatch(model_dir: Path) -> None:
    edit_card(model_dir, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="sha256"):
        LoadedModel(model_dir, pool_size=1)
    # With verification off the (intact) model loads.
    assert LoadedModel(model_dir, pool_size=1, verify_sha256=False).run(batch(2)).shape == (2,)


def test_tampered_model_file_fails_the_sha256_check(model_dir: Path) -> None:
    path = model_dir / "model.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ModelLoadError, match="does not match"):
        LoadedModel(model_dir, pool_size=1)


@pytest.mark.parametrize("verify", [True, False])
def test_corrupt_model(tmp_path: Path, verify: bool) -> None:
    model_dir = write_model(tmp_path, "deepfm", kind="corrupt")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        LoadedModel(model_dir, pool_size=1, verify_sha256=verify)


@pytest.mark.parametrize("verify", [True, False])
def test_missing_model_file(model_dir: Path, verify: bool) -> None:
    (model_dir / "model.onnx").unlink()
    with pytest.raises(ModelLoadError):
        LoadedModel(model_dir, pool_size=1, verify_sha256=verify)


def test_missing_card(model_dir: Path) -> None:
    (model_dir / "card.json").unlink()
    with pytest.raises(ModelLoadError, match="card"):
        LoadedModel(model_dir, pool_size=1)


@pytest.mark.parametrize(
    "text",
    ["{not json", '{"name": "deepfm"}', '{"name": 3}', "[]"],
    ids=["bad-json", "missing-keys", "wrong-type", "array"],
)
def test_unreadable_card(model_dir: Path, text: str) -> None:
    (model_dir / "card.json").write_text(text)
    with pytest.raises(ModelLoadError, match="cannot read model card"):
        read_card(model_dir)


def test_card_field_count_mismatch_with_graph(model_dir: Path) -> None:
    card = json.loads((model_dir / "card.json").read_text())
    edit_card(model_dir, fields=card["fields"][:3])
    with pytest.raises(ModelLoadError, match="graph takes 4 fields, card lists 3"):
        LoadedModel(model_dir, pool_size=1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input": {"name": "x", "dtype": "int64", "shape": ["batch", 4]}}, "no int64 input"),
        ({"output": {"name": "y", "dtype": "float32", "shape": ["batch"]}}, "no output"),
    ],
)
def test_card_tensor_names_must_match_the_graph(
    model_dir: Path, change: dict[str, object], message: str
) -> None:
    edit_card(model_dir, **change)
    with pytest.raises(ModelLoadError, match=message):
        LoadedModel(model_dir, pool_size=1)


# -- run failures --------------------------------------------------------------------------
def test_nan_model_raises_model_error(tmp_path: Path) -> None:
    model = LoadedModel(write_model(tmp_path, "deepfm", kind="nan"), pool_size=1)
    with pytest.raises(ModelError, match="non-finite") as info:
        model.run(batch(4))
    assert str(tmp_path) not in info.value.message
    assert model._free.qsize() == 1  # the session went back to the pool


@pytest.mark.parametrize(
    "ids",
    [
        np.zeros((3, 4), dtype=np.int32),  # wrong dtype
        np.zeros((3, 5), dtype=np.int64),  # wrong width
        np.full((3, 4), 10**6, dtype=np.int64),  # gather index out of range
    ],
    ids=["int32", "width", "out-of-range"],
)
def test_ort_failures_become_model_error(model_dir: Path, ids: np.ndarray) -> None:
    model = LoadedModel(model_dir, pool_size=1)
    with pytest.raises(ModelError) as info:
        model.run(ids)
    assert info.value.message == "model deepfm/1 failed to score the batch"
    assert info.value.status == 500
    assert model._free.qsize() == 1


# -- shared weights, shared arena, ORT profiling -------------------------------------------
REAL_MODELS = Path(__file__).resolve().parent.parent / "models"


def test_read_initializers_matches_onnx(model_dir: Path) -> None:
    from onnx import load as onnx_load
    from onnx import numpy_helper

    got = read_initializers(model_dir / "model.onnx")
    want = {
        t.name: numpy_helper.to_array(t)
        for t in onnx_load(str(model_dir / "model.onnx")).graph.initializer
    }
    assert set(got) == set(want) == {"offsets", "weights", "axis1", "bias"}
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert got[name].shape == array.shape, name
        np.testing.assert_array_equal(got[name], array)
        assert got[name].flags.c_contiguous and got[name].flags.writeable


@pytest.mark.parametrize("name", ["deepfm", "autoint"])
def test_read_initializers_of_the_served_models(name: str) -> None:
    from onnx import load as onnx_load
    from onnx import numpy_helper

    path = REAL_MODELS / name / "1" / "model.onnx"
    got = read_initializers(path)
    want = {t.name: numpy_helper.to_array(t) for t in onnx_load(str(path)).graph.initializer}
    assert set(got) == set(want)
    for key, array in want.items():
        np.testing.assert_array_equal(got[key], array)


def test_read_initializers_rejects_what_is_not_protobuf(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x0f" * 10)  # wire type 7 does not exist
    with pytest.raises(ValueError, match="wire type"):
        read_initializers(path)


@pytest.mark.parametrize("pool_size", [1, 3])
@pytest.mark.parametrize("shared_arena", [False, True])
def test_shared_weights_score_like_separate_sessions(
    model_dir: Path, pool_size: int, shared_arena: bool
) -> None:
    separate = LoadedModel(model_dir, pool_size=pool_size)
    shared = LoadedModel(
        model_dir, pool_size=pool_size, share_weights=True, shared_arena=shared_arena
    )
    assert separate.shared_initializers == 0
    assert shared.shared_initializers == 4
    assert len(shared._sessions) == pool_size
    assert len({id(s) for s in shared._sessions}) == pool_size
    ids = batch(500, seed=3)
    want = separate.run(ids)
    with contextlib.ExitStack() as stack:  # every session of the pool, not just the top one
        sessions = [stack.enter_context(shared.session()) for _ in range(pool_size)]
        for sess in sessions:
            np.testing.assert_array_equal(sess.run(["ctr"], {"ids": ids})[0], want)
    np.testing.assert_array_equal(shared.run(ids), want)


def test_shared_weights_are_one_copy_used_in_place(model_dir: Path) -> None:
    """Writing to the pool's weight array changes what every session computes: ORT
    reads that memory, so there are no per-session copies of it."""
    model = LoadedModel(model_dir, pool_size=3, share_weights=True)
    ids = batch(50, seed=4)
    before = model.run(ids)
    weights = model._shared["weights"].numpy()
    weights += 1.0  # in place: the OrtValue wraps this very buffer
    with contextlib.ExitStack() as stack:
        sessions = [stack.enter_context(model.session()) for _ in range(3)]
        outs = [sess.run(["ctr"], {"ids": ids})[0] for sess in sessions]
    for out in outs:
        assert (out > before).all()  # 4 fields x +1.0 on the logit
        np.testing.assert_array_equal(out, outs[0])


@pytest.mark.parametrize("name", ["deepfm", "autoint"])
def test_shared_weights_on_the_served_models(name: str) -> None:
    model_dir = REAL_MODELS / name / "1"
    separate = LoadedModel(model_dir, pool_size=1)
    shared = LoadedModel(model_dir, pool_size=2, share_weights=True, shared_arena=True)
    assert shared.shared_initializers >= 10
    vocab = np.array([f.vocab_size for f in shared.card.fields])
    ids = (np.random.default_rng(9).random((300, len(vocab))) * vocab).astype(np.int64)
    np.testing.assert_array_equal(shared.run(ids), separate.run(ids))


@pytest.mark.parametrize("name", ["deepfm", "autoint"])
def test_mem_pattern_off_scores_alike_and_reaches_the_sessions(name: str) -> None:
    model_dir = REAL_MODELS / name / "1"
    planned = LoadedModel(model_dir, pool_size=1, share_weights=True, shared_arena=True)
    unplanned = LoadedModel(
        model_dir, pool_size=2, share_weights=True, shared_arena=True, mem_pattern=False
    )
    assert all(s.get_session_options().enable_mem_pattern for s in planned._sessions)
    assert not any(s.get_session_options().enable_mem_pattern for s in unplanned._sessions)
    vocab = np.array([f.vocab_size for f in planned.card.fields])
    rng = np.random.default_rng(10)
    for rows in (1, 300, 300, 7):  # the second run of a shape is the one a pattern plans
        ids = (rng.random((rows, len(vocab))) * vocab).astype(np.int64)
        np.testing.assert_array_equal(unplanned.run(ids), planned.run(ids))


@pytest.mark.parametrize("name", ["deepfm", "autoint"])
def test_prepacking_off_scores_alike_and_reaches_the_sessions(name: str) -> None:
    model_dir = REAL_MODELS / name / "1"
    packed = LoadedModel(model_dir, pool_size=1, share_weights=True, shared_arena=True)
    unpacked = LoadedModel(
        model_dir, pool_size=2, share_weights=True, shared_arena=True, prepack=False
    )
    key = "session.disable_prepacking"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # not set
        packed._sessions[0].get_session_options().get_session_config_entry(key)
    for sess in unpacked._sessions:
        assert sess.get_session_options().get_session_config_entry(key) == "1"
    vocab = np.array([f.vocab_size for f in packed.card.fields])
    ids = (np.random.default_rng(11).random((300, len(vocab))) * vocab).astype(np.int64)
    # Another GEMM kernel layout: the same scores up to float rounding.
    np.testing.assert_allclose(unpacked.run(ids), packed.run(ids), rtol=1e-5, atol=1e-6)


def test_the_farm_passes_mem_pattern_to_its_sessions() -> None:
    from app.config import load
    from app.service import load_model

    for setting in (False, True):
        config = load(overrides={"mem_pattern": setting}, env={})
        model = load_model("deepfm", REAL_MODELS / "deepfm" / "1", config)
        assert model._sessions[0].get_session_options().enable_mem_pattern is setting
    assert load(env={}).mem_pattern is False
    config = load(overrides={"prepack_weights": False}, env={})
    model = load_model("deepfm", REAL_MODELS / "deepfm" / "1", config)
    options = model._sessions[0].get_session_options()
    assert options.get_session_config_entry("session.disable_prepacking") == "1"


def test_register_env_arena_is_idempotent() -> None:
    register_env_arena()
    register_env_arena()  # ORT would refuse a second allocator for the same device


def test_profiling_off_writes_nothing(model_dir: Path, tmp_path: Path) -> None:
    model = LoadedModel(model_dir, pool_size=2)
    model.run(batch(3))
    model.close()
    assert model.profiles == []


def test_profiling_writes_one_trace_per_session(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "profiles"
    model = LoadedModel(model_dir, pool_size=2, profile_dir=out)
    model.run(batch(10))
    model.close()
    assert len(model.profiles) == 2
    assert sorted(p.parent for p in model.profiles) == [out, out]
    names = sorted(p.name for p in model.profiles)
    assert names[0].startswith("deepfm-1-pid") and "-s0_" in names[0]
    assert "-s1_" in names[1]
    assert all(p.suffix == ".json" and p.exists() for p in model.profiles)


def test_farm_with_ort_profiling_writes_node_events_at_close(make_config, tmp_path: Path) -> None:
    from app.service import Farm

    run_dir = tmp_path / "run"
    config = make_config(ort_profiling=True, run_dir=str(run_dir), pool_size=2)
    assert config.ort_profile_path == run_dir / "ort-profiles"
    farm = Farm(config)
    farm.load()
    farm.pipeline.rank(batch(40), top_k=5, stage1_k=20)
    farm.close()
    files = sorted(config.ort_profile_path.glob("*.json"))
    # Two models (deepfm, autoint) x a pool of two sessions, one trace each.
    assert len(files) == 4
    assert {f.name.split("-pid")[0] for f in files} == {"deepfm-1", "autoint-1"}
    ops: dict[str, set[str]] = {"deepfm-1": set(), "autoint-1": set()}
    for f in files:  # warmup_runs is 0: only the session that ranked has node events
        events = json.loads(f.read_text())
        assert any(e.get("name") == "model_loading_uri" for e in events)
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                assert e["dur"] >= 0
                ops[f.name.split("-pid")[0]].add(e["args"]["op_name"])
    # Each model's ranking run shows up node by node (the fake graph's Gather, Sigmoid).
    for model, seen in ops.items():
        assert {"Gather", "Sigmoid"} <= seen, (model, seen)


def test_profiling_is_off_by_default(make_config, tmp_path: Path) -> None:
    from app.service import Farm

    config = make_config(run_dir=str(tmp_path / "run"))
    assert config.ort_profiling is False
    farm = Farm(config)
    farm.load()
    farm.close()
    assert not config.ort_profile_path.exists()


def test_a_run_that_waits_for_a_session_is_timed(model_dir: Path) -> None:
    """ctr_farm_session_wait_seconds counts only runs that found every session busy."""

    def waits() -> tuple[float, float]:
        samples = Samples(metrics.collect())
        name = "ctr_farm_session_wait_seconds"
        return samples.total(f"{name}_count", model="deepfm/1"), samples.total(
            f"{name}_sum", model="deepfm/1"
        )

    model = LoadedModel(model_dir, pool_size=1)
    count0, sum0 = waits()
    model.run(batch(3))  # a free session: no wait recorded
    assert waits()[0] == count0
    released = threading.Event()

    def hold() -> None:
        with model.session():
            released.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.05)
    timer = threading.Timer(0.1, released.set)
    timer.start()
    model.run(batch(3))  # waits ~0.1 s for the held session
    holder.join()
    count1, sum1 = waits()
    assert count1 == count0 + 1
    assert sum1 - sum0 >= 0.05
