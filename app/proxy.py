"""Render ``deploy/nginx.conf`` for a Config and run nginx in the foreground.

``python -m app.proxy`` is the Procfile's ``proxy`` entry. The template's ``{{name}}``
placeholders are filled from the Config; nothing is written outside ``run_dir``.
"""

from __future__ import annotations

import ctypes
import getpass
import grp
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from app.config import REPO_ROOT, Config, ConfigError, load

TEMPLATE = REPO_ROOT / "deploy" / "nginx.conf"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def upstream_servers(config: Config, max_conns: int | None = None) -> str:
    # With a cap, nginx refuses what no worker may take (502 -> the JSON 503 with
    # Retry-After) for a few microseconds of its own time, not a worker's.
    max_conns = config.upstream_max_conns if max_conns is None else max_conns
    cap = f" max_conns={max_conns}" if max_conns else ""
    lines = []
    if config.per_worker_sockets:
        for slot in range(config.workers):
            sock = config.worker_socket(slot)
            lines.append(f"        server unix:{sock} max_fails=1 fail_timeout=1s{cap};")
        # The shared socket catches traffic while a worker slot is being replaced.
        lines.append(f"        server unix:{config.shared_socket} backup{cap};")
    else:
        lines.append(f"        server unix:{config.shared_socket}{cap};")
    return "\n".join(lines)


#: The shared-memory zone of the per-client rate limit (see ``rate_limit_directives``).
RATE_LIMIT_ZONE = "per_client"


def rate_limit_directives(config: Config) -> tuple[str, str]:
    """(``http``-level zone, ``location``-level limit) for the per-client rate limit, or
    two empty strings when ``rate_limit_rps`` is 0 (no limit, no zone)."""
    if config.rate_limit_rps == 0:
        return "", ""
    zone = (
        f"    limit_req_zone $binary_remote_addr zone={RATE_LIMIT_ZONE}:10m"
        f" rate={config.rate_limit_rps}r/s;"
    )
    # nginx refuses burst=0: no burst is written as no burst parameter.
    burst = f" burst={config.rate_limit_burst}" if config.rate_limit_burst else ""
    limit = "\n".join(
        [
            # nodelay: the burst is answered at once, not spread over time; above it, 429.
            f"            limit_req zone={RATE_LIMIT_ZONE}{burst} nodelay;",
            "            limit_req_status 429;",
            # Rejections are in the access log (status 429); at the default "error" level
            # a flood would also write one error-log line per rejected request.
            "            limit_req_log_level notice;",
        ]
    )
    return zone, limit


def fill_template(template: Path, values: dict[str, str]) -> str:
    """``template``'s text with every ``{{name}}`` replaced by ``values[name]``."""

    def fill(match: re.Match[str]) -> str:
        try:
            return values[match.group(1)]
        except KeyError:
            raise ConfigError(f"{template}: unknown placeholder {match.group(0)}") from None

    return _PLACEHOLDER.sub(fill, template.read_text())


def render(config: Config, template: Path = TEMPLATE) -> str:
    user = getpass.getuser()
    rate_zone, rate_limit = rate_limit_directives(config)
    values = {
        # Only effective as root (CI, a fresh machine): workers must be able to open the
        # gunicorn sockets, which belong to the invoking user.
        "user_directive": (
            f"user {user} {grp.getgrgid(os.getgid()).gr_name};" if os.geteuid() == 0 else ""
        ),
        "nginx_workers": "1",
        "run_dir": str(config.run_path),
        "access_log": f"{config.run_path}/access.log json buffer=64k flush=1s",
        "upstream_servers": upstream_servers(config),
        "heavy_servers": upstream_servers(config, config.heavy_lane_conns),
        "heavy_lane_conns": str(config.heavy_lane_conns),
        "heavy_lane_digits": str(
            len(str(config.heavy_lane_bytes)) if config.heavy_lane_bytes else 99
        ),
        "upstream_keepalive": str(config.upstream_keepalive_s),
        "gunicorn_keepalive": str(config.gunicorn_keepalive_s),
        "host": config.host,
        "port": str(config.port),
        "max_body_bytes": str(config.max_body_bytes),
        "worker_timeout_s": str(config.worker_timeout_s),
        "rate_limit_zone": rate_zone,
        "rate_limit": rate_limit,
        "client_header_timeout_s": str(config.client_header_timeout_s),
        "client_body_timeout_s": str(config.client_body_timeout_s),
        "send_timeout_s": str(config.send_timeout_s),
    }
    return fill_template(template, values)


def nginx_binary(config: Config) -> str:
    found = shutil.which(config.nginx_bin) or shutil.which(config.nginx_bin, path="/usr/sbin")
    if not found:
        raise ConfigError(
            f"nginx_bin: {config.nginx_bin!r} not found (apt-get install nginx-light)"
        )
    return found


def prepare(config: Config) -> list[str]:
    """Write the rendered config under run_dir; return the nginx command line."""
    run = config.run_path
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (run / "nginx" / sub).mkdir(parents=True, exist_ok=True)
    conf = run / "nginx.conf"
    conf.write_text(render(config))
    # -e: error log before the config is read (avoids /var/log/nginx when not root).
    return [nginx_binary(config), "-p", str(run), "-e", "stderr", "-c", str(conf)]


def main() -> None:
    try:
        config = load()
        argv = prepare(config)
    except ConfigError as exc:
        sys.exit(f"ctr-farm proxy: {exc}")
    check = subprocess.run([*argv, "-t", "-q"], capture_output=True, text=True)
    if check.returncode != 0:
        sys.exit(f"ctr-farm proxy: nginx rejects {argv[-1]}:\n{check.stderr}")
    sys.exit(supervise(argv))


def _stop_with_parent(signum: int) -> Callable[[], None]:
    """For the child before exec: if this supervisor dies (even by SIGKILL), the child
    gets ``signum`` instead of living on as an orphan holding its port (Linux prctl)."""

    def arm() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signum)

    return arm


#: linux/prctl.h
PR_SET_PDEATHSIG = 1


def supervise(argv: list[str], stop: int = signal.SIGQUIT) -> int:
    """Run nginx; turn SIGTERM/SIGINT (honcho, Ctrl-C) into SIGQUIT, nginx's graceful
    shutdown, so requests in flight finish instead of being cut. (Another server passes
    its own graceful ``stop`` signal: app.monitoring runs Prometheus with SIGTERM.)

    nginx gets its own session: honcho (and a terminal's Ctrl-C) signal the whole
    process group, and a SIGTERM reaching nginx directly is its fast shutdown."""
    proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=_stop_with_parent(stop))

    def graceful(signum: int, frame: object) -> None:
        proc.send_signal(stop)

    signal.signal(signal.SIGTERM, graceful)
    signal.signal(signal.SIGINT, graceful)
    return proc.wait()


if __name__ == "__main__":
    main()
