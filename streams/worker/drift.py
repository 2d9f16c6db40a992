"""The worker's drift gauge: every scored batch's feature rows go into a PSI window against the
served (champion) classifier's training distribution, and ``shoppulse_live_feature_psi`` is set
from it at most every :data:`EXPORT_INTERVAL_S` seconds.

The window runs on the worker's monotonic clock (processing time), not event time: the alert
``ShopPulseFeatureDrift`` asks whether what the model is fed *now* looks like what it learned from,
and a replay of old events is still what it is fed. Only the champion is compared: its training
rows are the reference, whatever variant a shopper is served, since the feature rows are the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
from prometheus_client import Gauge

from models.classifiers import ShopperClassifier
from models.drift import PsiWindow
from models.names import CLASSIFIER_MODEL

log = logging.getLogger(__name__)

#: Seconds between two updates of the gauge (computing the PSI is cheap; scrapes are rarer).
EXPORT_INTERVAL_S = 5.0


class ServesClassifier(Protocol):
    """What the drift gauge needs of :class:`models.scoring.BatchScorer`: the champion classifier."""

    @property
    def classifier(self) -> ShopperClassifier | None: ...


class DriftGauge:
    """Feeds a :class:`models.drift.PsiWindow` and exports its PSI per feature.

    Args:
        scorer: serves the champion classifier (None: the heuristic, nothing to compare with).
        gauge: ``shoppulse_live_feature_psi{model,version,feature}``.
        window_s: the window's span, in seconds.
        min_rows: below this many rows in the window no PSI is exported (the series are removed):
            a PSI of few rows is inflated by sampling noise, about ``(bins - 1) / rows``.
        export_interval_s: least seconds between two gauge updates.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        scorer: ServesClassifier,
        gauge: Gauge,
        window_s: float,
        min_rows: int,
        export_interval_s: float = EXPORT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scorer = scorer
        self.gauge = gauge
        self.window_s = window_s
        self.min_rows = min_rows
        self.export_interval_s = export_interval_s
        self.clock = clock
        self._classifier: ShopperClassifier | None = None
        self._window: PsiWindow | None = None
        self._exported: list[tuple[str, str, str]] = []  # label values currently set
        self._next_export_s = 0.0

    def observe(self, features: np.ndarray) -> None:
        """Count a scored batch's feature rows; update the gauge when it is due."""
        classifier = self.scorer.classifier
        if classifier is not self._classifier:
            self._start(classifier)
        if self._window is None:
            return
        now_s = self.clock()
        self._window.add(features, now_s)
        if now_s >= self._next_export_s:
            self._next_export_s = now_s + self.export_interval_s
            self._export(now_s)

    def _start(self, classifier: ShopperClassifier | None) -> None:
        """A new champion: forget the old window and its series, start one on its distribution."""
        self._clear()
        self._classifier, self._window, self._next_export_s = classifier, None, 0.0
        if classifier is None:
            return
        if classifier.training_distribution is None:
            log.info("classifier version %s has no training distribution: no drift exported", classifier.version)
            return
        self._window = PsiWindow(classifier.training_distribution, self.window_s)

    def _export(self, now_s: float) -> None:
        assert self._window is not None and self._classifier is not None
        if self._window.rows(now_s) < self.min_rows:
            self._clear()
            return
        version = str(self._classifier.version)
        psi = self._window.psi(now_s)
        self._exported = [(CLASSIFIER_MODEL, version, name) for name in self._window.reference.names]
        for labels, value in zip(self._exported, psi, strict=True):
            self.gauge.labels(*labels).set(float(value))

    def _clear(self) -> None:
        for labels in self._exported:
            self.gauge.remove(*labels)
        self._exported = []
