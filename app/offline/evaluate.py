"""Offline quality metrics of predicted CTRs against click labels (numpy only).

Shared by training (the model card's AUC and log loss) and batch scoring
(``ctr-farm score``'s summary), so both report the same numbers for the same scores.
"""

from __future__ import annotations

import numpy as np

#: Fixed log-spaced edges of the predicted-CTR histogram: the model card's
#: ``distribution.ctr_histogram`` (PSI drift monitoring) and ``ctr-farm score``'s summary.
CTR_EDGES: tuple[float, ...] = (0.0, *np.logspace(-5.0, 0.0, 20).tolist())


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney rank sum, with tied scores given their average rank."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels) > 0.5
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # Average 1-based rank of each distinct score: end of its run minus half the run.
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = float(avg_rank[inverse][labels].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def logloss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0 - eps)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))
