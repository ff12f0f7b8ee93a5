"""``ctr-farm score`` against the real stack: the same rows scored offline and sent to
/predict and /rank through nginx get the same CTRs (float32, bit for bit) and ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.config import REPO_ROOT, Config
from tests.integration.conftest import JSON, MSGPACK, Candidates, parse, post

pytestmark = pytest.mark.integration

ROWS = 1_500
#: /predict takes at most max_predict_candidates (64) per request.
PREDICT_BATCH = 64


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory, candidates: Candidates) -> dict[str, Any]:
    """Realistic ids with 2% out of vocabulary (above, below, far above), duplicated rows,
    a ``click`` label and a ``request`` key in runs of 40 to 400 rows."""
    ids = candidates.ids(ROWS, seed=2024, oov_rate=0.02)
    rng = np.random.default_rng(7)
    runs = rng.integers(40, 401, size=ROWS)
    request = np.repeat(np.arange(ROWS), runs)[:ROWS]
    columns = {name: ids[:, j] for j, name in enumerate(candidates.names)}
    columns |= {"click": (rng.random(ROWS) < 0.05).astype(np.int8), "request": request}
    path = tmp_path_factory.mktemp("score") / "logs.parquet"
    pq.write_table(pa.table(columns), path, row_group_size=500)
    return {"path": path, "ids": ids, "request": request}


def ctr_farm_score(config: Config, *args: str) -> dict[str, Any]:
    """``python -m app score`` in a fresh process, on the models the stack serves: one
    through a flag, one through its CTR_FARM_* variable (both reach app.config.load)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTR_FARM_")}
    env["CTR_FARM_AUTOINT_MODEL"] = config.autoint_model
    cmd = [sys.executable, "-m", "app", "score", "--deepfm-model", config.deepfm_model]
    proc = subprocess.run(
        [*cmd, *args, "--no-progress", "--json"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("model", [None, "deepfm"])
def test_batch_predict_equals_served_predict(
    model: str | None,
    logs: dict[str, Any],
    client: httpx.Client,
    candidates: Candidates,
    config: Config,
    tmp_path: Path,
) -> None:
    out = tmp_path / "scores.parquet"
    args = ["--input", str(logs["path"]), "--output", str(out), "--chunk-rows", "400"]
    summary = ctr_farm_score(config, *args, *(["--model", model] if model else []))
    name = model or config.predict_model
    assert summary["rows"] == ROWS and summary["models"] == [f"{name}/1"]
    table = pq.read_table(out)
    assert table.column("row").to_pylist() == list(range(ROWS))
    batch = table.column("ctr").to_numpy()
    served = []
    for i, start in enumerate(range(0, ROWS, PREDICT_BATCH)):
        rows = logs["ids"][start : start + PREDICT_BATCH]
        body: dict[str, Any] = {"candidates": candidates.form(rows, "rows")}
        if model:
            body["model"] = model
        resp = post(client, "/predict", body, (JSON, MSGPACK)[i % 2])
        assert resp.status_code == 200, resp.text[:300]
        answer = parse(resp)
        assert answer["model"] == name
        served += answer["ctr"]
    served_f32 = np.array(served, dtype=np.float64).astype(np.float32)
    assert np.max(np.abs(served_f32 - batch)) <= 1e-6
    assert np.array_equal(served_f32, batch)  # in practice: bit for bit
    # The summary's OOV counts are the farm's mapping of the same ids.
    oov = (logs["ids"] < 0) | (logs["ids"] >= candidates.vocab)
    assert summary["oov_count"] == dict(
        zip(candidates.names, oov.sum(axis=0).tolist(), strict=True)
    )


@pytest.mark.parametrize(
    ("grouping", "top_k", "stage1_k"),
    [(["--group-size", "300"], 10, 60), (["--group-by", "request"], None, None)],
    ids=["fixed-groups", "key-groups-defaults"],
)
def test_batch_rank_equals_served_rank(
    grouping: list[str],
    top_k: int | None,
    stage1_k: int | None,
    logs: dict[str, Any],
    client: httpx.Client,
    candidates: Candidates,
    config: Config,
    tmp_path: Path,
) -> None:
    out = tmp_path / "ranks"
    args = ["--input", str(logs["path"]), "--output", str(out), "--mode", "rank", *grouping]
    args += ["--chunk-rows", "500"]
    for flag, value in (("--top-k", top_k), ("--stage1-k", stage1_k)):
        if value is not None:
            args += [flag, str(value)]
    summary = ctr_farm_score(config, *args)
    table = pq.read_table(out)
    group = table.column("group").to_numpy()
    rank = table.column("rank").to_numpy(zero_copy_only=False)
    ctr = table.column("ctr").to_numpy(zero_copy_only=False)
    assert summary["groups"] == len(np.unique(group))
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        body: dict[str, Any] = {"candidates": candidates.form(logs["ids"][rows], "columns")}
        if top_k is not None:
            body |= {"top_k": top_k, "stage1_k": stage1_k}
        resp = post(client, "/rank", body, MSGPACK if g % 2 else JSON)
        assert resp.status_code == 200, resp.text[:300]
        answer = parse(resp)
        assert answer["degraded"] is False
        served_rows = [int(rows[r["index"]]) for r in answer["rankings"]]
        kept = rows[~np.isnan(rank[rows])]
        batch_rows = kept[np.argsort(rank[kept])].tolist()
        assert batch_rows == served_rows, f"group {g}"
        served_ctr = np.array([r["ctr"] for r in answer["rankings"]]).astype(np.float32)
        assert np.array_equal(ctr[batch_rows].astype(np.float32), served_ctr), f"group {g}"
        assert [r["rank"] for r in answer["rankings"]] == rank[batch_rows].astype(int).tolist()
