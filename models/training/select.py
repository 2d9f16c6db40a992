"""Never serve a loser: choose the model to register from VALIDATION numbers only.

Both choices are plain functions of validation predictions / metrics, so training and a later
``shoppulse retrain`` call the same rule, and nothing from the evaluation period (test split)
can reach them (their arguments do not contain it).

* Churn + purchase (:func:`select_classifier`): the MLP is registered only when its mean
  validation log loss over the tasks is lower than the logistic regression's AND the 95%
  shopper-level bootstrap interval of that mean difference lies wholly below zero. Otherwise the
  logistic regression (the simpler model, also a calibrated torch model) is registered. Log loss
  because serving uses the probabilities themselves (alerts, thresholds), not only their order;
  the interval because a more complex model has to show it is better, not merely tie.
* Next item (:func:`select_recommender`): the servable candidate with the highest validation
  NDCG@10 (HR@10 breaks ties, then the simpler candidate wins).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..binary_metrics import bootstrap_mean_log_loss_delta, log_loss, roc_auc

#: The rules in words (they go into the report and the artifacts).
CLASSIFIER_CRITERION = (
    "mean validation log loss over the tasks; the MLP is served only when it is lower than the "
    "logistic regression's with the 95% shopper-bootstrap interval of the difference below zero"
)
RECOMMENDER_CRITERION = "highest validation NDCG@10 (HR@10, then the simpler candidate, break ties)"


def select_classifier(
    candidate: str,
    baseline: str,
    valid_p: Mapping[str, Mapping[str, np.ndarray]],
    valid_y: Mapping[str, np.ndarray],
    valid_users: Mapping[str, np.ndarray],
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Which of ``candidate`` (the MLP) and ``baseline`` (logistic regression) to register.

    Args:
        valid_p: method -> task -> calibrated probabilities on that task's validation rows.
        valid_y / valid_users: task -> labels / shopper ids of the same rows.
        n_boot: bootstrap resamples; with 0 the point estimate alone decides (tests, tiny logs).

    Returns a JSON-ready record: ``served``, the per-task validation log loss and ROC-AUC of
    both, the mean log-loss difference (candidate - baseline), its interval and the reason.
    """
    tasks = list(valid_y)
    per_task = {
        task: {
            m: {
                "log_loss": log_loss(valid_p[m][task], valid_y[task]),
                "roc_auc": roc_auc(valid_p[m][task], valid_y[task]),
                "rows": int(len(valid_y[task])),
            }
            for m in (candidate, baseline)
        }
        for task in tasks
    }
    mean = {m: float(np.mean([per_task[t][m]["log_loss"] for t in tasks])) for m in (candidate, baseline)}
    delta = mean[candidate] - mean[baseline]
    ci = bootstrap_mean_log_loss_delta(
        [valid_p[candidate][t] for t in tasks],
        [valid_p[baseline][t] for t in tasks],
        [valid_y[t] for t in tasks],
        [valid_users[t] for t in tasks],
        n_boot,
        seed,
    )
    wins = delta < 0 and (not ci or ci[1] < 0)
    served = candidate if wins else baseline
    interval = f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else " (no bootstrap)"
    if wins:
        reason = f"{candidate} has the lower mean validation log loss: {delta:+.4f}{interval}"
    elif delta < 0:
        reason = (
            f"{candidate} is lower by {-delta:.4f} on mean validation log loss but the 95% interval{interval} "
            f"does not exclude zero, so the simpler {baseline} is served"
        )
    else:
        reason = f"{candidate} does not beat {baseline} on mean validation log loss: {delta:+.4f}{interval}"
    return {
        "served": served,
        "candidates": [candidate, baseline],
        "criterion": CLASSIFIER_CRITERION,
        "valid": per_task,
        "mean_log_loss": mean,
        "delta_log_loss": delta,
        "ci95": ci,
        "reason": reason,
    }


def select_recommender(valid_metrics: Mapping[str, Mapping[str, float]], servable: Sequence[str]) -> dict[str, Any]:
    """The servable candidate with the best validation NDCG@10.

    Args:
        valid_metrics: candidate -> validation metrics (``HR@10``, ``NDCG@10`` ...), every
            candidate, servable or not (all are reported).
        servable: the candidates serving can load, simplest first (ties go to the earlier one).
    """
    order = {name: i for i, name in enumerate(servable)}
    ranked = sorted(servable, key=lambda m: (-valid_metrics[m]["NDCG@10"], -valid_metrics[m]["HR@10"], order[m]))
    served = ranked[0]
    runner = ranked[1] if len(ranked) > 1 else None
    reason = f"{served} has the best validation NDCG@10 ({valid_metrics[served]['NDCG@10']:.4f})"
    if runner is not None:
        reason += f"; next best {runner} {valid_metrics[runner]['NDCG@10']:.4f}"
    return {
        "served": served,
        "candidates": list(servable),
        "criterion": RECOMMENDER_CRITERION,
        "valid": {m: dict(v) for m, v in valid_metrics.items()},
        "reason": reason,
    }
