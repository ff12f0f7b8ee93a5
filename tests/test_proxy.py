"""app.proxy: the rendered nginx.conf is complete, matches the Config, and nginx accepts it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.config import Config, ConfigError, load
from app.proxy import nginx_binary, prepare, render, upstream_servers
from app.stack import free_port

NGINX = "/usr/sbin/nginx"


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Short on purpose: unix socket paths must stay under 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="farm-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def proxy_config(run_dir: Path, **overrides: Any) -> Config:
    return load(overrides={"run_dir": str(run_dir), "port": free_port(), **overrides}, env={})


def upstream_block(text: str) -> list[str]:
    block = re.search(r"upstream ctr_farm \{(.*?)\n    \}", text, re.S)
    assert block is not None
    return [
        line.strip() for line in block.group(1).splitlines() if line.strip().startswith("server")
    ]


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_per_worker_sockets_list_every_worker_then_the_backup(run_dir: Path, workers: int):
    config = proxy_config(run_dir, workers=workers, per_worker_sockets=True)
    servers = upstream_block(render(config))
    assert servers == [
        *(
            f"server unix:{run_dir}/worker-{i}.sock max_fails=1 fail_timeout=1s;"
            for i in range(workers)
        ),
        f"server unix:{run_dir}/gunicorn.sock backup;",
    ]
    assert upstream_servers(config).count("\n") == workers


@pytest.mark.parametrize("workers", [1, 3])
def test_shared_socket_only(run_dir: Path, workers: int) -> None:
    config = proxy_config(run_dir, workers=workers, per_worker_sockets=False)
    assert upstream_block(render(config)) == [f"server unix:{run_dir}/gunicorn.sock;"]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"max_body_bytes": 12345, "upstream_keepalive_s": 7, "worker_timeout_s": 42},
        {"host": "0.0.0.0", "per_worker_sockets": False},
    ],
)
def test_render_fills_every_placeholder(run_dir: Path, overrides: dict[str, Any]) -> None:
    config = proxy_config(run_dir, **overrides)
    text = render(config)
    assert "{{" not in text
    assert "}}" not in text
    assert f"client_max_body_size {config.max_body_bytes};" in text
    assert f"listen {config.host}:{config.port} backlog=4096;" in text
    assert f"keepalive_timeout {config.upstream_keepalive_s}s;" in text
    assert f"proxy_read_timeout {config.worker_timeout_s}s;" in text
    assert f"pid {run_dir}/nginx.pid;" in text
    assert f"access_log {run_dir}/access.log json" in text
    # Nothing points outside the run dir.
    for path in re.findall(r"_temp_path (\S+);", text):
        assert path.startswith(f"{run_dir}/nginx/")


def test_unknown_placeholder_is_a_config_error(run_dir: Path, tmp_path: Path) -> None:
    template = tmp_path / "nginx.conf"
    template.write_text("listen {{host}}:{{port}};\nfoo {{no_such_value}};\n")
    with pytest.raises(ConfigError, match="no_such_value"):
        render(proxy_config(run_dir), template)


def test_a_template_without_placeholders_is_unchanged(run_dir: Path, tmp_path: Path) -> None:
    template = tmp_path / "nginx.conf"
    template.write_text("events {}\n{ not a placeholder }\n")
    assert render(proxy_config(run_dir), template) == template.read_text()


def test_nginx_binary(run_dir: Path) -> None:
    found = Path(nginx_binary(proxy_config(run_dir)))
    assert found.name == "nginx"
    assert os.access(found, os.X_OK)
    with pytest.raises(ConfigError, match="nginx_bin"):
        nginx_binary(proxy_config(run_dir, nginx_bin="no-such-nginx-binary"))


@pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")
@pytest.mark.parametrize(
    "overrides",
    [{"per_worker_sockets": True, "workers": 3}, {"per_worker_sockets": False}],
    ids=["per-worker", "shared"],
)
def test_nginx_accepts_the_rendered_config(run_dir: Path, overrides: dict[str, Any]) -> None:
    config = proxy_config(run_dir, nginx_bin=NGINX, **overrides)
    argv = prepare(config)
    conf = run_dir / "nginx.conf"
    assert argv == [NGINX, "-p", str(run_dir), "-e", "stderr", "-c", str(conf)]
    assert conf.read_text() == render(config)
    assert len(str(config.worker_socket(config.workers - 1))) < 107
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stderr
    assert "syntax is ok" in check.stderr
    assert "test is successful" in check.stderr
    # -t writes nothing outside the run dir: nginx's temp dirs were made under it.
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        assert (run_dir / "nginx" / sub).is_dir()


@pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")
def test_nginx_rejects_a_broken_config(run_dir: Path) -> None:
    """Guard the test above: ``nginx -t`` does fail on a bad file."""
    config = proxy_config(run_dir, nginx_bin=NGINX)
    argv = prepare(config)
    conf = run_dir / "nginx.conf"
    conf.write_text(conf.read_text().replace("client_max_body_size", "client_max_body_sizes"))
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode != 0
    assert "client_max_body_sizes" in check.stderr
