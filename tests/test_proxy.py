"""app.proxy: the rendered nginx.conf is complete, matches the Config, and nginx accepts it."""

from __future__ import annotations

import json
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
from app.proxy import (
    nginx_binary,
    prepare,
    rate_limit_directives,
    render,
    upstream_servers,
)
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


# -- front proxy limits: rate limit, timeouts, nginx's own error answers ---------------------
def location_block(text: str, name: str) -> str:
    block = re.search(rf"\n        location {re.escape(name)} \{{\n(.*?)\n        \}}", text, re.S)
    assert block is not None, f"no location {name}"
    return block.group(1)


def test_rate_limit_is_rendered_from_config(run_dir: Path) -> None:
    text = render(proxy_config(run_dir, rate_limit_rps=37, rate_limit_burst=5))
    assert len(re.findall(r"^\s*limit_req", text, re.M)) == 4  # zone, limit, status, log level
    zones = re.findall(r"^\s*limit_req_zone .*$", text, re.M)
    assert [z.strip() for z in zones] == [
        "limit_req_zone $binary_remote_addr zone=per_client:10m rate=37r/s;"
    ]
    # The limit guards what reaches the workers; nginx's own answers are not limited.
    proxied = location_block(text, "/")
    assert "limit_req zone=per_client burst=5 nodelay;" in proxied
    assert "limit_req_status 429;" in proxied
    assert text.count("limit_req zone=") == 1
    assert "error_page 429 @rate_limited;" in text


def test_no_burst_is_no_burst_parameter(run_dir: Path) -> None:
    _, limit = rate_limit_directives(proxy_config(run_dir, rate_limit_rps=5, rate_limit_burst=0))
    assert "limit_req zone=per_client nodelay;" in limit  # nginx refuses burst=0


@pytest.mark.parametrize("burst", [0, 1000])
def test_rate_limit_zero_renders_no_limit(run_dir: Path, burst: int) -> None:
    text = render(proxy_config(run_dir, rate_limit_rps=0, rate_limit_burst=burst))
    assert re.findall(r"^\s*limit_req", text, re.M) == []
    assert rate_limit_directives(proxy_config(run_dir, rate_limit_rps=0)) == ("", "")


def test_default_rate_limit_is_on(run_dir: Path) -> None:
    config = proxy_config(run_dir)
    zone, limit = rate_limit_directives(config)
    assert f"rate={config.rate_limit_rps}r/s;" in zone
    assert f"burst={config.rate_limit_burst} nodelay;" in limit


@pytest.mark.parametrize(
    "overrides",
    [{}, {"client_header_timeout_s": 3, "client_body_timeout_s": 4, "send_timeout_s": 5}],
    ids=["defaults", "custom"],
)
def test_client_timeouts_are_rendered_from_config(run_dir: Path, overrides: dict[str, Any]) -> None:
    config = proxy_config(run_dir, **overrides)
    text = render(config)
    for directive, value in [
        ("client_header_timeout", config.client_header_timeout_s),
        ("client_body_timeout", config.client_body_timeout_s),
        ("send_timeout", config.send_timeout_s),
    ]:
        assert re.findall(rf"^\s*{directive} (\S+);$", text, re.M) == [f"{value}s"]


#: nginx's own answers: status -> (status sent, error code). 494 is nginx's internal code
#: for an oversized header, answered 431.
NGINX_ERRORS = {
    400: (400, "bad_request"),
    404: (404, "not_found"),
    413: (413, "payload_too_large"),
    414: (414, "uri_too_long"),
    429: (429, "rate_limited"),
    494: (431, "header_too_large"),
    501: (501, "not_implemented"),
    502: (503, "upstream_unavailable"),
    504: (503, "upstream_unavailable"),
    505: (505, "http_version_not_supported"),
}


def error_pages(text: str) -> dict[int, tuple[str | None, str]]:
    """``error_page`` directives: status -> (``=status`` override or None, target)."""
    pages: dict[int, tuple[str | None, str]] = {}
    for codes, override, target in re.findall(
        r"^\s*error_page ((?:\d+ )+)(?:=(\d+) )?(\S+);$", text, re.M
    ):
        for code in codes.split():
            assert int(code) not in pages, f"error_page {code} twice"
            pages[int(code)] = (override or None, target)
    return pages


def test_every_nginx_error_answer_is_json_in_the_farm_shape(run_dir: Path) -> None:
    text = render(proxy_config(run_dir, max_body_bytes=4096))
    pages = error_pages(text)
    assert set(pages) == set(NGINX_ERRORS)
    # 408 is never answered (nginx closes the connection), so it has no page.
    assert 408 not in pages
    for code, (override, target) in pages.items():
        status, error_code = NGINX_ERRORS[code]
        assert override in (None, str(status)), code
        body = location_block(text, target if target.startswith("@") else f"= {target}")
        if not target.startswith("@"):
            assert "internal;" in body  # never reachable from outside
        assert "default_type application/json;" in body
        assert "add_header X-Request-ID $req_id always;" in body
        returned = re.search(r"return (\d+) '(.*)';", body)
        assert returned is not None, target
        assert int(returned.group(1)) == status
        doc = json.loads(returned.group(2).replace("$req_id", "rid-1"))
        assert doc["request_id"] == "rid-1"
        assert doc["error"]["code"] == error_code
        assert doc["error"]["field"] is None
        assert doc["error"]["message"]
        assert set(doc) == {"error", "request_id"}
        if status in (429, 503):
            assert "add_header Retry-After 1 always;" in body
    assert "4096 bytes" in location_block(text, "@payload_too_large")


@pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")
@pytest.mark.parametrize(
    "overrides",
    [
        {"rate_limit_rps": 0},
        {"rate_limit_rps": 1, "rate_limit_burst": 0, "client_header_timeout_s": 1},
        {"rate_limit_rps": 1_000_000, "rate_limit_burst": 1_000_000, "send_timeout_s": 3600},
    ],
    ids=["no-limit", "smallest", "largest"],
)
def test_nginx_accepts_the_limits(run_dir: Path, overrides: dict[str, Any]) -> None:
    argv = prepare(proxy_config(run_dir, nginx_bin=NGINX, **overrides))
    check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stderr


# -- the heavy lane ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lane_bytes", "pool_size", "max_conns", "digits", "cap"),
    [(10_000, 1, 0, 5, 3), (100_000, 6, 0, 6, 8), (1000, 1, 5, 4, 5), (0, 1, 0, 99, 3)],
)
def test_heavy_lane_caps_large_rankings_per_worker(
    run_dir: Path, lane_bytes: int, pool_size: int, max_conns: int, digits: int, cap: int
) -> None:
    config = proxy_config(
        run_dir,
        heavy_lane_bytes=lane_bytes,
        heavy_lane_max_conns=max_conns,
        pool_size=pool_size,
        per_worker_sockets=True,
    )
    text = render(config)
    block = re.search(r"upstream ctr_farm_heavy \{(.*?)\n    \}", text, re.S)
    assert block is not None
    servers = [line.strip() for line in block.group(1).splitlines() if "server " in line]
    assert len(servers) == config.workers + 1
    assert all(line.endswith(f" max_conns={cap};") for line in servers), servers
    # POST /rank with at least `digits` digits of Content-Length takes the lane (99: never).
    assert f'"~^POST /rank [0-9]{{{digits},}}$" ctr_farm_heavy;' in text
    assert "proxy_pass http://$ctr_farm_lane;" in text
    # The small lane is never capped by the heavy one.
    assert all("max_conns" not in line for line in upstream_block(text))


@pytest.mark.parametrize("lane_bytes", [5000, 12345, 99])
def test_heavy_lane_bytes_must_be_a_power_of_ten(lane_bytes: int) -> None:
    with pytest.raises(ConfigError, match="heavy_lane_bytes"):
        load(overrides={"heavy_lane_bytes": lane_bytes}, env={})
