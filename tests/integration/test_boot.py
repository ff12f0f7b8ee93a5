"""Boot failures: a model that cannot load stops the farm with a clear message."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from app.config import load
from app.stack import Stack, free_port
from tests.fake_models import write_model

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("corrupt", "sha256"),  # bytes changed after the card was written
        ("unloadable", "onnxruntime cannot load it"),  # card matches, file is not ONNX
    ],
)
def test_bad_model_stops_gunicorn_with_reason(kind: str, expected: str) -> None:
    root = Path(tempfile.mkdtemp(prefix="boot-"))
    try:
        good = write_model(root, "deepfm")
        bad = write_model(root, "autoint", kind="corrupt" if kind == "unloadable" else "ok")
        if kind == "corrupt":
            (bad / "model.onnx").write_bytes(b"tampered")
        config = load(
            overrides={
                "port": free_port(),
                "run_dir": str(root / "run"),
                "deepfm_model": str(good),
                "autoint_model": str(bad),
                "workers": 1,
            },
            env={},
        )
        stack = Stack(config, root / "logs")
        with pytest.raises(RuntimeError, match="gunicorn exited"):
            stack.start(timeout_s=60)
        stack.stop()
        log = (root / "logs" / "gunicorn.log").read_text()
        assert expected in log
        # The worker never answered: no request reached a half-loaded worker.
        assert "Application startup complete" not in log
        assert stack.gunicorn is not None and stack.gunicorn.returncode != 0
    finally:
        shutil.rmtree(root, ignore_errors=True)
