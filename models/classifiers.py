"""Churn and purchase-propensity classifiers: one MLP, a shared trunk and one head per task.

Input: the ``float32`` feature matrix a :class:`features.spec.FeatureSpec` produces (this module
only needs its width and hash, it does not import ``features``). Labels: a ``[N, n_tasks]``
float matrix of 0/1 with ``NaN`` where a task has no label for that row (masked out of the
loss and the metrics).

* :class:`MultiTaskMLP`: input standardisation (mean/std of the training rows, stored as
  buffers) → ``hidden`` Linear-GELU-Dropout layers (shared trunk) → one logit per task;
  per-task calibration ``sigmoid(a * logit + b)`` also stored as buffers.
* :func:`train_classifier`: AdamW, masked BCE, early stopping on the validation log loss
  (mean over tasks), best weights restored, then calibration on the validation rows:
  ``"temperature"`` (``a = 1/T``, ``b = 0``) or ``"platt"`` (``a``, ``b`` fitted).
* Metrics come from :mod:`models.binary_metrics` (written once, cross-checked against
  scikit-learn).
* :class:`ShopperClassifier`: model + feature-spec hash; ``predict_proba(X)`` on any device;
  artifacts record the feature-spec hash and loading refuses another one, and the training
  rows' distribution per feature (:mod:`models.drift`) that the worker's drift gauge compares to.

Calibration re-uses the early-stopping validation rows (no third split), which is the usual
compromise on small data; pass a separate calibration set to :func:`calibrate` to avoid it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .binary_metrics import classification_metrics
from .drift import FeatureDistribution
from .nextitem import resolve_device, seed_everything, to_device

log = logging.getLogger(__name__)

MODEL_KIND = "shopper-classifier-mlp"
#: ``metadata.json`` ``extra`` entry holding :meth:`FeatureDistribution.to_dict`.
TRAINING_DISTRIBUTION_KEY = "training_distribution"
DEFAULT_TASKS = ("churn", "purchase")


@dataclass
class ClassifierConfig:
    input_dim: int
    tasks: tuple[str, ...] = DEFAULT_TASKS
    hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"], d["hidden"] = list(self.tasks), list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClassifierConfig:
        return cls(
            input_dim=int(d["input_dim"]),
            tasks=tuple(d["tasks"]),
            hidden=tuple(int(h) for h in d["hidden"]),
            dropout=float(d["dropout"]),
        )


@dataclass
class ClassifierTrainConfig:
    epochs: int = 100
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 10
    seed: int = 0
    device: str = "auto"
    calibration: str = "temperature"  # "temperature" | "platt" | "none"
    progress: bool = True


@dataclass
class ClassifierReport:
    best_epoch: int = 0
    best_valid_loss: float = float("inf")
    epochs_run: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    device: str = "cpu"
    history: list[dict[str, float]] = field(default_factory=list)
    valid_metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MultiTaskMLP(nn.Module):
    # buffers registered in __init__ (declared so that attribute access is typed as a Tensor)
    feat_mean: torch.Tensor
    feat_std: torch.Tensor
    calib_a: torch.Tensor
    calib_b: torch.Tensor

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        width = cfg.input_dim
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = h
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.Linear(width, len(cfg.tasks))  # one logit per task
        self.register_buffer("feat_mean", torch.zeros(cfg.input_dim))
        self.register_buffer("feat_std", torch.ones(cfg.input_dim))
        self.register_buffer("calib_a", torch.ones(len(cfg.tasks)))
        self.register_buffer("calib_b", torch.zeros(len(cfg.tasks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Uncalibrated logits ``[N, n_tasks]``."""
        x = (x - self.feat_mean) / self.feat_std
        return self.heads(self.trunk(x))

    def calibrated_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x) * self.calib_a + self.calib_b

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        was = self.training
        self.eval()
        try:
            return torch.sigmoid(self.calibrated_logits(x))
        finally:
            self.train(was)


# ------------------------------------------------------------------------------ calibration
def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """Temperature ``T`` minimising the log loss of ``sigmoid(logits / T)`` (labels 0/1, no NaN)."""
    z, y = logits.double().flatten(), labels.double().flatten()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def fit_platt(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> tuple[float, float]:
    """Platt scaling: ``(a, b)`` minimising the log loss of ``sigmoid(a * logit + b)``."""
    z, y = logits.double().flatten(), labels.double().flatten()
    ab = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([ab], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(ab[0] * z + ab[1], y)
        loss.backward()
        return loss

    opt.step(closure)
    a, b = ab.detach().tolist()
    return float(a), float(b)


@torch.no_grad()
def calibrate(
    model: MultiTaskMLP, x: torch.Tensor, y: torch.Tensor, method: str = "temperature"
) -> dict[str, dict[str, float]]:
    """Fit per-task calibration on ``(x, y)`` (NaN labels ignored) into the model's buffers."""
    if method not in ("temperature", "platt", "none"):
        raise ValueError(f"calibration must be 'temperature', 'platt' or 'none', not {method!r}")
    model.eval()
    logits = model(x.to(model.calib_a.device)).cpu()
    y = y.cpu()
    out: dict[str, dict[str, float]] = {}
    for t, task in enumerate(model.cfg.tasks):
        keep = ~torch.isnan(y[:, t])
        z, lab = logits[keep, t], y[keep, t]
        a, b = 1.0, 0.0
        if method != "none" and lab.numel() > 0 and 0 < float(lab.sum()) < lab.numel():
            with torch.enable_grad():
                if method == "temperature":
                    a = 1.0 / fit_temperature(z, lab)
                else:
                    a, b = fit_platt(z, lab)
        model.calib_a[t], model.calib_b[t] = a, b
        out[task] = {"a": a, "b": b}
    return out


# ------------------------------------------------------------------------------ training
def _masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mask = ~torch.isnan(y)
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[mask], y[mask])


def train_classifier(
    x_train: np.ndarray | torch.Tensor,
    y_train: np.ndarray | torch.Tensor,
    x_valid: np.ndarray | torch.Tensor,
    y_valid: np.ndarray | torch.Tensor,
    cfg: ClassifierConfig | None = None,
    tcfg: ClassifierTrainConfig | None = None,
) -> tuple[MultiTaskMLP, ClassifierReport]:
    """Train, early-stop on validation log loss, restore the best weights, calibrate."""
    xt = torch.as_tensor(np.asarray(x_train, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y_train, dtype=np.float32))
    xv = torch.as_tensor(np.asarray(x_valid, dtype=np.float32))
    yv = torch.as_tensor(np.asarray(y_valid, dtype=np.float32))
    if xt.ndim != 2 or yt.ndim != 2 or len(xt) != len(yt) or len(xv) != len(yv):
        raise ValueError("x must be [N, D] and y [N, n_tasks] with matching N")
    if not torch.isfinite(xt).all() or not torch.isfinite(xv).all():
        raise ValueError("feature matrix contains NaN/inf; the FeatureSpec should clip every feature")
    cfg = cfg or ClassifierConfig(input_dim=xt.shape[1])
    if cfg.input_dim != xt.shape[1] or len(cfg.tasks) != yt.shape[1]:
        raise ValueError(
            f"config expects {cfg.input_dim} features / {len(cfg.tasks)} tasks, data has {xt.shape[1]} / {yt.shape[1]}"
        )
    tc = tcfg or ClassifierTrainConfig()
    seed_everything(tc.seed)
    device = resolve_device(tc.device)
    model = MultiTaskMLP(cfg)
    model.feat_mean.copy_(xt.mean(0))
    model.feat_std.copy_(xt.std(0, unbiased=False).clamp_min(1e-6))
    model.to(device)
    xt, yt, xv_d, yv_d = xt.to(device), yt.to(device), xv.to(device), yv.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    report = ClassifierReport(device=str(device))
    best_state = None
    bad = 0
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(range(1, tc.epochs + 1), desc="epochs", disable=not tc.progress, dynamic_ncols=True)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(xt), generator=gen).to(device)
        total, steps = 0.0, 0
        for s in range(0, len(perm), tc.batch_size):
            idx = perm[s : s + tc.batch_size]
            loss = _masked_bce(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
        model.eval()
        with torch.no_grad():
            vlog = model(xv_d)
            vloss = float(np.mean([float(_masked_bce(vlog[:, t], yv_d[:, t])) for t in range(len(cfg.tasks))]))
        report.history.append({"epoch": float(epoch), "loss": total / max(steps, 1), "valid_loss": vloss})
        report.epochs_run = epoch
        if vloss < report.best_valid_loss - 1e-6:
            report.best_valid_loss, report.best_epoch, bad = vloss, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
        bar.set_postfix(loss=f"{total / max(steps, 1):.4f}", valid=f"{vloss:.4f}", best=f"{report.best_epoch}")
        if bad >= tc.patience:
            report.stopped_early = True
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    calibrate(model, xv_d, yv_d, tc.calibration)
    probs = model.predict_proba(xv_d).cpu().numpy()
    yvn = yv.numpy()
    report.valid_metrics = {task: classification_metrics(probs[:, t], yvn[:, t]) for t, task in enumerate(cfg.tasks)}
    report.train_seconds = time.perf_counter() - t0
    model.eval()
    return model, report


class ShopperClassifier:
    """A trained :class:`MultiTaskMLP` bound to the feature spec it was trained on.

    ``training_distribution``: the training rows' quantile bins per feature, or None for an
    artifact written before it was stored (drift is then not measured for it).
    """

    def __init__(
        self,
        model: MultiTaskMLP,
        feature_spec_hash: str | None,
        version: str | None = None,
        training_distribution: FeatureDistribution | None = None,
    ) -> None:
        self.model = model.eval()
        self.feature_spec_hash = feature_spec_hash
        self.version = version
        self.training_distribution = training_distribution

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.model.cfg.tasks

    @property
    def reference_features(self) -> np.ndarray:
        """The mean feature row of the training data (the input standardisation's ``feat_mean``):
        the "typical shopper" churn reasons compare a shopper to."""
        return self.model.feat_mean.detach().cpu().numpy()

    def to(self, device: str | torch.device | None) -> ShopperClassifier:
        self.model.to(resolve_device(device))
        return self

    def predict_proba(self, x: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """Calibrated probability per task for a ``float32 [N, D]`` feature matrix (one pass)."""
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
        if xt.ndim != 2 or xt.shape[1] != self.model.cfg.input_dim:
            raise ValueError(f"expected a [N, {self.model.cfg.input_dim}] feature matrix, got {tuple(xt.shape)}")
        p = self.model.predict_proba(to_device(xt, self.model.calib_a.device)).cpu().numpy()
        return {task: p[:, t] for t, task in enumerate(self.tasks)}

    def save(
        self,
        directory: str | Path,
        version: str,
        metrics: Mapping[str, Any] | None = None,
        training_data: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        from .artifacts import save_artifact

        self.version = version
        return save_artifact(
            directory,
            {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            kind=MODEL_KIND,
            version=version,
            config=self.model.cfg.to_dict(),
            feature_spec_hash=self.feature_spec_hash,
            metrics=dict(metrics or {}),
            training_data=dict(training_data or {}),
            extra=dict(extra or {})
            | ({TRAINING_DISTRIBUTION_KEY: self.training_distribution.to_dict()} if self.training_distribution else {}),
        )

    @classmethod
    def load(
        cls, directory: str | Path, expected_feature_spec_hash: str | None, device: str | torch.device | None = "cpu"
    ) -> ShopperClassifier:
        """Verify and load; refuses an artifact trained on another feature spec (``ArtifactError``)."""
        from .artifacts import ArtifactError, load_artifact

        art = load_artifact(directory, expected_kind=MODEL_KIND, expected_feature_spec_hash=expected_feature_spec_hash)
        try:
            model = MultiTaskMLP(ClassifierConfig.from_dict(art.metadata["config"]))
            model.load_state_dict(art.state_dict, strict=True)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise ArtifactError(
                f"artifact {directory} does not match the {MODEL_KIND} model code ({exc}); "
                "retrain the model or load it with the code version that wrote it"
            ) from exc
        version = art.metadata.get("version")
        return cls(
            model, art.metadata["feature_spec_hash"], version, _training_distribution(art.metadata, model.cfg, version)
        ).to(device)


def _training_distribution(
    metadata: Mapping[str, Any], cfg: ClassifierConfig, version: str | None
) -> FeatureDistribution | None:
    """The artifact's training distribution; None (one log line) when it has none or it does not fit
    the model: drift is an aid, a model without it still serves."""
    entry = (metadata.get("extra") or {}).get(TRAINING_DISTRIBUTION_KEY)
    if entry is None:
        log.info("classifier version %s stores no training distribution; its feature drift is not measured", version)
        return None
    try:
        distribution = FeatureDistribution.from_dict(entry)
    except ValueError as exc:
        log.warning("classifier version %s: %s; its feature drift is not measured", version, exc)
        return None
    if len(distribution.names) != cfg.input_dim:
        log.warning(
            "classifier version %s: training distribution has %d features, the model %d; its feature drift is "
            "not measured",
            version,
            len(distribution.names),
            cfg.input_dim,
        )
        return None
    return distribution


__all__: Sequence[str] = (
    "ClassifierConfig",
    "ClassifierTrainConfig",
    "ClassifierReport",
    "MultiTaskMLP",
    "ShopperClassifier",
    "train_classifier",
    "calibrate",
    "fit_temperature",
    "fit_platt",
    "MODEL_KIND",
    "DEFAULT_TASKS",
)
