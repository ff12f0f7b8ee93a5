"""app.cli: one flag per setting, documented from the setting's own comment in Config."""

from __future__ import annotations

import msgspec
import pytest

from app.cli import main, setting_docs
from app.config import Config


def help_text(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_every_setting_has_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys)
    for field in msgspec.structs.fields(Config):
        assert "--" + field.name.replace("_", "-") in text


def test_tracing_flags_say_what_they_do(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys)
    assert "--tracing {off,stdout,otlp}" in text
    assert "one JSON line per span on the worker's stdout" in text
    assert "pip install -e '.[tracing]'). (default off)" in text
    assert "OTLP/HTTP traces URL. (default http://127.0.0.1:4318/v1/traces)" in text
    assert "Share of traces recorded (0 to 1)." in text
    assert "deploy/grafana/ctr-farm.json" in text  # the epilog points at the dashboard


def test_docs_come_from_the_config_comments() -> None:
    docs = setting_docs()
    assert docs["pool_size"].startswith("ONNX Runtime sessions per model per worker")
    assert docs["trace_sample_ratio"].startswith("Share of traces recorded")
    assert set(docs) <= {f.name for f in msgspec.structs.fields(Config)}


def test_a_bad_choice_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--tracing", "jaeger"])
    assert info.value.code == 2
    assert "--tracing: invalid choice: 'jaeger'" in capsys.readouterr().err
