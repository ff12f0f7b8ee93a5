"""Security through the real stack: admin endpoints are reachable only on a worker's own
unix socket with the token; the public port answers 404; no request reaches the file
system through a model name; no error body carries a traceback or a path."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.stack import Stack, running

pytestmark = pytest.mark.integration

TOKEN = "fault-suite-token"


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with running(Path(tempfile.mkdtemp(prefix="fadm-")), {"admin_token": TOKEN}) as stack:
        yield stack


def worker(stack: Stack, slot: int = 0) -> httpx.Client:
    transport = httpx.HTTPTransport(uds=str(stack.config.worker_socket(slot)))
    return httpx.Client(transport=transport, base_url="http://worker", timeout=10)


@pytest.mark.parametrize("path", ["/admin/config", "/admin/breakers/reset", "/admin/x"])
def test_public_port_hides_admin(stack: Stack, path: str) -> None:
    for method in ("GET", "POST"):
        resp = httpx.request(method, stack.url + path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
        assert resp.headers["X-Request-ID"]


def test_worker_socket_serves_admin_with_the_token_only(stack: Stack) -> None:
    with worker(stack) as client:
        assert client.get("/admin/config").status_code == 401
        resp = client.get("/admin/config", headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status_code == 200 and resp.json()["admin_token"] == "<redacted>"
        resp = client.post("/admin/breakers/reset", headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status_code == 200 and resp.json()["pid"] in stack.worker_pids()


@pytest.mark.parametrize(
    "model", ["../../etc/passwd", "/etc/passwd", "deepfm/../autoint", "models/deepfm/1", "x" * 300]
)
def test_model_names_never_reach_the_file_system(stack: Stack, model: str) -> None:
    body = {"candidate": {"weekday": 1}, "model": model}
    resp = httpx.post(f"{stack.url}/predict", json=body, timeout=10)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_request", "model")
    assert "/etc" not in resp.text and "Traceback" not in resp.text
    assert str(stack.config.run_path) not in resp.text and "models/" not in error["message"]
