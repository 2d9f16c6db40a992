"""The whole job: :func:`train_all` (replay, label, split, train, choose on validation, evaluate,
save the chosen models, promote)."""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from features.events import Event
from features.spec import DEFAULT_FEATURE_SPEC, FeatureSpec

from ..artifacts import ArtifactError, is_legacy
from ..classifiers import ShopperClassifier
from ..drift import FeatureDistribution
from ..labels import TASKS
from ..names import CLASSIFIER_MODEL, NEXTITEM_MODEL
from ..nextitem import VocabRecommender, resolve_device
from ..registry import ModelRegistry, RegistryError
from .config import TrainingConfig
from .examples import ExampleSet, build_examples
from .fit_classifiers import fit_and_evaluate_classifiers
from .fit_nextitem import fit_and_evaluate_nextitem
from .split import TimeSplit, make_time_split


@dataclass
class TrainingResult:
    """What :func:`train_all` produced.

    Attributes:
        version: the version both models were saved under.
        artifacts: registry model name -> artifact directory.
        promoted: whether both were promoted to ``current``.
        report: JSON-ready evaluation (what :func:`models.report.write_report` renders).
        classifier / recommender: the models chosen on validation and registered, ready to score
            (the MLP or the logistic regression; SASRec, co-occurrence or their blend).
        timings: seconds per stage.
        report_paths: the written report's files by kind (set by whoever writes it).
        examples / split: the labelled rows and the time split the models were judged on
            (``shoppulse retrain`` scores the champion on the same evaluation rows).
    """

    version: str
    artifacts: dict[str, Path]
    promoted: bool
    report: dict[str, Any]
    classifier: ShopperClassifier
    recommender: VocabRecommender
    timings: dict[str, float]
    report_paths: dict[str, Path] = field(default_factory=dict)
    examples: ExampleSet | None = None
    split: TimeSplit | None = None

    @property
    def beats_baselines(self) -> bool:
        """True when the MLP beats every baseline on ROC-AUC, PR-AUC and log loss for both tasks."""
        return all(c["beats_all"] for c in self.report["classifiers"]["comparison"].values())

    @property
    def served(self) -> dict[str, str]:
        """Registry model name -> the candidate registered under it (chosen on validation)."""
        return {
            CLASSIFIER_MODEL: self.report["classifiers"]["selection"]["served"],
            NEXTITEM_MODEL: self.report["nextitem"]["selection"]["served"],
        }


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


def _new_version(registry: ModelRegistry, wanted: str | None) -> str:
    base = wanted or dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    version, n = base, 1
    while any(registry.version_dir(m, version).exists() for m in (CLASSIFIER_MODEL, NEXTITEM_MODEL)):
        if wanted:
            raise ValueError(f"version {wanted!r} already exists in {registry.root}; versions are immutable")
        n += 1
        version = f"{base}-{n}"
    return version


def train_all(
    events: Iterable[Event],
    out_registry_root: str | Path | None = None,
    config: TrainingConfig | None = None,
    spec: FeatureSpec | None = None,
) -> TrainingResult:
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
    split = make_time_split(
        ex.observed_from_ms,
        ex.observed_until_ms,
        cfg.labels.horizons(),
        cfg.eval_fraction,
        cfg.valid_fraction,
        cfg.warmup_ms,
    )

    t0 = time.perf_counter()
    served_classifier, cls_info = fit_and_evaluate_classifiers(ex, split, cfg, spec)
    timings["classifiers"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    recommender, ni_info = fit_and_evaluate_nextitem(ex.applied, split.split_ms, cfg)
    timings["nextitem"] = time.perf_counter() - t0

    registry = ModelRegistry(out_registry_root)
    version = _new_version(registry, cfg.version)
    # the training distribution goes into the artifact (the worker's drift reference), not the report
    classifier = ShopperClassifier(
        served_classifier,
        spec.hash,
        version,
        training_distribution=FeatureDistribution.from_dict(cls_info.pop("training_distribution")),
    )
    training_data = {
        "source": cfg.source,
        "events": ex.counts["events"],
        "late_events": ex.counts["late_events"],
        "applied_events": ex.counts["applied_events"],
        "duplicates": ex.counts["duplicates"],
        "shoppers": ex.counts["shoppers"],
        "observed_from": split.to_dict()["start"],
        "observed_until": split.to_dict()["end"],
        "moments": ex.counts["moments"],
        "labels": ex.counts["labels"],
        "split": split.to_dict(),
        "label_definitions": cfg.labels.describe(),
        "state_config": asdict(cfg.state),
    }
    cls_metrics = {
        task: {m: {k: v for k, v in d.items() if k != "by_moment"} for m, d in per.items()}
        for task, per in cls_info["metrics"].items()
    }
    cls_selection = cls_info["selection"]
    t0 = time.perf_counter()
    cls_dir = classifier.save(
        registry.version_dir(CLASSIFIER_MODEL, version),
        version,
        metrics=_json_safe(cls_metrics),
        training_data=_json_safe(training_data | {"rows": cls_info["rows"]}),
        extra=_json_safe(
            {
                "labels": cfg.labels.to_dict(),
                "feature_names": list(spec.names),
                "comparison": {
                    t: {b: {k: v for k, v in d.items()} for b, d in c["baselines"].items()}
                    for t, c in cls_info["comparison"].items()
                },
                "served": cls_selection["served"],
                "selection": cls_selection,
                "training": cls_info[f"{'mlp' if cls_selection['served'] == 'mlp' else 'logreg'}_training"],
                "seed": cfg.seed,
            }
        ),
    )
    ni_metrics = {
        p: {m: {k: v for k, v in r.items() if k != "by_target_kind"} for m, r in per.items()}
        for p, per in ni_info["metrics"].items()
    }
    recommender.version = version
    ni_dir = recommender.save(
        registry.version_dir(NEXTITEM_MODEL, version),
        version,
        metrics=_json_safe(ni_metrics),
        training_data=_json_safe(training_data | {"nextitem": ni_info["data"]}),
        extra=_json_safe(
            {
                "feature_spec_hash": spec.hash,
                "history_source": "ShopperState.recent_items()",
                "history_len": cfg.state.history_len,
                "interaction_weights": {
                    "view": cfg.labels.view_weight,
                    "cart": cfg.labels.cart_weight,
                    "order": cfg.labels.order_weight,
                },
                "served": ni_info["selection"]["served"],
                "selection": ni_info["selection"],
                "training": ni_info["training"],
                "seed": cfg.seed,
            }
        ),
    )
    if cfg.promote:
        registry.promote(CLASSIFIER_MODEL, version)
        registry.promote(NEXTITEM_MODEL, version)
    timings["save"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all

    report = _json_safe(
        {
            "version": version,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "feature_spec_hash": spec.hash,
            "device": str(resolve_device(cfg.device)),
            "torch_threads": torch.get_num_threads(),
            "config": cfg.to_dict(),
            "data": training_data,
            "censoring": {
                task: {
                    "censored_rows": ex.counts["labels"][task]["censored"],
                    "note": f"moments after the log's end minus the {task} horizon have no {task} label "
                    "and were dropped",
                }
                for task in TASKS
            },
            "classifiers": cls_info,
            "nextitem": ni_info,
            "artifacts": {CLASSIFIER_MODEL: str(cls_dir), NEXTITEM_MODEL: str(ni_dir)},
            "registry": str(registry.root),
            "promoted": cfg.promote,
            "timings": timings,
        }
    )
    return TrainingResult(
        version,
        {CLASSIFIER_MODEL: Path(cls_dir), NEXTITEM_MODEL: Path(ni_dir)},
        cfg.promote,
        report,
        classifier,
        recommender,
        timings,
        examples=ex,
        split=split,
    )


def models_ready(registry_root: str | Path | None = None, spec: FeatureSpec | None = None) -> bool:
    """True when both models have a current version that serving can load (safetensors format)
    and the classifier was trained on ``spec`` (default: :data:`features.spec.DEFAULT_FEATURE_SPEC`
    as it is now); ``make demo`` trains quick models first when this is False."""
    spec = spec or DEFAULT_FEATURE_SPEC
    registry = ModelRegistry(registry_root)
    try:
        metas = {}
        for model in (CLASSIFIER_MODEL, NEXTITEM_MODEL):
            version = registry.current(model)
            if version is None:
                return False
            metas[model] = registry.describe(model, version)
    except (RegistryError, ArtifactError):
        return False
    return (
        not any(is_legacy(m) for m in metas.values()) and metas[CLASSIFIER_MODEL].get("feature_spec_hash") == spec.hash
    )
