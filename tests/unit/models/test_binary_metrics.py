"""models.binary_metrics agrees with scikit-learn: ties, weights, NaN labels, one class."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as sk  # type: ignore[import-untyped]  # scikit-learn ships no stubs or py.typed
from sklearn.exceptions import UndefinedMetricWarning  # type: ignore[import-untyped]  # no stubs either

from models.binary_metrics import (
    RankedScores,
    average_precision,
    binary_metrics,
    brier_score,
    log_loss,
    roc_auc,
)


def sample(seed: int, n: int = 500, levels: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores that depend on the label; ``levels`` rounds them so many rows tie."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-(rng.normal(size=n) + 1.2 * y - 0.8)))
    if levels is not None:
        p = np.clip(np.round(p * levels) / levels, 0.01, 0.99)
    w = rng.integers(0, 4, size=n).astype(np.float64)  # bootstrap-like counts, zeros included
    return p, y, w


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("levels", [None, 5, 20])
def test_agrees_with_sklearn_with_ties_and_weights(seed, levels):
    p, y, w = sample(seed, levels=levels)
    assert roc_auc(p, y) == pytest.approx(sk.roc_auc_score(y, p), abs=1e-12)
    assert roc_auc(p, y, w) == pytest.approx(sk.roc_auc_score(y, p, sample_weight=w), abs=1e-12)
    assert average_precision(p, y) == pytest.approx(sk.average_precision_score(y, p), abs=1e-12)
    assert average_precision(p, y, w) == pytest.approx(sk.average_precision_score(y, p, sample_weight=w), abs=1e-12)
    assert log_loss(p, y) == pytest.approx(sk.log_loss(y, p), abs=1e-12)
    assert log_loss(p, y, w) == pytest.approx(sk.log_loss(y, p, sample_weight=w), abs=1e-12)
    assert brier_score(p, y) == pytest.approx(sk.brier_score_loss(y, p), abs=1e-12)
    report = binary_metrics(p, y)
    assert (report["roc_auc"], report["pr_auc"], report["log_loss"]) == pytest.approx(
        (sk.roc_auc_score(y, p), sk.average_precision_score(y, p), sk.log_loss(y, p)), abs=1e-12
    )
    ranked = RankedScores(p, y)  # the bootstrap's path: one sort, many weightings
    assert ranked.auc_ap(w) == pytest.approx(
        (sk.roc_auc_score(y, p, sample_weight=w), sk.average_precision_score(y, p, sample_weight=w)), abs=1e-12
    )


def test_all_scores_tied_is_chance():
    y = np.array([0, 1, 0, 1, 1], dtype=np.float64)
    p = np.full(5, 0.4)
    assert roc_auc(p, y) == pytest.approx(sk.roc_auc_score(y, p)) == pytest.approx(0.5)
    assert average_precision(p, y) == pytest.approx(sk.average_precision_score(y, p))


def test_rows_without_a_label_are_dropped():
    p, y, w = sample(7)
    censored = y.copy()
    censored[::3] = np.nan
    kept = ~np.isnan(censored)
    assert roc_auc(p, censored) == pytest.approx(sk.roc_auc_score(y[kept], p[kept]), abs=1e-12)
    assert log_loss(p, censored, w) == pytest.approx(sk.log_loss(y[kept], p[kept], sample_weight=w[kept]), abs=1e-12)
    assert brier_score(p, censored) == pytest.approx(sk.brier_score_loss(y[kept], p[kept]), abs=1e-12)


def test_a_nan_score_is_refused_as_sklearn_refuses_it():
    p, y, _ = sample(3, n=20)
    p[4] = np.nan
    for ours, theirs in ((roc_auc, sk.roc_auc_score), (log_loss, sk.log_loss)):
        with pytest.raises(ValueError):
            theirs(y, p)
        with pytest.raises(ValueError, match="NaN"):
            ours(p, y)


def test_one_class_gives_nan_rank_metrics_and_a_finite_log_loss():
    p = np.array([0.2, 0.7, 0.4])
    y = np.ones(3)
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(sk.roc_auc_score(y, p))
    assert math.isnan(roc_auc(p, y)) and math.isnan(average_precision(p, y))
    assert math.isnan(roc_auc(1 - p, 1 - y))
    assert log_loss(p, y) == pytest.approx(sk.log_loss(y, p, labels=[0, 1]), abs=1e-12)
    assert math.isnan(log_loss([], []))


def test_log_loss_clips_certain_misses_to_a_finite_value():
    value = log_loss([0.0, 1.0], [1.0, 0.0])
    assert math.isfinite(value) and value > 15
