"""What ``ctr-farm models`` shows: the model versions under a repository root, their
cards, and whether each would serve.

Finding versions is app/registry.py's (numbered dirs holding a card; hidden and other
dirs are never versions). Validating one is :func:`app.service.validate_version`, the
check every worker runs before a version serves: the card, the file's sha256, ONNX
Runtime loading it with the card's signature, warm-up, and the golden request
(``golden.json``). This module walks the root and words the answers.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from app import registry
from app.config import Config
from app.errors import FarmError, ModelLoadError
from app.sessions import MODEL_FILE, read_card


# -- finding versions --------------------------------------------------------------------------
def version_dirs(path: Path) -> list[Path]:
    """The versions at or under ``path``: a version dir itself, a model's repository (its
    versions), or a root of repositories (every ``<name>/<version>``); oldest first."""
    if registry.is_version(path):
        return [path]
    versions = registry.versions(path)
    if versions or not path.is_dir():
        return versions
    repos = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [v for repo in repos for v in registry.versions(repo)]


def resolve(root: Path, spec: str) -> Path:
    """``NAME`` (its newest version), ``NAME/VERSION`` or a path -> one version dir."""
    for path in (Path(spec), root / spec):
        if registry.is_version(path):
            return path
        versions = registry.versions(path)
        if versions:
            return versions[-1]
    known = ", ".join(key_of(d) for d in version_dirs(root)) or "none"
    raise ModelLoadError(f"no model {spec!r} under {root} (known: {known})")


def key_of(version_dir: Path) -> str:
    """``name/version`` as the directories name it."""
    return f"{version_dir.parent.name}/{version_dir.name}"


# -- validation --------------------------------------------------------------------------------
@dataclass
class Validation:
    dir: Path
    #: None: valid. Else the first check it failed, as a worker would log it.
    error: str | None = None
    #: Rows of the golden request checked (0: the version has no golden.json).
    golden_rows: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def key(self) -> str:
        return key_of(self.dir)


def validate(version_dir: Path, config: Config) -> Validation:
    """Run a worker's validation of one version (one session, sha256 always checked; the
    version's repository directory names the model). Without a golden.json, one forward
    run must at least give CTRs in [0, 1] (a worker would serve it and fail requests)."""
    from app.service import validate_version  # (the serving core: only when validating)

    result = Validation(version_dir)
    config = msgspec.structs.replace(config, pool_size=1, verify_sha256=True)
    golden = version_dir / registry.GOLDEN_FILE
    try:
        model = validate_version(version_dir.parent.name, version_dir, config)
        try:
            if golden.is_file():
                result.golden_rows = len(
                    msgspec.json.decode(golden.read_bytes(), type=registry.Golden).ids
                )
            else:
                # No recorded scores to compare: at least the scores must be CTRs.
                scores = model.run(registry.golden_rows(model))  # ModelError if not finite
                if ((scores < 0) | (scores > 1)).any():
                    raise ModelLoadError(f"{model.key}: scores outside [0, 1]")
        finally:
            model.close()
    except FarmError as exc:
        result.error = exc.message
    return result


def publish(source: Path, root: Path, config: Config) -> Path:
    """``ctr-farm models publish``: :func:`registry.publish` with a worker's checks, and
    the fields of the newest version already there (a reload would refuse others)."""
    from app.service import validate_version

    card = read_card(source)
    repo = root / card.name
    current = registry.versions(repo)
    fields = read_card(current[-1]).field_names if current else None
    config = msgspec.structs.replace(config, pool_size=1, verify_sha256=True)
    return registry.publish(
        source, repo, lambda path: validate_version(card.name, path, config, fields=fields)
    )


def reload_farm(config: Config) -> int:
    """SIGHUP the running farm's gunicorn master (it forwards it to every worker)."""
    pidfile = config.run_path / "gunicorn.pid"
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"no running farm to reload ({pidfile}): {exc}") from exc
    return pid


# -- presentation (``ctr-farm models``) ----------------------------------------------------
def roles(config: Config) -> dict[Path, list[str]]:
    """Version dir -> what the config serves it as (``stage 1 (keeps 100)``, ...): the
    version a setting pins, or a repository's newest (if it validates)."""
    out: dict[Path, list[str]] = {}
    for name, setting in config.model_dirs().items():
        try:
            version_dir = registry.newest(setting)
        except ModelLoadError:
            continue
        served = out.setdefault(version_dir.resolve(), [])
        for i, stage in enumerate(config.stages):
            if stage.model == name:
                keep = f" (keeps {stage.keep_k})" if stage.keep_k else ""
                served.append(f"stage {i + 1}{keep}")
        if config.predict_model == name:
            served.append("/predict")
    return out


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def format_list(root: Path, config: Config, as_json: bool = False) -> str:
    served = roles(config)
    rows: list[dict[str, Any]] = []
    for version_dir in version_dirs(root):
        row: dict[str, Any] = {"model": key_of(version_dir), "dir": str(version_dir)}
        row["served_as"] = served.get(version_dir.resolve(), [])
        row["golden"] = (version_dir / registry.GOLDEN_FILE).is_file()
        try:
            card = read_card(version_dir)
        except ModelLoadError as exc:
            row["error"] = exc.message
        else:
            row |= {
                "architecture": card.architecture,
                "test_auc": card.metrics.test_auc,
                "size_bytes": card.size_bytes,
                "sha256": card.sha256,
            }
        rows.append(row)
    if as_json:
        return "\n".join(msgspec.json.encode(r).decode() for r in rows)
    table = [("MODEL", "ARCHITECTURE", "TEST AUC", "SIZE", "SHA256", "GOLDEN", "SERVED AS")]
    for r in rows:
        if "error" in r:
            table.append((r["model"], f"unreadable: {r['error']}", "", "", "", "", ""))
            continue
        table.append(
            (
                r["model"],
                r["architecture"],
                f"{r['test_auc']:.4f}",
                _size(r["size_bytes"]),
                r["sha256"][:12],
                "yes" if r["golden"] else "no",
                ", ".join(r["served_as"]) or "-",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in table]
    lines.append(f"({len(rows)} versions under {root})")
    return "\n".join(line.rstrip() for line in lines)


def describe(version_dir: Path, config: Config, as_json: bool = False) -> str:
    card = read_card(version_dir)
    if as_json:
        return msgspec.json.format(msgspec.json.encode(card)).decode()
    m, t = card.metrics, card.training
    shape = ", ".join(map(str, card.input.shape))
    lines = [
        f"{card.name}/{card.version}  {card.architecture}  {version_dir}",
        f"  files       {MODEL_FILE} {_size(card.size_bytes)}, sha256 {card.sha256}",
        f"  graph       {card.input.name} {card.input.dtype} [{shape}] ->"
        f" {card.output.name} {card.output.dtype} [{', '.join(map(str, card.output.shape))}],"
        f" opset {card.opset}",
        f"  metrics     valid AUC {m.valid_auc:.4f}, test AUC {m.test_auc:.4f},"
        f" test log loss {m.test_logloss:.5f}",
        "  served as   " + (", ".join(roles(config).get(version_dir.resolve(), [])) or "-"),
        "  golden      "
        + ("golden.json" if (version_dir / registry.GOLDEN_FILE).is_file() else "none"),
    ]
    if t:
        lines.append("  training    " + ", ".join(f"{k} {v}" for k, v in t.items()))
    hp = {k: v for k, v in card.hyperparameters.items() if not isinstance(v, dict)}
    if hp:
        lines.append("  hyperparams " + ", ".join(f"{k} {v}" for k, v in hp.items()))
    lines.append(f"  fields ({len(card.fields)}, in input order)   vocab_size  oov_index")
    width = max(len(f.name) for f in card.fields)
    lines += [f"    {f.name:<{width}}  {f.vocab_size:>10}  {f.oov_index:>9}" for f in card.fields]
    return "\n".join(lines)


def format_validation(check: Validation) -> str:
    if not check.ok:
        return f"FAIL  {check.key}  {check.dir}: {check.error}"
    golden = (
        f"golden request ({check.golden_rows} rows)"
        if check.golden_rows
        else "forward run (no golden.json: scores only checked to be CTRs)"
    )
    return f"ok    {check.key}  {check.dir}: card, sha256, onnxruntime, warm-up, {golden}"
