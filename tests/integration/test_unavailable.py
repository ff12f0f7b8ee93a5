"""When no worker can answer, nginx itself answers a JSON 503 with Retry-After."""

from __future__ import annotations

import shutil
import signal
import tempfile
from pathlib import Path

import httpx
import pytest

from app.stack import running

pytestmark = pytest.mark.integration


def test_no_worker_gives_json_503_with_retry_after() -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="down-"))
    try:
        with running(run_dir, {"workers": 1}) as stack:
            assert stack.gunicorn is not None
            stack.gunicorn.send_signal(signal.SIGTERM)
            stack.gunicorn.wait(30)
            resp = httpx.post(
                f"{stack.url}/rank",
                json={"candidates": [[0] * 16]},
                headers={"X-Request-ID": "down-1"},
                timeout=10,
            )
        assert resp.status_code == 503
        assert resp.headers["content-type"] == "application/json"
        assert resp.headers["retry-after"] == "1"
        assert resp.headers["x-request-id"] == "down-1"
        assert resp.json() == {
            "error": {
                "code": "upstream_unavailable",
                "message": (
                    "no worker could take the request now (all busy or restarting); retry shortly"
                ),
                "field": None,
            },
            "request_id": "down-1",
        }
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
