"""app.cli: every command's --help (defaults shown), what --help imports, the packaging,
setting flags through app.config.load, and the models, make-logs, score and train
commands run as a user runs them."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import numpy as np
import pyarrow.parquet as pq
import pytest

import app.offline
from app.cli import COMMANDS, build_parser, config_from, main, setting_docs
from app.config import REPO_ROOT, Config, load
from app.offline import logs
from app.registry import next_version, versions
from app.sessions import MODEL_FILE
from tests.fake_models import copy_as_version
from tests.test_batch import make_input

#: Per command: text its --help must show (defaults, and where a setting comes from).
HELP_SHOWS = {
    "serve": [
        "--workers N",
        "(default 2; CTR_FARM_WORKERS)",
        "(default deepfm:100,autoint; CTR_FARM_STAGES)",
        "--inference {auto,executor,inline}",
        "--verify-sha256, --no-verify-sha256",
        "CTR_FARM_CONFIG",
    ],
    "score": [
        "--chunk-rows CHUNK_ROWS",
        "(default: 50000)",
        "(default: 1000)",
        "(default: predict)",
        "(default: click)",
        "(default models/deepfm; CTR_FARM_DEEPFM_MODEL)",
    ],
    "models": ["list", "validate", "describe"],
    "bench": ["(default 200; --quick 3)", "(default 50,100,200; --quick 20,100)", "(default: 7)"],
    "sweep": ["(default: predict)", "(default: 100)", "(default 2; --quick 1,2)"],
    "make-logs": ["--rows ROWS", "(default: 0.005)", ".parquet or .csv"],
    "train": ["(default: 3000000)", "(default: all)", "(default: 150.0)", "(default: models)"],
}


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``ctr-farm argv`` in process: (exit status, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    out = capsys.readouterr()
    return code, out.out, out.err


# -- help ----------------------------------------------------------------------------------------
def test_every_command_is_tested_here() -> None:
    assert set(HELP_SHOWS) == set(COMMANDS)


@pytest.mark.parametrize("command", list(HELP_SHOWS))
def test_command_help_lists_its_defaults(command: str, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_main([command, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: ctr-farm {command}")
    flat = " ".join(out.split())  # argparse wraps lines
    for text in HELP_SHOWS[command]:
        assert text in flat, text


@pytest.mark.parametrize(
    ("action", "shows"),
    [
        ("list", ["--root ROOT", "(default: models)", "--json"]),
        ("validate", ["[PATH ...]", "warm-up, golden request", "(default: models)"]),
        ("describe", ["NAME[/VERSION]", "(default: models)"]),
    ],
)
def test_models_actions_help(action: str, shows: list[str], capsys: pytest.CaptureFixture):
    code, out, _ = run_main(["models", action, "--help"], capsys)
    flat = " ".join(out.split())
    assert code == 0 and all(text in flat for text in shows), out


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    for name, command in COMMANDS.items():
        assert f"  {name:<10} {command.help}" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["nope"], "invalid choice: 'nope'"),
        (["score"], "the following arguments are required: --input, --output"),
        (["models"], "the following arguments are required: ACTION"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture):
    code, _, err = run_main(argv, capsys)
    assert code == 2 and message in err


def imports_of(code: str) -> set[str]:
    """``sys.modules`` after running ``code`` in a fresh interpreter at the project root."""
    probe = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["make-logs", "--help"]])
def test_help_never_imports_torch_or_onnxruntime(argv: list[str]) -> None:
    modules = imports_of(
        f"from app.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    )
    assert "app.cli" in modules
    assert not {"torch", "onnxruntime", "app.offline.train", "benchmarks.ranking"} & modules


# -- packaging ---------------------------------------------------------------------------------
def test_packaging_declares_the_entry_point_and_the_benchmarks() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"ctr-farm": "app.cli:main"}
    assert "benchmarks*" in project["tool"]["setuptools"]["packages"]["find"]["include"]
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="ctr-farm")
    assert entry.load() is main


@pytest.mark.parametrize(
    ("script", "command"),
    [
        ("bench_ranking.py", "bench"),
        ("sweep.py", "sweep"),
        ("make_logs.py", "make-logs"),
        ("train.py", "train"),
    ],
)
def test_scripts_are_wrappers_of_the_cli(script: str, command: str) -> None:
    proc = subprocess.run(
        [sys.executable, f"scripts/{script}", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: ctr-farm {command}")


# -- settings: defaults < file < env < flags ---------------------------------------------------
@pytest.mark.parametrize("command", ["serve", "score"])
def test_setting_flags_resolve_through_config_load(
    command: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    toml = tmp_path / "farm.toml"
    toml.write_text('predict_model = "deepfm"\nintra_threads = 3\n')
    monkeypatch.setenv("CTR_FARM_CONFIG", str(toml))
    monkeypatch.setenv("CTR_FARM_INTRA_THREADS", "2")  # env beats the file
    monkeypatch.setenv("CTR_FARM_MAX_CANDIDATES", "700")
    parser, _ = build_parser(command)
    extra = ["--input", "x", "--output", "y"] if command == "score" else []
    args = parser.parse_args([*extra, "--max-candidates", "900", "--stages", "deepfm:50,autoint"])
    config = config_from(args)
    assert config.predict_model == "deepfm"  # from the file
    assert config.intra_threads == 2  # env
    assert config.max_candidates == 900  # the flag beats env
    assert [(s.model, s.keep_k) for s in config.stages] == [("deepfm", 50), ("autoint", None)]
    assert config == load(
        overrides={
            "max_candidates": 900,
            "stages": [{"model": "deepfm", "keep_k": 50}, {"model": "autoint"}],
        }
    )


def test_a_bad_setting_names_it(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, _, err = run_main(
        ["score", "--input", "x", "--output", str(tmp_path / "o"), "--intra-threads", "0"], capsys
    )
    assert code == 1
    assert "ctr-farm score: invalid setting: Expected `int` >= 1 - at `$.intra_threads`" in err


# -- models --------------------------------------------------------------------------------------
#: The versions under models/ ("autoint/1", ...), and the newest (served) one per model.
BUNDLED = [
    f"{name}/{v.name}"
    for name in ("autoint", "deepfm")
    for v in versions(REPO_ROOT / "models" / name)
]
NEWEST = {
    name: f"{name}/{versions(REPO_ROOT / 'models' / name)[-1].name}"
    for name in ("autoint", "deepfm")
}
ARCH = {"autoint": "AutoInt", "deepfm": "DeepFM"}
#: Every version so far is the same function (rewrites of version 1): the same test AUC.
AUC = {"autoint": "0.7575", "deepfm": "0.7619"}


def test_models_list(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CTR_FARM_CONFIG", raising=False)
    code, out, _ = run_main(["models", "list"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "MODEL",
        "ARCHITECTURE",
        "TEST",
        "AUC",
        "SIZE",
        "SHA256",
        "GOLDEN",
        "SERVED",
        "AS",
    ]
    # Every bundled version, oldest first per model; the newest of each is the served one.
    rows = lines[1:-1]
    assert [r.split()[0] for r in rows] == BUNDLED
    served = {"autoint": "stage 2, /predict", "deepfm": "stage 1 (keeps 100)"}
    for row in rows:
        key = row.split()[0]
        name = key.split("/")[0]
        assert row.split()[1:3] == [ARCH[name], AUC[name]]
        assert row.endswith(served[name] if key == NEWEST[name] else "-"), row
    code, out, _ = run_main(["models", "list", "--json"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["model"] for r in rows] == BUNDLED
    deepfm_1 = BUNDLED.index("deepfm/1")
    assert (
        rows[deepfm_1]["sha256"]
        == json.loads((REPO_ROOT / "models/deepfm/1/card.json").read_text())["sha256"]
    )


def test_models_validate_the_bundled_models(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_main(["models", "validate"], capsys)
    assert code == 0, out
    n = len(BUNDLED)
    assert out.splitlines()[-1] == f"{n} of {n} models valid"
    for key in BUNDLED:
        assert f"ok    {key}  " in out
    assert out.count("card, sha256, onnxruntime, warm-up, golden request (16 rows)") == n


def test_models_validate_a_corrupt_copy_fails(tmp_path: Path, capsys: pytest.CaptureFixture):
    root = tmp_path / "models"
    shutil.copytree(REPO_ROOT / "models" / "deepfm", root / "deepfm")
    shutil.copytree(REPO_ROOT / "models" / "autoint", root / "autoint")
    model = root / "deepfm" / "1" / MODEL_FILE
    data = bytearray(model.read_bytes())
    data[-100] ^= 0x01
    model.write_bytes(bytes(data))
    code, out, _ = run_main(["models", "validate", "--root", str(root)], capsys)
    assert code == 1
    assert f"FAIL  deepfm/1  {root / 'deepfm' / '1'}: " in out
    assert "model.onnx: sha256 " in out and " does not match card 3d52c260" in out
    assert f"ok    autoint/1  {root / 'autoint' / '1'}" in out
    assert out.splitlines()[-1] == f"{len(BUNDLED) - 1} of {len(BUNDLED)} models valid"
    # One model by path: the same verdict.
    code, out, _ = run_main(["models", "validate", str(root / "deepfm" / "1")], capsys)
    assert code == 1 and out.splitlines()[-1] == "0 of 1 models valid"


def test_models_publish_is_atomic_and_checked(tmp_path: Path, capsys: pytest.CaptureFixture):
    root = tmp_path / "models"
    shutil.copytree(REPO_ROOT / "models" / "deepfm", root / "deepfm")
    before = sorted(p.name for p in (root / "deepfm").iterdir())
    new = next_version(root / "deepfm")
    good = copy_as_version(REPO_ROOT / "models" / "deepfm" / "1", tmp_path / "build" / new, new)
    code, out, _ = run_main(["models", "publish", str(good), "--root", str(root)], capsys)
    assert code == 0, out
    assert f"published deepfm/{new} at {root / 'deepfm' / new}" in out
    assert "kill -HUP" in out  # how to make the farm serve it
    assert (root / "deepfm" / new / "golden.json").is_file()  # recorded at publish
    code, out, _ = run_main(["models", "validate", str(root / "deepfm" / new)], capsys)
    assert code == 0 and out.splitlines()[-1] == "1 of 1 models valid"
    # Versions are immutable; a broken one never appears, not even half-copied.
    code, _, err = run_main(["models", "publish", str(good), "--root", str(root)], capsys)
    assert code == 1 and f"deepfm/{new} already exists" in err
    nxt = str(int(new) + 1)
    bad = copy_as_version(REPO_ROOT / "models" / "deepfm" / "1", tmp_path / "build" / nxt, nxt)
    (bad / MODEL_FILE).write_bytes(b"not onnx")
    code, _, err = run_main(["models", "publish", str(bad), "--root", str(root)], capsys)
    assert code == 1 and "does not match card" in err
    assert sorted(p.name for p in (root / "deepfm").iterdir()) == sorted([*before, new])


def test_models_describe(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CTR_FARM_CONFIG", raising=False)
    code, out, _ = run_main(["models", "describe", "deepfm"], capsys)
    assert code == 0
    newest = NEWEST["deepfm"].split("/")[1]
    assert out.startswith(f"{NEWEST['deepfm']}  DeepFM  {REPO_ROOT / 'models' / 'deepfm' / newest}")
    assert "test AUC 0.7619" in out and "served as   stage 1 (keeps 100)" in out
    assert "golden      golden.json" in out
    assert "    domain                 24000      24000" in out
    code, out, _ = run_main(["models", "describe", "autoint/1", "--json"], capsys)
    card = json.loads(out)
    assert card["name"] == "autoint" and len(card["fields"]) == 16
    code, _, err = run_main(["models", "describe", "wide-and-deep"], capsys)
    assert code == 1
    assert "ctr-farm models: no model 'wide-and-deep' under" in err
    assert f"(known: {', '.join(BUNDLED)})" in err


# -- make-logs, train ------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_make_logs_small_run(suffix: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / f"logs{suffix}"
    code, stdout, _ = run_main(
        ["make-logs", "--rows", "3000", "--seed", "7", "--neg-ratio", "20", "--out", str(out)],
        capsys,
    )
    assert code == 0
    summary = json.loads(stdout)
    table = logs.read(out)
    assert summary["rows"] == table.n_rows < 3000  # down-sampled
    assert summary["clicks"] == int(table[logs.LABEL].sum()) > 0
    assert list(table) == [*logs.FIELD_NAMES, logs.LABEL]
    again = logs.generate(3000, 7, neg_ratio=20)  # deterministic: the same rows
    assert np.array_equal(table.id_matrix(), again.id_matrix())


def test_make_logs_bad_value(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_main(
        [
            "make-logs",
            "--rows",
            "10",
            "--seed",
            "1",
            "--base-ctr",
            "0.5",
            "--out",
            str(tmp_path / "x.parquet"),
        ],
        capsys,
    )
    assert code == 1 and "ctr-farm make-logs: base_ctr must be in [0.001, 0.01]" in err


def test_train_models_are_the_trainers() -> None:
    trainer = pytest.importorskip("app.offline.train")
    from app.offline.cli import MODELS

    assert set(MODELS) == set(trainer.DEFAULT_SPECS)


def test_train_without_torch_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    monkeypatch.delitem(sys.modules, "app.offline.train", raising=False)
    monkeypatch.delattr(app.offline, "train", raising=False)
    code, _, err = run_main(["train", "--rows-train", "10"], capsys)
    assert code == 1
    assert "ctr-farm train: training needs the train extra (torch is missing)" in err
    assert "CTR_FARM_EXTRAS=dev,train bash scripts/install" in err


# -- score ---------------------------------------------------------------------------------------
def test_score_prints_a_summary(
    tmp_path: Path, fake_models: Path, capsys: pytest.CaptureFixture
) -> None:
    make_input(tmp_path / "logs.parquet", 1_000, seed=3)
    argv = [
        "score",
        "--input",
        str(tmp_path / "logs.parquet"),
        "--output",
        str(tmp_path / "scores.parquet"),
        "--deepfm-model",
        str(fake_models / "deepfm" / "1"),
        "--autoint-model",
        str(fake_models / "autoint" / "1"),
        "--chunk-rows",
        "300",
    ]
    code, out, _ = run_main([*argv, "--no-progress"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("scored 1000 rows in 4 chunks (0 resumed) with autoint/1 in")
    assert lines[1] == f"output   {tmp_path / 'scores.parquet'}/ (parquet parts, _manifest.jsonl)"
    assert lines[2] == f"summary  {tmp_path / 'scores.summary.json'}"
    assert lines[3].startswith("ctr      mean 0.")
    assert lines[4].startswith("auc      0.")
    assert lines[5].startswith("oov      weekday ")
    assert "ctr histogram" in out
    assert pq.read_table(tmp_path / "scores.parquet").num_rows == 1_000
    code, out, _ = run_main([*argv, "--json"], capsys)  # resumed: nothing left to do
    summary = json.loads(out)
    assert summary["run"]["resumed_chunks"] == 4 and summary["rows"] == 1_000
    code, _, err = run_main([*argv, "--group-by", "weekday"], capsys)
    assert code == 1 and "--group-by, --top-k and --stage1-k go with --mode rank" in err
    code, _, err = run_main([*argv, "--chunk-rows", "500"], capsys)
    assert code == 1 and "holds a run with other job.chunk_rows" in err
    code, _, err = run_main([*argv, "--model", "nope"], capsys)
    assert code == 1 and "unknown model; loaded: ['autoint', 'deepfm'] (model)" in err


def test_struct_settings_take_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CTR_FARM_CONFIG", raising=False)
    parser, _ = build_parser("serve")
    canary = '{"autoint_model": "models/autoint/1", "steps": [0.1, 1.0]}'
    config = config_from(parser.parse_args(["--canary", canary]))
    assert config.canary is not None
    assert config.canary.autoint_model == "models/autoint/1"
    assert config.canary.steps == (0.1, 1.0)


# -- setting flags: documented from Config's own comments ---------------------------------
def serve_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_every_setting_has_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    text = serve_help(capsys)
    for field in msgspec.structs.fields(Config):
        assert "--" + field.name.replace("_", "-") in text


def test_tracing_flags_say_what_they_do(capsys: pytest.CaptureFixture[str]) -> None:
    text = serve_help(capsys)
    assert "--tracing {off,stdout,otlp}" in text
    assert "one JSON line per span on the worker's stdout" in text
    assert "(default off; CTR_FARM_TRACING)" in text
    assert "(default http://127.0.0.1:4318/v1/traces; CTR_FARM_OTLP_ENDPOINT)" in text
    assert "Share of traces recorded (0 to 1)" in text


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
