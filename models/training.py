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
6. **Artifacts**: both models saved into the registry (:mod:`models.registry`) as
   ``shopper-classifier/<version>`` and ``nextitem/<version>`` with metadata (kind, version,
   created, training data summary, FeatureSpec hash, item vocabulary, metrics) and promoted.

Deterministic for a seed on CPU with a fixed thread count; ``device="auto"`` uses CUDA when
available. No Kafka, no Faust, no ``streams`` import.
"""
from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from features.events import Event
from features.offline import replay
from features.spec import DEFAULT_FEATURE_SPEC, FeatureSpec
from features.state import APPLIED, DAY_MS, StateConfig

from .baselines import CooccurrenceRecommender, PopularityRecommender
from .classifiers import (
    ClassifierConfig,
    ClassifierTrainConfig,
    MultiTaskMLP,
    ShopperClassifier,
    calibrate,
    expected_calibration_error,
    fit_platt,
    train_classifier,
)
from .labels import (
    MOMENT_EVENT,
    MOMENT_NAMES,
    MOMENT_SWEEP,
    TASKS,
    FutureIndex,
    LabelConfig,
    MomentSampler,
    item_sequences,
    label_moments,
    label_summary,
    next_item_split,
    sweep_times,
)
from .metrics import DEFAULT_KS, evaluate_full_ranking
from .nextitem import NextItemConfig, NextItemRecommender, TrainConfig, resolve_device, seed_everything, train_nextitem
from .registry import ModelRegistry
from .sequences import ItemVocab

#: Registry model names.
CLASSIFIER_MODEL = "shopper-classifier"
NEXTITEM_MODEL = "nextitem"
#: Method names in metrics and reports.
METHOD_MODEL = "mlp"
METHOD_RULE = "recency_frequency_rule"
METHOD_LOGREG = "logistic_regression"
METHOD_HEURISTIC = "served_heuristic"
NEXTITEM_METHODS = ("sasrec", "cooccurrence", "popularity")


# ============================================================================== configuration
@dataclass
class TrainingConfig:
    """Everything :func:`train_all` needs besides the events (defaults = a full run).

    Use :meth:`quick` for the demo-size run. Times are in ms.

    Attributes (the less obvious ones):
        eval_fraction: share of the usable time (log span - warm-up - 2 x longest horizon) that
            is the churn evaluation window; places the split.
        valid_fraction: last share (by time) of each task's training window used for early
            stopping and calibration.
        warmup_ms: no training moments in the log's first days: every shopper looks new there
            (windows, tenure and lifetime counts are still filling up), which does not match
            later rows. Features still see those events.
        observed_until_ms: end of the observed log for censoring (default: the last event time).
        calibration: ``"platt"`` (default), ``"temperature"`` or ``"none"`` for the MLP and the
            logistic regression, fitted on the validation slice.
        logreg_l2: L2 penalty of the logistic-regression baseline.
        bootstrap: shopper-level bootstrap resamples for the delta intervals (0 = none).
        nextitem_recent_only: train SASRec on each shopper's latest ``max_len + 1`` items only
            (quick mode, to stay within seconds on a CPU).
        source: free-form description of the data (goes into the artifacts' training_data).
    """

    labels: LabelConfig = field(default_factory=LabelConfig)
    state: StateConfig = field(default_factory=StateConfig)
    eval_fraction: float = 0.25
    valid_fraction: float = 0.2
    warmup_ms: int = 7 * DAY_MS
    observed_until_ms: int | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    # churn / purchase MLP (and the logistic regression baseline's training)
    hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.1
    epochs: int = 100
    patience: int = 8
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    calibration: str = "platt"
    logreg_l2: float = 1e-4
    bootstrap: int = 200
    # next item
    nextitem_dim: int = 64
    nextitem_layers: int = 2
    nextitem_heads: int = 2
    nextitem_max_len: int = 50
    nextitem_dropout: float = 0.5
    nextitem_attn_dropout: float = 0.2
    nextitem_epochs: int = 100
    nextitem_patience: int = 5
    nextitem_batch_size: int = 256
    nextitem_lr: float = 1e-3
    nextitem_recent_only: bool = False
    # registry
    version: str | None = None
    promote: bool = True
    source: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls, **overrides: Any) -> "TrainingConfig":
        """Demo size: seconds on one CPU thread for ~2k shoppers x 28 days.

        Uses a 7-day churn horizon: with a 28-day log a 14-day horizon leaves no leakage-free
        training window (training needs ``t + 14 d <= S``, evaluation ``S <= t <= end - 14 d``).
        """
        base = cls(labels=LabelConfig(churn_horizon_ms=7 * DAY_MS), warmup_ms=3 * DAY_MS, hidden=(32, 16), epochs=40,
                   patience=4, batch_size=1024, lr=3e-3, bootstrap=100, nextitem_dim=32, nextitem_layers=1,
                   nextitem_heads=1, nextitem_max_len=20, nextitem_dropout=0.3, nextitem_epochs=6, nextitem_patience=2,
                   nextitem_batch_size=256, nextitem_lr=5e-3, nextitem_recent_only=True)
        return replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


# ============================================================================== examples
class _StateTap:
    """Stands in for the FeatureSpec inside :func:`features.offline.replay`.

    ``replay`` calls ``spec.row(state, event.ts_ms)`` right after ``state.update(event)``; the tap
    remembers that live state (so sweeps can read every shopper's state between events) and
    returns no row: rows are computed only for the moments that become examples, with the real
    spec, from the same state at the same time, so they equal replay's rows (tested).
    """

    _EMPTY = np.zeros(0, dtype=np.float32)

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.states: dict[str, Any] = {}
        self.last: Any = None

    def row(self, state: Any, now_ms: int) -> np.ndarray:
        self.states[state.user_id] = state
        self.last = state
        return self._EMPTY

    def __getattr__(self, name: str) -> Any:
        return getattr(self.spec, name)


@dataclass
class ExampleSet:
    """Labelled point-in-time rows.

    Attributes:
        x: ``float32 [M, spec.dim]`` feature rows; y: ``float32 [M, 2]`` labels (:data:`TASKS`,
        NaN = censored); ts: moment times; users: shopper ids; moment: 0 event / 1 sweep.
        applied: the applied events in replay order (for next-item sequences).
    """

    x: np.ndarray
    y: np.ndarray
    ts: np.ndarray
    users: list[str]
    moment: np.ndarray
    applied: list[Event]
    observed_from_ms: int
    observed_until_ms: int
    counts: dict[str, Any]


def build_examples(events: Iterable[Event], labels: LabelConfig = LabelConfig(),
                   state_config: StateConfig = StateConfig(), spec: FeatureSpec = DEFAULT_FEATURE_SPEC,
                   observed_until_ms: int | None = None, progress: bool = False) -> ExampleSet:
    """Replay the log, take rows at scoring moments, label them (see :mod:`models.labels`)."""
    events = list(events)
    if not events:
        raise ValueError("no events to train on")
    ts_sorted = np.sort(np.fromiter((e.ts_ms for e in events), dtype=np.int64, count=len(events)))
    first_ms = int(ts_sorted[0])
    until = int(observed_until_ms) if observed_until_ms is not None else int(ts_sorted[-1])
    sweeps = [t for t in sweep_times(first_ms, until, labels.sweep_every_ms)]
    max_idle = labels.max_idle_ms
    tap = _StateTap(spec)
    sampler = MomentSampler(labels.example_gap_ms)
    rows: list[np.ndarray] = []
    users: list[str] = []
    times: list[int] = []
    kinds: list[int] = []
    applied: list[Event] = []
    duplicates = 0
    j = 0
    n = len(events)
    from tqdm.auto import tqdm

    stream = replay(events, state_config, tap)  # type: ignore[arg-type]  (duck-typed spec, see _StateTap)
    for k, (event, outcome, _) in enumerate(tqdm(stream, total=n, desc="replay", disable=not progress,
                                                 dynamic_ncols=True, mininterval=1.0)):
        state = tap.last
        if state is None or state.user_id != event.user_id:
            raise RuntimeError("features.offline.replay no longer calls spec.row(state, ts) after each update; "
                               "models.training._StateTap must follow it")
        tap.last = None
        if outcome == APPLIED:
            applied.append(event)
            if sampler.accept(event.user_id, event.ts_ms):
                rows.append(spec.row(state, event.ts_ms))
                users.append(event.user_id)
                times.append(event.ts_ms)
                kinds.append(MOMENT_EVENT)
        else:
            duplicates += 1
        nxt = int(ts_sorted[k + 1]) if k + 1 < n else None
        while j < len(sweeps) and (nxt is None or sweeps[j] < nxt):
            t = sweeps[j]
            j += 1
            if t > until:
                continue
            live = [s for s in tap.states.values() if t - s.last_event_ms <= max_idle]
            if live:
                rows.append(spec.matrix(live, t))
                users.extend(s.user_id for s in live)
                times.extend([t] * len(live))
                kinds.extend([MOMENT_SWEEP] * len(live))
    x = np.vstack([r.reshape(-1, spec.dim) for r in rows]).astype(np.float32) if rows else \
        np.zeros((0, spec.dim), np.float32)
    ts = np.asarray(times, dtype=np.int64)
    index = FutureIndex(applied)
    y = label_moments(index, users, ts, labels, until)
    keep = ~np.isnan(y).all(axis=1)
    moment = np.asarray(kinds, dtype=np.int8)
    counts = {
        "events": n, "applied_events": len(applied), "duplicates": duplicates, "shoppers": len(tap.states),
        "moments": {"event": int((moment == MOMENT_EVENT).sum()), "sweep": int((moment == MOMENT_SWEEP).sum())},
        "dropped_all_censored": int((~keep).sum()),
        "labels": label_summary(y),
    }
    users_kept = [u for u, kk in zip(users, keep) if kk]
    return ExampleSet(x[keep], y[keep], ts[keep], users_kept, moment[keep], applied, first_ms, until, counts)


# ============================================================================== time split
@dataclass(frozen=True)
class TimeSplit:
    """One split time ``split_ms`` for every task; windows per task (inclusive ms bounds).

    For a task with horizon ``h``: fit ``[start + warmup, valid_from)``, valid
    ``[valid_from, split - h]`` (so every training label ends by ``split``), eval
    ``[split, end - h]`` (later moments are censored).
    """

    start_ms: int
    end_ms: int
    split_ms: int
    warmup_ms: int
    horizons: dict[str, int]
    valid_fraction: float

    def valid_from(self, task: str) -> int:
        train_end = self.split_ms - self.horizons[task]
        lo = self.start_ms + self.warmup_ms
        return int(train_end - self.valid_fraction * (train_end - lo))

    def windows(self, task: str) -> dict[str, tuple[int, int]]:
        h = self.horizons[task]
        v = self.valid_from(task)
        return {"fit": (self.start_ms + self.warmup_ms, v - 1), "valid": (v, self.split_ms - h),
                "eval": (self.split_ms, self.end_ms - h)}

    def masks(self, ts: np.ndarray, task: str) -> dict[str, np.ndarray]:
        out = {}
        for name, (lo, hi) in self.windows(task).items():
            out[name] = (ts >= lo) & (ts <= hi)
        return out

    def to_dict(self) -> dict[str, Any]:
        def iso(ms: int) -> str:
            return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="minutes")

        return {
            "start": iso(self.start_ms), "split": iso(self.split_ms), "end": iso(self.end_ms),
            "start_ms": self.start_ms, "split_ms": self.split_ms, "end_ms": self.end_ms,
            "warmup_ms": self.warmup_ms, "valid_fraction": self.valid_fraction,
            "horizons_ms": dict(self.horizons),
            "windows": {task: {name: [iso(lo), iso(hi)] for name, (lo, hi) in self.windows(task).items()}
                        for task in self.horizons},
        }


def make_time_split(start_ms: int, end_ms: int, horizons: Mapping[str, int], eval_fraction: float = 0.25,
                    valid_fraction: float = 0.2, warmup_ms: int = 0) -> TimeSplit:
    """Place the split so the longest-horizon task's evaluation window is ``eval_fraction`` of its
    usable time; raises ``ValueError`` when the log is too short for the horizons."""
    if not 0 < eval_fraction < 1 or not 0 < valid_fraction < 1:
        raise ValueError("eval_fraction and valid_fraction must be in (0, 1)")
    h_max = max(horizons.values())
    span = end_ms - start_ms
    usable = span - warmup_ms - 2 * h_max
    if usable <= 0:
        raise ValueError(
            f"the log spans {span / DAY_MS:.1f} days but the longest label horizon is {h_max / DAY_MS:.1f} days: "
            f"a leakage-free time split needs more than {(2 * h_max + warmup_ms) / DAY_MS:.1f} days (a training "
            "window whose labels end before the split, then an evaluation window whose labels end before the "
            "log does). Use a longer log or a shorter horizon (e.g. --churn-horizon-days 7).")
    split = int(end_ms - h_max - eval_fraction * usable)
    return TimeSplit(int(start_ms), int(end_ms), split, int(warmup_ms), dict(horizons), float(valid_fraction))


# ============================================================================== binary metrics
class RankedScores:
    """Scores sorted once (descending, ties grouped) so AUC / AP / ROC take O(n) per weighting."""

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
        """ROC-AUC (ties count half) and average precision (sklearn's step definition)."""
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
        gp, gn = self._grouped(None)
        p, n = max(gp.sum(), 1e-12), max(gn.sum(), 1e-12)
        tpr = np.concatenate([[0.0], np.cumsum(gp) / p])
        fpr = np.concatenate([[0.0], np.cumsum(gn) / n])
        if len(tpr) > max_points:
            keep = np.unique(np.linspace(0, len(tpr) - 1, max_points).round().astype(int))
            tpr, fpr = tpr[keep], fpr[keep]
        return {"fpr": [round(float(v), 5) for v in fpr], "tpr": [round(float(v), 5) for v in tpr]}


def _log_loss(p: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    ll = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(ll.mean() if w is None else (ll * w).sum() / w.sum())


def reliability_bins(p: np.ndarray, y: np.ndarray, n_bins: int = 15) -> list[dict[str, float]]:
    """Equal-width bins (same as the ECE): count, mean predicted, observed rate."""
    p = np.asarray(p, dtype=np.float64)
    b = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    out = []
    for i in range(n_bins):
        m = b == i
        if m.any():
            out.append({"lo": i / n_bins, "hi": (i + 1) / n_bins, "count": int(m.sum()),
                        "mean_p": float(p[m].mean()), "rate": float(y[m].mean())})
    return out


def binary_metrics(p: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """ROC-AUC, PR-AUC, log loss, Brier, ECE (15 bins), base rate, rows, positives."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    auc, ap = RankedScores(p, y).auc_ap()
    return {"roc_auc": auc, "pr_auc": ap, "log_loss": _log_loss(p, y), "brier": float(np.mean((p - y) ** 2)),
            "ece": expected_calibration_error(p, y), "base_rate": float(y.mean()) if y.size else math.nan,
            "mean_p": float(p.mean()) if p.size else math.nan, "rows": int(y.size), "positives": int(y.sum())}


def bootstrap_deltas(model_p: np.ndarray, base_p: np.ndarray, y: np.ndarray, clusters: np.ndarray,
                     n_boot: int, seed: int) -> dict[str, list[float]]:
    """95% intervals of model - baseline for ROC-AUC, PR-AUC and log loss (shopper-level bootstrap:
    shoppers are resampled with replacement, all their rows with them)."""
    if n_boot <= 0:
        return {}
    rng = np.random.default_rng(seed)
    _, inv = np.unique(clusters, return_inverse=True)
    n_clusters = int(inv.max()) + 1
    rm, rb = RankedScores(model_p, y), RankedScores(base_p, y)
    ll_m = -(y * np.log(np.clip(model_p, 1e-7, 1 - 1e-7)) + (1 - y) * np.log(np.clip(1 - model_p, 1e-7, 1)))
    ll_b = -(y * np.log(np.clip(base_p, 1e-7, 1 - 1e-7)) + (1 - y) * np.log(np.clip(1 - base_p, 1e-7, 1)))
    deltas = {"roc_auc": [], "pr_auc": [], "log_loss": []}
    for _ in range(n_boot):
        w = rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters))[inv].astype(np.float64)
        am, pm = rm.auc_ap(w)
        ab, pb = rb.auc_ap(w)
        deltas["roc_auc"].append(am - ab)
        deltas["pr_auc"].append(pm - pb)
        deltas["log_loss"].append(float((ll_m * w).sum() / w.sum() - (ll_b * w).sum() / w.sum()))
    return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in deltas.items()}


# ============================================================================== baselines
#: Recency/frequency rule: feature columns it reads (normalised as the FeatureSpec does).
RULE_COLUMNS = ("ms_since_last_event", "active_days_30d", "cart_items_now", "views_24h")


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

    def fit(self, score: np.ndarray, y: np.ndarray) -> "PlattRule":
        if len(y) and 0 < float(np.sum(y)) < len(y):
            self.a, self.b = fit_platt(torch.as_tensor(score, dtype=torch.float64),
                                       torch.as_tensor(y, dtype=torch.float64))
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


def train_logistic_regression(x_fit: np.ndarray, y_fit: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray,
                              l2: float = 1e-4, calibration: str = "platt", seed: int = 0,
                              max_iter: int = 500) -> tuple[MultiTaskMLP, dict[str, Any]]:
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
    opt = torch.optim.LBFGS(model.heads.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")
    steps = [0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _masked_task_bce(model(xt), yt) + l2 * (model.heads.weight ** 2).sum()
        loss.backward()
        steps[0] += 1
        return loss

    model.train()
    final = float(opt.step(closure).detach())
    calibrate(model, torch.as_tensor(np.asarray(x_valid, dtype=np.float32)),
              torch.as_tensor(np.asarray(y_valid, dtype=np.float32)), calibration)
    model.eval()
    return model, {"optimizer": "lbfgs", "l2": l2, "function_evals": steps[0], "final_loss": final}


def _served_heuristic(x: np.ndarray, spec: FeatureSpec) -> np.ndarray | None:
    try:
        from .heuristic import PurchaseIntentHeuristic

        h = PurchaseIntentHeuristic(spec)
    except (ImportError, KeyError):  # pragma: no cover - heuristic removed or spec changed
        return None
    return np.array([d[h.name] for d in h.score([], x)], dtype=np.float64)


# ============================================================================== result
@dataclass
class TrainingResult:
    """What :func:`train_all` produced.

    Attributes:
        version: the version both models were saved under.
        artifacts: registry model name -> artifact directory.
        promoted: whether both were promoted to ``current``.
        report: JSON-ready evaluation (what :func:`models.report.write_report` renders).
        classifier / recommender: the trained models, ready to score.
        timings: seconds per stage.
    """

    version: str
    artifacts: dict[str, Path]
    promoted: bool
    report: dict[str, Any]
    classifier: ShopperClassifier
    recommender: NextItemRecommender
    timings: dict[str, float]

    @property
    def beats_baselines(self) -> bool:
        """True when the MLP beats every baseline on ROC-AUC, PR-AUC and log loss for both tasks."""
        return all(c["beats_all"] for c in self.report["classifiers"]["comparison"].values())


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ============================================================================== classifiers
def fit_and_evaluate_classifiers(ex: ExampleSet, split: TimeSplit, cfg: TrainingConfig, spec: FeatureSpec,
                                 ) -> tuple[MultiTaskMLP, dict[str, Any]]:
    """Train the MLP and the baselines on the split's training windows, evaluate all on its
    evaluation windows; returns the (CPU) MLP and the JSON-ready evaluation."""
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
            raise ValueError(f"no {task} examples in the training window ({fit_sizes[task]} fit, {val_sizes[task]} "
                             "valid); use a longer log or more shoppers")
    tcfg = ClassifierTrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 patience=cfg.patience, seed=cfg.seed, device=cfg.device, calibration=cfg.calibration,
                                 progress=cfg.progress)
    t0 = time.perf_counter()
    mlp, mlp_rep = train_classifier(x_fit, y_fit, x_val, y_val,
                                    ClassifierConfig(input_dim=spec.dim, hidden=tuple(cfg.hidden), dropout=cfg.dropout),
                                    tcfg)
    t_mlp = time.perf_counter() - t0
    t0 = time.perf_counter()
    logreg, lr_rep = train_logistic_regression(x_fit, y_fit, x_val, y_val, l2=cfg.logreg_l2,
                                               calibration=cfg.calibration, seed=cfg.seed)
    t_lr = time.perf_counter() - t0
    mlp.cpu()
    logreg.cpu()
    raw_rule = rule_scores(ex.x, spec)
    with torch.no_grad():
        p_mlp = mlp.predict_proba(torch.as_tensor(ex.x)).numpy().astype(np.float64)
        p_lr = logreg.predict_proba(torch.as_tensor(ex.x)).numpy().astype(np.float64)

    metrics: dict[str, dict[str, Any]] = {}
    comparison: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    eval_rows: dict[str, Any] = {}
    users = np.asarray(ex.users)
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
                    m["by_moment"][name] = {"roc_auc": auc, "pr_auc": ap, "rows": int(sel.sum()),
                                            "base_rate": float(y_ev[sel].mean())}
            metrics[task][method] = m
            curves[task]["roc"][method] = RankedScores(p, y_ev).roc()
            curves[task]["reliability"][method] = reliability_bins(p, y_ev)
        comp: dict[str, Any] = {"baselines": {}}
        for method in preds:
            if method == METHOD_MODEL:
                continue
            mm, mb = metrics[task][METHOD_MODEL], metrics[task][method]
            d = {k: mm[k] - mb[k] for k in ("roc_auc", "pr_auc", "log_loss", "brier", "ece")}
            d["ci95"] = bootstrap_deltas(preds[METHOD_MODEL], preds[method], y_ev, users[ev], cfg.bootstrap,
                                         cfg.seed + t)
            d["beats"] = bool(d["roc_auc"] > 0 and d["pr_auc"] > 0 and d["log_loss"] < 0)
            comp["baselines"][method] = d
        # "beats all" is judged against the required baselines (rule + logistic regression)
        comp["beats_all"] = all(comp["baselines"][b]["beats"] for b in (METHOD_RULE, METHOD_LOGREG))
        comparison[task] = comp
        eval_rows[task] = {"rows": int(ev.sum()), "positives": int(y_ev.sum()),
                           "fit_rows": int(fit_m.sum()),
                           "valid_rows": int((masks[task]["valid"] & labelled[task]).sum())}
        comp["rule_platt"] = {"a": rule.a, "b": rule.b}
    info = {
        "metrics": metrics, "comparison": comparison, "curves": curves, "rows": eval_rows,
        "mlp_training": {k: v for k, v in mlp_rep.to_dict().items() if k != "history"} | {"seconds": t_mlp},
        "logreg_training": lr_rep | {"seconds": t_lr},
        "calibration": {task: {"a": float(mlp.calib_a[t]), "b": float(mlp.calib_b[t])} for t, task in enumerate(TASKS)},
        "rule": {"churn": "log1p(hours since last event, cap 720) - log1p(active days in 30 d)",
                 "purchase": "log1p(cart units now) + 0.5 * log1p(views in 24 h)",
                 "calibration": "Platt scaling fitted on the training (fit) rows"},
        "architecture": {"hidden": list(cfg.hidden), "dropout": cfg.dropout, "calibration": cfg.calibration},
    }
    return mlp, info


# ============================================================================== next item
def _grouped_eval(score_fn: Any, hist: list[list[int]], tgt: list[int], kinds: list[str], weights: list[float],
                  num_items: int) -> dict[str, Any]:
    overall = evaluate_full_ranking(score_fn, hist, tgt, num_items, DEFAULT_KS)
    by_kind: dict[str, Any] = {}
    num = {f"{m}@{k}": 0.0 for m in ("HR", "NDCG") for k in DEFAULT_KS}
    den = 0.0
    for kind in sorted(set(kinds)):
        idx = [i for i, kk in enumerate(kinds) if kk == kind]
        r = evaluate_full_ranking(score_fn, [hist[i] for i in idx], [tgt[i] for i in idx], num_items, DEFAULT_KS)
        w = weights[idx[0]]
        by_kind[kind] = {"users": len(idx), "weight": w, **{k: r[k] for k in num}}
        for k in num:
            num[k] += w * len(idx) * r[k]
        den += w * len(idx)
    overall["weighted"] = {k: v / den for k, v in num.items()} if den else {}
    overall["by_target_kind"] = by_kind
    return overall


def fit_and_evaluate_nextitem(applied: Sequence[Event], split_ms: int, cfg: TrainingConfig,
                              ) -> tuple[NextItemRecommender, dict[str, Any]]:
    """SASRec on every shopper's items before ``split_ms`` vs popularity and co-occurrence."""
    seqs = item_sequences(applied, cfg.labels)
    nis = next_item_split(seqs, split_ms)
    vocab = ItemVocab.from_sequences(nis.train)
    if len(vocab) < 2:
        raise ValueError("fewer than 2 items before the split; cannot train a next-item model")
    train_idx = [vocab.encode(s) for s in nis.train]
    fit = [s[:-1] for s in train_idx]
    if cfg.nextitem_recent_only:  # quick mode: only each shopper's latest window (max_len transitions)
        fit = [s[-(cfg.nextitem_max_len + 1):] for s in fit]
    val_in = [s[:-1] for s in train_idx if len(s) >= 2]
    val_tg = [s[-1] for s in train_idx if len(s) >= 2]
    mcfg = NextItemConfig(num_items=len(vocab), max_len=cfg.nextitem_max_len, dim=cfg.nextitem_dim,
                          layers=cfg.nextitem_layers, heads=cfg.nextitem_heads, dropout=cfg.nextitem_dropout,
                          attn_dropout=cfg.nextitem_attn_dropout)
    tcfg = TrainConfig(epochs=cfg.nextitem_epochs, batch_size=cfg.nextitem_batch_size, lr=cfg.nextitem_lr,
                       patience=cfg.nextitem_patience, seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    t0 = time.perf_counter()
    model, rep = train_nextitem(fit, mcfg, tcfg, val_in, val_tg)
    t_train = time.perf_counter() - t0
    model.cpu()
    pop = PopularityRecommender().fit(train_idx, len(vocab))
    cooc = CooccurrenceRecommender().fit(train_idx, len(vocab))
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    data = {"shoppers_with_history": len(nis.train), "train_interactions": sum(len(s) for s in train_idx),
            "items": len(vocab), "valid_shoppers": len(val_tg)}
    for protocol, targets in (("next", nis.next), ("next_new", nis.next_new)):
        hist, tgt, kinds, wts, cold = [], [], [], [], 0
        for h, target, kind, w in zip(targets.history, targets.target, targets.kind, targets.weight):
            ti = vocab.index(target)
            if ti == 0:
                cold += 1
                continue
            hist.append(vocab.encode(h))
            tgt.append(ti)
            kinds.append(kind)
            wts.append(w)
        data[protocol] = {"eval_shoppers": len(tgt), "cold_targets_dropped": cold,
                          "target_in_history": int(sum(t in set(h) for h, t in zip(hist, tgt)))}
        results[protocol] = {}
        if tgt:
            for name, fn in (("sasrec", model.score), ("cooccurrence", cooc.score), ("popularity", pop.score)):
                results[protocol][name] = _grouped_eval(fn, hist, tgt, kinds, wts, len(vocab))
    t_eval = time.perf_counter() - t0
    info = {
        "metrics": results,
        "protocols": {
            "next": "target = the shopper's first interaction at or after the split; history items are excluded "
                    "from the ranking as when serving, so a repeat of a history item is a miss for every method",
            "next_new": "target = the shopper's first interaction at or after the split with an item not in the "
                        "history (the items a history-excluding recommender can hit)",
        },
        "data": data,
        "training": {k: v for k, v in rep.to_dict().items() if k != "history"} | {"seconds": t_train},
        "eval_seconds": t_eval,
        "config": mcfg.to_dict(),
    }
    return NextItemRecommender(model, vocab), info


# ============================================================================== train_all
def _new_version(registry: ModelRegistry, wanted: str | None) -> str:
    base = wanted or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    version, n = base, 1
    while any(registry.version_dir(m, version).exists() for m in (CLASSIFIER_MODEL, NEXTITEM_MODEL)):
        if wanted:
            raise ValueError(f"version {wanted!r} already exists in {registry.root}; versions are immutable")
        n += 1
        version = f"{base}-{n}"
    return version


def train_all(events: Iterable[Event], out_registry_root: str | Path | None = None,
              config: TrainingConfig | None = None, spec: FeatureSpec | None = None) -> TrainingResult:
    """Replay, label, split by time, train, evaluate against baselines, save and promote.

    Args:
        events: the log (any order; replay sorts by event time). Only ``features.events.Event``.
        out_registry_root: registry root (``None``: ``$SHOPPULSE_MODELS_DIR`` or ``artifacts/models``).
        config: :class:`TrainingConfig` (default: full size); :meth:`TrainingConfig.quick` for the demo.
        spec: the feature spec (default: :data:`features.spec.DEFAULT_FEATURE_SPEC`, read now).
    """
    cfg = config or TrainingConfig()
    spec = spec or DEFAULT_FEATURE_SPEC
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    ex = build_examples(events, cfg.labels, cfg.state, spec, cfg.observed_until_ms, cfg.progress)
    timings["replay_and_labels"] = time.perf_counter() - t0
    split = make_time_split(ex.observed_from_ms, ex.observed_until_ms, cfg.labels.horizons(), cfg.eval_fraction,
                            cfg.valid_fraction, cfg.warmup_ms)

    t0 = time.perf_counter()
    mlp, cls_info = fit_and_evaluate_classifiers(ex, split, cfg, spec)
    timings["classifiers"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    recommender, ni_info = fit_and_evaluate_nextitem(ex.applied, split.split_ms, cfg)
    timings["nextitem"] = time.perf_counter() - t0

    registry = ModelRegistry(out_registry_root)
    version = _new_version(registry, cfg.version)
    classifier = ShopperClassifier(mlp, spec.hash, version)
    training_data = {
        "source": cfg.source, "events": ex.counts["events"], "applied_events": ex.counts["applied_events"],
        "duplicates": ex.counts["duplicates"], "shoppers": ex.counts["shoppers"],
        "observed_from": split.to_dict()["start"], "observed_until": split.to_dict()["end"],
        "moments": ex.counts["moments"], "labels": ex.counts["labels"], "split": split.to_dict(),
        "label_definitions": cfg.labels.describe(), "state_config": asdict(cfg.state),
    }
    cls_metrics = {task: {m: {k: v for k, v in d.items() if k != "by_moment"} for m, d in per.items()}
                   for task, per in cls_info["metrics"].items()}
    t0 = time.perf_counter()
    cls_dir = classifier.save(
        registry.version_dir(CLASSIFIER_MODEL, version), version, metrics=_json_safe(cls_metrics),
        training_data=_json_safe(training_data | {"rows": cls_info["rows"]}),
        extra=_json_safe({"labels": cfg.labels.to_dict(), "feature_names": list(spec.names),
                          "comparison": {t: {b: {k: v for k, v in d.items()} for b, d in c["baselines"].items()}
                                         for t, c in cls_info["comparison"].items()},
                          "training": cls_info["mlp_training"], "seed": cfg.seed}))
    ni_metrics = {p: {m: {k: v for k, v in r.items() if k != "by_target_kind"} for m, r in per.items()}
                  for p, per in ni_info["metrics"].items()}
    recommender.version = version
    ni_dir = recommender.save(
        registry.version_dir(NEXTITEM_MODEL, version), version, metrics=_json_safe(ni_metrics),
        training_data=_json_safe(training_data | {"nextitem": ni_info["data"]}),
        extra=_json_safe({"feature_spec_hash": spec.hash, "history_source": "ShopperState.recent_items()",
                          "history_len": cfg.state.history_len, "interaction_weights": {
                              "view": cfg.labels.view_weight, "cart": cfg.labels.cart_weight,
                              "order": cfg.labels.order_weight},
                          "training": ni_info["training"], "seed": cfg.seed}))
    if cfg.promote:
        registry.promote(CLASSIFIER_MODEL, version)
        registry.promote(NEXTITEM_MODEL, version)
    timings["save"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all

    report = _json_safe({
        "version": version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "feature_spec_hash": spec.hash,
        "device": str(resolve_device(cfg.device)),
        "torch_threads": torch.get_num_threads(),
        "config": cfg.to_dict(),
        "data": training_data,
        "censoring": {task: {"censored_rows": ex.counts["labels"][task]["censored"],
                             "note": f"moments after the log's end minus the {task} horizon have no {task} label "
                                     "and were dropped"} for task in TASKS},
        "classifiers": cls_info,
        "nextitem": ni_info,
        "artifacts": {CLASSIFIER_MODEL: str(cls_dir), NEXTITEM_MODEL: str(ni_dir)},
        "registry": str(registry.root),
        "promoted": cfg.promote,
        "timings": timings,
    })
    return TrainingResult(version, {CLASSIFIER_MODEL: Path(cls_dir), NEXTITEM_MODEL: Path(ni_dir)}, cfg.promote,
                          report, classifier, recommender, timings)


def models_ready(registry_root: str | Path | None = None, spec: FeatureSpec | None = None) -> bool:
    """True when both models have a current version and the classifier was trained on ``spec``
    (default: :data:`features.spec.DEFAULT_FEATURE_SPEC` as it is now); ``make demo`` trains
    quick models first when this is False."""
    from .artifacts import ArtifactError
    from .registry import RegistryError

    spec = spec or DEFAULT_FEATURE_SPEC
    registry = ModelRegistry(registry_root)
    try:
        if registry.current(NEXTITEM_MODEL) is None or registry.current(CLASSIFIER_MODEL) is None:
            return False
        meta = registry.describe(CLASSIFIER_MODEL, registry.current(CLASSIFIER_MODEL))  # type: ignore[arg-type]
    except (RegistryError, ArtifactError):
        return False
    return meta.get("feature_spec_hash") == spec.hash


__all__ = (
    "TrainingConfig", "TrainingResult", "ExampleSet", "TimeSplit", "train_all", "build_examples", "make_time_split",
    "fit_and_evaluate_classifiers", "fit_and_evaluate_nextitem", "train_logistic_regression",
    "rule_scores", "PlattRule", "binary_metrics", "bootstrap_deltas", "reliability_bins", "RankedScores",
    "CLASSIFIER_MODEL", "NEXTITEM_MODEL", "models_ready",
)
