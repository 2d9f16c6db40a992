"""What :func:`models.training.train_all` needs besides the events: :class:`TrainingConfig`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from features.state import DAY_MS, StateConfig

from ..labels import LabelConfig


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
    def quick(cls, **overrides: Any) -> TrainingConfig:
        """Demo size: seconds on one CPU thread for ~2k shoppers x 28 days.

        Uses a 7-day churn horizon: with a 28-day log a 14-day horizon leaves no leakage-free
        training window (training needs ``t + 14 d <= S``, evaluation ``S <= t <= end - 14 d``).
        """
        base = cls(
            labels=LabelConfig(churn_horizon_ms=7 * DAY_MS),
            warmup_ms=3 * DAY_MS,
            hidden=(32, 16),
            epochs=40,
            patience=4,
            batch_size=1024,
            lr=3e-3,
            bootstrap=100,
            nextitem_dim=32,
            nextitem_layers=1,
            nextitem_heads=1,
            nextitem_max_len=20,
            nextitem_dropout=0.3,
            nextitem_epochs=6,
            nextitem_patience=2,
            nextitem_batch_size=256,
            nextitem_lr=5e-3,
            nextitem_recent_only=True,
        )
        return replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d
