"""Two workers in one consumer group: partitions split, every event scored, one shopper's state
never split; when one worker stops, the other takes its partitions with their state and repeats
no churn alert."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from features.encoding import decode_state, encode_state
from features.offline import final_states
from features.state import StateConfig
from models.registry import ModelRegistry
from streams.config import Settings
from streams.kafka.broker import free_port
from streams.kafka.clients import ensure_topics
from streams.kafka.producer import produce
from streams.sim.generator import GeneratorConfig, ShopSimulator, at_most_per_shopper

from .kafka_helpers import WorkerProcess, isolated_settings, read_topic, value_of
from .test_model_serving import publish_models
from .test_worker import changelog_states, newest_ts, scored_until, valid_events

pytestmark = pytest.mark.integration


def owned_partitions(worker: WorkerProcess) -> set[tuple[str, str]]:
    """Input partitions (erasure requests included) a worker reports lag for, i.e. owns."""
    owned = set()
    for line in worker.metrics_text().splitlines():
        if line.startswith("shoppulse_consumer_lag{"):
            labels = dict(part.split("=") for part in line[line.index("{") + 1 : line.index("}")].split(","))
            owned.add((labels["topic"].strip('"'), labels["partition"].strip('"')))
    return owned


def two_workers(broker, tmp_path, simulator: ShopSimulator, model_seed: int) -> tuple[Settings, Settings]:
    """Settings of two workers in one group (own data dirs and ports) serving small models over the
    simulator's items, with alert thresholds low enough that every scored shopper alerts once;
    the topics exist."""
    registry = ModelRegistry(tmp_path / "registry")
    items = sorted({e.item_id for e in simulator.events(limit=3000) if e.item_id})
    publish_models(registry, "v1", items, seed=model_seed)
    base = isolated_settings(
        broker.bootstrap_servers, tmp_path / "a", models_dir=registry.root, churn_alert_high=0.01, churn_alert_low=0.005
    )
    ensure_topics(base)
    return base, dataclasses.replace(base, data_dir=tmp_path / "b", metrics_port=free_port())


def test_two_workers_split_partitions_and_take_over(broker, tmp_path):
    simulator = ShopSimulator(GeneratorConfig(seed=31, n_shoppers=200, n_items=300, clock="live"))
    base, other = two_workers(broker, tmp_path, simulator, model_seed=5)
    stream = at_most_per_shopper(simulator.messages(), StateConfig().dedup_ids)  # the byte-exact parity envelope
    first, second = [next(stream) for _ in range(2000)], [next(stream) for _ in range(1500)]

    all_partitions = len(base.consumed_topics) * base.partitions
    a, b = WorkerProcess(base, tmp_path / "a.log"), WorkerProcess(other, tmp_path / "b.log")
    try:
        a.wait_ready(90)
        b.wait_ready(90)
        produce(first, base.topic_by_kind, base.librdkafka_config())
        scored_until(base, newest_ts(valid_events(first)))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(owned_partitions(a) | owned_partitions(b)) < all_partitions:
            time.sleep(0.5)
        mine, theirs = owned_partitions(a), owned_partitions(b)
        assert mine and theirs and not mine & theirs, f"partitions not split: {sorted(mine)} / {sorted(theirs)}"
        assert len(mine | theirs) == all_partitions
        assert a.stop() == 0, a.log_tail()  # b takes over a's partitions and their state

        produce(second, base.topic_by_kind, base.librdkafka_config())
        events = valid_events(first + second)
        scored_until(base, newest_ts(events))
        deadline = time.monotonic() + 10  # the lag gauge that shows ownership refreshes once a second
        while time.monotonic() < deadline and len(owned_partitions(b)) < all_partitions:
            time.sleep(0.5)
        assert len(owned_partitions(b)) == all_partitions, f"b owns only {sorted(owned_partitions(b))}"
    finally:
        a.stop()
        assert b.stop() == 0, b.log_tail()

    offline = final_states(events)
    online = {user: decode_state(raw) for user, raw in changelog_states(base).items()}
    wrong = [user for user, state in offline.items() if encode_state(online[user]) != encode_state(state)]
    assert not wrong, f"{len(wrong)} shoppers' state split or lost across the hand-over, e.g. {wrong[:3]}"

    users = set(offline)
    alerts = read_topic(
        base, base.topic_churn_alerts, until=lambda ms: users <= {json.loads(value_of(m))["user_id"] for m in ms}
    )
    alert_ids: dict[str, set[str]] = {}
    for m in alerts:
        doc = json.loads(value_of(m))
        alert_ids.setdefault(doc["user_id"], set()).add(doc["alert_id"])
    assert set(alert_ids) == users
    assert all(len(ids) == 1 for ids in alert_ids.values()), {u: i for u, i in alert_ids.items() if len(i) > 1}
