"""Command line: ``python -m app serve [--pool-size 6 ...]``.

Flags are generated from :class:`app.config.Config`, so every setting has one flag
(``--pool-size``, ``--intra-threads``, ``--deepfm-model``, ...) and the CLI can never
drift from the config. ``serve`` resolves the config (defaults < file < env < flags),
exports it to the environment and hands over to honcho, which runs the Procfile.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence

import msgspec

from app.config import REPO_ROOT, Config, ConfigError, load, parse_stages, to_env


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    defaults = Config()
    for field in msgspec.structs.fields(Config):
        if field.name == "stages":
            help_ = "cascade as model[:keep_k],... (default deepfm:100,autoint)"
            parser.add_argument("--stages", help=help_)
            continue
        default = getattr(defaults, field.name)
        flag = "--" + field.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"(default {default})",
            )
        else:
            parser.add_argument(flag, default=None, help=f"(default {default})")


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


def procfile_entries(config: Config) -> list[str]:
    """The Procfile entries ``serve`` starts: ``prometheus`` only when asked for
    (``--prometheus``); honcho would otherwise start every entry."""
    return ["web", "proxy", *(["prometheus"] if config.prometheus else [])]


def serve(args: argparse.Namespace) -> None:
    config = load(overrides=_overrides(args))
    env = {**os.environ, **to_env(config)}
    honcho = shutil.which("honcho", path=str(REPO_ROOT / ".venv" / "bin")) or shutil.which("honcho")
    if honcho is None:
        raise ConfigError("honcho is not installed (run scripts/install)")
    os.chdir(REPO_ROOT)
    argv = [honcho, "start", "-f", "Procfile", "-d", str(REPO_ROOT), *procfile_entries(config)]
    os.execve(honcho, argv, env)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ctr-farm", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="start nginx + gunicorn (honcho) on the bundled models")
    _add_config_flags(p_serve)
    p_serve.set_defaults(func=serve)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ConfigError as exc:
        sys.exit(f"ctr-farm: {exc}")
