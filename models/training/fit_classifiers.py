"""Churn + purchase: the MLP and its baselines trained on the split's training windows, the one
to serve chosen on the validation windows (:mod:`.select`), all evaluated on the evaluation
windows (:func:`fit_and_evaluate_classifiers`)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from features.spec import FeatureSpec

from ..binary_metrics import RankedScores, binary_metrics, bootstrap_deltas, reliability_bins
from ..classifiers import ClassifierConfig, ClassifierTrainConfig, MultiTaskMLP, calibrate, fit_platt, train_classifier
from ..drift import FeatureDistribution
from ..labels import MOMENT_NAMES, TASKS
from ..nextitem import seed_everything
from .config import TrainingConfig
from .examples import ExampleSet
from .select import select_classifier
from .split import TimeSplit

#: Method names in metrics and reports.
METHOD_MODEL = "mlp"
METHOD_RULE = "recency_frequency_rule"
METHOD_LOGREG = "logistic_regression"
METHOD_HEURISTIC = "served_heuristic"


def rule_scores(x: np.ndarray, spec: FeatureSpec) -> dict[str, np.ndarray]:
    """Raw recency/frequency scores (higher = more likely), from the same feature rows.

    * churn    = log1p(hours since the last event, capped at 720) - log1p(active days in the last 30 d):
      long silence raises it, a habit of coming back lowers it;
    * purchase = log1p(units in the cart now) + 0.5 * log1p(page views in the last 24 h).

    They become probabilities by Platt scaling fitted on the training rows.
    """
    rec = x[:, spec.index("ms_since_last_event")].astype(np.float64)
    active_days = 30.0 * x[:, spec.index("active_days_30d")].astype(np.float64)
    cart = x[:, spec.index("cart_items_now")].astype(np.float64)
    views = x[:, spec.index("views_24h")].astype(np.float64)
    return {"churn": rec - np.log1p(active_days), "purchase": cart + 0.5 * views}


class PlattRule:
    """``sigmoid(a * score + b)`` fitted by log loss (:func:`models.classifiers.fit_platt`)."""

    def __init__(self) -> None:
        self.a, self.b = 1.0, 0.0

    def fit(self, score: np.ndarray, y: np.ndarray) -> PlattRule:
        if len(y) and 0 < float(np.sum(y)) < len(y):
            self.a, self.b = fit_platt(
                torch.as_tensor(score, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
            )
        return self

    def predict(self, score: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(self.a * np.asarray(score, dtype=np.float64) + self.b)))


def _masked_task_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over tasks of each task's mean BCE on its labelled rows (tasks stay independent)."""
    total = logits.sum() * 0.0
    for t in range(y.shape[1]):
        keep = ~torch.isnan(y[:, t])
        if bool(keep.any()):
            total = total + torch.nn.functional.binary_cross_entropy_with_logits(logits[keep, t], y[keep, t])
    return total


def train_logistic_regression(
    x_fit: np.ndarray,
    y_fit: np.ndarray,
    x_valid: np.ndarray,
    y_valid: np.ndarray,
    l2: float = 1e-4,
    calibration: str = "platt",
    seed: int = 0,
    max_iter: int = 500,
) -> tuple[MultiTaskMLP, dict[str, Any]]:
    """Logistic regression per task: a :class:`MultiTaskMLP` with no hidden layer (one linear layer
    on the same standardised features), fitted to convergence by full-batch L-BFGS on the masked
    log loss + ``l2 * ||W||^2`` (convex: no early stopping needed), then calibrated on the
    validation rows exactly like the MLP."""
    seed_everything(seed)
    xt = torch.as_tensor(np.asarray(x_fit, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y_fit, dtype=np.float32))
    model = MultiTaskMLP(ClassifierConfig(input_dim=xt.shape[1], tasks=TASKS, hidden=(), dropout=0.0))
    model.feat_mean.copy_(xt.mean(0))
    model.feat_std.copy_(xt.std(0, unbiased=False).clamp_min(1e-6))
    opt = torch.optim.LBFGS(
        model.heads.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )
    steps = [0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _masked_task_bce(model(xt), yt) + l2 * (model.heads.weight**2).sum()
        loss.backward()
        steps[0] += 1
        return loss

    model.train()
    final = float(opt.step(closure).detach())
    calibrate(
        model,
        torch.as_tensor(np.asarray(x_valid, dtype=np.float32)),
        torch.as_tensor(np.asarray(y_valid, dtype=np.float32)),
        calibration,
    )
    model.eval()
    return model, {"optimizer": "lbfgs", "l2": l2, "function_evals": steps[0], "final_loss": final}


def _served_heuristic(x: np.ndarray, spec: FeatureSpec) -> np.ndarray | None:
    try:
        from ..heuristic import PurchaseIntentHeuristic

        h = PurchaseIntentHeuristic(spec)
    except (ImportError, KeyError):  # pragma: no cover - heuristic removed or spec changed
        return None
    return np.array([d[h.name] for d in h.score([], x)], dtype=np.float64)


def fit_and_evaluate_classifiers(
    ex: ExampleSet,
    split: TimeSplit,
    cfg: TrainingConfig,
    spec: FeatureSpec,
) -> tuple[MultiTaskMLP, dict[str, Any]]:
    """Train the MLP and the baselines on the split's training windows, choose between the MLP and
    the logistic regression on the validation windows, evaluate all on the evaluation windows.

    Returns the (CPU) model to serve, the MLP or the logistic regression (both
    :class:`MultiTaskMLP`, calibrated), and the JSON-ready evaluation; ``info["selection"]``
    says which and why, ``info["training_distribution"]`` holds the quantile bins per feature
    (:meth:`models.drift.FeatureDistribution.to_dict`) of the rows after the events from the end of
    the warm-up to the split (:attr:`ExampleSet.event_rows`): what the worker scores, the reference
    of live drift.
    The moments the models learn from would not do: one an hour per shopper plus daily sweeps of
    idle shoppers put PSI near 10 on ``views_1h`` for unchanged traffic (bench/bench_drift.py).
    """
    masks = {task: split.masks(ex.ts, task) for task in TASKS}
    labelled = {task: ~np.isnan(ex.y[:, t]) for t, task in enumerate(TASKS)}

    def part(name: str) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        use = np.zeros(len(ex.ts), dtype=bool)
        y = np.full_like(ex.y, np.nan)
        sizes = {}
        for t, task in enumerate(TASKS):
            m = masks[task][name] & labelled[task]
            y[m, t] = ex.y[m, t]
            use |= m
            sizes[task] = int(m.sum())
        return ex.x[use], y[use], sizes

    x_fit, y_fit, fit_sizes = part("fit")
    x_val, y_val, val_sizes = part("valid")
    for task in TASKS:
        if fit_sizes[task] == 0 or val_sizes[task] == 0:
            raise ValueError(
                f"no {task} examples in the training window ({fit_sizes[task]} fit, {val_sizes[task]} "
                "valid); use a longer log or more shoppers"
            )
    tcfg = ClassifierTrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        patience=cfg.patience,
        seed=cfg.seed,
        device=cfg.device,
        calibration=cfg.calibration,
        progress=cfg.progress,
    )
    t0 = time.perf_counter()
    mlp, mlp_rep = train_classifier(
        x_fit,
        y_fit,
        x_val,
        y_val,
        ClassifierConfig(input_dim=spec.dim, hidden=tuple(cfg.hidden), dropout=cfg.dropout),
        tcfg,
    )
    t_mlp = time.perf_counter() - t0
    t0 = time.perf_counter()
    logreg, lr_rep = train_logistic_regression(
        x_fit, y_fit, x_val, y_val, l2=cfg.logreg_l2, calibration=cfg.calibration, seed=cfg.seed
    )
    t_lr = time.perf_counter() - t0
    mlp.cpu()
    logreg.cpu()
    raw_rule = rule_scores(ex.x, spec)
    with torch.no_grad():
        p_mlp = mlp.predict_proba(torch.as_tensor(ex.x)).numpy().astype(np.float64)
        p_lr = logreg.predict_proba(torch.as_tensor(ex.x)).numpy().astype(np.float64)

    users = np.asarray(ex.users)
    valid_rows = {task: masks[task]["valid"] & labelled[task] for task in TASKS}
    selection = select_classifier(
        METHOD_MODEL,
        METHOD_LOGREG,
        {
            METHOD_MODEL: {task: p_mlp[valid_rows[task], t] for t, task in enumerate(TASKS)},
            METHOD_LOGREG: {task: p_lr[valid_rows[task], t] for t, task in enumerate(TASKS)},
        },
        {task: ex.y[valid_rows[task], t].astype(np.float64) for t, task in enumerate(TASKS)},
        {task: users[valid_rows[task]] for task in TASKS},
        cfg.bootstrap,
        cfg.seed,
    )

    metrics: dict[str, dict[str, Any]] = {}
    comparison: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    eval_rows: dict[str, Any] = {}
    for t, task in enumerate(TASKS):
        fit_m = masks[task]["fit"] & labelled[task]
        ev = masks[task]["eval"] & labelled[task]
        y_ev = ex.y[ev, t].astype(np.float64)
        rule = PlattRule().fit(raw_rule[task][fit_m], ex.y[fit_m, t])
        preds = {METHOD_MODEL: p_mlp[ev, t], METHOD_LOGREG: p_lr[ev, t], METHOD_RULE: rule.predict(raw_rule[task][ev])}
        p_heur = _served_heuristic(ex.x[ev], spec) if task == "purchase" else None
        if p_heur is not None:
            preds[METHOD_HEURISTIC] = p_heur
        moment = ex.moment[ev]
        metrics[task] = {}
        curves[task] = {"roc": {}, "reliability": {}}
        for method, p in preds.items():
            m = binary_metrics(p, y_ev)
            m["by_moment"] = {}
            for code, name in enumerate(MOMENT_NAMES):
                sel = moment == code
                if sel.any():
                    auc, ap = RankedScores(p[sel], y_ev[sel]).auc_ap()
                    m["by_moment"][name] = {
                        "roc_auc": auc,
                        "pr_auc": ap,
                        "rows": int(sel.sum()),
                        "base_rate": float(y_ev[sel].mean()),
                    }
            metrics[task][method] = m
            curves[task]["roc"][method] = RankedScores(p, y_ev).roc()
            curves[task]["reliability"][method] = reliability_bins(p, y_ev)
        comp: dict[str, Any] = {"baselines": {}}
        for method in preds:
            if method == METHOD_MODEL:
                continue
            mm, mb = metrics[task][METHOD_MODEL], metrics[task][method]
            d = {k: mm[k] - mb[k] for k in ("roc_auc", "pr_auc", "log_loss", "brier", "ece")}
            d["ci95"] = bootstrap_deltas(
                preds[METHOD_MODEL], preds[method], y_ev, users[ev], cfg.bootstrap, cfg.seed + t
            )
            d["beats"] = bool(d["roc_auc"] > 0 and d["pr_auc"] > 0 and d["log_loss"] < 0)
            comp["baselines"][method] = d
        # "beats all" is judged against the required baselines (rule + logistic regression)
        comp["beats_all"] = all(comp["baselines"][b]["beats"] for b in (METHOD_RULE, METHOD_LOGREG))
        comparison[task] = comp
        eval_rows[task] = {
            "rows": int(ev.sum()),
            "positives": int(y_ev.sum()),
            "fit_rows": int(fit_m.sum()),
            "valid_rows": int((masks[task]["valid"] & labelled[task]).sum()),
        }
        comp["rule_platt"] = {"a": rule.a, "b": rule.b}
    info = {
        "metrics": metrics,
        "comparison": comparison,
        "curves": curves,
        "rows": eval_rows,
        "mlp_training": {k: v for k, v in mlp_rep.to_dict().items() if k != "history"} | {"seconds": t_mlp},
        "logreg_training": lr_rep | {"seconds": t_lr},
        "calibration": {task: {"a": float(mlp.calib_a[t]), "b": float(mlp.calib_b[t])} for t, task in enumerate(TASKS)},
        "selection": selection,
        "rule": {
            "churn": "log1p(hours since last event, cap 720) - log1p(active days in 30 d)",
            "purchase": "log1p(cart units now) + 0.5 * log1p(views in 24 h)",
            "calibration": "Platt scaling fitted on the training (fit) rows",
        },
        "architecture": {"hidden": list(cfg.hidden), "dropout": cfg.dropout, "calibration": cfg.calibration},
        "training_distribution": FeatureDistribution.fit(
            ex.event_rows[(ex.event_ts >= split.start_ms + split.warmup_ms) & (ex.event_ts < split.split_ms)],
            spec.names,
        ).to_dict(),
    }
    return (mlp if selection["served"] == METHOD_MODEL else logreg), info
