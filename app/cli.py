"""Command line: ``python -m app serve [--pool-size 6 ...]``.

Flags are generated from :class:`app.config.Config`, so every setting has one flag
(``--pool-size``, ``--intra-threads``, ``--deepfm-model``, ...) and the CLI can never
drift from the config. ``serve`` resolves the config (defaults < file < env < flags),
exports it to the environment and hands over to honcho, which runs the Procfile.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import shutil
import sys
import typing
from collections.abc import Sequence

import msgspec

from app.config import REPO_ROOT, Config, ConfigError, load, parse_stages, to_env

_DOC_LINE = re.compile(r"^\s*#:\s?(.*)$")
_FIELD_LINE = re.compile(r"^\s*(\w+)\s*:")
EPILOG = """Every flag is also the environment variable CTR_FARM_<SETTING> and a key of the TOML
file named by CTR_FARM_CONFIG (flags win). README.md documents each group of settings;
"Dashboards and tracing" there covers --tracing and the Grafana dashboard in
deploy/grafana/ctr-farm.json."""


def setting_docs() -> dict[str, str]:
    """Each setting's ``#:`` comment in :class:`Config` (where it is documented once)."""
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(Config).splitlines():
        doc = _DOC_LINE.match(line)
        if doc:
            pending.append(doc.group(1))
            continue
        field = _FIELD_LINE.match(line)
        if field and pending:
            docs[field.group(1)] = " ".join(pending)
        pending = []
    return docs


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    defaults = Config()
    docs = setting_docs()
    for field in msgspec.structs.fields(Config):
        doc = docs.get(field.name, "").replace("``", "").replace("%", "%%") + " "
        if field.name == "stages":
            help_ = "cascade as model[:keep_k],... (default deepfm:100,autoint)"
            parser.add_argument("--stages", help=doc + help_)
            continue
        default = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        help_ = f"{doc}(default {default})".lstrip()
        if isinstance(default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_
            )
        elif typing.get_origin(field.type) is typing.Literal:
            parser.add_argument(flag, default=None, choices=typing.get_args(field.type), help=help_)
        else:
            parser.add_argument(flag, default=None, help=help_)


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {}
    for field in msgspec.structs.fields(Config):
        value = getattr(args, field.name, None)
        if value is None:
            continue
        if field.name == "stages":
            out["stages"] = parse_stages(value)
        else:
            out[field.name] = value
    return out


def serve(args: argparse.Namespace) -> None:
    config = load(overrides=_overrides(args))
    env = {**os.environ, **to_env(config)}
    honcho = shutil.which("honcho", path=str(REPO_ROOT / ".venv" / "bin")) or shutil.which("honcho")
    if honcho is None:
        raise ConfigError("honcho is not installed (run scripts/install)")
    os.chdir(REPO_ROOT)
    os.execve(honcho, [honcho, "start", "-f", "Procfile", "-d", str(REPO_ROOT)], env)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ctr-farm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser(
        "serve",
        help="start nginx + gunicorn (honcho) on the bundled models",
        description="Start nginx + gunicorn (honcho) on the bundled models.",
        epilog=EPILOG,
    )
    _add_config_flags(p_serve)
    p_serve.set_defaults(func=serve)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ConfigError as exc:
        sys.exit(f"ctr-farm: {exc}")
