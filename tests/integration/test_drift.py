"""A running worker exports shoppulse_live_feature_psi for the classifier it serves, and drops it with that version."""

from __future__ import annotations

import math
import re
import time

import numpy as np
import pytest

from features.offline import replay
from features.spec import DEFAULT_FEATURE_SPEC
from features.state import APPLIED
from models.drift import FeatureDistribution
from models.names import CLASSIFIER_MODEL
from models.registry import ModelRegistry
from streams.kafka.clients import ensure_topics
from streams.kafka.producer import produce
from streams.sim.generator import GeneratorConfig, ShopSimulator
from tests.unit.streams.worker.test_drift_gauge import publish

from .kafka_helpers import WorkerProcess, isolated_settings
from .test_worker import newest_ts, scored_until, valid_events

pytestmark = pytest.mark.integration

_PSI = re.compile(r'^shoppulse_live_feature_psi\{feature="(\w+)",model="([\w-]+)",version="(\w+)"\} (\S+)$', re.M)


def psi_series(worker: WorkerProcess) -> dict[tuple[str, str], float]:
    """(version, feature) -> PSI, as /metrics shows it."""
    return {(v, f): float(x) for f, m, v, x in _PSI.findall(worker.metrics_text()) if m == CLASSIFIER_MODEL}


def test_worker_exports_feature_psi_of_the_served_classifier(broker, tmp_path):
    simulator = ShopSimulator(GeneratorConfig(seed=5, n_shoppers=150, n_items=200, clock="live"))
    stream = simulator.messages()
    first = [next(stream) for _ in range(1200)]
    rows = [row for _, outcome, row in replay(valid_events(first)) if outcome == APPLIED]
    registry = ModelRegistry(tmp_path / "registry")
    publish(registry, "v1", FeatureDistribution.fit(np.asarray(rows), DEFAULT_FEATURE_SPEC.names))
    settings = isolated_settings(
        broker.bootstrap_servers, tmp_path / "worker", models_dir=registry.root, drift_min_rows=100
    )
    ensure_topics(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        produce(first, settings.topic_by_kind, settings.librdkafka_config())
        scored_until(settings, newest_ts(valid_events(first)))

        def feed_until(done, timeout_s: float = 40.0) -> None:
            """Keep traffic flowing (the gauge is updated when a batch comes, at most every 5 s)."""
            deadline = time.monotonic() + timeout_s
            while not done() and time.monotonic() < deadline:
                produce([next(stream) for _ in range(30)], settings.topic_by_kind, settings.librdkafka_config())
                time.sleep(0.5)

        feed_until(lambda: len(psi_series(worker)) == DEFAULT_FEATURE_SPEC.dim)
        exported = psi_series(worker)
        assert {f for _, f in exported} == set(DEFAULT_FEATURE_SPEC.names) and {v for v, _ in exported} == {"v1"}
        assert all(math.isfinite(x) and x >= 0 for x in exported.values())

        publish(registry, "v2", None)  # saved without a training distribution: no drift, and v1's series go
        feed_until(lambda: worker.metric('shoppulse_model_info{model="shopper-classifier",version="v2"}') == 1)
        feed_until(lambda: not psi_series(worker), timeout_s=10.0)
        assert worker.metric('shoppulse_model_info{model="shopper-classifier",version="v2"}') == 1
        assert psi_series(worker) == {}
    finally:
        assert worker.stop() == 0, worker.log_tail()
