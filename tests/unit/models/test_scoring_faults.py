"""A promoted model that loads but cannot score is refused; the last good model keeps serving."""

from __future__ import annotations

import numpy as np

from features.spec import DEFAULT_FEATURE_SPEC
from features.state import ShopperState
from models.classifiers import ClassifierConfig, MultiTaskMLP, ShopperClassifier
from models.names import CLASSIFIER_MODEL
from models.registry import ModelRegistry
from models.scoring import CHURN, PURCHASE, BatchScorer

NOW_MS = 1_760_000_000_000


def promote_classifier(registry: ModelRegistry, version: str, input_dim: int) -> None:
    model = ShopperClassifier(MultiTaskMLP(ClassifierConfig(input_dim=input_dim)), DEFAULT_FEATURE_SPEC.hash)
    model.save(registry.version_dir(CLASSIFIER_MODEL, version), version)
    registry.promote(CLASSIFIER_MODEL, version)


def test_a_model_that_raises_at_inference_is_refused_and_the_last_good_one_serves(tmp_path):
    """Seen in the worker before: such a model crashed the scoring agent on every batch while
    /readyz still said ready and nothing was published."""
    registry = ModelRegistry(tmp_path)
    promote_classifier(registry, "v1", DEFAULT_FEATURE_SPEC.dim)
    scorer = BatchScorer(DEFAULT_FEATURE_SPEC, tmp_path)
    promote_classifier(registry, "v2", DEFAULT_FEATURE_SPEC.dim + 1)  # right spec hash, wrong input width
    assert scorer.refresh(force=True) is False
    assert scorer.load_errors == 1 and scorer.served == {CLASSIFIER_MODEL: "v1"}, scorer.served
    states = [ShopperState.new("u1")]
    scores = scorer.score(states, DEFAULT_FEATURE_SPEC.matrix(states, np.array([NOW_MS], dtype=np.int64)))
    assert set(scores[0].scores) == {CHURN, PURCHASE}
