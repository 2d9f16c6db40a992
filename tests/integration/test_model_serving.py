"""The worker serving real torch models: scores, recommendations and churn alerts on their topics,
alerts never repeated across a restart, hot reload of a promoted version, and a corrupt artifact
that leaves the last good model in place."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from features.spec import DEFAULT_FEATURE_SPEC
from models.artifacts import WEIGHTS_FILE
from models.classifiers import ClassifierConfig, MultiTaskMLP, ShopperClassifier
from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL
from models.nextitem import NextItemConfig, NextItemRecommender, SASRec
from models.registry import ModelRegistry
from models.scoring import CHURN, PURCHASE
from models.sequences import ItemVocab
from streams.config import Settings
from streams.kafka.broker import EmbeddedBroker
from streams.kafka.clients import ensure_topics
from streams.kafka.producer import produce
from streams.sim.generator import GeneratorConfig, ShopSimulator

from .kafka_helpers import WorkerProcess, isolated_settings, read_topic, value_of
from .test_worker import newest_ts, scored_until, valid_events

pytestmark = pytest.mark.integration


def publish_models(registry: ModelRegistry, version: str, items: list[str], seed: int) -> None:
    """Small untrained models with the real artifact format, registered and promoted."""
    torch.manual_seed(seed)
    classifier = ShopperClassifier(
        MultiTaskMLP(ClassifierConfig(input_dim=DEFAULT_FEATURE_SPEC.dim)), DEFAULT_FEATURE_SPEC.hash
    )
    classifier.save(registry.version_dir(CLASSIFIER_MODEL, version), version)
    vocab = ItemVocab(items)
    recommender = NextItemRecommender(
        SASRec(NextItemConfig(num_items=len(vocab), max_len=20, dim=16, layers=1, heads=1)), vocab
    )
    recommender.save(registry.version_dir(NEXTITEM_MODEL, version), version)
    registry.promote(CLASSIFIER_MODEL, version)
    registry.promote(NEXTITEM_MODEL, version)


def serving_models(
    broker: EmbeddedBroker, tmp_path: Path, simulator: ShopSimulator, item_events: int, seed: int, **overrides: Any
) -> tuple[Settings, ModelRegistry, list[str]]:
    """Settings (topics created) for a worker serving small untrained models, v1, over the items of
    the simulator's first ``item_events`` events; the registry and those items. Churn alert
    thresholds are so low that every scored shopper alerts once; the 7-day cooldown forbids a second."""
    registry = ModelRegistry(tmp_path / "registry")
    items = sorted({e.item_id for e in simulator.events(limit=item_events) if e.item_id})
    publish_models(registry, "v1", items, seed=seed)
    settings = isolated_settings(
        broker.bootstrap_servers,
        tmp_path / "worker",
        models_dir=registry.root,
        churn_alert_high=0.01,
        churn_alert_low=0.005,
        **overrides,
    )
    ensure_topics(settings)
    return settings, registry, items


def test_models_score_recommend_alert_and_reload(broker, tmp_path):
    simulator = ShopSimulator(GeneratorConfig(seed=21, n_shoppers=120, n_items=300, clock="live"))
    settings, registry, items = serving_models(broker, tmp_path, simulator, item_events=3000, seed=1)
    stream = simulator.messages()
    first, second = [next(stream) for _ in range(1500)], [next(stream) for _ in range(1500)]

    worker = WorkerProcess(settings, tmp_path / "worker-1.log")
    worker.wait_ready()
    produce(first, settings.topic_by_kind, settings.librdkafka_config())
    scored_until(settings, newest_ts(valid_events(first)))
    assert worker.metric('shoppulse_model_info{model="shopper-classifier",version="v1"}') == 1
    worker.kill()  # kill -9: alert states must come back from the changelog, not repeat

    worker = WorkerProcess(settings, tmp_path / "worker-2.log")
    try:
        worker.wait_ready()
        publish_models(registry, "v2", items, seed=2)  # hot reload, between batches
        broken = registry.version_dir(CLASSIFIER_MODEL, "v3")
        shutil.copytree(registry.version_dir(CLASSIFIER_MODEL, "v2"), broken)
        (broken / "metadata.json").write_text(
            json.dumps({**json.loads((broken / "metadata.json").read_text()), "version": "v3"})
        )
        weights = broken / WEIGHTS_FILE
        weights.write_bytes(weights.read_bytes()[:100])  # truncated: must be refused, never half-loaded
        produce(second, settings.topic_by_kind, settings.librdkafka_config())
        events = valid_events(first + second)
        scores = scored_until(settings, newest_ts(events))
        load_errors_before_v3 = worker.metric("shoppulse_model_load_errors_total")
        # A bad deploy: the pointer names an artifact whose weights are truncated.
        pointer = registry.root / CLASSIFIER_MODEL / "current"
        pointer.write_text(json.dumps({**json.loads(pointer.read_text()), "version": "v3"}))
        deadline = time.monotonic() + 40  # the worker looks at the registry every few seconds, between batches
        while (
            worker.metric("shoppulse_model_load_errors_total") == load_errors_before_v3 and time.monotonic() < deadline
        ):
            more = [next(stream) for _ in range(50)]
            produce(more, settings.topic_by_kind, settings.librdkafka_config())
            events += valid_events(more)
            time.sleep(0.5)
        scores = scored_until(settings, newest_ts(events))
        load_errors = worker.metric("shoppulse_model_load_errors_total")
        serving_v2 = worker.metric('shoppulse_model_info{model="shopper-classifier",version="v2"}')
    finally:
        assert worker.stop() == 0, worker.log_tail()

    docs = [json.loads(value_of(m)) for m in scores]
    assert all(set(doc["scores"]) == {CHURN, PURCHASE} for doc in docs)
    assert {doc["model_versions"][CHURN] for doc in docs} >= {"shopper-classifier:v1", "shopper-classifier:v2"}
    assert load_errors == load_errors_before_v3 + 1 and serving_v2 == 1, "a corrupt artifact must leave v2 in place"

    users = {e.user_id for e in events}
    recommendations = read_topic(
        settings,
        settings.topic_recommendations,
        until=lambda ms: users <= {json.loads(value_of(m))["user_id"] for m in ms},
    )
    for message in recommendations:
        doc = json.loads(value_of(message))
        assert message.key() == doc["user_id"].encode() and 0 < len(doc["items"]) <= settings.top_k
        assert all(item["item_id"] in set(items) for item in doc["items"])

    alerts = read_topic(
        settings,
        settings.topic_churn_alerts,
        until=lambda ms: users <= {json.loads(value_of(m))["user_id"] for m in ms},
    )
    per_user = Counter(json.loads(value_of(m))["user_id"] for m in alerts)
    assert set(per_user) == users
    assert max(per_user.values()) == 1, f"repeated alerts: {[u for u, n in per_user.items() if n > 1][:5]}"
    alert = json.loads(value_of(alerts[0]))
    assert {"alert_id", "churn_risk", "reasons", "last_activity_ts", "value_to_date", "model_version"} <= set(alert)


def test_silent_shoppers_are_rescored_and_alerted_once(broker, tmp_path):
    """No event needed: the sweep re-scores idle shoppers; repeated sweeps do not repeat an alert."""
    simulator = ShopSimulator(GeneratorConfig(seed=4, n_shoppers=40, n_items=200, clock="live"))
    settings, _, _ = serving_models(
        broker, tmp_path, simulator, item_events=400, seed=3, silent_after_ms=1500, silent_sweep_interval_s=1
    )
    messages = list(simulator.messages(limit=400))
    users = {e.user_id for e in valid_events(messages)}
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        produce(messages, settings.topic_by_kind, settings.librdkafka_config())
        # at least three sweeps' worth
        rescored = worker.wait_for_metric("shoppulse_silent_rescored_total", 3 * len(users), timeout_s=40)
    finally:
        assert worker.stop() == 0, worker.log_tail()
    assert rescored >= 3 * len(users)
    silent_scores = read_topic(
        settings,
        settings.topic_scores,
        until=lambda ms: (
            users
            <= {json.loads(value_of(m))["user_id"] for m in ms if json.loads(value_of(m))["trigger_event_id"] is None}
        ),
    )
    assert users <= {
        json.loads(value_of(m))["user_id"] for m in silent_scores if json.loads(value_of(m))["trigger_event_id"] is None
    }
    alerts = read_topic(
        settings,
        settings.topic_churn_alerts,
        until=lambda ms: users <= {json.loads(value_of(m))["user_id"] for m in ms},
    )
    per_user = Counter(json.loads(value_of(m))["user_id"] for m in alerts)
    assert per_user == Counter(dict.fromkeys(users, 1)), "each silent shopper alerts exactly once per cooldown"
