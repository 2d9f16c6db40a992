"""Feature drift: the training distribution per feature, and a Population Stability Index over a
sliding window of the rows the worker scores.

* :class:`FeatureDistribution` is stored in the classifier artifact: per feature, quantile bin
  edges of the training rows and the training share of each bin. Bins are left-open,
  ``(edge[i-1], edge[i]]`` (``np.searchsorted(..., side="left")``), with ``(-inf, edge[0]]`` first
  and ``(edge[-1], inf)`` last. Duplicate quantiles are merged, so a count that is 0 in most
  training rows gets one bin holding exactly the zeros instead of several identical ones.
* :func:`population_stability_index`: ``sum((a - e) * ln(a / e))`` over bins, ``a`` the live
  share and ``e`` the training share, both floored at :data:`PSI_EPSILON` so that a bin empty on
  one side adds a large but finite term rather than infinity.
* :class:`PsiWindow`: counts per (time bucket, feature, bin) in a ring; a batch is binned with one
  ``np.searchsorted`` per feature (no per-row Python) and added to the current bucket; buckets older
  than the window are cleared as time moves on, so old rows are forgotten a bucket at a time.

Pure numpy: no torch, no Kafka. Serving reads it through
:attr:`models.classifiers.ShopperClassifier.training_distribution`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Quantile bins per feature before duplicate edges are merged.
DEFAULT_BINS = 10
#: Floor for a bin's share on either side of the PSI: 0.01 % (a bin never seen in training and
#: holding 10 % of live rows adds about 0.69; one holding 1 % about 0.05).
PSI_EPSILON = 1e-4
#: Time buckets of a :class:`PsiWindow`: the window forgets 1/12 of its span at a time.
WINDOW_BUCKETS = 12


@dataclass(frozen=True)
class FeatureDistribution:
    """Training distribution of each feature of a feature vector.

    Attributes:
        names: feature names, in vector order.
        edges: per feature, the increasing inner bin edges (``len(shares[j]) - 1`` of them).
        shares: ``float64 [features, max_bins]``: training share per bin, rows summing to 1;
            features with fewer bins are padded with 0 (bins no row can fall into).
        rows: training rows the distribution was measured on.
    """

    names: tuple[str, ...]
    edges: tuple[np.ndarray, ...]
    shares: np.ndarray
    rows: int

    @classmethod
    def fit(cls, x: np.ndarray, names: Sequence[str], bins: int = DEFAULT_BINS) -> FeatureDistribution:
        """Quantile edges of ``x`` (``[rows, features]``) per feature, duplicates merged, and the
        share of ``x``'s rows in each bin. Edges are observed values (``inverted_cdf``), so a
        value equal to an edge falls in the same bin in training and in serving."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != len(names) or len(x) == 0:
            raise ValueError(f"expected a non-empty [rows, {len(names)}] matrix, got {x.shape}")
        if bins < 2:
            raise ValueError(f"bins must be at least 2, not {bins}")
        quantiles = np.arange(1, bins) / bins
        edges = tuple(
            np.unique(np.quantile(x[:, j].astype(np.float64), quantiles, method="inverted_cdf"))
            for j in range(x.shape[1])
        )
        shares = np.zeros((x.shape[1], max(len(e) for e in edges) + 1))
        for j, e in enumerate(edges):
            counts = np.bincount(np.searchsorted(e, x[:, j], side="left"), minlength=len(e) + 1)
            shares[j, : len(e) + 1] = counts / len(x)
        return cls(tuple(names), edges, shares, len(x))

    def bin_counts(self, x: np.ndarray) -> np.ndarray:
        """``int64 [features, max_bins]``: how many rows of ``x`` fall in each bin."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != len(self.names):
            raise ValueError(f"expected a [rows, {len(self.names)}] matrix, got {x.shape}")
        width = self.shares.shape[1]
        flat = np.concatenate(
            [np.searchsorted(e, x[:, j], side="left") + j * width for j, e in enumerate(self.edges)]
        )
        return np.bincount(flat, minlength=len(self.names) * width).reshape(len(self.names), width)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for ``metadata.json``."""
        return {
            "rows": self.rows,
            "features": [
                {"name": name, "edges": [float(v) for v in e], "shares": [float(v) for v in s[: len(e) + 1]]}
                for name, e, s in zip(self.names, self.edges, self.shares, strict=True)
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureDistribution:
        """Inverse of :meth:`to_dict`; ``ValueError`` when the entry is malformed."""
        try:
            features = list(data["features"])
            names = tuple(str(f["name"]) for f in features)
            edges = tuple(np.asarray(f["edges"], dtype=np.float64) for f in features)
            rows_shares = [np.asarray(f["shares"], dtype=np.float64) for f in features]
            rows = int(data["rows"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"training distribution is malformed ({exc!r})") from exc
        if not features:
            raise ValueError("training distribution has no features")
        for name, e, s in zip(names, edges, rows_shares, strict=True):
            if e.ndim != 1 or s.shape != (len(e) + 1,) or np.any(np.diff(e) <= 0) or not np.all(np.isfinite(e)):
                raise ValueError(f"feature {name!r}: edges must increase and there must be one share more than edges")
            if np.any(s < 0) or not math.isclose(float(s.sum()), 1.0, abs_tol=1e-6):
                raise ValueError(f"feature {name!r}: shares must be non-negative and sum to 1")
        shares = np.zeros((len(features), max(len(s) for s in rows_shares)))
        for j, s in enumerate(rows_shares):
            shares[j, : len(s)] = s
        return cls(names, edges, shares, rows)


def population_stability_index(expected: np.ndarray, counts: np.ndarray, epsilon: float = PSI_EPSILON) -> np.ndarray:
    """PSI per row of ``expected`` (shares, ``[features, bins]``) against observed ``counts`` of the
    same shape; NaN for a feature with no observed rows."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        actual = np.maximum(counts / totals, epsilon)
    wanted = np.maximum(np.asarray(expected, dtype=np.float64), epsilon)
    psi = ((actual - wanted) * np.log(actual / wanted)).sum(axis=1)
    psi[totals[:, 0] == 0] = np.nan
    return psi


class PsiWindow:
    """Bin counts of the rows seen in the last ``window_s`` seconds, in :data:`WINDOW_BUCKETS`
    buckets of ``window_s / WINDOW_BUCKETS`` each, and the PSI of that window against a reference.

    Time is the caller's clock in seconds (the worker passes ``time.monotonic()``); the window
    covers between ``window_s - bucket`` and ``window_s`` of it.
    """

    def __init__(self, reference: FeatureDistribution, window_s: float, buckets: int = WINDOW_BUCKETS) -> None:
        if window_s <= 0 or buckets < 1:
            raise ValueError("window_s must be positive and buckets at least 1")
        self.reference = reference
        self.bucket_s = window_s / buckets
        self._counts = np.zeros((buckets, *reference.shares.shape), dtype=np.int64)
        self._epoch = np.full(buckets, -1, dtype=np.int64)  # which bucket number each slot holds

    def _slot(self, now_s: float) -> int:
        """The slot of the bucket holding ``now_s``, cleared first if it held an older bucket."""
        number = int(now_s // self.bucket_s)
        slot = number % len(self._epoch)
        if self._epoch[slot] != number:
            self._counts[slot] = 0
            self._epoch[slot] = number
        return slot

    def _live(self, now_s: float) -> np.ndarray:
        number = int(now_s // self.bucket_s)
        return (self._epoch > number - len(self._epoch)) & (self._epoch <= number)

    def add(self, x: np.ndarray, now_s: float) -> None:
        """Count a batch's feature rows (``[rows, features]``) at time ``now_s``."""
        if len(x):
            self._counts[self._slot(now_s)] += self.reference.bin_counts(x)

    def counts(self, now_s: float) -> np.ndarray:
        """Bin counts of the rows inside the window at ``now_s``."""
        return self._counts[self._live(now_s)].sum(axis=0)

    def rows(self, now_s: float) -> int:
        """Rows inside the window at ``now_s``."""
        return int(self.counts(now_s)[0].sum())

    def psi(self, now_s: float) -> np.ndarray:
        """PSI per feature of the window at ``now_s`` against the reference (NaN when empty)."""
        return population_stability_index(self.reference.shares, self.counts(now_s))
