"""Run a script of scripts/ as a user would: a fresh interpreter in the repository root."""

from __future__ import annotations

import subprocess
import sys

from app.config import REPO_ROOT


def run_proc(
    *args: str,
    env: dict[str, str] | None = None,
    returncode: int = 0,
    timeout_s: float = 300,
) -> subprocess.CompletedProcess:
    """``python <args>``; asserts the exit status, shows the stderr tail when it differs."""
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        check=False,
    )
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return proc
