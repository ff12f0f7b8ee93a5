"""app.monitoring: the rendered Prometheus config scrapes the farm's front, promtool accepts
it, and the Prometheus entry of the Procfile starts only when asked for."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from app import cli
from app.config import REPO_ROOT, Config, ConfigError, load
from app.monitoring import RULES, prepare, prometheus_binary, render, scrape_target

PROMTOOL = shutil.which("promtool")


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="farm-m-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def config_for(run_dir: Path, **overrides: Any) -> Config:
    return load(overrides={"run_dir": str(run_dir), **overrides}, env={})


@pytest.mark.parametrize(
    ("host", "port", "target"),
    [
        ("127.0.0.1", 8080, "127.0.0.1:8080"),
        ("0.0.0.0", 9000, "127.0.0.1:9000"),
        ("10.1.2.3", 80, "10.1.2.3:80"),
        ("::", 8080, "[::1]:8080"),
        ("::1", 8081, "[::1]:8081"),
    ],
)
def test_scrape_target_is_the_front_as_seen_from_here(host: str, port: int, target: str) -> None:
    assert scrape_target(load(overrides={"host": host, "port": port}, env={})) == target


@pytest.mark.parametrize(("interval", "timeout"), [(5, "5s"), (1, "1s"), (60, "10s")])
def test_render_scrapes_the_farm_at_the_configured_interval(
    run_dir: Path, interval: int, timeout: str
) -> None:
    config = config_for(run_dir, port=8123, prometheus_scrape_interval_s=interval)
    text = render(config)
    assert "{{" not in text
    doc = yaml.safe_load(text)
    assert doc["global"] == {
        "scrape_interval": f"{interval}s",
        "scrape_timeout": timeout,
        "evaluation_interval": f"{interval}s",
    }
    assert doc["rule_files"] == [str(RULES)]
    (job,) = doc["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:8123"]}]


def test_prepare_writes_the_config_and_listens_on_loopback(run_dir: Path) -> None:
    config = config_for(
        run_dir, prometheus_port=9400, prometheus_retention_h=2, log_level="warning"
    )
    argv = prepare(config)
    conf = run_dir / "prometheus.yml"
    assert conf.read_text() == render(config)
    assert config.prometheus_path == run_dir / "prometheus" and config.prometheus_path.is_dir()
    assert argv[1:] == [
        f"--config.file={conf}",
        f"--storage.tsdb.path={run_dir / 'prometheus'}",
        "--storage.tsdb.retention.time=2h",
        "--web.listen-address=127.0.0.1:9400",
        "--log.format=json",
        "--log.level=warn",
    ]


def test_a_missing_binary_names_the_setting_and_the_install(run_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"prometheus_bin.*scripts/install --monitoring"):
        prometheus_binary(config_for(run_dir, prometheus_bin="no-such-prometheus"))


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (prometheus package)")
def test_promtool_accepts_the_rendered_config_and_the_rules(run_dir: Path) -> None:
    prepare(config_for(run_dir))
    check = subprocess.run(
        [str(PROMTOOL), "check", "config", str(run_dir / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 2 rules found" in check.stdout + check.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (prometheus package)")
def test_promtool_rejects_a_broken_config(run_dir: Path) -> None:
    """Guard the test above: ``promtool check config`` does fail on a bad file."""
    bad = run_dir / "bad.yml"
    bad.write_text("global:\n  scrape_interval: 5s\n  scrape_timeout: 10s\n")
    check = subprocess.run(
        [str(PROMTOOL), "check", "config", str(bad)], capture_output=True, timeout=60
    )
    assert check.returncode != 0


# -- the optional Procfile entry -------------------------------------------------------------
def procfile() -> dict[str, str]:
    lines = (REPO_ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


def serve_config(*flags: str) -> Config:
    parser, _ = cli.build_parser("serve")
    return cli.config_from(parser.parse_args(list(flags)), env={})


def test_prometheus_is_a_procfile_entry_that_serve_starts_only_when_asked() -> None:
    entries = procfile()
    assert entries["prometheus"] == ".venv/bin/python -m app.monitoring"
    assert cli.procfile_entries(serve_config()) == ["web", "proxy"]
    config = serve_config("--prometheus", "--prometheus-port", "9300")
    assert (config.prometheus, config.prometheus_port) == (True, 9300)
    assert cli.procfile_entries(config) == ["web", "proxy", "prometheus"]
    assert set(cli.procfile_entries(config)) == set(entries)
