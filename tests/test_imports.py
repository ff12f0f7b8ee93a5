"""Serving must never import torch (nor the dev-only onnx package)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from app.config import REPO_ROOT

SERVING = [
    "app.config",
    "app.errors",
    "app.schema",
    "app.features",
    "app.sessions",
    "app.pipeline",
    "app.cache",
    "app.service",
    "app.api",
    "app.proxy",
    "app.monitoring",
    "app.stack",
    "app.logconf",
    "app.asgi",
    "app.window",
    "app.goodput",
    "app.drift",
    "app.requestlog",
    "app.stats",
    "app.status",
    "app.tracing",
]
#: opentelemetry: imported only when a worker builds its tracer (Config.tracing on);
#: sqlite3 only when it opens its request log (Config.request_log set).
FORBIDDEN = ["torch", "onnx", "onnxscript", "app.offline", "opentelemetry", "sqlite3"]


def imported_after(modules: list[str]) -> set[str]:
    """Import ``modules`` in a fresh interpreter; return the names of sys.modules."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTR_FARM_")}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def serving_modules() -> set[str]:
    return imported_after(SERVING)


@pytest.mark.parametrize("forbidden", FORBIDDEN)
def test_serving_does_not_import(serving_modules: set[str], forbidden: str) -> None:
    leaked = {m for m in serving_modules if m == forbidden or m.startswith(forbidden + ".")}
    assert leaked == set()


def test_the_check_sees_what_was_imported(serving_modules: set[str]) -> None:
    """Guard: the subprocess really imported the serving stack."""
    assert {"app.asgi", "app.api", "onnxruntime", "falcon", "msgspec"} <= serving_modules


def test_the_gunicorn_master_never_imports_onnxruntime() -> None:
    """deploy/gunicorn.conf.py runs in the master before fork: ONNX Runtime's global state
    (threads, condition variables) must not exist there, or a worker that exits hangs in
    ORT's exit handlers (seen: a boot failure that never stopped gunicorn)."""
    leaked = imported_after(["app.config", "app.logconf"])
    assert "onnxruntime" not in leaked and "app.pipeline" not in leaked
