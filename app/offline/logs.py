"""Deterministic generator of iPinYou-style impression logs (numpy + pyarrow only).

Every impression is 16 categorical ids (see :data:`FIELDS`, in model input order) and a
``click`` label. Ids are Zipf-distributed over each field's finite vocabulary, with a fixed
per-field permutation so the popular ids are scattered over ``0..cardinality-1``.

The click comes from a hidden logit::

    logit = bias + sum_f w_f[id_f] + sum_(a,b) <v_a[id_a], v_b[id_b]>

i.e. first-order weights plus low-rank second-order interactions on a few field pairs,
so that FM/attention models have something to find. All hidden parameters (the "world")
derive from :data:`WORLD_SEED`, so train/valid/test files generated with different
``seed`` values share one world and differ only in which impressions were sampled.
The bias is solved by bisection so that the expected CTR is ``base_ctr``.

Optional negative down-sampling (the iPinYou reference's ``neg150``) keeps every click and
a seeded fraction of the non-clicks; that fraction is recorded in :attr:`Logs.meta` so a
model trained on it can be calibrated back.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

#: Seed of the hidden world (weights, factors, permutations). Never tied to ``seed``.
WORLD_SEED = 20130606
DEFAULT_BASE_CTR = 0.005
MIN_BASE_CTR, MAX_BASE_CTR = 0.001, 0.01
LABEL = "click"
META_KEY = b"ctr_farm"
#: Rows drawn (from the world seed) to solve the bias; large enough for ~1e-3 relative error.
_CALIBRATION_ROWS = 400_000


class FieldSpec(NamedTuple):
    """One categorical field: ids are ints in ``[0, cardinality)``."""

    name: str
    cardinality: int
    #: Zipf exponent of the id popularity (0 = uniform).
    zipf: float
    #: Std of the hidden first-order weights; larger = more predictive field.
    weight_std: float


FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("weekday", 7, 0.1, 0.10),
    FieldSpec("hour", 24, 0.2, 0.15),
    FieldSpec("region", 35, 1.0, 0.15),
    FieldSpec("city", 400, 1.05, 0.15),
    FieldSpec("adexchange", 4, 1.0, 0.20),
    FieldSpec("domain", 24000, 1.1, 0.45),
    FieldSpec("slotwidth", 21, 1.2, 0.30),
    FieldSpec("slotheight", 14, 1.2, 0.30),
    FieldSpec("slotvisibility", 11, 1.1, 0.35),
    FieldSpec("slotformat", 4, 1.0, 0.30),
    FieldSpec("slotprice_bucket", 12, 1.0, 0.25),
    FieldSpec("creative", 12000, 1.1, 0.45),
    FieldSpec("advertiser", 9, 1.0, 0.40),
    FieldSpec("useragent", 60, 1.1, 0.20),
    FieldSpec("os", 10, 1.2, 0.15),
    FieldSpec("ip_bucket", 8000, 1.05, 0.15),
)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)
_INDEX = {name: i for i, name in enumerate(FIELD_NAMES)}

#: Hidden second-order interactions: (field a, field b, std of the interaction term).
PAIRS: tuple[tuple[str, str, float], ...] = (
    ("weekday", "hour", 0.25),
    ("hour", "slotformat", 0.30),
    ("domain", "advertiser", 0.55),
    ("creative", "useragent", 0.40),
    ("region", "advertiser", 0.35),
    ("slotwidth", "slotheight", 0.40),
    ("adexchange", "slotprice_bucket", 0.35),
)
_FACTOR_RANK = 4


class Logs(dict[str, np.ndarray]):
    """Columns by name (16 int64 fields in :data:`FIELDS` order, then ``click`` int8)."""

    def __init__(self, columns: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        super().__init__(columns)
        self.meta = meta

    @property
    def n_rows(self) -> int:
        return len(self[LABEL])

    def id_matrix(self) -> np.ndarray:
        """The fields as one C-contiguous int64 matrix ``[rows, 16]`` (model input order)."""
        return np.ascontiguousarray(np.stack([self[n] for n in FIELD_NAMES], axis=1))


class _World(NamedTuple):
    cdfs: tuple[np.ndarray, ...]
    perms: tuple[np.ndarray, ...]
    weights: tuple[np.ndarray, ...]
    #: Per pair: (factors of field a, factors of field b), each ``[card, rank]``.
    factors: tuple[tuple[np.ndarray, np.ndarray], ...]
    #: Region-dependent shift of the city id, so city correlates with region.
    city_shift: np.ndarray


def _zipf_cdf(cardinality: int, exponent: float) -> np.ndarray:
    probs = 1.0 / np.arange(1, cardinality + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(probs)
    return cdf / cdf[-1]


@functools.cache
def _world() -> _World:
    rng = np.random.default_rng(WORLD_SEED)
    cdfs = tuple(_zipf_cdf(f.cardinality, f.zipf) for f in FIELDS)
    perms = tuple(rng.permutation(f.cardinality) for f in FIELDS)
    weights = tuple(rng.normal(0.0, f.weight_std, f.cardinality) for f in FIELDS)
    factors = []
    for a, b, std in PAIRS:
        # Entries ~N(0, s) with s^2 * sqrt(rank) = std makes the dot product's std = std.
        scale = np.sqrt(std / np.sqrt(_FACTOR_RANK))
        card_a, card_b = FIELDS[_INDEX[a]].cardinality, FIELDS[_INDEX[b]].cardinality
        factors.append(
            (
                rng.normal(0.0, scale, (card_a, _FACTOR_RANK)),
                rng.normal(0.0, scale, (card_b, _FACTOR_RANK)),
            )
        )
    city_shift = rng.integers(
        0, FIELDS[_INDEX["city"]].cardinality, FIELDS[_INDEX["region"]].cardinality
    )
    return _World(cdfs, perms, weights, tuple(factors), city_shift)


def _sample_ids(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    world = _world()
    uniforms = rng.random((len(FIELDS), rows))
    columns: dict[str, np.ndarray] = {}
    for i, spec in enumerate(FIELDS):
        rank = np.searchsorted(world.cdfs[i], uniforms[i], side="right")
        # Float round-off can put u just above cdf[-1] == 1.0; clip keeps the id in range.
        rank = np.minimum(rank, spec.cardinality - 1)
        columns[spec.name] = world.perms[i][rank].astype(np.int64)
    city_card = FIELDS[_INDEX["city"]].cardinality
    columns["city"] = (columns["city"] + world.city_shift[columns["region"]]) % city_card
    return columns


def _raw_logit(columns: dict[str, np.ndarray]) -> np.ndarray:
    """The hidden logit without the bias."""
    world = _world()
    rows = len(columns[FIELD_NAMES[0]])
    logit = np.zeros(rows, dtype=np.float64)
    for i, spec in enumerate(FIELDS):
        logit += world.weights[i][columns[spec.name]]
    for (a, b, _), (fa, fb) in zip(PAIRS, world.factors, strict=True):
        logit += np.einsum("ij,ij->i", fa[columns[a]], fb[columns[b]])
    return logit


def _mean_ctr(raw: np.ndarray, bias: float) -> float:
    return float(np.mean(1.0 / (1.0 + np.exp(-(raw + bias)))))


@functools.cache
def solve_bias(base_ctr: float) -> float:
    """Bias such that the expected CTR over the world's id distribution is ``base_ctr``."""
    if not MIN_BASE_CTR <= base_ctr <= MAX_BASE_CTR:
        raise ValueError(f"base_ctr must be in [{MIN_BASE_CTR}, {MAX_BASE_CTR}], got {base_ctr}")
    # A fixed calibration sample (world seed, not the caller's seed) keeps the bias shared
    # by every file generated against this world.
    raw = _raw_logit(_sample_ids(np.random.default_rng(WORLD_SEED + 1), _CALIBRATION_ROWS))
    lo, hi = -30.0, 10.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _mean_ctr(raw, mid) < base_ctr:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def true_ctr(columns: dict[str, np.ndarray], base_ctr: float = DEFAULT_BASE_CTR) -> np.ndarray:
    """The hidden click probability of each row (the Bayes-optimal predictor)."""
    logit = _raw_logit(columns) + solve_bias(base_ctr)
    return 1.0 / (1.0 + np.exp(-logit))


def generate(
    rows: int,
    seed: int,
    base_ctr: float = DEFAULT_BASE_CTR,
    neg_ratio: float | None = None,
) -> Logs:
    """Sample ``rows`` impressions (before down-sampling) with labels.

    With ``neg_ratio``, all clicks are kept and non-clicks are kept at the rate
    ``min(1, neg_ratio * clicks / non_clicks)``; the rate is ``meta["neg_sampling_rate"]``.
    """
    if rows <= 0:
        raise ValueError(f"rows must be positive, got {rows}")
    if neg_ratio is not None and neg_ratio <= 0:
        raise ValueError(f"neg_ratio must be positive, got {neg_ratio}")
    rng = np.random.default_rng(seed)
    columns = _sample_ids(rng, rows)
    ctr = true_ctr(columns, base_ctr)
    click = (rng.random(rows) < ctr).astype(np.int8)
    rate = 1.0
    if neg_ratio is not None:
        positives = int(click.sum())
        negatives = rows - positives
        rate = min(1.0, neg_ratio * positives / negatives) if negatives else 1.0
        keep = (click == 1) | (rng.random(rows) < rate)
        columns = {name: col[keep] for name, col in columns.items()}
        click = click[keep]
    columns[LABEL] = click
    meta = {
        "generator": "ctr_farm.offline.logs",
        "world_seed": WORLD_SEED,
        "seed": seed,
        "rows_sampled": rows,
        "rows": len(click),
        "base_ctr": base_ctr,
        "neg_ratio": neg_ratio,
        "neg_sampling_rate": rate,
    }
    logger.debug("generated logs %s", meta)
    return Logs(columns, meta)


def to_arrow(table: Logs | dict[str, np.ndarray]) -> pa.Table:
    meta = getattr(table, "meta", None)
    arrow = pa.table({name: pa.array(col) for name, col in table.items()})
    if meta is not None:
        arrow = arrow.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True)})
    return arrow


def write(table: Logs | dict[str, np.ndarray], path: str | Path) -> Path:
    """Write to ``.parquet`` (metadata in the schema) or ``.csv`` (metadata in a sidecar)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrow = to_arrow(table)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        pq.write_table(arrow, path, compression="zstd")
    elif suffix == ".csv":
        pa_csv.write_csv(arrow, path)
        meta = getattr(table, "meta", None)
        if meta is not None:
            sidecar = path.with_name(path.name + ".meta.json")
            sidecar.write_text(json.dumps(meta, sort_keys=True, indent=2) + "\n")
    else:
        raise ValueError(f"unsupported log format {path.suffix!r} (use .parquet or .csv)")
    return path


def read(path: str | Path) -> Logs:
    """Read a file written by :func:`write` back into :class:`Logs`."""
    path = Path(path)
    suffix = path.suffix.lower()
    meta: dict[str, Any] = {}
    if suffix == ".parquet":
        arrow = pq.read_table(path)
        raw = (arrow.schema.metadata or {}).get(META_KEY)
        meta = json.loads(raw) if raw else {}
    elif suffix == ".csv":
        arrow = pa_csv.read_csv(path)
        sidecar = path.with_name(path.name + ".meta.json")
        meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    else:
        raise ValueError(f"unsupported log format {path.suffix!r} (use .parquet or .csv)")
    columns = {name: arrow.column(name).to_numpy().astype(np.int64) for name in FIELD_NAMES}
    columns[LABEL] = arrow.column(LABEL).to_numpy().astype(np.int8)
    return Logs(columns, meta)
