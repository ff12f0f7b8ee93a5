"""app.offline.evaluate: AUC and log loss (numpy only; no torch needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.offline.evaluate import auc, logloss


def test_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 300).astype(np.float64)  # many ties
    labels = rng.random(300) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert auc(scores, labels) == pytest.approx(pairwise)
    assert auc(np.arange(4.0), np.array([0, 0, 1, 1])) == 1.0


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        # 4 (positive, negative) pairs: 0.35 > 0.1, 0.35 < 0.4, 0.8 > both -> 3/4.
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75),
        ([0.9, 0.1], [0, 1], 0.0),  # perfectly wrong
        ([0.5, 0.5], [0, 1], 0.5),  # a tie counts half
        # Pairs: (0.3 vs 0.3) tie 0.5, (0.3 vs 0.1) 1, (0.7 vs 0.3) 1, (0.7 vs 0.1) 1 -> 3.5/4.
        ([0.3, 0.3, 0.7, 0.1], [0, 1, 1, 0], 0.875),
    ],
)
def test_auc_hand_checked(scores: list[float], labels: list[int], expected: float) -> None:
    assert auc(np.array(scores, dtype=np.float32), np.array(labels)) == expected


def test_auc_needs_both_labels() -> None:
    with pytest.raises(ValueError, match="both positive and negative"):
        auc(np.array([0.1, 0.2]), np.array([1, 1]))


def test_logloss_hand_checked() -> None:
    assert logloss(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(math.log(2))
    assert logloss(np.array([0.9]), np.array([1])) == pytest.approx(-math.log(0.9))
