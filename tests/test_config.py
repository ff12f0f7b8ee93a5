"""app.config: precedence, validation that names the setting, env round-trip."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from app.config import (
    ENV_FILE,
    REPO_ROOT,
    Config,
    ConfigError,
    StageConfig,
    load,
    parse_stages,
    to_env,
)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "farm.toml"
    path.write_text(text)
    return path


# -- defaults and precedence ---------------------------------------------------------------
def test_defaults_with_empty_env() -> None:
    config = load(env={})
    assert config == Config()
    assert config.pool_size == 1
    assert config.stages == (StageConfig("deepfm", 100), StageConfig("autoint"))
    assert config.predict_model == "autoint"
    assert config.verify_sha256 is True


@pytest.mark.parametrize(
    ("in_file", "in_env", "in_overrides", "expected"),
    [
        (False, False, False, 1),  # default
        (True, False, False, 2),  # file beats default
        (True, True, False, 3),  # env beats file
        (False, True, False, 3),
        (True, True, True, 4),  # overrides beat env
        (True, False, True, 4),
        (False, False, True, 4),
    ],
)
def test_precedence_default_file_env_overrides(
    tmp_path: Path, in_file: bool, in_env: bool, in_overrides: bool, expected: int
) -> None:
    env: dict[str, str] = {}
    if in_file:
        env[ENV_FILE] = str(write_toml(tmp_path, "pool_size = 2\n"))
    if in_env:
        env["CTR_FARM_POOL_SIZE"] = "3"
    overrides = {"pool_size": 4} if in_overrides else {}
    assert load(overrides=overrides, env=env).pool_size == expected


def test_precedence_is_per_setting(tmp_path: Path) -> None:
    """Each layer only replaces the settings it names."""
    toml = write_toml(tmp_path, 'pool_size = 2\nworkers = 5\nlog_level = "debug"\n')
    env = {ENV_FILE: str(toml), "CTR_FARM_WORKERS": "6"}
    config = load(overrides={"log_level": "error"}, env=env)
    assert (config.pool_size, config.workers, config.log_level) == (2, 6, "error")
    assert config.max_candidates == Config().max_candidates


def test_file_argument_beats_env_file(tmp_path: Path) -> None:
    a = write_toml(tmp_path, "pool_size = 2\n")
    b = tmp_path / "b.toml"
    b.write_text("pool_size = 7\n")
    assert load(env={ENV_FILE: str(a)}, file=b).pool_size == 7


def test_none_override_means_flag_not_given() -> None:
    config = load(overrides={"pool_size": None}, env={"CTR_FARM_POOL_SIZE": "3"})
    assert config.pool_size == 3


def test_file_stages_table_form(tmp_path: Path) -> None:
    toml = write_toml(
        tmp_path,
        '[[stages]]\nmodel = "deepfm"\nkeep_k = 40\n\n'
        '[[stages]]\nmodel = "autoint"\nkeep_k = 20\n\n'
        '[[stages]]\nmodel = "autoint"\n',
    )
    config = load(file=toml, env={})
    assert config.stages == (
        StageConfig("deepfm", 40),
        StageConfig("autoint", 20),
        StageConfig("autoint", None),
    )
    assert config.default_stage1_k == 40


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("deepfm:50,autoint", (StageConfig("deepfm", 50), StageConfig("autoint"))),
        ("deepfm:50, autoint,", (StageConfig("deepfm", 50), StageConfig("autoint"))),
        ("autoint", (StageConfig("autoint"),)),
        ("deepfm:", (StageConfig("deepfm"),)),
        (
            "deepfm:300,deepfm:30,autoint",
            (StageConfig("deepfm", 300), StageConfig("deepfm", 30), StageConfig("autoint")),
        ),
    ],
)
def test_stages_env_form(raw: str, expected: tuple[StageConfig, ...]) -> None:
    assert load(env={"CTR_FARM_STAGES": raw}).stages == expected


def test_env_values_are_converted_to_their_types() -> None:
    config = load(
        env={
            "CTR_FARM_PORT": "9090",
            "CTR_FARM_INFERENCE": "inline",
            "CTR_FARM_RUN_DIR": "/tmp/x",
            "CTR_FARM_HOST": "0.0.0.0",
        }
    )
    assert config.port == 9090
    assert isinstance(config.port, int)
    assert config.inference == "inline"
    assert config.run_dir == "/tmp/x"
    assert config.host == "0.0.0.0"


def test_env_ignores_unprefixed_and_unknown_names() -> None:
    config = load(env={"POOL_SIZE": "9", "CTR_FARM_NOT_A_SETTING": "1"})
    assert config == Config()


# -- bools ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        (" yes ", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("False", False),
        ("no", False),
        ("off", False),
        ("", False),
    ],
)
@pytest.mark.parametrize("setting", ["verify_sha256", "per_worker_sockets"])
def test_bool_env_parsing(setting: str, raw: str, expected: bool) -> None:
    config = load(env={f"CTR_FARM_{setting.upper()}": raw})
    assert getattr(config, setting) is expected


@pytest.mark.parametrize("raw", ["ture", "2", "enabled", "y e s"])
def test_bool_env_typo_is_an_error_naming_the_setting(raw: str) -> None:
    # A typo must not silently turn sha256 verification off.
    with pytest.raises(ConfigError, match="CTR_FARM_VERIFY_SHA256"):
        load(env={"CTR_FARM_VERIFY_SHA256": raw})


# -- bad values ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "env", "setting"),
    [
        ({"pool_size": 0}, {}, "pool_size"),
        ({"pool_size": -1}, {}, "pool_size"),
        ({}, {"CTR_FARM_POOL_SIZE": "two"}, "pool_size"),
        ({}, {"CTR_FARM_POOL_SIZE": "0"}, "pool_size"),
        ({"port": 0}, {}, "port"),
        ({"port": 70000}, {}, "port"),
        ({"worker_class": "bogus"}, {}, "worker_class"),
        ({}, {"CTR_FARM_WORKER_CLASS": "eventlet"}, "worker_class"),
        ({"inference": "gpu"}, {}, "inference"),
        ({"log_level": "verbose"}, {}, "log_level"),
        ({"warmup_runs": -1}, {}, "warmup_runs"),
        ({"max_candidates": 0}, {}, "max_candidates"),
        ({"stages": [{"model": "xgboost"}]}, {}, "stages[0].model"),
        ({"stages": [{"model": "deepfm", "keep_k": 10}, {"model": "gbdt"}]}, {}, "stages[1]"),
        ({}, {"CTR_FARM_STAGES": "deepfm:lots,autoint"}, "stages[0].keep_k"),
        ({}, {"CTR_FARM_STAGES": "deepfm:0,autoint"}, "stages[0].keep_k"),
        ({}, {"CTR_FARM_STAGES": ","}, "stages"),
        ({"stages": []}, {}, "stages"),
        ({"predict_model": "bogus"}, {}, "predict_model"),
        ({"cache_entries": -1}, {}, "cache_entries"),
        ({}, {"CTR_FARM_CACHE_ENTRIES": "lots"}, "cache_entries"),
        ({"cache_ttl_s": 0}, {}, "cache_ttl_s"),
        ({"no_such_setting": 1}, {}, "no_such_setting"),
        ({"sla_rank_ms": 0}, {}, "sla_rank_ms"),
        ({}, {"CTR_FARM_SLA_PREDICT_MS": "fast"}, "sla_predict_ms"),
        ({"stats_window_s": 5}, {}, "stats_window_s"),
        ({"request_log_queue": 0}, {}, "request_log_queue"),
        ({"drift_psi_warn": 0.3, "drift_psi_alert": 0.2}, {}, "drift_psi_warn"),
        ({"drift_psi_warn": 0.2, "drift_psi_alert": 0.2}, {}, "drift_psi_warn"),
        ({"drift_psi_alert": -1}, {}, "drift_psi_alert"),
        ({"drift_window_s": 1}, {}, "drift_window_s"),
        ({"drift_sample_every": 0}, {}, "drift_sample_every"),
        ({"tracing": "jaeger"}, {}, "tracing"),
        ({}, {"CTR_FARM_TRACE_SAMPLE_RATIO": "1.5"}, "trace_sample_ratio"),
        ({"trace_sample_ratio": -0.1}, {}, "trace_sample_ratio"),
        ({"tracing": "otlp", "otlp_endpoint": "localhost:4318"}, {}, "otlp_endpoint"),
    ],
)
def test_bad_values_raise_config_error_naming_the_setting(
    overrides: dict[str, Any], env: dict[str, str], setting: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(overrides=overrides, env=env)
    assert setting in str(info.value)
    assert "Traceback" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "setting"),
    [
        ("pool_size = 0\n", "pool_size"),
        ("bogus_key = 1\n", "bogus_key"),
        ('worker_class = "bogus"\n', "worker_class"),
        ('[[stages]]\nmodel = "deepfm"\nbogus = 1\n', "bogus"),
        ('[[stages]]\nmodel = "mystery"\n', "stages[0].model"),
    ],
)
def test_bad_values_in_the_file(tmp_path: Path, text: str, setting: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(setting)):
        load(file=write_toml(tmp_path, text), env={})


@pytest.mark.parametrize(
    "content", [None, "pool_size = \n", "this is not toml"], ids=["missing", "bad", "junk"]
)
def test_unreadable_config_file_names_the_variable(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "farm.toml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=ENV_FILE):
        load(env={ENV_FILE: str(path)})


def test_config_is_frozen() -> None:
    config = load(env={})
    with pytest.raises(AttributeError):
        config.pool_size = 3  # type: ignore[misc]


# -- to_env round-trip ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"pool_size": 3, "workers": 4, "per_worker_sockets": False, "verify_sha256": False},
        {
            "stages": [
                {"model": "deepfm", "keep_k": 500},
                {"model": "autoint", "keep_k": 50},
                {"model": "autoint"},
            ],
            "predict_model": "deepfm",
        },
        {"stages": [{"model": "autoint"}], "inference": "inline", "log_level": "debug"},
        {
            "deepfm_model": "/abs/deepfm/7",
            "run_dir": "/tmp/farm-run",
            "host": "0.0.0.0",
            "port": 18080,
            "worker_class": "gthread",
            "threads": 4,
            "warmup_runs": 0,
            "nginx_bin": "/usr/sbin/nginx",
        },
        {
            "tracing": "otlp",
            "otlp_endpoint": "https://otel:4318/v1/traces",
            "trace_sample_ratio": 0.25,
        },
    ],
    ids=["defaults", "ints-and-bools", "three-stages", "one-stage", "paths-and-network", "tracing"],
)
def test_to_env_round_trips(overrides: dict[str, Any]) -> None:
    config = load(overrides=overrides, env={})
    env = to_env(config)
    assert all(k.startswith("CTR_FARM_") and isinstance(v, str) for k, v in env.items())
    assert ENV_FILE not in env
    assert load(env=env) == config


def test_to_env_covers_every_setting() -> None:
    import msgspec

    names = {f.name for f in msgspec.structs.fields(Config)}
    assert set(to_env(Config())) == {f"CTR_FARM_{n.upper()}" for n in names}


# -- derived values ------------------------------------------------------------------------
def test_relative_paths_resolve_against_the_repo_root() -> None:
    config = load(overrides={"deepfm_model": "/abs/deepfm/1", "run_dir": "run-x"}, env={})
    dirs = config.model_dirs()
    assert dirs["deepfm"] == Path("/abs/deepfm/1")
    assert dirs["autoint"] == REPO_ROOT / "models" / "autoint"
    assert config.run_path == REPO_ROOT / "run-x"
    assert config.worker_socket(1) == REPO_ROOT / "run-x" / "worker-1.sock"
    assert config.shared_socket == REPO_ROOT / "run-x" / "gunicorn.sock"


def test_observability_settings_from_env_and_derived() -> None:
    env = {
        "CTR_FARM_SLA_RANK_MS": "35.5",
        "CTR_FARM_SLA_PREDICT_MS": "8",
        "CTR_FARM_REQUEST_LOG": "requests.db",
        "CTR_FARM_DRIFT_PSI_WARN": "0.05",
        "CTR_FARM_RUN_DIR": "run-y",
    }
    config = load(env=env)
    assert (config.sla_ms("/rank"), config.sla_ms("/predict"), config.sla_ms("/health")) == (
        35.5,
        8.0,
        None,
    )
    assert config.drift_psi_warn == 0.05 and config.drift_psi_alert == 0.25
    # The request log lives under the run dir unless given an absolute path; off by default.
    assert config.request_log_path == REPO_ROOT / "run-y" / "requests.db"
    absolute = load(overrides={"request_log": "/var/log/farm.db"}, env={})
    assert absolute.request_log_path == Path("/var/log/farm.db")
    assert load(env={}).request_log_path is None


@pytest.mark.parametrize(("keepalive", "expected"), [(1, 16), (60, 75), (300, 315)])
def test_gunicorn_keepalive_outlives_nginx(keepalive: int, expected: int) -> None:
    config = load(overrides={"upstream_keepalive_s": keepalive}, env={})
    assert config.gunicorn_keepalive_s == expected > config.upstream_keepalive_s


@pytest.mark.parametrize(
    ("stages", "expected"),
    [
        ([{"model": "deepfm", "keep_k": 17}, {"model": "autoint"}], 17),
        ([{"model": "deepfm"}, {"model": "autoint"}], 100),
    ],
)
def test_default_stage1_k(stages: list[dict[str, Any]], expected: int) -> None:
    assert load(overrides={"stages": stages}, env={}).default_stage1_k == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # Requests relying on the defaults would all be rejected.
        ({"stages": "deepfm:7,autoint"}, "stages[0].keep_k: 7 is below default_top_k"),
        ({"stages": "deepfm:50,deepfm:20,autoint", "default_top_k": 30}, "stages[1].keep_k: 20"),
        ({"stages": "deepfm:50,deepfm:5,autoint"}, "stages[1].keep_k: 5 is below"),
        ({"stages": "deepfm:50,deepfm,autoint"}, "stages[1].keep_k: a middle stage needs"),
    ],
)
def test_stage_limits_must_agree_with_default_top_k(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(overrides={**overrides, "stages": parse_stages(overrides["stages"])}, env={})


def test_stage_parsing_tolerates_spaces() -> None:
    assert parse_stages(" deepfm : 50 , autoint ") == [
        {"model": "deepfm", "keep_k": "50"},
        {"model": "autoint", "keep_k": None},
    ]


def test_reference_topology_file_is_a_valid_config() -> None:
    path = REPO_ROOT / "deploy" / "topologies" / "reference-2x6.toml"
    config = load(env={ENV_FILE: str(path)})
    assert (config.workers, config.pool_size, config.inference) == (2, 6, "executor")
    assert config.prepack_weights is False and load(env={}).prepack_weights is True


# -- front proxy limits --------------------------------------------------------------------
def test_front_proxy_defaults_do_not_throttle_the_benchmarks() -> None:
    """wrk drives 4-5k requests/s from 127.0.0.1 over up to 100 connections: the per-client
    rate must sit above that, and the burst must cover connections arriving together."""
    config = load(env={})
    assert config.rate_limit_rps >= 10_000
    assert config.rate_limit_burst >= 100
    assert (config.client_header_timeout_s, config.client_body_timeout_s) == (10, 10)
    assert config.send_timeout_s == 10


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CTR_FARM_RATE_LIMIT_RPS": "0"}, {"rate_limit_rps": 0}),  # off
        ({"CTR_FARM_RATE_LIMIT_RPS": "50", "CTR_FARM_RATE_LIMIT_BURST": "0"},
         {"rate_limit_rps": 50, "rate_limit_burst": 0}),
        ({"CTR_FARM_CLIENT_HEADER_TIMEOUT_S": "2", "CTR_FARM_CLIENT_BODY_TIMEOUT_S": "3",
          "CTR_FARM_SEND_TIMEOUT_S": "4"},
         {"client_header_timeout_s": 2, "client_body_timeout_s": 3, "send_timeout_s": 4}),
    ],
)  # fmt: skip
def test_front_proxy_limits_from_env(env: dict[str, str], expected: dict[str, int]) -> None:
    config = load(env=env)
    assert {name: getattr(config, name) for name in expected} == expected
    assert load(env=to_env(config)) == config


@pytest.mark.parametrize(
    ("overrides", "env", "setting"),
    [
        ({"rate_limit_rps": -1}, {}, "rate_limit_rps"),
        ({"rate_limit_rps": 1_000_001}, {}, "rate_limit_rps"),
        ({}, {"CTR_FARM_RATE_LIMIT_RPS": "fast"}, "rate_limit_rps"),
        ({}, {"CTR_FARM_RATE_LIMIT_RPS": "1.5"}, "rate_limit_rps"),
        ({"rate_limit_burst": -1}, {}, "rate_limit_burst"),
        ({"client_header_timeout_s": 0}, {}, "client_header_timeout_s"),
        ({"client_header_timeout_s": 3601}, {}, "client_header_timeout_s"),
        ({}, {"CTR_FARM_CLIENT_BODY_TIMEOUT_S": "0"}, "client_body_timeout_s"),
        ({}, {"CTR_FARM_CLIENT_BODY_TIMEOUT_S": "10s"}, "client_body_timeout_s"),
        ({"send_timeout_s": -5}, {}, "send_timeout_s"),
    ],
)
def test_bad_front_proxy_limits_name_the_setting(
    overrides: dict[str, Any], env: dict[str, str], setting: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(setting)):
        load(overrides=overrides, env=env)


# -- tracing -------------------------------------------------------------------------------
def test_tracing_is_off_by_default_and_set_from_env() -> None:
    assert load(env={}).tracing == "off"
    env = {"CTR_FARM_TRACING": "otlp", "CTR_FARM_TRACE_SAMPLE_RATIO": "0.1"}
    config = load(env=env)
    assert (config.tracing, config.trace_sample_ratio) == ("otlp", 0.1)
    assert config.otlp_endpoint == "http://127.0.0.1:4318/v1/traces"


@pytest.mark.parametrize(
    ("mode", "missing"),
    [
        ("stdout", "opentelemetry.sdk"),
        ("otlp", "opentelemetry.sdk"),
        ("otlp", "opentelemetry.exporter.otlp"),
        ("stdout", "opentelemetry"),
    ],
)
def test_tracing_without_its_packages_stops_the_boot(
    monkeypatch: pytest.MonkeyPatch, mode: str, missing: str
) -> None:
    """As if the ``tracing`` extra were not installed (a None entry in sys.modules is
    what ``import`` and ``find_spec`` treat as absent)."""
    import sys

    for name in [m for m in sys.modules if m == missing or m.startswith(missing + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(ConfigError, match=r"tracing: .*\[tracing\]"):
        load(overrides={"tracing": mode}, env={})
    assert load(env={}).tracing == "off"  # off needs none of it
