"""Model versions and hot reload through the real nginx + gunicorn + 2 workers.

The stack serves from a model repository (a snapshot of the bundled models as
version 1). A new version is published atomically (``registry.publish``), then:

- SIGHUP to the gunicorn master under a bounded open-loop load: both workers move to
  it, and every request of the load is answered 200 (no request dropped);
- a corrupt version written straight into the repository (bypassing publish) and
  ``POST /admin/reload`` on one worker's socket: rejected with its reason in the answer
  and at ``/models``, in both workers, while the previous version goes on serving.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from app import registry
from app.sessions import CARD_FILE, MODEL_FILE, LoadedModel
from app.stack import Stack
from benchmarks.soak import OpenLoad, mixed_bodies
from tests.fake_models import copy_as_version
from tests.faults.test_lifecycle import UnixConnection, wait_until
from tests.integration.conftest import start_stack

pytestmark = pytest.mark.integration

TOKEN = "reload-test-token"
RATE, SECONDS = 60.0, 6.0


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    yield from start_stack(request, prefix="farm-r-", settings={"admin_token": TOKEN})


def on_worker(stack: Stack, slot: int, method: str, path: str, **headers: str) -> tuple[int, Any]:
    conn = UnixConnection(str(stack.config.worker_socket(slot)), timeout_s=120.0)
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, msgspec.json.decode(resp.read())
    finally:
        conn.close()


def served(stack: Stack, slot: int) -> dict[str, str]:
    _, body = on_worker(stack, slot, "GET", "/models")
    return {m["name"]: m["version"] for m in body["models"]}


def new_version(stack: Stack, name: str, version: str, tmp: Path) -> Path:
    """Version ``version`` of ``name``: version 1's weights under a new card version."""
    return copy_as_version(stack.config.model_dirs()[name] / "1", tmp / name / version, version)


def validated(path: Path) -> LoadedModel:
    model = LoadedModel(path, pool_size=1)
    registry.check_golden(model)
    return model


def test_sighup_under_load_moves_every_worker_and_drops_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    assert served(stack, 0)["autoint"] == served(stack, 1)["autoint"] == "1"
    published = registry.publish(
        new_version(stack, "autoint", "2", tmp_path),
        stack.config.model_dirs()["autoint"],
        validated,
    )
    assert (published / registry.GOLDEN_FILE).is_file()

    load = OpenLoad(stack.url, mixed_bodies(stack.config), RATE, SECONDS).start()
    time.sleep(1.5)
    assert stack.gunicorn is not None
    os.kill(stack.gunicorn.pid, signal.SIGHUP)
    for slot in (0, 1):
        wait_until(lambda s=slot: served(stack, s)["autoint"] == "2", 60, f"worker {slot}")
    shots = load.join()

    statuses = Counter(s.status for s in shots)
    print({"sent": len(shots), "statuses": dict(statuses)})
    assert len(shots) == int(RATE * SECONDS)
    assert statuses == {200: len(shots)}, [s.detail for s in shots if s.status != 200][:3]
    for slot in (0, 1):
        _, body = on_worker(stack, slot, "GET", "/models")
        assert body["generation"] == 2 and body["last_reload"]["changed"] == ["autoint/2"]
    answer = httpx.post(
        f"{stack.url}/rank", content=mixed_bodies(stack.config)[2][1], timeout=30
    ).json()
    assert answer["models"] == ["deepfm/1", "autoint/2"]


def test_admin_reload_rejects_a_corrupt_version_and_keeps_serving(stack: Stack) -> None:
    before = served(stack, 0)["autoint"]
    repo = stack.config.model_dirs()["autoint"]
    bad = repo / "9"
    shutil.copytree(repo / "1", bad)
    card = json.loads((bad / CARD_FILE).read_text())
    (bad / CARD_FILE).write_text(json.dumps({**card, "version": "9"}))
    (bad / MODEL_FILE).write_bytes(b"\0" * 64)  # a publish that went wrong halfway

    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert on_worker(stack, 0, "POST", "/admin/reload")[0] == 401
    status, body = on_worker(stack, 0, "POST", "/admin/reload", **auth)

    assert status == 200, body
    assert body["changed"] == []
    assert [(r["name"], r["version"]) for r in body["rejected"]] == [("autoint", "9")]
    assert "does not match card" in body["rejected"][0]["reason"]
    assert str(repo) not in json.dumps(body)  # no file system paths in answers
    # The master forwarded the reload to the other worker: it rejected it too.
    wait_until(
        lambda: on_worker(stack, 1, "GET", "/models")[1]["rejected"], 60, "worker 1's reload"
    )
    for slot in (0, 1):
        assert served(stack, slot)["autoint"] == before
    answer = httpx.post(
        f"{stack.url}/rank", content=mixed_bodies(stack.config)[2][1], timeout=30
    ).json()
    assert answer["models"] == ["deepfm/1", f"autoint/{before}"]
