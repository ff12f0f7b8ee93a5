"""app.batch: chunked scoring over fake ONNX models, checked against plain ONNX Runtime;
chunk boundaries, resuming (interrupted, torn, killed), the summary, bounded memory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from app.batch import MANIFEST, Chunk, Job, ScoreError, score, summary_path
from app.config import REPO_ROOT, Config
from app.errors import InvalidRequest
from app.offline.evaluate import CTR_EDGES
from tests.conftest import FIELD_NAMES, VOCAB
from tests.test_sessions import direct_run

VOCABS = np.array([VOCAB[n] for n in FIELD_NAMES])


def make_input(
    path: Path,
    rows: int,
    seed: int = 0,
    row_group: int | None = None,
    oov_rate: float = 0.02,
    key_runs: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Fake-model logs: ids (a few out of vocabulary), ``click`` (~10%), maybe a ``key``
    whose runs are ``key_runs`` long (min, max)."""
    rng = np.random.default_rng(seed)
    ids = (rng.random((rows, len(VOCABS))) * VOCABS).astype(np.int64)
    bad = rng.random(ids.shape) < oov_rate
    ids[bad] = rng.choice([-1, 10**6, 2**40], size=int(bad.sum()))
    columns: dict[str, np.ndarray] = {n: ids[:, j] for j, n in enumerate(FIELD_NAMES)}
    columns["click"] = (rng.random(rows) < 0.1).astype(np.int8)
    if key_runs is not None:
        lengths = rng.integers(key_runs[0], key_runs[1] + 1, size=rows)
        columns["key"] = np.repeat(np.arange(rows) * 7 + 3, lengths)[:rows]
    pq.write_table(pa.table(columns), path, row_group_size=row_group or rows)
    return columns


def mapped(columns: dict[str, np.ndarray]) -> np.ndarray:
    """What the farm feeds the models: ids outside the vocabulary -> the OOV index."""
    ids = np.stack([columns[n] for n in FIELD_NAMES], axis=1)
    return np.where((ids < 0) | (ids >= VOCABS), VOCABS, ids)


def read_output(path: Path) -> pa.Table:
    return pq.read_table(path)


def parts(path: Path) -> dict[str, pa.Table]:
    return {p.name: pq.read_table(p) for p in sorted(path.glob("part-*.parquet"))}


def manifest_chunks(path: Path) -> list[Chunk]:
    lines = (path / MANIFEST).read_bytes().splitlines()[1:]
    return [msgspec.json.decode(line, type=Chunk) for line in lines]


def without_run(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k not in ("run", "output")}


@pytest.fixture
def logs(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "logs.parquet"
    return path, make_input(path, 2_500, seed=1, row_group=700)


# -- predict -----------------------------------------------------------------------------------
def test_predict_scores_every_row_as_onnx_runtime_does(
    logs: tuple[Path, dict], tmp_path: Path, config: Config, fake_models: Path
) -> None:
    path, columns = logs
    out = tmp_path / "scores.parquet"
    summary = score(Job(path, out, chunk_rows=1000, batch_rows=64), config)
    table = read_output(out)
    assert table.column_names == ["row", "ctr", "click"]
    assert table.column("row").to_pylist() == list(range(2_500))
    want = direct_run(fake_models / "autoint" / "1", mapped(columns))
    got = table.column("ctr").to_numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert table.column("click").to_numpy().tolist() == columns["click"].tolist()
    assert summary["rows"] == summary["scored_rows"] == 2_500
    assert summary["chunks"] == 3 and summary["models"] == ["autoint/1"]


def test_predict_with_another_model(
    logs: tuple[Path, dict], tmp_path: Path, config: Config, fake_models: Path
) -> None:
    path, columns = logs
    out = tmp_path / "scores.parquet"
    summary = score(Job(path, out, model="deepfm"), config)
    want = direct_run(fake_models / "deepfm" / "1", mapped(columns))
    np.testing.assert_array_equal(read_output(out).column("ctr").to_numpy(), want)
    assert summary["models"] == ["deepfm/1"]


def test_chunks_do_not_depend_on_the_files_row_groups(tmp_path: Path, config: Config) -> None:
    """The same rows in row groups of 333 or of 10000: the same parts, row for row."""
    outs = []
    for row_group in (333, 10_000):
        path = tmp_path / f"logs-{row_group}.parquet"
        make_input(path, 2_100, seed=4, row_group=row_group)
        out = tmp_path / f"out-{row_group}"
        score(Job(path, out, chunk_rows=500), config)
        outs.append(out)
    a, b = (parts(o) for o in outs)
    assert list(a) == [f"part-{i:06d}.parquet" for i in range(5)]
    assert [t.num_rows for t in a.values()] == [500, 500, 500, 500, 100]
    assert all(a[name].equals(b[name]) for name in a)
    assert [c.start for c in manifest_chunks(outs[0])] == [0, 500, 1000, 1500, 2000]


# -- summary -----------------------------------------------------------------------------------
def test_summary_counts_oov_histogram_mean_and_auc(
    logs: tuple[Path, dict], tmp_path: Path, config: Config
) -> None:
    path, columns = logs
    out = tmp_path / "scores.parquet"
    summary = score(Job(path, out, chunk_rows=800), config)
    ids = np.stack([columns[n] for n in FIELD_NAMES], axis=1)
    oov = ((ids < 0) | (ids >= VOCABS)).sum(axis=0)
    assert summary["oov_count"] == dict(zip(FIELD_NAMES, oov.tolist(), strict=True))
    assert summary["oov_rate"]["weekday"] == pytest.approx(oov[0] / 2_500)
    ctr = read_output(out).column("ctr").to_numpy()
    hist = summary["ctr_histogram"]
    assert hist["edges"] == list(CTR_EDGES)
    assert hist["counts"] == np.histogram(ctr, bins=np.asarray(CTR_EDGES))[0].tolist()
    assert sum(hist["counts"]) == 2_500
    assert summary["ctr_mean"] == pytest.approx(float(ctr.astype(np.float64).mean()), rel=1e-12)
    click = columns["click"] > 0
    pos, neg = ctr[click], ctr[~click]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert summary["auc"] == pytest.approx(pairwise, rel=1e-12)
    assert summary["label"]["positives"] == int(click.sum())
    written = json.loads(summary_path(out).read_text())
    assert written == without_run(summary) | {"output": str(out)}
    assert summary_path(out) == tmp_path / "scores.summary.json"


def test_auc_on_a_hand_checked_tiny_file(tmp_path: Path, make_config, fake_models: Path) -> None:
    """4 rows whose scores order as 0.1 < 0.35 < 0.4 < 0.8 does against labels 0,1,0,1:
    3 of the 4 (click, no click) pairs are ordered right -> AUC 0.75."""
    ids = np.array([[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]], dtype=np.int64)
    ctr = direct_run(fake_models / "autoint" / "1", ids)
    order = np.argsort(ctr)  # ascending: give labels 0,1,0,1 in that order
    click = np.zeros(4, dtype=np.int8)
    click[order[[1, 3]]] = 1
    table = {n: ids[:, j] for j, n in enumerate(FIELD_NAMES)} | {"click": click}
    pq.write_table(pa.table(table), tmp_path / "tiny.parquet")
    summary = score(Job(tmp_path / "tiny.parquet", tmp_path / "out"), make_config())
    assert summary["auc"] == 0.75
    assert summary["label"] == {
        "column": "click",
        "positives": 2,
        "rate": 0.5,
        "scored_positives": 2,
        "scored_rate": 0.5,
    }


def test_no_label_column_no_auc(tmp_path: Path, config: Config) -> None:
    path = tmp_path / "nolabel.parquet"
    columns = make_input(tmp_path / "x.parquet", 300, seed=2)
    pq.write_table(pa.table({n: columns[n] for n in FIELD_NAMES}), path)
    summary = score(Job(path, tmp_path / "out"), config)
    assert summary["label"] is None and summary["auc"] is None
    assert read_output(tmp_path / "out").column_names == ["row", "ctr"]


# -- rank --------------------------------------------------------------------------------------
def reference_rank(fake_models: Path, ids: np.ndarray, top_k: int, stage1_k: int) -> list[int]:
    """The cascade by hand: deepfm keeps stage1_k (ties by index), autoint orders them."""
    s1 = direct_run(fake_models / "deepfm" / "1", ids)
    keep = sorted(sorted(range(len(ids)), key=lambda i: (-s1[i], i))[:stage1_k])
    s2 = direct_run(fake_models / "autoint" / "1", ids[keep])
    best = sorted(range(len(keep)), key=lambda j: (-s2[j], keep[j]))[:top_k]
    return [keep[j] for j in best]


def test_rank_fixed_groups_match_the_cascade(
    logs: tuple[Path, dict], tmp_path: Path, config: Config, fake_models: Path
) -> None:
    path, columns = logs
    out = tmp_path / "ranks"
    job = Job(path, out, mode="rank", group_size=300, chunk_rows=1000, top_k=5, stage1_k=40)
    summary = score(job, config)
    table = read_output(out)
    assert table.column_names == ["row", "group", "rank", "ctr", "keep", "click"]
    # chunk_rows rounds down to whole groups: 900-row chunks.
    assert [c.start for c in manifest_chunks(out)] == [0, 900, 1800]
    ids, group = mapped(columns), table.column("group").to_numpy()
    assert summary["groups"] == 9 and group.tolist() == (np.arange(2_500) // 300).tolist()
    rank = table.column("rank").to_numpy(zero_copy_only=False)
    for g in range(9):
        rows = np.arange(g * 300, min(g * 300 + 300, 2_500))
        want = reference_rank(fake_models, ids[rows], 5, 40)
        kept = rows[~np.isnan(rank[rows])]
        assert [int(r) - g * 300 for r in kept[np.argsort(rank[kept])]] == want
    assert summary["scored_rows"] == table.column("keep").to_numpy().sum() == 9 * 5
    assert summary["models"] == ["deepfm/1", "autoint/1"]


def test_rank_single_stage_is_the_baseline(tmp_path: Path, config: Config, fake_models: Path):
    path = tmp_path / "logs.parquet"
    columns = make_input(path, 120, seed=5)
    job = Job(path, tmp_path / "out", mode="rank", group_size=120, top_k=7, multi_stage=False)
    summary = score(job, config)
    table = read_output(tmp_path / "out").filter(pc.field("keep"))
    ctr = direct_run(fake_models / "autoint" / "1", mapped(columns))
    want = sorted(range(120), key=lambda i: (-ctr[i], i))[:7]
    assert table.sort_by("rank").column("row").to_pylist() == want
    assert summary["models"] == ["autoint/1"]


def test_rank_group_by_never_splits_a_group(tmp_path: Path, config: Config) -> None:
    path = tmp_path / "logs.parquet"
    columns = make_input(path, 3_000, seed=6, row_group=256, key_runs=(3, 90))
    out = tmp_path / "ranks"
    summary = score(Job(path, out, mode="rank", group_by="key", chunk_rows=400, top_k=3), config)
    runs = 1 + int(np.count_nonzero(np.diff(columns["key"])))
    assert summary["groups"] == runs
    key_part = {}
    for name, table in parts(out).items():
        assert table.num_rows <= 400 + 90
        for key in set(table.column("key").to_pylist()):
            assert key not in key_part, f"group {key} split over {key_part.get(key)} and {name}"
            key_part[key] = name
    table = read_output(out)
    assert table.column("key").to_numpy().tolist() == columns["key"].tolist()
    kept = table.filter(pc.field("keep")).group_by("key").aggregate([("rank", "max")])
    run_lengths = np.unique(columns["key"], return_counts=True)[1]
    assert sorted(kept.column("rank_max").to_pylist()) == sorted(np.minimum(run_lengths, 3))


def test_rank_group_above_max_candidates_fails(tmp_path: Path, make_config) -> None:
    path = tmp_path / "logs.parquet"
    make_input(path, 500, key_runs=(200, 200))
    job = Job(path, tmp_path / "out", mode="rank", group_by="key", chunk_rows=100)
    with pytest.raises(ScoreError, match=r"group key=3 has more than 150 rows \(max_candidates\)"):
        score(job, make_config(max_candidates=150))
    job = Job(path, tmp_path / "out2", mode="rank", group_size=200)
    with pytest.raises(ScoreError, match=r"group_size 200 is above max_candidates \(150\)"):
        score(job, make_config(max_candidates=150))


# -- resuming ----------------------------------------------------------------------------------
def interrupt_after(n: int) -> Callable[[Chunk], None]:
    def hook(chunk: Chunk) -> None:
        if chunk.index + 1 == n:
            raise KeyboardInterrupt

    return hook


@pytest.mark.parametrize("mode", ["predict", "rank"])
def test_an_interrupted_run_resumes_to_the_same_output(
    logs: tuple[Path, dict], tmp_path: Path, config: Config, mode: str
) -> None:
    path, _ = logs
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    options: dict[str, Any] = {"mode": mode, "chunk_rows": 400, "group_size": 100}
    expected = score(Job(path, whole, **options), config)
    with pytest.raises(KeyboardInterrupt):
        score(Job(path, resumed, **options), config, after_chunk=interrupt_after(3))
    assert len(manifest_chunks(resumed)) == 3
    seen: list[int] = []
    summary = score(
        Job(path, resumed, **options), config, after_chunk=lambda c: seen.append(c.index)
    )
    assert seen == [3, 4, 5, 6]  # only the unfinished chunks ran
    assert summary["run"]["resumed_chunks"] == 3
    assert without_run(summary) == without_run(expected)
    a, b = parts(whole), parts(resumed)
    assert list(a) == list(b) and all(a[k].equals(b[k]) for k in a)
    assert (whole / MANIFEST).read_bytes().splitlines()[1:] == (
        resumed / MANIFEST
    ).read_bytes().splitlines()[1:]


def test_resume_after_a_kill_mid_commit(logs: tuple[Path, dict], tmp_path: Path, config):
    """A torn manifest line, a part written but not listed, a temporary file: all dropped
    and written again."""
    path, _ = logs
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    expected = score(Job(path, whole, chunk_rows=500), config)
    with pytest.raises(KeyboardInterrupt):
        score(Job(path, broken, chunk_rows=500), config, after_chunk=interrupt_after(3))
    lines = (broken / MANIFEST).read_bytes().splitlines(keepends=True)
    (broken / MANIFEST).write_bytes(b"".join(lines[:3]) + lines[3][:25])  # chunk 2 torn
    (broken / "part-000003.parquet").write_bytes(b"half a part")
    (broken / "part-000004.parquet.tmp").write_bytes(b"")
    summary = score(Job(path, broken, chunk_rows=500), config)
    assert summary["run"]["resumed_chunks"] == 2
    assert without_run(summary) == without_run(expected)
    a, b = parts(whole), parts(broken)
    assert list(a) == list(b) and all(a[k].equals(b[k]) for k in a)
    assert not list(broken.glob("*.tmp"))


def test_a_finished_run_reruns_as_a_no_op(logs: tuple[Path, dict], tmp_path: Path, config):
    path, _ = logs
    first = score(Job(path, tmp_path / "out", chunk_rows=1000), config)
    ran: list[int] = []
    again = score(
        Job(path, tmp_path / "out", chunk_rows=1000),
        config,
        after_chunk=lambda c: ran.append(c.index),
    )
    assert ran == [] and again["run"]["resumed_chunks"] == 3
    assert without_run(again) == without_run(first)


def test_other_settings_or_input_refuse_to_resume(
    logs: tuple[Path, dict], tmp_path: Path, config: Config
) -> None:
    path, _ = logs
    out = tmp_path / "out"
    score(Job(path, out, chunk_rows=1000), config)
    with pytest.raises(ScoreError, match=r"holds a run with other job\.chunk_rows; .*--overwrite"):
        score(Job(path, out, chunk_rows=999), config)
    with pytest.raises(ScoreError, match=r"other job\.model, models"):
        score(Job(path, out, chunk_rows=1000, model="deepfm"), config)
    make_input(path, 2_500, seed=99, row_group=700)  # same rows, other ids
    with pytest.raises(ScoreError, match=r"other input\.bytes, input\.footer_sha256;"):
        score(Job(path, out, chunk_rows=1000), config)
    summary = score(Job(path, out, chunk_rows=999, overwrite=True), config)
    assert summary["run"]["resumed_chunks"] == 0 and summary["chunks"] == 3


# -- bad input and output ----------------------------------------------------------------------
def test_bad_inputs_and_outputs_fail_with_a_clear_message(tmp_path: Path, config: Config) -> None:
    good = tmp_path / "good.parquet"
    columns = make_input(good, 100)
    with pytest.raises(ScoreError, match=r"cannot read .*missing\.parquet as parquet"):
        score(Job(tmp_path / "missing.parquet", tmp_path / "o1"), config)
    lacking = tmp_path / "lacking.parquet"
    pq.write_table(pa.table({"weekday": columns["weekday"]}), lacking)
    with pytest.raises(ScoreError, match=r"lacks the columns \['hour', 'region', 'city'\]"):
        score(Job(lacking, tmp_path / "o2"), config)
    nulls = tmp_path / "nulls.parquet"
    with_null = {n: pa.array(columns[n]) for n in FIELD_NAMES}
    with_null["city"] = pa.array([None, *columns["city"][1:].tolist()], type=pa.int64())
    pq.write_table(pa.table(with_null), nulls)
    with pytest.raises(ScoreError, match=r"column 'city' has nulls"):
        score(Job(nulls, tmp_path / "o3"), config)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ScoreError, match=r"is not the output of `ctr-farm score`"):
        score(Job(good, tmp_path / "taken", overwrite=True), config)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    with pytest.raises(ScoreError, match=r"exists and is not a directory"):
        score(Job(good, good), config)
    with pytest.raises(InvalidRequest, match=r"unknown model; loaded: \['autoint', 'deepfm'\]"):
        score(Job(good, tmp_path / "o4", model="nope"), config)


# -- in a process of its own: killed, interrupted, memory ----------------------------------------
def score_cmd(fake_models: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "app",
        "score",
        "--deepfm-model",
        str(fake_models / "deepfm" / "1"),
        "--autoint-model",
        str(fake_models / "autoint" / "1"),
        "--no-progress",
        *args,
    ]


def run_until(cmd: list[str], out: Path, chunks: int, sig: int) -> subprocess.CompletedProcess:
    """Start ``cmd``, send ``sig`` once ``out``'s manifest lists ``chunks`` chunks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTR_FARM_")}
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    manifest = out / MANIFEST
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and len(manifest.read_bytes().splitlines()) > chunks:
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_killed_and_interrupted_processes_resume_to_the_same_output(
    tmp_path: Path, fake_models: Path
) -> None:
    path = tmp_path / "logs.parquet"
    make_input(path, 200_000, seed=8, row_group=4096)
    args = ["--input", str(path), "--chunk-rows", "250"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    done = subprocess.run(
        score_cmd(fake_models, *args, "--output", str(whole), "--json"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    expected = json.loads(done.stdout)
    cmd = score_cmd(fake_models, *args, "--output", str(resumed), "--json")
    killed = run_until(cmd, resumed, 20, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it was killed"
    stopped = run_until(cmd, resumed, 300, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    assert f"interrupted; the same command resumes {resumed}" in stopped.stderr
    finished = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    summary = json.loads(finished.stdout)
    assert 300 <= summary["run"]["resumed_chunks"] < 800
    assert without_run(summary) == without_run(expected)
    a, b = parts(whole), parts(resumed)
    assert len(a) == 800 and list(a) == list(b)
    assert all(a[k].equals(b[k]) for k in a)


MEMORY_PROBE = """
import json, sys, tracemalloc
import pyarrow as pa
import pyarrow.compute as pc
from app.cli import main
tracemalloc.start()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "arrow_peak": pa.default_memory_pool().max_memory(),
                  "python_peak": tracemalloc.get_traced_memory()[1]}))
"""


def peak_memory(tmp_path: Path, fake_models: Path, rows: int) -> dict[str, int]:
    """Peak Arrow and Python (tracemalloc: numpy too) bytes of ``ctr-farm score`` over
    ``rows`` rows (no label) read 5000 at a time, in a fresh process."""
    columns = make_input(tmp_path / f"labelled-{rows}.parquet", rows, seed=9)
    path = tmp_path / f"logs-{rows}.parquet"
    pq.write_table(pa.table({n: columns[n] for n in FIELD_NAMES}), path, row_group_size=20_000)
    cmd = score_cmd(fake_models, "--input", str(path), "--output", str(tmp_path / f"o{rows}"))
    cmd += ["--chunk-rows", "5000", "--json"]
    cmd[1:4] = ["-c", MEMORY_PROBE, "score"]  # python -c PROBE score ...
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["code"] == 0
    return probe


def test_memory_follows_the_chunk_not_the_file(tmp_path: Path, fake_models: Path) -> None:
    """8x the rows, the same peak: Arrow's stays at about one row group (pyarrow's default
    pre-buffering held the whole compressed file), Python's grows by the manifest's chunk
    records only (~1 KB per chunk). Without a label: AUC is the one figure that reads every
    row's score back (5 bytes a row plus the sort)."""
    small = peak_memory(tmp_path, fake_models, 100_000)
    large = peak_memory(tmp_path, fake_models, 800_000)
    decoded = 800_000 * len(FIELD_NAMES) * 8  # 25.6 MB
    assert large["arrow_peak"] < 1.2 * small["arrow_peak"] + 64 * 1024, (small, large)
    assert large["arrow_peak"] < decoded / 10, large
    chunks = (800_000 - 100_000) // 5000
    assert large["python_peak"] - small["python_peak"] < chunks * 2048, (small, large)
