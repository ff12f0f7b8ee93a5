"""``ctr-farm serve`` as a user runs it: flags and CTR_FARM_* variables resolve through
app.config.load, reach honcho, gunicorn, the workers and nginx; Ctrl-C stops them all."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from app.config import REPO_ROOT
from app.sessions import read_card
from app.stack import free_port
from tests.integration.conftest import TIMEOUT, Candidates, snapshot_models

pytestmark = pytest.mark.integration


class Served(NamedTuple):
    url: str
    proc: subprocess.Popen
    run_dir: Path
    candidates: Candidates


@pytest.fixture(scope="module")
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    run_dir = Path(tempfile.mkdtemp(prefix="srv-"))  # short: unix socket paths < 107 bytes
    models = snapshot_models(run_dir / "models")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTR_FARM_")}
    env |= {"CTR_FARM_DEFAULT_TOP_K": "3", "CTR_FARM_WORKERS": "2"}  # the flag below wins
    cmd = [sys.executable, "-m", "app", "serve", "--port", str(port), "--run-dir", str(run_dir)]
    cmd += ["--workers", "1", "--max-predict-candidates", "2"]
    cmd += ["--deepfm-model", models["deepfm_model"], "--autoint-model", models["autoint_model"]]
    with (run_dir / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, run_dir)
        card = read_card(Path(models["deepfm_model"]))
        yield Served(url, proc, run_dir, Candidates(card.fields))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    failed = request.session.testsfailed
    if not failed:
        shutil.rmtree(run_dir, ignore_errors=True)


def wait_ready(url: str, proc: subprocess.Popen, run_dir: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, (run_dir / "serve.log").read_text()[-3000:]
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"ctr-farm serve not ready after {timeout_s}s: {run_dir / 'serve.log'}")


def test_settings_from_flags_and_env_reach_the_workers(served: Served) -> None:
    candidates = served.candidates
    ids = candidates.ids(20, seed=3)
    with httpx.Client(base_url=served.url, timeout=TIMEOUT) as client:
        ranked = client.post("/rank", json={"candidates": candidates.form(ids, "rows")})
        assert ranked.status_code == 200, ranked.text
        assert len(ranked.json()["rankings"]) == 3  # CTR_FARM_DEFAULT_TOP_K
        predicted = client.post("/predict", json={"candidates": candidates.form(ids[:3], "rows")})
        assert predicted.status_code == 400  # --max-predict-candidates 2
        assert "at most 2 candidates per /predict" in predicted.json()["error"]["message"]
        assert client.get("/ready").json()["models"] == ["deepfm/1", "autoint/1"]
    # --workers 1 beat CTR_FARM_WORKERS=2: one worker socket in the run dir.
    assert sorted(p.name for p in served.run_dir.glob("worker-*.sock")) == ["worker-0.sock"]


def test_ctrl_c_stops_the_whole_farm(served: Served) -> None:
    os.killpg(served.proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
    served.proc.wait(60)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{served.url}/health", timeout=2)
