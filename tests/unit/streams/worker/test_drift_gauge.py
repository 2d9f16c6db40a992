"""shoppulse_live_feature_psi: the pipeline's scored rows against the served classifier's training bins."""

from __future__ import annotations

import logging

import numpy as np
import torch

from features.events import DEFAULT_LIMITS, Event, encode_event
from features.spec import DEFAULT_FEATURE_SPEC
from features.state import StateConfig
from models.classifiers import ClassifierConfig, MultiTaskMLP, ShopperClassifier
from models.drift import FeatureDistribution, population_stability_index
from models.names import CLASSIFIER_MODEL
from models.registry import ModelRegistry
from models.scoring import BatchScorer
from streams.worker.drift import DriftGauge
from streams.worker.metrics import WorkerMetrics
from streams.worker.pipeline import BatchProcessor, InputMessage

NOW_MS = 1_760_000_000_000
TOPICS = {"views": "page_view", "cart": "cart", "orders": "order"}
NAMES = DEFAULT_FEATURE_SPEC.names


def publish(registry: ModelRegistry, version: str, distribution: FeatureDistribution | None) -> None:
    torch.manual_seed(0)
    model = MultiTaskMLP(ClassifierConfig(input_dim=DEFAULT_FEATURE_SPEC.dim))
    classifier = ShopperClassifier(model, DEFAULT_FEATURE_SPEC.hash, training_distribution=distribution)
    classifier.save(registry.version_dir(CLASSIFIER_MODEL, version), version)
    registry.promote(CLASSIFIER_MODEL, version)


def batch(first_user: int, users: int, offset: int) -> list[InputMessage]:
    """One page view each for ``users`` shoppers, some of whom viewed before (varied feature rows)."""
    messages = []
    for n, u in enumerate(range(first_user, first_user + users)):
        user = f"u{u % 37}"
        ts_ms = NOW_MS - 1000 * (users - n)
        event = Event("view", f"{user}-{offset + n}", user, ts_ms, "s", f"i{n % 7}", "toys", 9.5, 1)
        messages.append(InputMessage("views", 0, offset + n, user.encode(), encode_event(event)))
    return messages


def psi_samples(metrics: WorkerMetrics, version: str) -> list[float | None]:
    return [
        metrics.registry.get_sample_value(
            "shoppulse_live_feature_psi", {"model": CLASSIFIER_MODEL, "version": version, "feature": name}
        )
        for name in NAMES
    ]


def psi_series(metrics: WorkerMetrics) -> list[object]:
    return [s for m in metrics.registry.collect() if m.name == "shoppulse_live_feature_psi" for s in m.samples]


def test_gauge_equals_the_psi_of_the_scored_rows_and_follows_the_served_classifier(tmp_path, caplog):
    rng = np.random.default_rng(0)
    reference = FeatureDistribution.fit(
        np.log1p(rng.poisson(1.5, (5_000, DEFAULT_FEATURE_SPEC.dim))).astype(np.float32), NAMES
    )
    registry = ModelRegistry(tmp_path / "registry")
    publish(registry, "v1", reference)
    scorer = BatchScorer(DEFAULT_FEATURE_SPEC, registry.root, device="cpu", reload_interval_s=0.0)
    metrics = WorkerMetrics()
    clock = [100.0]
    gauge = DriftGauge(
        scorer, metrics.feature_psi, window_s=60.0, min_rows=50, export_interval_s=0.0, clock=lambda: clock[0]
    )
    scored: list[np.ndarray] = []

    def watch(features: np.ndarray) -> None:
        scored.append(features.copy())
        gauge.observe(features)

    processor = BatchProcessor(
        TOPICS, StateConfig(), DEFAULT_FEATURE_SPEC, scorer, DEFAULT_LIMITS, metrics, feature_watch=watch
    )
    store: dict[bytes, bytes] = {}

    def run(messages: list[InputMessage]) -> None:
        outcome = processor.process(messages, lambda partition, key: store.get(key), now_ms=NOW_MS)
        for write in outcome.writes:
            if write.value is None:  # a deletion
                store.pop(write.key, None)
            else:
                store[write.key] = write.value

    run(batch(0, 30, 0))  # 30 shoppers scored: below min_rows, nothing exported
    assert psi_samples(metrics, "v1") == [None] * len(NAMES)

    offset = 30
    for step in range(4):
        clock[0] += 7.0
        run(batch(step * 11, 30, offset))
        offset += 30
    rows = np.concatenate(scored)
    assert len(rows) >= 50
    expected = population_stability_index(reference.shares, reference.bin_counts(rows))
    assert psi_samples(metrics, "v1") == [float(v) for v in expected]  # exactly the offline PSI of those rows
    assert max(expected) > 0.2  # the hand-made traffic looks nothing like the random reference
    silent = processor.rescore_silent([(0, key, value) for key, value in store.items()], NOW_MS + 2 * 86_400_000)
    assert silent.scored and sum(len(r) for r in scored) == len(rows)  # sweep re-scores are not drift rows
    assert psi_samples(metrics, "v1") == [float(v) for v in expected]

    clock[0] += 70.0  # the window emptied; one small batch is too few rows to claim anything
    run(batch(0, 5, offset))
    assert psi_samples(metrics, "v1") == [None] * len(NAMES)

    for _ in range(2):
        run(batch(0, 30, offset))
        offset += 30
    assert None not in psi_samples(metrics, "v1")

    publish(registry, "v2", None)  # an artifact written before training distributions existed
    with caplog.at_level(logging.INFO, logger="streams.worker.drift"):
        for _ in range(3):
            run(batch(0, 30, offset))
            offset += 30
    assert scorer.classifier is not None and scorer.classifier.version == "v2"
    assert "v2 has no training distribution" in caplog.text
    assert psi_samples(metrics, "v2") == [None] * len(NAMES)
    assert not psi_series(metrics)  # v1's series went with v1


def test_heuristic_serving_exports_no_drift(tmp_path):
    metrics = WorkerMetrics()
    scorer = BatchScorer(DEFAULT_FEATURE_SPEC, tmp_path / "empty", device="cpu")
    gauge = DriftGauge(scorer, metrics.feature_psi, window_s=60.0, min_rows=1, export_interval_s=0.0)
    gauge.observe(np.zeros((10, DEFAULT_FEATURE_SPEC.dim), dtype=np.float32))
    assert not psi_series(metrics)
