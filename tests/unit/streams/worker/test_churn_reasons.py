"""Churn-alert reasons are a property of the shopper and the model, not of the process that scored them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from features.events import DEFAULT_LIMITS
from features.spec import DEFAULT_FEATURE_SPEC
from features.state import StateConfig
from models.classifiers import ClassifierConfig, MultiTaskMLP, ShopperClassifier
from models.names import CLASSIFIER_MODEL
from models.registry import ModelRegistry
from models.scoring import BatchScorer
from streams.worker.alerts import AlertPolicy
from streams.worker.metrics import WorkerMetrics
from streams.worker.pipeline import BatchProcessor
from tests.unit.streams.worker.test_pipeline import NOW_MS, TOPICS, message, view

#: Every scored shopper alerts: the test is about the reasons, not the thresholds.
ALWAYS_ALERT = AlertPolicy(high=0.01, low=0.0)


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    """A classifier whose training distribution (its standardisation buffers) is far from zero."""
    torch.manual_seed(7)
    model = MultiTaskMLP(ClassifierConfig(input_dim=DEFAULT_FEATURE_SPEC.dim))
    rng = np.random.default_rng(7)
    feat_mean, feat_std = model.feat_mean, model.feat_std  # buffers: typed Tensor | Module by nn.Module
    assert isinstance(feat_mean, torch.Tensor) and isinstance(feat_std, torch.Tensor)
    feat_mean.copy_(torch.as_tensor(rng.uniform(1.0, 5.0, DEFAULT_FEATURE_SPEC.dim), dtype=torch.float32))
    feat_std.copy_(torch.as_tensor(rng.uniform(0.5, 2.0, DEFAULT_FEATURE_SPEC.dim), dtype=torch.float32))
    registry = ModelRegistry(tmp_path)
    ShopperClassifier(model, DEFAULT_FEATURE_SPEC.hash).save(registry.version_dir(CLASSIFIER_MODEL, "v1"), "v1")
    registry.promote(CLASSIFIER_MODEL, "v1")
    return registry


def worker(registry: ModelRegistry) -> BatchProcessor:
    """What one worker process builds: its own scorer over the shared registry."""
    return BatchProcessor(
        TOPICS,
        StateConfig(),
        DEFAULT_FEATURE_SPEC,
        BatchScorer(DEFAULT_FEATURE_SPEC, registry.root),
        DEFAULT_LIMITS,
        WorkerMetrics(),
        alert_policy=ALWAYS_ALERT,
    )


def alert_reasons(processor: BatchProcessor, user: str) -> list[dict]:
    """The reasons of the alert that ``user``'s three views fire on a fresh state."""
    events = [view(user, n, NOW_MS - 60_000 + n * 1000) for n in range(3)]
    outcome = processor.process(
        [message(e, i) for i, e in enumerate(events)], lambda partition, key: None, now_ms=NOW_MS
    )
    (scored,) = outcome.scored
    assert scored.alert is not None
    return json.loads(scored.alert)["reasons"]


def test_reasons_do_not_depend_on_the_worker_or_what_it_scored_before(registry):
    busy = worker(registry)
    # A long-running worker has scored many other shoppers (the old running-mean reference drifted with them).
    others = [view(f"other-{n}", n, NOW_MS - 3_600_000 + n) for n in range(500)]
    busy.process([message(e, i) for i, e in enumerate(others)], lambda partition, key: None, now_ms=NOW_MS)
    on_the_busy_worker = alert_reasons(busy, "u1")
    on_another_worker = alert_reasons(worker(registry), "u1")  # a second replica
    after_a_restart = alert_reasons(worker(registry), "u1")  # a freshly started process
    assert on_the_busy_worker, "the test needs a shopper whose alert has reasons"
    assert on_the_busy_worker == on_another_worker == after_a_restart


def test_the_reference_is_the_training_mean_the_artifact_holds(registry):
    scorer = BatchScorer(DEFAULT_FEATURE_SPEC, registry.root)
    assert scorer.classifier is not None
    feat_mean = scorer.classifier.model.feat_mean
    assert isinstance(feat_mean, torch.Tensor)
    trained_mean = feat_mean.numpy()
    np.testing.assert_array_equal(scorer.classifier.reference_features, trained_mean)
    # A shopper who *is* the training mean has nothing that raises the risk above it.
    assert scorer.churn_reasons(trained_mean[None, :].astype(np.float32)) == [[]]
    # One feature moved from the mean, in the direction that raises the risk: it alone is the reason,
    # with exactly the risk it adds over the typical shopper.
    at_mean = scorer.classifier.predict_proba(trained_mean[None, :])["churn"][0]
    moved = np.repeat(trained_mean[None, :], 2, axis=0)
    moved[:, 0] += [10.0, -10.0]
    risks = scorer.classifier.predict_proba(moved)["churn"]
    riskier = int(np.argmax(risks))
    assert risks[riskier] > at_mean
    assert scorer.churn_reasons(moved[riskier : riskier + 1]) == [
        [(DEFAULT_FEATURE_SPEC.names[0], round(float(risks[riskier] - at_mean), 4))]
    ]


def test_alert_reasons_are_counted_by_feature(registry):
    processor = worker(registry)
    reasons = alert_reasons(processor, "u1")
    counted = {
        sample.labels["feature"]: sample.value
        for metric in processor.metrics.alert_reasons.collect()
        for sample in metric.samples
        if sample.name == "shoppulse_churn_alert_reasons_total"
    }
    assert counted == {reason["feature"]: 1.0 for reason in reasons}
