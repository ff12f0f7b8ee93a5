"""Offline batch scoring: a parquet file of impressions -> a CTR, or a rank, per row.

The serving code, in process: :class:`app.service.Farm` loads the models named by the
one :class:`~app.config.Config`, :meth:`FeatureSpace.map_oov` maps and counts
out-of-vocabulary ids exactly as a request's ids are, and :meth:`Farm.score` (what
``/predict`` runs) or :meth:`Farm.rank_ids` (what ``/rank`` runs) scores them. So a row
scores here what it scores over HTTP (``tests/integration/test_score_equality.py``).

Input: parquet whose columns include the model card's fields as integer ids
(``ctr-farm make-logs`` writes such files), optionally a label (``click``) and, for
``rank``, a group key. It is read ``chunk_rows`` rows at a time (pyarrow record batches):
memory follows the chunk, not the file.

* ``predict``: every row scored by one model, ``batch_rows`` rows per model run.
* ``rank``: rows grouped into requests (``group_size`` consecutive rows, or runs of equal
  ``group_by`` values), each ranked by the cascade: ``rank`` 1..top_k and its ``ctr`` for
  the rows kept, null for the others.

Output: a directory of parquet parts, one per chunk (``part-000000.parquet``, ...), that
pyarrow, pandas or duckdb read as one table, and ``_manifest.jsonl``: a header line (the
job, the models, the input's fingerprint), then one line per finished chunk with its
statistics, appended once its part is in place. A rerun of the same command skips the
finished chunks: chunk boundaries depend only on the input and the job, so a run killed
at any point and resumed writes what an uninterrupted run writes.

Summary (from the manifest, plus AUC from the parts): rows, OOV rate per field, a
histogram of the CTRs over fixed bins (the model card's ``CTR_EDGES``), their mean, and
AUC when the label column is present; written to ``<output>.summary.json``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from app.config import Config
from app.errors import CommandError
from app.offline.evaluate import CTR_EDGES, auc
from app.service import Farm

log = logging.getLogger(__name__)

Mode = Literal["predict", "rank"]
FORMAT = 1
MANIFEST = "_manifest.jsonl"
PART = "part-{:06d}.parquet"
SUMMARY_SUFFIX = ".summary.json"
_EDGES = np.asarray(CTR_EDGES)


class ScoreError(CommandError):
    """The job cannot run as asked (input, output or settings); the message says why."""


@dataclass(frozen=True)
class Job:
    """What to score and how; every field but ``output`` and ``overwrite`` must match
    for a rerun to resume."""

    input: Path
    output: Path
    mode: Mode = "predict"
    #: ``predict``: the model (None: the config's ``predict_model``).
    model: str | None = None
    chunk_rows: int = 50_000
    #: ``predict``: rows per model run (``/predict`` takes 64 per request; the scores do
    #: not depend on it for batches of 7 rows or more).
    batch_rows: int = 1000
    #: ``rank``: consecutive rows per request, unless ``group_by`` names a key column.
    group_size: int = 1000
    group_by: str | None = None
    top_k: int | None = None
    stage1_k: int | None = None
    multi_stage: bool = True
    label: str = "click"
    overwrite: bool = False

    def settings(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("input", "output", "overwrite"):
            out.pop(name)
        if self.mode == "predict":
            for name in ("group_size", "group_by", "top_k", "stage1_k", "multi_stage"):
                out.pop(name)
        else:
            out.pop("model")
            out.pop("batch_rows")
        return out


# -- the manifest ------------------------------------------------------------------------------
class Header(msgspec.Struct, frozen=True):
    format: int
    job: dict[str, Any]
    models: list[str]
    fields: list[str]
    input: dict[str, Any]


class Stats(msgspec.Struct):
    """What a chunk contributes to the summary (sums, so chunks add up)."""

    rows: int
    scored: int
    ctr_sum: float
    histogram: list[int]
    oov: list[int]
    groups: int = 0
    #: Label > 0 among all rows, and among the scored ones (None: no label column).
    positives: int | None = None
    scored_positives: int | None = None


class Chunk(msgspec.Struct, frozen=True):
    index: int
    start: int
    file: str
    stats: Stats


_header_decoder = msgspec.json.Decoder(Header)
_chunk_decoder = msgspec.json.Decoder(Chunk)


def fingerprint(path: Path, pf: pq.ParquetFile) -> dict[str, Any]:
    """Size, rows and the footer's sha256 (it holds every row group's statistics):
    a changed input is noticed without reading it all."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        fh.seek(max(size - 8, 0))
        footer_len = int.from_bytes(fh.read(4), "little")
        fh.seek(max(size - 8 - footer_len, 0))
        digest = hashlib.sha256(fh.read(footer_len + 8)).hexdigest()
    return {"bytes": size, "rows": pf.metadata.num_rows, "footer_sha256": digest}


class PartStore:
    """The output directory: parts, the manifest, resuming."""

    def __init__(self, path: Path, header: Header, overwrite: bool) -> None:
        self.path = path
        self.header = header
        self.manifest = path / MANIFEST
        if path.exists() and not path.is_dir():
            raise ScoreError(f"{path} exists and is not a directory; choose another --output")
        if path.is_dir() and any(path.iterdir()) and not self.manifest.exists():
            raise ScoreError(
                f"{path} exists and is not the output of `ctr-farm score` (no {MANIFEST});"
                " choose another --output"
            )
        if overwrite:
            self._remove_parts(0)
            self.manifest.unlink(missing_ok=True)

    def open(self) -> list[Chunk]:
        """The finished chunks (a new run: none). Drops what a killed run left half-done."""
        if not self.manifest.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            self._write_manifest([])
            return []
        lines = self.manifest.read_bytes().splitlines()
        try:
            old = _header_decoder.decode(lines[0]) if lines else None
        except msgspec.DecodeError:
            old = None
        if old != self.header:
            raise ScoreError(self._mismatch(old))
        done: list[Chunk] = []
        for line in lines[1:]:
            try:
                chunk = _chunk_decoder.decode(line)
            except msgspec.DecodeError:  # the line a kill cut short
                break
            if chunk.index != len(done) or not (self.path / chunk.file).exists():
                break
            done.append(chunk)
        if len(done) != len(lines) - 1:
            self._write_manifest(done)
        self._remove_parts(len(done))
        return done

    def _mismatch(self, old: Header | None) -> str:
        what = "an unreadable manifest"
        if old is not None:
            changed = _changed(msgspec.to_builtins(self.header), msgspec.to_builtins(old))
            what = "other " + ", ".join(changed)
        return (
            f"{self.path} holds a run with {what}; rerun with the same settings to resume,"
            " --overwrite to start again, or choose another --output"
        )

    def commit(self, chunk: Chunk, table: pa.Table) -> None:
        """Write the part, then record it: a kill in between leaves an unlisted part that
        the rerun writes again."""
        tmp = self.path / (chunk.file + ".tmp")
        pq.write_table(table, tmp, compression="zstd")
        _fsync(tmp)
        os.replace(tmp, self.path / chunk.file)
        with self.manifest.open("ab") as fh:
            fh.write(msgspec.json.encode(chunk) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())

    def parts(self, chunks: list[Chunk]) -> Iterator[Path]:
        return (self.path / c.file for c in chunks)

    def _write_manifest(self, chunks: list[Chunk]) -> None:
        tmp = self.manifest.with_suffix(".tmp")
        lines = [msgspec.json.encode(x) for x in (self.header, *chunks)]
        tmp.write_bytes(b"\n".join(lines) + b"\n")
        _fsync(tmp)
        os.replace(tmp, self.manifest)

    def _remove_parts(self, first: int) -> None:
        if not self.path.is_dir():
            return
        for part in self.path.glob("part-*.parquet*"):
            index = part.name.removeprefix("part-").split(".")[0]
            if part.name.endswith(".tmp") or (index.isdigit() and int(index) >= first):
                part.unlink()


def _changed(new: dict[str, Any], old: dict[str, Any]) -> list[str]:
    """Keys (``job.chunk_rows``, ``models``, ...) whose values differ."""
    out: list[str] = []
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            out += [f"{key}.{k}" for k in value if value[k] != before.get(k)]
        elif value != before:
            out.append(key)
    return out


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading -----------------------------------------------------------------------------------
def read_from(pf: pq.ParquetFile, columns: list[str], start: int, batch_rows: int):
    """Record batches of ``columns`` from row ``start`` on, skipping whole row groups."""
    meta = pf.metadata
    first, skip = 0, start
    while first < meta.num_row_groups and skip >= meta.row_group(first).num_rows:
        skip -= meta.row_group(first).num_rows
        first += 1
    if first == meta.num_row_groups:
        return
    groups = list(range(first, meta.num_row_groups))
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
        if skip >= len(batch):
            skip -= len(batch)
            continue
        yield batch.slice(skip) if skip else batch
        skip = 0


Cut = Callable[[pa.Table, bool], int]


def rechunk(batches: Iterator[pa.RecordBatch], chunk_rows: int, cut: Cut) -> Iterator[pa.Table]:
    """Consecutive tables of about ``chunk_rows`` rows, whatever the file's row groups:
    ``cut(table, at_end)`` says how many of the buffered rows make the next chunk
    (0: read more first)."""
    buffered: pa.Table | None = None
    for batch in batches:
        table = pa.Table.from_batches([batch])
        buffered = table if buffered is None else pa.concat_tables([buffered, table])
        while len(buffered) >= chunk_rows:
            n = cut(buffered, False)
            if n == 0:
                break
            yield buffered.slice(0, n)
            buffered = buffered.slice(n)
    while buffered is not None and len(buffered):
        n = cut(buffered, True)
        yield buffered.slice(0, n)
        buffered = buffered.slice(n)


def fixed_cut(chunk_rows: int) -> Cut:
    return lambda table, at_end: min(chunk_rows, len(table))


def key_cut(key: str, chunk_rows: int, max_group: int) -> Cut:
    """End a chunk at the last change of ``key`` within ``chunk_rows`` rows, so no group
    is split; a longer group makes a chunk of its own, up to ``max_group`` rows."""

    def cut(table: pa.Table, at_end: bool) -> int:
        if at_end and len(table) <= chunk_rows:
            return len(table)
        starts = group_starts(table.column(key))
        inside = starts[(starts > 0) & (starts <= chunk_rows)]
        if len(inside):
            return int(inside[-1])
        first = int(starts[1]) if len(starts) > 1 else len(table)
        if first > max_group:
            value = table.column(key)[0].as_py()
            raise ScoreError(
                f"group {key}={value!r} has more than {max_group} rows (max_candidates)"
            )
        return first if len(starts) > 1 or at_end else 0

    return cut


def group_starts(keys: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Row offsets where a run of equal keys starts (0 first)."""
    if keys.null_count:
        raise ScoreError("the group key column has nulls")
    values = keys.to_numpy(zero_copy_only=False)
    return np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1]).astype(np.int64)


def id_matrix(table: pa.Table, names: tuple[str, ...], start: int) -> np.ndarray:
    """The fields as a C-contiguous int64 ``[n, k]`` matrix (card order), as decoded."""
    out = np.empty((len(table), len(names)), dtype=np.int64)
    for j, name in enumerate(names):
        column = table.column(name)
        if column.null_count:
            raise ScoreError(f"column {name!r} has nulls (in the chunk from row {start})")
        try:
            out[:, j] = column.cast(pa.int64()).to_numpy()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ScoreError(f"column {name!r}: ids must be int64: {exc}") from exc
    return out


# -- scoring -----------------------------------------------------------------------------------
class Scorer:
    """One chunk -> its output table and statistics, with the farm's code."""

    def __init__(self, farm: Farm, job: Job, columns: list[str]) -> None:
        assert farm.features is not None
        self.farm, self.job, self.features = farm, job, farm.features
        names = self.features.names
        missing = [c for c in (*names, job.group_by) if c and c not in columns]
        if missing:
            raise ScoreError(
                f"{job.input} lacks the columns {missing}; it needs the model card's fields"
                f" {list(names)} (`ctr-farm make-logs` writes such files)"
            )
        self.has_label = job.label in columns
        extra = [c for c in (job.group_by, job.label if self.has_label else None) if c]
        #: What is read from the input (each column once).
        self.columns = list(dict.fromkeys([*names, *extra]))
        self.model = farm.model(job.model) if job.mode == "predict" else None
        limit = farm.config.max_candidates
        self.chunk_rows = job.chunk_rows
        self.cut = fixed_cut(job.chunk_rows)
        if job.mode == "rank" and job.group_by:
            self.cut = key_cut(job.group_by, job.chunk_rows, limit)
        elif job.mode == "rank":
            if job.group_size > limit:
                raise ScoreError(f"group_size {job.group_size} is above max_candidates ({limit})")
            # Whole groups per chunk: chunk boundaries fall on group boundaries.
            self.chunk_rows = max(job.group_size, job.chunk_rows // job.group_size * job.group_size)
            self.cut = fixed_cut(self.chunk_rows)
        self.groups_done = 0

    def models(self) -> list[str]:
        """``name/version@sha256`` of every model whose scores land in the output."""
        if self.model is not None:
            used = [self.model]
        elif self.job.multi_stage:
            used = [self.farm.models[s.model] for s in self.farm.config.stages]
        else:
            used = [self.farm.model()]
        return [f"{m.key}@{m.card.sha256}" for m in used]

    def run(self, table: pa.Table, start: int) -> tuple[pa.Table, Stats]:
        ids = id_matrix(table, self.features.names, start)
        counter = self.features.oov_counter
        before = counter.snapshot()
        self.features.map_oov(ids)  # in place, counted: as a request's ids
        after = counter.snapshot()
        stats = Stats(len(ids), 0, 0.0, [], [after[n] - before[n] for n in counter.names])
        columns: dict[str, Any] = {"row": pa.array(np.arange(start, start + len(ids)))}
        if self.job.mode == "rank":
            ctr, rank, group = self._rank(ids, table)
            stats.groups = int(group[-1] - group[0] + 1) if len(group) else 0
            columns["group"] = pa.array(group)
            if self.job.group_by:
                columns[self.job.group_by] = table.column(self.job.group_by)
        if self.job.mode == "predict":
            kept = None
            scored = columns["ctr"] = self._predict(ids)
        else:
            kept = rank > 0
            scored = ctr[kept]
            columns["rank"] = pa.array(rank, mask=~kept)
            columns["ctr"] = pa.array(ctr, mask=~kept)
            columns["keep"] = pa.array(kept)
        if self.has_label:
            label = table.column(self.job.label).cast(pa.int8())
            columns[self.job.label] = label
            positive = label.to_numpy(zero_copy_only=False) > 0
            stats.positives = int(np.count_nonzero(positive))
            stats.scored_positives = int(
                np.count_nonzero(positive if kept is None else positive[kept])
            )
        stats.scored = len(scored)
        stats.ctr_sum = float(np.sum(scored, dtype=np.float64))
        stats.histogram = np.histogram(scored, bins=_EDGES)[0].tolist()
        return pa.table(columns), stats

    def _predict(self, ids: np.ndarray) -> np.ndarray:
        assert self.model is not None
        step = self.job.batch_rows
        name = self.model.name
        runs = [self.farm.score(ids[i : i + step], name) for i in range(0, len(ids), step)]
        return np.concatenate(runs) if runs else np.empty(0, dtype=np.float32)

    def _rank(self, ids: np.ndarray, table: pa.Table) -> tuple[np.ndarray, ...]:
        """Per row: the final CTR and rank (0: not kept) and the request (group) index."""
        n, job = len(ids), self.job
        if job.group_by:
            starts = group_starts(table.column(job.group_by))
        else:
            starts = np.arange(0, n, job.group_size, dtype=np.int64)
        ends = np.append(starts[1:], n)
        rank = np.zeros(n, dtype=np.int32)
        ctr = np.zeros(n, dtype=np.float32)
        group = np.empty(n, dtype=np.int64)
        limit = self.farm.config.max_candidates
        for index, (a, b) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            index += self.groups_done
            if b - a > limit:
                raise ScoreError(f"group {index} has {b - a} rows, above max_candidates ({limit})")
            result = self.farm.rank_ids(ids[a:b], job.top_k, job.stage1_k, job.multi_stage)
            if result.degraded:
                raise ScoreError(
                    f"group {index}: answered by {result.answered_by} ({result.reason}),"
                    " not the full cascade"
                )
            rank[a + result.indices] = np.arange(1, len(result.indices) + 1, dtype=np.int32)
            ctr[a + result.indices] = result.scores
            group[a:b] = index
        self.groups_done += len(starts)
        return ctr, rank, group


# -- the job -----------------------------------------------------------------------------------
def summary_path(output: Path) -> Path:
    """``scores.parquet`` -> ``scores.summary.json`` beside it."""
    return output.with_name(output.stem + SUMMARY_SUFFIX)


def score(
    job: Job,
    config: Config,
    progress: bool = False,
    after_chunk: Callable[[Chunk], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``job``; return the summary, also written beside the output."""
    if min(job.chunk_rows, job.batch_rows, job.group_size) < 1:
        raise ScoreError("chunk_rows, batch_rows and group_size must be positive")
    try:
        # pre_buffer=False: pyarrow would otherwise read every requested row group ahead,
        # i.e. hold the whole compressed file (measured: 11 MB for a 10 MB file).
        pf = pq.ParquetFile(job.input, pre_buffer=False)
    except (OSError, pa.ArrowException) as exc:
        raise ScoreError(f"cannot read {job.input} as parquet: {exc}") from exc
    t0 = time.perf_counter()
    # Inline: no inference threads or admission queue; one caller, one run at a time.
    farm = Farm(msgspec.structs.replace(config, inference="inline"))
    farm.load()
    try:
        scorer = Scorer(farm, job, pf.schema_arrow.names)
        fields = list(scorer.features.names)
        header = Header(FORMAT, job.settings(), scorer.models(), fields, fingerprint(job.input, pf))
        store = PartStore(job.output, header, job.overwrite)
        done = store.open()
        resumed = len(done)
        _run(pf, scorer, store, done, progress, after_chunk)
    finally:
        farm.close()
    summary = summarize(job, header, done, store)
    summary_path(job.output).write_bytes(msgspec.json.format(msgspec.json.encode(summary)) + b"\n")
    seconds = time.perf_counter() - t0
    new_rows = sum(c.stats.rows for c in done[resumed:])
    summary["run"] = {
        "seconds": round(seconds, 3),
        "resumed_chunks": resumed,
        "rows_per_s": round(new_rows / seconds, 1),
    }
    return summary


def _run(
    pf: pq.ParquetFile,
    scorer: Scorer,
    store: PartStore,
    done: list[Chunk],
    progress: bool,
    after_chunk: Callable[[Chunk], None] | None,
) -> None:
    """Score the chunks after ``done``, committing each (``done`` grows as they finish)."""
    start = sum(c.stats.rows for c in done)
    scorer.groups_done = sum(c.stats.groups for c in done)
    bar = _progress(progress, pf.metadata.num_rows, start)
    batches = read_from(pf, scorer.columns, start, scorer.chunk_rows)
    try:
        for table in rechunk(batches, scorer.chunk_rows, scorer.cut):
            out, stats = scorer.run(table, start)
            chunk = Chunk(len(done), start, PART.format(len(done)), stats)
            store.commit(chunk, out)
            done.append(chunk)
            start += len(table)
            if bar is not None:
                bar.update(len(table))
            if after_chunk is not None:
                after_chunk(chunk)
    finally:
        if bar is not None:
            bar.close()


def _progress(enabled: bool, total: int, initial: int) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        log.warning("no progress bar: tqdm is not installed (pip install -e '.[batch]')")
        return None
    return tqdm(total=total, initial=initial, unit="row", unit_scale=True, desc="scoring")


def summarize(job: Job, header: Header, chunks: list[Chunk], store: PartStore) -> dict[str, Any]:
    """The run's summary: sums of the chunks' statistics, AUC from the parts."""
    rows = sum(c.stats.rows for c in chunks)
    scored = sum(c.stats.scored for c in chunks)
    oov = [sum(c.stats.oov[j] for c in chunks) for j in range(len(header.fields))]
    histogram = [sum(c.stats.histogram[j] for c in chunks) for j in range(len(_EDGES) - 1)]
    out: dict[str, Any] = {
        "input": str(job.input),
        "output": str(job.output),
        "mode": job.mode,
        "models": [m.partition("@")[0] for m in header.models],
        "rows": rows,
        "chunks": len(chunks),
        "groups": sum(c.stats.groups for c in chunks) if job.mode == "rank" else None,
        "scored_rows": scored,
        "oov_rate": {
            f: (n / rows if rows else 0.0) for f, n in zip(header.fields, oov, strict=True)
        },
        "oov_count": dict(zip(header.fields, oov, strict=True)),
        "ctr_mean": sum(c.stats.ctr_sum for c in chunks) / scored if scored else None,
        "ctr_histogram": {"edges": list(CTR_EDGES), "counts": histogram},
        "label": None,
        "auc": None,
    }
    if chunks and all(c.stats.positives is not None for c in chunks):
        positives = sum(c.stats.positives or 0 for c in chunks)
        kept = sum(c.stats.scored_positives or 0 for c in chunks)
        out["label"] = {
            "column": job.label,
            "positives": positives,
            "rate": positives / rows,
            # rank: the click rate of the rows the cascade kept, against ``rate``.
            "scored_positives": kept,
            "scored_rate": kept / scored if scored else None,
        }
        out["auc"] = _auc(store, chunks, job.label)
    return out


def _auc(store: PartStore, chunks: list[Chunk], label: str) -> float | None:
    """AUC of the scored rows against the label, read back from the parts (resumed or
    not): the one figure that needs every row at once, 5 bytes per row plus the sort."""
    scores, labels = [], []
    for part in store.parts(chunks):
        table = pq.read_table(part, columns=["ctr", label]).drop_null()
        scores.append(table.column("ctr").to_numpy())
        labels.append(table.column(label).to_numpy())
    y = np.concatenate(labels) if labels else np.empty(0)
    if (y > 0).all() or (y <= 0).all():
        return None  # AUC needs both classes
    return auc(np.concatenate(scores), y)


def format_summary(summary: dict[str, Any]) -> str:
    """The summary for a terminal (the JSON file has it all)."""
    run = summary.get("run", {})
    groups = f", {summary['groups']} requests" if summary["groups"] is not None else ""
    lines = [
        f"scored {summary['rows']} rows in {summary['chunks']} chunks{groups}"
        f" ({run.get('resumed_chunks', 0)} resumed) with {', '.join(summary['models'])}"
        f" in {run.get('seconds', 0):.1f} s ({run.get('rows_per_s', 0):.0f} rows/s)",
        f"output   {summary['output']}/ (parquet parts, {MANIFEST})",
        f"summary  {summary_path(Path(summary['output']))}",
    ]
    if summary["ctr_mean"] is not None:
        lines.append(f"ctr      mean {summary['ctr_mean']:.6f} over {summary['scored_rows']} rows")
    label = summary["label"]
    if label is not None:
        auc_text = "n/a (one class)" if summary["auc"] is None else f"{summary['auc']:.4f}"
        lines.append(
            f"auc      {auc_text}  ({label['column']}: {label['positives']} positives,"
            f" rate {label['rate']:.5f}; scored rows {label['scored_rate'] or 0:.5f})"
        )
    oov = {k: v for k, v in summary["oov_rate"].items() if v}
    lines.append(
        "oov      "
        + (", ".join(f"{k} {v:.3%}" for k, v in oov.items()) or "none")
        + ("" if not oov or len(oov) == len(summary["oov_rate"]) else " (other fields none)")
    )
    counts = summary["ctr_histogram"]["counts"]
    edges = summary["ctr_histogram"]["edges"]
    used = [i for i, c in enumerate(counts) if c]
    if used:
        lines.append("ctr histogram")
        top = max(counts)
        for i in range(used[0], used[-1] + 1):
            bar = "#" * round(40 * counts[i] / top)
            lines.append(f"  [{edges[i]:.2e}, {edges[i + 1]:.2e})  {counts[i]:>10}  {bar}".rstrip())
    return "\n".join(lines)
