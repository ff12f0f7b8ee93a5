"""Model monitoring: each model's inputs and predicted CTRs against its training data.

A model card's ``distribution`` describes the test set the model was evaluated on: per
field the 20 most frequent ids with their shares and the OOV rate, and a histogram of
the model's predicted CTR (fixed bins) with its mean. :class:`Reference` turns it into
bins: per field one bin per top id, ``other`` and ``oov``; for the CTR (feature ``ctr``)
the card's bins.

Per worker and model version, :class:`ModelMonitor` counts the rows the model scored
into those bins over the last ``drift_window_s`` seconds (:mod:`app.window`: published
as ``ctr_farm_drift_window_rows``, so the counts are farm-wide). Only batches that are a
whole request are counted: the first stage of ``/rank`` (or the single stage of
``multi_stage: false``) and ``/predict``. A later stage scores the survivors of the
previous one, chosen for their high scores, so its inputs differ from training traffic
by design, not by drift. The cost is bounded by sampling: one row in
``drift_sample_every`` (a systematic sample across requests), binned with one table
lookup and one ``np.bincount`` over the sampled ``[rows, fields]`` matrix.

Drift is the population stability index of each feature, window against card::

    PSI = sum over bins of (a - e) * ln(a / e)

with ``a`` the window's share of a bin and ``e`` the card's. A share below ``EPSILON``
(1e-4; an empty bin on either side, e.g. OOV ids the test set never had) counts as
``EPSILON`` and the shares are not renormalised: an empty bin adds a bounded term
instead of an infinite one. With ``drift_min_rows`` sampled rows or more, a model's
state is ``alert`` when some feature's PSI reaches ``drift_psi_alert``, ``warn`` from
``drift_psi_warn``, else ``ok``; below that, ``insufficient_data``. A sample of ``n``
rows drawn from the card's own distribution has a PSI of about ``(bins - 1) / n`` (0.01
for 22 bins and 2000 rows): noise stays far below the default warn level of 0.1.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np
from prometheus_client.metrics_core import Metric

from app import metrics
from app.config import Config
from app.schema import FeatureDrift, ModelCard, ModelDrift
from app.window import PublishedWindow, SlidingCounts

EPSILON = 1e-4
#: The feature name of the predicted CTR (fields are named by the card).
CTR = "ctr"
WINDOW_SLICES = 10
ROWS_SAMPLE, CTR_SUM_SAMPLE = "ctr_farm_drift_window_rows", "ctr_farm_drift_window_ctr_sum"
STATE_LEVEL = {"insufficient_data": -1, "ok": 0, "warn": 1, "alert": 2}


def psi(actual: np.ndarray, expected: np.ndarray, eps: float = EPSILON) -> float:
    """PSI of ``actual`` counts against ``expected`` shares (see the module docstring)."""
    total = float(actual.sum())
    if total <= 0:
        return math.nan
    a = np.maximum(actual / total, eps)
    e = np.maximum(expected, eps)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass(frozen=True)
class Feature:
    """One monitored feature: its bins' labels, the card's shares, its place in the vector."""

    name: str
    bins: tuple[str, ...]
    expected: np.ndarray
    start: int

    @property
    def stop(self) -> int:
        return self.start + len(self.bins)


class Reference:
    """A model's training distribution as bins, and the lookup that bins a batch."""

    def __init__(self, card: ModelCard) -> None:
        dist = card.distribution or {}
        self.features: list[Feature] = []
        tables, offsets, start = [], [], 0
        for field in card.fields:
            stats = dist["fields"][field.name]
            top = [int(i) for i in stats["top_ids"] if 0 <= int(i) < field.vocab_size]
            shares = [float(s) for i, s in zip(stats["top_ids"], stats["top_shares"], strict=True)]
            shares = shares[: len(top)]
            oov = float(stats.get("oov_rate", 0.0))
            expected = np.array([*shares, max(0.0, 1.0 - sum(shares) - oov), oov])
            self.features.append(
                Feature(
                    field.name,
                    (*map(str, top), "other", "oov"),
                    expected / expected.sum(),
                    start,
                )
            )
            # id -> bin: every id "other", the OOV index "oov", each top id its own bin.
            table = np.full(field.vocab_size + 1, start + len(top), dtype=np.intp)
            table[field.vocab_size] = start + len(top) + 1
            table[top] = start + np.arange(len(top))
            offsets.append(sum(len(t) for t in tables))
            tables.append(table)
            start += len(top) + 2
        self.n_field_bins = start
        self._table = np.concatenate(tables)
        self._offsets = np.array(offsets, dtype=np.int64)
        hist = dist["ctr_histogram"]
        edges = [float(e) for e in hist["edges"]]
        shares = np.array(hist["shares"], dtype=np.float64)
        self._inner_edges = np.array(edges[1:-1])
        self.ctr = Feature(CTR, tuple(f"{e:.3g}" for e in edges[:-1]), shares / shares.sum(), start)
        self.features.append(self.ctr)
        self.card_ctr_mean: float | None = dist.get("ctr_mean")
        #: Bins of every feature, then the CTR sum.
        self.size = self.ctr.stop + 1

    @classmethod
    def from_card(cls, card: ModelCard) -> Reference | None:
        """None when the card carries no (complete) training distribution."""
        dist = card.distribution
        if not dist or "ctr_histogram" not in dist:
            return None
        if not all(f.name in dist.get("fields", {}) for f in card.fields):
            return None
        return cls(card)

    def bin_fields(self, rows: np.ndarray) -> np.ndarray:
        """Counts per field bin of ``[n, fields]`` OOV-mapped ids."""
        # mode="clip": an id outside the table (never, after OOV mapping) lands in some
        # bin instead of failing the request.
        idx = self._table.take(rows + self._offsets, mode="clip")
        return np.bincount(idx.ravel(), minlength=self.n_field_bins)

    def bin_ctr(self, scores: np.ndarray) -> np.ndarray:
        return np.bincount(
            np.searchsorted(self._inner_edges, scores, side="right"), minlength=len(self.ctr.bins)
        )


class ModelMonitor:
    """One model version's window of binned rows in one worker (thread-safe)."""

    def __init__(self, key: str, reference: Reference, window_s: int, sample_every: int) -> None:
        self.key, self.reference, self.sample_every = key, reference, sample_every
        counts = SlidingCounts(reference.size, window_s, WINDOW_SLICES)
        children = [
            metrics.DRIFT_ROWS.labels(key, feature.name, label)
            for feature in reference.features
            for label in feature.bins
        ]
        self.window = PublishedWindow(counts, [*children, metrics.DRIFT_CTR_SUM.labels(key)])
        self._seen = 0
        self._lock = threading.Lock()

    def record(self, ids: np.ndarray, scores: np.ndarray) -> None:
        """Count the sampled rows of a batch the model scored (ids OOV-mapped)."""
        n, k = len(ids), self.sample_every
        with self._lock:  # rows r of the stream with r % k == 0, across requests
            first = -self._seen % k
            self._seen += n
        if first >= n:
            return
        rows, sampled = ids[first::k], scores[first::k]
        ref = self.reference
        self.window.counts.add_many(
            (
                (0, ref.bin_fields(rows)),
                (ref.ctr.start, ref.bin_ctr(sampled)),
                (ref.ctr.stop, np.array([sampled.sum(dtype=np.float64)])),
            )
        )


class DriftMonitor:
    """Every monitored model of a worker; reads the farm-wide windows back as a report."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.models: dict[str, ModelMonitor] = {}

    def add(self, key: str, card: ModelCard) -> bool:
        """Monitor a model version; False when its card has no training distribution."""
        reference = Reference.from_card(card)
        if reference is None:
            return False
        self.models[key] = ModelMonitor(
            key, reference, self.config.drift_window_s, self.config.drift_sample_every
        )
        return True

    def record(self, key: str, ids: np.ndarray, scores: np.ndarray) -> None:
        monitor = self.models.get(key)
        if monitor is not None:
            monitor.record(ids, scores)

    def retain(self, keys: set[str]) -> None:
        """Stop monitoring the versions not in ``keys`` (a reload retired them): their
        window gauges go to zero, and they leave ``/stats``."""
        gone = [m for key, m in self.models.items() if key not in keys]
        # One assignment: the publisher thread iterates the old dict or the new one.
        self.models = {key: m for key, m in self.models.items() if key in keys}
        for monitor in gone:
            monitor.window.clear()

    def publish(self) -> None:
        for monitor in list(self.models.values()):
            monitor.window.publish()

    def state(self, rows: float, worst_psi: float | None) -> str:
        if rows < self.config.drift_min_rows or worst_psi is None:
            return "insufficient_data"
        if worst_psi >= self.config.drift_psi_alert:
            return "alert"
        return "warn" if worst_psi >= self.config.drift_psi_warn else "ok"

    def report(self, samples: metrics.Samples) -> dict[str, ModelDrift]:
        """Per model version: PSI of every feature over the farm's window, and its state."""
        out: dict[str, ModelDrift] = {}
        for key, monitor in self.models.items():
            ref = monitor.reference
            counts = {
                (labels["feature"], labels["bin"]): value
                for labels, value in samples.select(ROWS_SAMPLE, model=key)
            }
            features = {f.name: _feature_drift(f, counts) for f in ref.features}
            rows = sum(counts.get((CTR, b), 0.0) for b in ref.ctr.bins)
            scored = {name: f.psi for name, f in features.items() if f.psi is not None}
            worst = max(scored, key=scored.__getitem__) if scored else None
            ctr_sum = samples.total(CTR_SUM_SAMPLE, model=key)
            out[key] = ModelDrift(
                state=self.state(rows, scored[worst] if worst else None),
                rows=int(rows),
                window_s=self.config.drift_window_s,
                ctr_mean=ctr_sum / rows if rows else None,
                card_ctr_mean=ref.card_ctr_mean,
                worst=worst,
                features=features,
            )
        return out

    @staticmethod
    def families(report: dict[str, ModelDrift]) -> list[Metric]:
        """The report as gauges for ``/metrics`` (computed at read time, farm-wide)."""
        psi_values = [
            ((key, name), f.psi)
            for key, drift in report.items()
            for name, f in drift.features.items()
            if f.psi is not None
        ]
        return [
            metrics.computed(metrics.DRIFT_PSI, psi_values),
            metrics.computed(
                metrics.DRIFT_STATE, [((key,), STATE_LEVEL[d.state]) for key, d in report.items()]
            ),
            metrics.computed(
                metrics.PREDICTED_CTR_MEAN,
                [((key,), d.ctr_mean) for key, d in report.items() if d.ctr_mean is not None],
            ),
        ]


def _feature_drift(feature: Feature, counts: dict[tuple[str, str], float]) -> FeatureDrift:
    actual = np.array([counts.get((feature.name, b), 0.0) for b in feature.bins])
    total = float(actual.sum())
    value = psi(actual, feature.expected) if total else None
    if feature.name == CTR:
        return FeatureDrift(psi=_round(value))
    n_top = len(feature.bins) - 2
    return FeatureDrift(
        psi=_round(value),
        oov_rate=_round(actual[-1] / total) if total else None,
        card_oov_rate=_round(float(feature.expected[-1])),
        top_share=_round(actual[:n_top].sum() / total) if total else None,
        card_top_share=_round(float(feature.expected[:n_top].sum())),
    )


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(float(value), digits)
