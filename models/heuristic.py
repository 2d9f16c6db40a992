"""A hand-set purchase-intent heuristic: the stand-in scorer until trained models are served.

It is a fixed logistic score over a few features of :data:`features.spec.DEFAULT_FEATURE_SPEC`
(already normalised by the spec): a full cart, recent cart adds, an active session and a good
view-to-cart ratio raise it; time since the last cart add lowers it. The weights are chosen
by hand, not learned, and the output says so in its name. No Kafka, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from features.spec import FeatureSpec
from features.state import ShopperState

#: feature name -> weight on its normalised value; see the module docstring.
WEIGHTS: dict[str, float] = {
    "cart_items_now": 1.2,
    "cart_adds_since_order": 0.6,
    "session_events": 0.4,
    "views_1h": 0.3,
    "view_to_cart_30d": 1.5,
    "ms_since_last_cart_add": -0.5,
}
BIAS = -3.0


class PurchaseIntentHeuristic:
    """``purchase_intent_heuristic`` in [0, 1] for each row of a feature matrix."""

    name = "purchase_intent_heuristic"
    version = "heuristic-1"

    def __init__(self, spec: FeatureSpec) -> None:
        self._columns = np.array([spec.index(name) for name in WEIGHTS], dtype=np.intp)
        self._weights = np.array(list(WEIGHTS.values()), dtype=np.float32)

    def score(self, states: Sequence[ShopperState], features: np.ndarray) -> list[dict[str, float]]:
        logits = features[:, self._columns] @ self._weights + BIAS
        probabilities = 1.0 / (1.0 + np.exp(-logits))
        return [{self.name: float(p)} for p in probabilities]
