"""The benchmark peers answer like the farm: same rankings, same CTRs, for one body.

Each peer (benchmarks/peers/) is started briefly by the harness, one worker process,
over a snapshot of the real models, and compared with the in-process ``Farm`` loaded
from the same snapshot. Then ``scripts/compare_peers.py`` runs end to end on a tiny
grid. Skipped cleanly when ``.venv-peers`` cannot be built (no package index here).
"""

from __future__ import annotations

import csv
import http.client
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from app import registry
from app.config import REPO_ROOT, load
from app.schema import PredictRequest, RankRequest
from app.service import Farm
from app.sessions import read_card
from benchmarks.peers import PEERS, ensure_venv, start_peer
from tests.integration.conftest import snapshot_models

pytestmark = pytest.mark.integration
#: compare_peers.py on the smallest grid that still compares a peer with the farm.
TINY = (
    *("--endpoints", "predict", "--targets", "ctr-farm,gthread-falcon"),
    *("--seconds", "1", "--warmup", "1", "--threads", "1", "--connections", "4"),
)


@pytest.fixture(scope="module")
def peers_venv() -> None:
    try:
        ensure_venv()
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f".venv-peers cannot be created here: {exc}")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Config overrides pinning a snapshot of the served versions (retrain-proof; the
    peers take a version dir, not a repository)."""
    repos = snapshot_models(tmp_path_factory.mktemp("peer-models"))
    return {key: str(registry.newest(Path(repo))) for key, repo in repos.items()}


@pytest.fixture(scope="module")
def reference_farm(models: dict[str, str]) -> Iterator[Farm]:
    farm = Farm(load(overrides={**models, "warmup_runs": 0}, env={}))
    farm.load()
    yield farm
    farm.close()


@pytest.fixture(scope="module")
def bodies(reference_farm: Farm) -> dict[str, bytes]:
    """Objects-form bodies with out-of-vocabulary ids and duplicated rows (score ties)."""
    card = read_card(reference_farm.config.model_dirs()["autoint"])
    rng = np.random.default_rng(7)
    vocab = np.array([f.vocab_size for f in card.fields])
    ids = (rng.random((300, len(vocab))) * vocab).astype(np.int64)
    ids[3, 5], ids[10, 0], ids[20, 15] = vocab[5], -1, 2**40  # OOV: at, below, far above
    ids[50:55] = ids[0]  # ties: the index breaks them
    names = [f.name for f in card.fields]
    cands = [dict(zip(names, row, strict=True)) for row in ids.tolist()]
    return {
        "rank": msgspec.json.encode({"candidates": cands, "top_k": 10, "stage1_k": 60}),
        "rank_default": msgspec.json.encode({"candidates": cands[:150]}),
        "rank_single": msgspec.json.encode(
            {"candidates": cands, "top_k": 7, "stage1_k": 20, "multi_stage": False}
        ),
        "predict": msgspec.json.encode({"candidates": cands[:5]}),
        "predict_one": msgspec.json.encode({"candidate": cands[3]}),
    }


def post(url: str, path: str, body: bytes) -> tuple[int, Any]:
    host, _, port = url.split("//", 1)[1].partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(data) if resp.status == 200 else data


@pytest.mark.parametrize("name", sorted(PEERS))
def test_peer_answers_like_the_farm(
    peers_venv: None,
    models: dict[str, str],
    reference_farm: Farm,
    bodies: dict[str, bytes],
    name: str,
) -> None:
    env = {
        "PEER_DEEPFM_MODEL": models["deepfm_model"],
        "PEER_AUTOINT_MODEL": models["autoint_model"],
    }
    with start_peer(name, workers=1, env=env, timeout_s=180) as peer:
        for key in ("rank", "rank_default", "rank_single"):
            expected = reference_farm.rank(
                msgspec.json.decode(bodies[key], type=RankRequest), "json"
            )
            status, answer = post(peer.url, "/rank", bodies[key])
            assert status == 200, (key, answer)
            got = answer["rankings"]
            assert [r["index"] for r in got] == expected.indices.tolist(), key
            assert [r["rank"] for r in got] == list(range(1, len(got) + 1))
            np.testing.assert_allclose([r["ctr"] for r in got], expected.scores, rtol=1e-6)
        for key in ("predict", "predict_one"):
            scores, _ = reference_farm.predict(
                msgspec.json.decode(bodies[key], type=PredictRequest), "json"
            )
            status, answer = post(peer.url, "/predict", bodies[key])
            assert status == 200, (key, answer)
            np.testing.assert_allclose(answer["ctr"], scores, rtol=1e-6)
        status, _ = post(peer.url, "/rank", b'{"candidates": [{"weekday": 1}]}')
        assert status in (400, 422), "a candidate missing fields is a client error"


def test_compare_peers_tiny(peers_venv: None, tmp_path: Path) -> None:
    out = tmp_path / "peers.csv"
    proc = subprocess.run(
        [sys.executable, "scripts/compare_peers.py", *TINY, "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {r["target"]: r for r in csv.DictReader(out.read_text().splitlines())}
    assert set(rows) == {"ctr-farm", "gthread-falcon"}
    for row in rows.values():
        assert float(row["rps"]) > 0 and int(row["non2xx"]) == 0
    assert rows["gthread-falcon"]["agrees"] == "True"
    assert float(rows["ctr-farm"]["rps_farm_over_peer"]) == 1.0
    assert "| predict | gthread-falcon |" in out.with_suffix(".md").read_text()
