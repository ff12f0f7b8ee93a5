"""``ctr-farm``: one command line for the farm (also ``python -m app``).

    ctr-farm serve      start nginx + gunicorn (honcho) on the configured models
    ctr-farm score      score a parquet file offline with the serving code (resumable)
    ctr-farm models     list, validate, describe and publish the models in the repository
    ctr-farm bench      the ranking latency study (single vs multi-stage)
    ctr-farm sweep      the throughput sweep over farm configurations (wrk)
    ctr-farm make-logs  generate synthetic impression logs
    ctr-farm train      train DeepFM / AutoInt (needs the train extra: torch)

Setting flags are generated from :class:`app.config.Config`, so every setting has one flag
(``--pool-size``, ``--deepfm-model``, ...) and the CLI can never drift from the config;
``serve`` and ``score`` resolve them through :func:`app.config.load` (defaults < file <
``CTR_FARM_*`` environment < flags). A command's module is imported only when that
command runs: ``ctr-farm --help`` imports neither torch nor onnxruntime.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec

from app.config import (
    ENV_FILE,
    ENV_PREFIX,
    REPO_ROOT,
    STRUCT_FIELDS,
    Config,
    ConfigError,
    load,
    parse_stages,
    to_env,
)
from app.errors import CommandError, FarmError
from app.logconf import configure_logging

#: Settings that matter to offline scoring (the models, how they run, the request limits).
SCORE_SETTINGS = (
    "deepfm_model",
    "autoint_model",
    "stages",
    "predict_model",
    "verify_sha256",
    "intra_threads",
    "inter_threads",
    "share_weights",
    "max_candidates",
    "default_top_k",
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every flag's help, except where there is none (None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


@dataclass(frozen=True)
class Command:
    """A subcommand: ``module`` defines ``arguments(parser)`` and ``run(args)`` functions
    (names below), imported only when the command is chosen."""

    help: str
    module: str
    arguments: str
    run: str

    def load(self) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[..., Any]]:
        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError as exc:
            raise CommandError(
                f"{exc.name} is not installed: reinstall the project (bash scripts/install)"
            ) from exc
        return getattr(module, self.arguments), getattr(module, self.run)


COMMANDS: dict[str, Command] = {
    "serve": Command(
        "start nginx + gunicorn (honcho) on the configured models",
        __name__,
        "serve_arguments",
        "serve",
    ),
    "score": Command(
        "score a parquet file of logs offline with the serving code (chunked, resumable)",
        __name__,
        "score_arguments",
        "score",
    ),
    "models": Command(
        "list, validate, describe and publish the models in the repository",
        __name__,
        "models_arguments",
        "models",
    ),
    "bench": Command(
        "the ranking latency study: single vs multi-stage, in-process and over HTTP",
        "benchmarks.study",
        "add_arguments",
        "run",
    ),
    "sweep": Command(
        "the throughput sweep over farm configurations, with wrk",
        "benchmarks.sweep",
        "add_arguments",
        "run",
    ),
    "make-logs": Command(
        "generate synthetic iPinYou-style impression logs (parquet or csv)",
        "app.offline.cli",
        "make_logs_arguments",
        "make_logs",
    ),
    "train": Command(
        "train DeepFM / AutoInt and write models/<name>/<version>/ (needs the train extra)",
        "app.offline.cli",
        "train_arguments",
        "train",
    ),
}


# -- setting flags ------------------------------------------------------------------------------
def setting_docs() -> dict[str, str]:
    """Each setting's first ``#:`` comment sentence in app/config.py: its flag's help."""
    docs: dict[str, str] = {}
    comment: list[str] = []
    for line in inspect.getsource(Config).splitlines():
        text = line.strip()
        if text.startswith("#:"):
            comment.append(text[2:].strip())
            continue
        name, sep, _ = text.partition(":")
        if sep and name.isidentifier() and comment:
            first = " ".join(comment).split(". ")[0].rstrip(".")
            docs[name] = first.replace("``", "").replace("%", "%%")  # argparse %-formats help
        comment = []
    return docs


def _flag_type(annotation: Any) -> dict[str, Any]:
    """argparse keywords for a setting's type: choices for a Literal, N for numbers."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is Literal:
        return {"choices": get_args(annotation)}
    if annotation in (int, float):
        return {"metavar": "N"}
    return {}


def add_config_flags(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """One flag per Config setting (or the ``names`` given), default None: an absent flag
    leaves the setting to the file and the environment."""
    defaults, docs = Config(), setting_docs()
    fields = {f.name: f for f in msgspec.structs.fields(Config)}
    group = parser.add_argument_group(
        "settings",
        f"(also from the environment, {ENV_PREFIX}<SETTING>, and a TOML file, {ENV_FILE};"
        " the README's Configuration section has them all)",
    )
    for name in fields if names is None else names:
        flag = "--" + name.replace("_", "-")
        env = ENV_PREFIX + name.upper()
        doc = docs.get(name, "")
        if name == "stages":
            help_ = f"{doc}: model[:keep_k],... (default deepfm:100,autoint; {env})"
            group.add_argument(flag, metavar="STAGES", help=help_)
            continue
        default = getattr(defaults, name)
        if name in STRUCT_FIELDS:  # a TOML table in the file, JSON here and in the env
            help_ = f"{doc}, as JSON (default none; {env})"
            group.add_argument(flag, metavar="JSON", help=help_)
            continue
        shown = '""' if default == "" else default
        help_ = f"{doc} (default {shown}; {env})".lstrip()
        if isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        else:
            group.add_argument(flag, help=help_, **_flag_type(fields[name].type))


def config_from(args: argparse.Namespace) -> Config:
    """The Config: defaults < file < env < the flags given on the command line."""
    overrides: dict[str, object] = {}
    for field in msgspec.structs.fields(Config):
        value = getattr(args, field.name, None)
        if value is not None:
            overrides[field.name] = parse_stages(value) if field.name == "stages" else value
    return load(overrides=overrides)


# -- serve --------------------------------------------------------------------------------------
def serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser)


def serve(args: argparse.Namespace) -> None:
    """Resolve the config, export it as CTR_FARM_* and exec honcho (runs the Procfile)."""
    config = config_from(args)
    env = {**os.environ, **to_env(config)}
    honcho = shutil.which("honcho", path=str(REPO_ROOT / ".venv" / "bin")) or shutil.which("honcho")
    if honcho is None:
        raise ConfigError("honcho is not installed (run scripts/install)")
    os.chdir(REPO_ROOT)
    os.execve(honcho, [honcho, "start", "-f", "Procfile", "-d", str(REPO_ROOT)], env)


# -- score --------------------------------------------------------------------------------------
def score_arguments(parser: argparse.ArgumentParser) -> None:
    from app.batch import Job

    d = Job(Path(), Path())
    parser.add_argument("--input", type=Path, required=True, help="parquet file of logs")
    parser.add_argument(
        "--output",
        type=Path,
        required=True,
        help="output directory of parquet parts + _manifest.jsonl; the summary goes to"
        " <name>.summary.json beside it",
    )
    parser.add_argument(
        "--mode",
        choices=("predict", "rank"),
        default=d.mode,
        help="predict: a CTR per row (as /predict); rank: rows grouped into requests,"
        " ranked by the cascade (as /rank)",
    )
    parser.add_argument(
        "--model", help="predict: the model (default: the predict_model setting, autoint)"
    )
    parser.add_argument(
        "--chunk-rows", type=int, default=d.chunk_rows, help="rows read, scored and written at once"
    )
    parser.add_argument(
        "--batch-rows", type=int, default=d.batch_rows, help="predict: rows per model run"
    )
    parser.add_argument(
        "--group-size", type=int, default=d.group_size, help="rank: consecutive rows per request"
    )
    parser.add_argument(
        "--group-by",
        metavar="COLUMN",
        help="rank: a request is a run of rows with equal COLUMN values (instead of --group-size)",
    )
    parser.add_argument(
        "--top-k", type=int, help="rank: rows ranked per request (default: default_top_k, 10)"
    )
    parser.add_argument(
        "--stage1-k", type=int, help="rank: stage 1's cut (default: the first stage's keep_k, 100)"
    )
    parser.add_argument(
        "--single-stage",
        action="store_true",
        help="rank with the predict_model alone (the baseline, as multi_stage: false)",
    )
    parser.add_argument("--label", default=d.label, help="label column for AUC (if present)")
    parser.add_argument(
        "--overwrite", action="store_true", help="start again instead of resuming --output"
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (none when not a terminal)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_config_flags(parser, SCORE_SETTINGS)


def score(args: argparse.Namespace) -> int:
    from app.batch import Job, ScoreError, format_summary
    from app.batch import score as run_job

    job = Job(
        input=args.input,
        output=args.output,
        mode=args.mode,
        model=args.model,
        chunk_rows=args.chunk_rows,
        batch_rows=args.batch_rows,
        group_size=args.group_size,
        group_by=args.group_by,
        top_k=args.top_k,
        stage1_k=args.stage1_k,
        multi_stage=not args.single_stage,
        label=args.label,
        overwrite=args.overwrite,
    )
    if args.mode == "predict" and (args.group_by or args.top_k or args.stage1_k):
        raise ScoreError("--group-by, --top-k and --stage1-k go with --mode rank")
    progress = not args.no_progress and sys.stderr.isatty()
    configure_logging("warning")  # JSON lines on stderr, as the farm's; none when all is well
    try:
        summary = run_job(job, config_from(args), progress=progress)
    except KeyboardInterrupt:
        print(
            f"ctr-farm score: interrupted; the same command resumes {args.output}", file=sys.stderr
        )
        return 130
    print(msgspec.json.encode(summary).decode() if args.json else format_summary(summary))
    return 0


# -- models -------------------------------------------------------------------------------------
def models_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    root_help = "the model repository (relative paths: from the project root)"

    def action(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        p.add_argument("--root", type=Path, default=Path("models"), help=root_help)
        return p

    p = action("list", "every version under --root: its card, golden request, role in the config")
    p.add_argument("--json", action="store_true", help="one JSON object per model")
    p = action(
        "validate",
        "what a worker checks before a version serves: card, sha256, ONNX Runtime load,"
        " warm-up, golden request; exit 1 if any fails",
    )
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="version dirs, model repositories or roots (default: every version under --root)",
    )
    p = action("describe", "one model's card in full: fields, metrics, training, files")
    p.add_argument("model", metavar="NAME[/VERSION]", help="a model (newest version) or a path")
    p.add_argument("--json", action="store_true", help="print the card as JSON")
    p = action(
        "publish",
        "copy a new version (a dir with model.onnx + card.json) into --root/<name>/<version>"
        " atomically, after the checks of validate (and the same fields as the newest"
        " version); records its golden request if it has none",
    )
    p.add_argument("source", type=Path, metavar="DIR", help="the version to publish")
    p.add_argument(
        "--reload",
        action="store_true",
        help="then SIGHUP the running farm (run_dir's gunicorn.pid): every worker reloads",
    )


def models(args: argparse.Namespace) -> int:
    from app import catalog

    root = args.root if args.root.is_absolute() else REPO_ROOT / args.root
    config = load()
    if args.action == "list":
        print(catalog.format_list(root, config, as_json=args.json))
        return 0
    if args.action == "describe":
        print(catalog.describe(catalog.resolve(root, args.model), config, as_json=args.json))
        return 0
    if args.action == "publish":
        target = catalog.publish(args.source, root, config)
        print(f"published {catalog.key_of(target)} at {target}")
        if args.reload:
            pid = catalog.reload_farm(config)
            print(f"asked the farm (gunicorn {pid}) to reload: see GET /models")
        else:
            print("the farm serves it after a reload: kill -HUP $(cat run/gunicorn.pid)")
        return 0
    # A relative PATH: from here, else from the project root (as --root).
    paths = [Path(p) if Path(p).exists() else REPO_ROOT / p for p in args.paths] or [root]
    dirs = [d for p in paths for d in catalog.version_dirs(p)]
    if not dirs:
        raise CommandError(f"no model versions under {', '.join(map(str, paths))}")
    failed = 0
    for version_dir in dirs:
        check = catalog.validate(version_dir, config)
        failed += not check.ok
        print(catalog.format_validation(check))
    print(f"{len(dirs) - failed} of {len(dirs)} models valid")
    return 1 if failed else 0


# -- entry point --------------------------------------------------------------------------------
def top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<10} {c.help}" for name, c in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="ctr-farm",
        description="ctr-farm: rank ad candidates by predicted CTR; serve, score, measure, train.",
        epilog=f"commands:\n{lines}\n\n`ctr-farm COMMAND --help` lists a command's flags.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help="what to run")
    return parser


def build_parser(name: str) -> tuple[argparse.ArgumentParser, Callable[..., Any]]:
    """``ctr-farm <name>``'s parser and run function (imports that command's module)."""
    command = COMMANDS[name]
    add_arguments, run = command.load()
    parser = argparse.ArgumentParser(
        prog=f"ctr-farm {name}", description=command.help, formatter_class=HelpFormatter
    )
    add_arguments(parser)
    return parser, run


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        top_parser().parse_args(argv[:1])  # --help, or an error naming the commands
        return 2
    name = argv[0]
    try:
        parser, run = build_parser(name)
        args = parser.parse_args(argv[1:])
        args.argv = argv[1:]  # the command's own arguments, for the reports that quote them
        return run(args) or 0
    except (ConfigError, CommandError) as exc:
        sys.exit(f"ctr-farm {name}: {exc}")
    except FarmError as exc:
        where = f" ({exc.field})" if exc.field else ""
        sys.exit(f"ctr-farm {name}: {exc.message}{where}")
