"""The registry names of ShopPulse's two models.

Training registers under them and serving loads from them; they live in this tiny module so
serving (:mod:`models.scoring`, ``streams.worker.app``) never has to import :mod:`models.training`
(and with it the replay, labelling and training code) for two strings.
"""

from __future__ import annotations

#: The churn / purchase-propensity classifier.
CLASSIFIER_MODEL = "shopper-classifier"
#: The next-item recommender.
NEXTITEM_MODEL = "nextitem"
