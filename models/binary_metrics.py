"""Binary-classification metrics, written once: ROC-AUC, average precision, log loss, Brier, ECE.

Training's report (:mod:`models.training`), the classifier's validation summary
(:func:`models.classifiers.train_classifier`) and the shopper-level bootstrap all read them from
here, so a number in a report and the same number in an artifact's metadata cannot drift apart.
Cross-checked against scikit-learn in ``tests/unit/models/test_binary_metrics.py``.

Conventions (the same in every function):

* labels are 0/1; rows whose label is NaN carry no label and are dropped (the training data
  marks censored labels that way); a NaN score or probability is an error (``ValueError``),
  as in scikit-learn, because silently ranking it anywhere would bias the metric;
* with only one class among the labelled rows ROC-AUC and average precision are undefined and
  come back as NaN (as scikit-learn's ROC-AUC does, with a warning): a report wants a gap, not
  a crash;
* ``weights`` (optional) weight rows, e.g. the bootstrap's resample counts.

Pure numpy: serving imports :mod:`models.classifiers`, which uses this module, so it must stay
light.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

#: Probabilities are clipped to ``[LOG_LOSS_EPS, 1 - LOG_LOSS_EPS]`` so a confident miss costs
#: a large but finite loss.
LOG_LOSS_EPS = 1e-7
#: Equal-width probability bins of the ECE and of the reliability table.
CALIBRATION_BINS = 15


def labelled(scores: Any, labels: Any, weights: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Flatten to float64 and drop the rows without a label (NaN); refuse NaN scores."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    keep = ~np.isnan(y)
    w = None if weights is None else np.asarray(weights, dtype=np.float64).ravel()[keep]
    s, y = s[keep], y[keep]
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; a model or baseline produced an invalid probability")
    return s, y, w


class RankedScores:
    """Scores sorted once (descending, ties grouped) so AUC / AP / ROC take O(n) per weighting.

    Expects labelled rows only (see :func:`labelled`); the bootstrap reuses one instance for
    hundreds of weightings.
    """

    def __init__(self, scores: np.ndarray, labels: np.ndarray) -> None:
        s = np.asarray(scores, dtype=np.float64)
        self.order = np.argsort(-s, kind="mergesort")
        ss = s[self.order]
        self.y = np.asarray(labels, dtype=np.float64)[self.order]
        new = np.ones(len(ss), dtype=bool)
        new[1:] = ss[1:] != ss[:-1]
        self.group = np.cumsum(new) - 1
        self.n_groups = int(self.group[-1]) + 1 if len(ss) else 0
        self.thresholds = ss[new]

    def _grouped(self, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        w = np.ones(len(self.y)) if weights is None else np.asarray(weights, dtype=np.float64)[self.order]
        gp = np.bincount(self.group, w * self.y, self.n_groups)
        gn = np.bincount(self.group, w * (1 - self.y), self.n_groups)
        return gp, gn

    def auc_ap(self, weights: np.ndarray | None = None) -> tuple[float, float]:
        """ROC-AUC (ties count half) and average precision (scikit-learn's step definition)."""
        gp, gn = self._grouped(weights)
        p, n = gp.sum(), gn.sum()
        if p <= 0 or n <= 0:
            return math.nan, math.nan
        auc = float((gp * (n - np.cumsum(gn) + 0.5 * gn)).sum() / (p * n))
        tp, fp = np.cumsum(gp), np.cumsum(gn)
        prec = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
        ap = float((gp / p * prec).sum())
        return auc, ap

    def roc(self, max_points: int = 200) -> dict[str, list[float]]:
        """The ROC curve, thinned to at most ``max_points`` points for the report's plot."""
        gp, gn = self._grouped(None)
        p, n = max(gp.sum(), 1e-12), max(gn.sum(), 1e-12)
        tpr = np.concatenate([[0.0], np.cumsum(gp) / p])
        fpr = np.concatenate([[0.0], np.cumsum(gn) / n])
        if len(tpr) > max_points:
            keep = np.unique(np.linspace(0, len(tpr) - 1, max_points).round().astype(int))
            tpr, fpr = tpr[keep], fpr[keep]
        return {"fpr": [round(float(v), 5) for v in fpr], "tpr": [round(float(v), 5) for v in tpr]}


def roc_auc(scores: Any, labels: Any, weights: Any = None) -> float:
    """Area under the ROC curve (ties count half); NaN with one class only."""
    s, y, w = labelled(scores, labels, weights)
    return RankedScores(s, y).auc_ap(w)[0]


def average_precision(scores: Any, labels: Any, weights: Any = None) -> float:
    """Average precision (the PR-AUC scikit-learn reports); NaN with one class only."""
    s, y, w = labelled(scores, labels, weights)
    return RankedScores(s, y).auc_ap(w)[1]


def row_log_loss(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-row log loss of labelled rows (the bootstrap re-weights these without recomputing)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
    y = np.asarray(labels, dtype=np.float64)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def log_loss(probs: Any, labels: Any, weights: Any = None) -> float:
    """Mean (or weighted mean) log loss; NaN with no labelled rows."""
    p, y, w = labelled(probs, labels, weights)
    if p.size == 0:
        return math.nan
    ll = row_log_loss(p, y)
    return float(ll.mean() if w is None else (ll * w).sum() / w.sum())


def brier_score(probs: Any, labels: Any) -> float:
    """Mean squared error of the probabilities; NaN with no labelled rows."""
    p, y, _ = labelled(probs, labels)
    return float(np.mean((p - y) ** 2)) if p.size else math.nan


def _bins(p: np.ndarray, n_bins: int) -> np.ndarray:
    return np.minimum((p * n_bins).astype(np.int64), n_bins - 1)


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = CALIBRATION_BINS) -> float:
    """ECE with ``n_bins`` equal-width bins: sum_b |b|/N * |mean(y_b) - mean(p_b)|."""
    p, y, _ = labelled(probs, labels)
    if p.size == 0:
        return math.nan
    bins = _bins(p, n_bins)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(y[m].mean() - p[m].mean())
    return float(ece)


def reliability_bins(probs: Any, labels: Any, n_bins: int = CALIBRATION_BINS) -> list[dict[str, float]]:
    """The ECE's bins, non-empty ones only: range, count, mean predicted, observed rate."""
    p, y, _ = labelled(probs, labels)
    bins = _bins(p, n_bins)
    out = []
    for i in range(n_bins):
        m = bins == i
        if m.any():
            out.append(
                {
                    "lo": i / n_bins,
                    "hi": (i + 1) / n_bins,
                    "count": int(m.sum()),
                    "mean_p": float(p[m].mean()),
                    "rate": float(y[m].mean()),
                }
            )
    return out


def binary_metrics(probs: Any, labels: Any) -> dict[str, Any]:
    """The training report's row: ROC-AUC, PR-AUC, log loss, Brier, ECE, base rate, mean p, counts."""
    p, y, _ = labelled(probs, labels)
    auc, ap = RankedScores(p, y).auc_ap()
    return {
        "roc_auc": auc,
        "pr_auc": ap,
        "log_loss": log_loss(p, y),
        "brier": brier_score(p, y),
        "ece": expected_calibration_error(p, y),
        "base_rate": float(y.mean()) if y.size else math.nan,
        "mean_p": float(p.mean()) if p.size else math.nan,
        "rows": int(y.size),
        "positives": int(y.sum()),
    }


def _cluster_resamples(clusters: np.ndarray, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """``n_boot`` row-weight vectors of a cluster bootstrap: clusters (shoppers) drawn with
    replacement, each row weighted by how often its cluster was drawn."""
    rng = np.random.default_rng(seed)
    _, inv = np.unique(clusters, return_inverse=True)
    n_clusters = int(inv.max()) + 1 if inv.size else 0
    for _ in range(n_boot):
        yield rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / max(n_clusters, 1)))[inv].astype(np.float64)


def bootstrap_deltas(
    model_p: np.ndarray, base_p: np.ndarray, y: np.ndarray, clusters: np.ndarray, n_boot: int, seed: int
) -> dict[str, list[float]]:
    """95% intervals of model - baseline for ROC-AUC, PR-AUC and log loss (shopper-level bootstrap:
    shoppers are resampled with replacement, all their rows with them). Labelled rows only."""
    if n_boot <= 0:
        return {}
    rm, rb = RankedScores(model_p, y), RankedScores(base_p, y)
    ll_m, ll_b = row_log_loss(model_p, y), row_log_loss(base_p, y)
    deltas: dict[str, list[float]] = {"roc_auc": [], "pr_auc": [], "log_loss": []}
    for w in _cluster_resamples(clusters, n_boot, seed):
        am, pm = rm.auc_ap(w)
        ab, pb = rb.auc_ap(w)
        deltas["roc_auc"].append(am - ab)
        deltas["pr_auc"].append(pm - pb)
        deltas["log_loss"].append(float(((ll_m - ll_b) * w).sum() / w.sum()))
    return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in deltas.items()}


def bootstrap_mean_log_loss_delta(
    model_p: list[np.ndarray],
    base_p: list[np.ndarray],
    y: list[np.ndarray],
    clusters: list[np.ndarray],
    n_boot: int,
    seed: int,
) -> list[float]:
    """95% interval of the mean over tasks of (model - baseline) log loss, one list entry per task.

    The tasks' rows come from the same shoppers, so shoppers are resampled once for all tasks
    (a shopper's rows in every task move together), as the selection's criterion needs; an
    empty list when ``n_boot <= 0``.
    """
    if n_boot <= 0:
        return []
    row_deltas = [row_log_loss(m, t) - row_log_loss(b, t) for m, b, t in zip(model_p, base_p, y, strict=True)]
    sizes = np.cumsum([len(c) for c in clusters])[:-1]
    means = []
    for w in _cluster_resamples(np.concatenate(clusters), n_boot, seed):
        per_task = [
            float((d * wt).sum() / wt.sum())
            for d, wt in zip(row_deltas, np.split(w, sizes), strict=True)
            if wt.sum() > 0
        ]
        means.append(float(np.mean(per_task)) if per_task else math.nan)
    return [float(np.nanpercentile(means, 2.5)), float(np.nanpercentile(means, 97.5))]


def classification_metrics(probs: Any, labels: Any) -> dict[str, float]:
    """The classifier's validation summary (in its training report): AUC, ECE, Brier, log loss, counts."""
    p, y, _ = labelled(probs, labels)
    return {
        "auc": roc_auc(p, y),
        "ece": expected_calibration_error(p, y),
        "brier": brier_score(p, y),
        "log_loss": log_loss(p, y),
        "positives": float((y == 1).sum()),
        "rows": float(y.size),
    }
