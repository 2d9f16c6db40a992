"""Train, evaluate and register ShopPulse's models from an event log (``shoppulse train``).

:func:`train_all` does the whole job on an ``Iterable[features.events.Event]``:

1. **Point-in-time rows.** The log is folded through :func:`features.offline.replay` (the same
   ``ShopperState.update`` the worker runs). Rows are taken at *scoring moments*
   (:mod:`models.labels`): after an applied event (at most one per shopper per hour) and at the
   daily silent-shopper sweep; each row only knows events up to its moment.
2. **Labels** from behaviour (:mod:`models.labels`): churn = no event in the next 14 days,
   purchase = an order in the next 24 hours; censored labels (horizon past the log's end) dropped.
3. **Time split** (:func:`make_time_split`), never random rows: one split time ``S``; scoring
   moments at or after ``S`` are the evaluation period; a training example of a task must have
   its whole label horizon end at or before ``S`` (``t + horizon <= S``), so no training label
   sees anything after ``S``. ``S`` is placed so the churn evaluation window is
   ``eval_fraction`` of the usable time. Early stopping and calibration use the last
   ``valid_fraction`` of each task's training window (by time); the first ``warmup_ms`` of the
   log give no training moments (everyone looks new there).
4. **Churn + purchase**: :class:`models.classifiers.MultiTaskMLP` (shared trunk, two heads),
   early stopping, Platt calibration. Baselines on exactly the same rows: a recency/frequency
   rule (:func:`rule_scores`, Platt-calibrated on the training rows), logistic regression (torch,
   one linear layer on the same standardised features, same early stopping and calibration),
   and for purchase the hand-set heuristic currently served (:mod:`models.heuristic`).
   Metrics on the evaluation period: ROC-AUC, PR-AUC (average precision), log loss, Brier, ECE,
   reliability bins, ROC curves, and the model's deltas against each baseline with shopper-level
   bootstrap 95% intervals.
5. **Next item**: SASRec (:func:`models.nextitem.train_nextitem`) on every shopper's items before
   ``S`` (early stopping on each shopper's last training item), against popularity and
   item-to-item co-occurrence (:mod:`models.baselines`): HR@K, NDCG@K (K = 5, 10, 20) and
   catalogue coverage for each shopper's first interaction at or after ``S`` (history = items
   before ``S``, history items excluded as when serving), unweighted and weighted by interaction
   kind (view 1, cart 3, bought 5).
6. **Never serve a loser** (:mod:`.select`): on the VALIDATION rows only, the MLP is chosen
   over logistic regression only when its mean log loss over the two tasks is lower with the
   95% shopper-bootstrap interval below zero; for next item the best validation NDCG@10 among
   SASRec, co-occurrence and their blend. The evaluation period never reaches the choice.
7. **Artifacts**: the two chosen models saved into the registry (:mod:`models.registry`) as
   ``shopper-classifier/<version>`` and ``nextitem/<version>`` with metadata (kind, version,
   created, training data summary, FeatureSpec hash, item vocabulary, metrics, what was served
   and why) and promoted.

Deterministic for a seed on CPU with a fixed thread count; ``device="auto"`` uses CUDA when
available. No Kafka, no Faust, no ``streams`` import.

One module per concern: :mod:`.config` (:class:`TrainingConfig`), :mod:`.examples` (steps 1-2),
:mod:`.split` (step 3), :mod:`.fit_classifiers` (step 4), :mod:`.fit_nextitem` (step 5),
:mod:`.select` (step 6) and :mod:`.pipeline` (step 7 and :func:`train_all`). Serving never imports this package: the
registry names it saves under live in :mod:`models.names`.
"""

from __future__ import annotations

from .config import TrainingConfig
from .examples import ExampleSet, build_examples
from .fit_classifiers import PlattRule, fit_and_evaluate_classifiers, rule_scores, train_logistic_regression
from .fit_nextitem import fit_and_evaluate_nextitem
from .pipeline import TrainingResult, models_ready, train_all
from .select import select_classifier, select_recommender
from .split import TimeSplit, make_time_split

__all__ = (
    "TrainingConfig",
    "TrainingResult",
    "ExampleSet",
    "TimeSplit",
    "train_all",
    "build_examples",
    "make_time_split",
    "fit_and_evaluate_classifiers",
    "fit_and_evaluate_nextitem",
    "train_logistic_regression",
    "rule_scores",
    "PlattRule",
    "models_ready",
    "select_classifier",
    "select_recommender",
)
