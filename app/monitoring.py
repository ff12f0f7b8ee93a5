"""Render ``deploy/prometheus.yml`` for a Config and run Prometheus in the foreground.

``python -m app.monitoring`` is the Procfile's optional ``prometheus`` entry (started by
``ctr-farm serve --prometheus``). It scrapes the farm's ``/metrics`` through nginx every
``prometheus_scrape_interval_s``, listens on ``127.0.0.1:<prometheus_port>`` only, and
keeps ``prometheus_retention_h`` hours of data under ``<run_dir>/prometheus``. The
binary is the Debian package's (``scripts/install --monitoring``).
"""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

from app.config import REPO_ROOT, Config, ConfigError, load
from app.proxy import fill_template, supervise

TEMPLATE = REPO_ROOT / "deploy" / "prometheus.yml"
RULES = REPO_ROOT / "deploy" / "prometheus.rules.yml"
#: Our log levels in Prometheus' words.
_LOG_LEVELS = {"debug": "debug", "info": "info", "warning": "warn", "error": "error"}


def scrape_target(config: Config) -> str:
    """``host:port`` of nginx as seen from this machine (a wildcard address -> loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(config.host, config.host)
    return f"[{host}]:{config.port}" if ":" in host else f"{host}:{config.port}"


def render(config: Config, template: Path = TEMPLATE) -> str:
    interval = config.prometheus_scrape_interval_s
    values = {
        "run_dir": str(config.run_path),
        "scrape_interval": f"{interval}s",
        # A scrape may not outlast the interval (Prometheus refuses the config).
        "scrape_timeout": f"{min(interval, 10)}s",
        "rules_file": str(RULES),
        "target": scrape_target(config),
    }
    return fill_template(template, values)


def prometheus_binary(config: Config) -> str:
    found = shutil.which(config.prometheus_bin)
    if not found:
        raise ConfigError(
            f"prometheus_bin: {config.prometheus_bin!r} not found"
            " (scripts/install --monitoring, i.e. apt-get install prometheus)"
        )
    return found


def prepare(config: Config) -> list[str]:
    """Write the rendered config under run_dir; return the Prometheus command line."""
    config.prometheus_path.mkdir(parents=True, exist_ok=True)
    conf = config.run_path / "prometheus.yml"
    conf.write_text(render(config))
    return [
        prometheus_binary(config),
        f"--config.file={conf}",
        f"--storage.tsdb.path={config.prometheus_path}",
        f"--storage.tsdb.retention.time={config.prometheus_retention_h}h",
        f"--web.listen-address=127.0.0.1:{config.prometheus_port}",
        "--log.format=json",
        f"--log.level={_LOG_LEVELS[config.log_level]}",
    ]


def main() -> None:
    try:
        argv = prepare(load())
    except ConfigError as exc:
        sys.exit(f"ctr-farm prometheus: {exc}")
    # SIGTERM is Prometheus' graceful stop (it flushes its head block).
    sys.exit(supervise(argv, stop=signal.SIGTERM))


if __name__ == "__main__":
    main()
