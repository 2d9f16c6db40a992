"""Live evaluation on the embedded broker: what the worker counts equals what an offline recount of
the same event log and the same published predictions gives (models.outcomes.recount), on a clean
run through /metrics, and after kill -9 mid-stream through the ledgers summed over the changelog.

Horizons and grace are compressed (seconds, not days) so that every kind of outcome resolves
within the test: purchases and churn both ways, alert returns and lapses, hits and misses."""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from features.events import KIND_VIEW, Event, parse_event
from features.state import StateConfig
from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL
from models.outcomes import (
    ALERTED,
    HOLDOUT,
    LiveMemory,
    Outcome,
    predictions_from_outputs,
    recount_by_shopper,
    tally,
)
from models.registry import SPLIT, ModelRegistry
from streams.config import Settings
from streams.kafka.clients import ensure_topics
from streams.kafka.producer import BackgroundProducer, produce
from streams.sim.generator import GeneratedMessage, GeneratorConfig, ShopSimulator, at_most_per_shopper, message_of
from streams.worker.metrics import WorkerMetrics

from .kafka_helpers import WorkerProcess, isolated_settings, read_to_end, value_of
from .test_model_serving import publish_models
from .test_worker import changelog_values, newest_ts, scored_until, valid_events

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 20261203
#: Compressed so that outcomes resolve in seconds: grace 4 s, purchase 1.5 s, churn 3 s.
COMPRESSED = {"grace_ms": 4000, "live_purchase_horizon_ms": 1500, "live_churn_horizon_ms": 3000}


def live_settings(
    bootstrap_servers: str, tmp_path: Path, simulator: ShopSimulator, split: bool = False, **overrides
) -> Settings:
    """Small real models; every scored shopper alerts once (thresholds near 0), half of them held out.
    ``split``: both model kinds also get a challenger (v2) served to half of the shoppers."""
    registry = ModelRegistry(tmp_path / "registry")
    items = sorted({e.item_id for e in simulator.events(limit=2000) if e.item_id})
    if split:
        publish_models(registry, "v2", items, seed=6)
    publish_models(registry, "v1", items, seed=5)  # the champion
    if split:
        for model in (CLASSIFIER_MODEL, NEXTITEM_MODEL):
            registry.set_challenger(model, "v2", SPLIT, 0.5, salt=f"{model}-trial")
    settings = isolated_settings(
        bootstrap_servers,
        tmp_path / "worker",
        models_dir=registry.root,
        churn_alert_high=0.01,
        churn_alert_low=0.005,
        alert_holdout_share=0.5,
        **{**COMPRESSED, **overrides},
    )
    ensure_topics(settings)
    return settings


def traffic(settings: Settings, simulator: ShopSimulator, rate_per_s: float, earlier_ms: int = 0) -> BackgroundProducer:
    """The simulator's messages at a steady rate; ``earlier_ms``: valid events stamped that long before
    the live clock (room for later events one grace period past them, which the worker accepts only
    up to 5 minutes ahead of its clock)."""
    messages = at_most_per_shopper(simulator.messages(), StateConfig().dedup_ids)
    if earlier_ms:
        messages = (earlier(m, earlier_ms) for m in messages)
    return BackgroundProducer(messages, settings.topic_by_kind, settings.librdkafka_config(), rate_per_s)


def earlier(message: GeneratedMessage, earlier_ms: int) -> GeneratedMessage:
    """A valid message restamped ``earlier_ms`` before its time; an invalid one unchanged."""
    if message.malformed_reason is not None:
        return message
    event = parse_event(message.topic_kind, message.key, message.value, int(time.time() * 1000))
    return message_of(replace(event, ts_ms=event.ts_ms - earlier_ms))


def close_every_shopper(settings: Settings, newest: dict[str, int], after_ms: int) -> list[GeneratedMessage]:
    """One more page view per shopper, ``after_ms`` after its newest event: its watermark moves past
    every earlier event plus the grace period, so all of their recommendation outcomes are decided."""
    closing = [
        message_of(
            Event(
                KIND_VIEW,
                f"{user}-closing",
                user,
                ts_ms + after_ms,
                session_id="closing",
                item_id="closing",
                category="closing",
                price=1.0,
                quantity=1,
            )
        )
        for user, ts_ms in sorted(newest.items())
    ]
    report = produce(closing, settings.topic_by_kind, settings.librdkafka_config())
    assert report.failed == 0, report.errors
    return closing


def recounted(settings: Settings, sent: list) -> tuple[dict[str, list[Outcome]], int]:
    """The offline recount per shopper from the input log and the scores and recommendations
    topics, and the number of held-out alerts those scores name."""
    scores = [json.loads(value_of(m)) for m in read_to_end(settings, settings.topic_scores)]
    recommendations = [json.loads(value_of(m)) for m in read_to_end(settings, settings.topic_recommendations)]
    predictions = predictions_from_outputs(scores, recommendations)
    held_out = sum(p.alert_group == HOLDOUT for p in predictions)
    return recount_by_shopper(valid_events(sent), predictions, settings.live_eval_config()), held_out


def assert_ledgers_equal_the_recount(settings: Settings, offline: dict[str, list[Outcome]]) -> None:
    """Each shopper's ledger (the changelog's last value) equals its recount, whole: recommendations
    too, whatever order the shopper's events arrived in (models.outcomes). Resolved recommendations
    must exist, or their comparison would be empty."""
    memories = {user: LiveMemory.decode(value.memory) for user, value in changelog_values(settings).items()}
    assert memories.keys() == offline.keys()
    compared_lists = 0
    for user, outcomes in offline.items():
        expected = tally(outcomes)
        ledger = {key: n for key, n in memories[user].ledger.items() if n}
        assert ledger == expected, mismatch(settings, user, ledger, expected, memories[user])
        compared_lists += expected.get(("recommendation", "champion", "opportunities"), 0)
    assert compared_lists > 0, "no shopper had a resolved recommendation"


def mismatch(settings: Settings, user: str, ledger: dict, expected: dict, memory: LiveMemory) -> str:
    """What a failed comparison needs to be understood: the differing counts, the stored memory and
    the shopper's published scorings (offset, score_seq, as_of_ts, alert) in topic order."""
    keys = sorted(ledger.keys() | expected.keys())
    differing = {key: (ledger.get(key, 0), expected.get(key, 0)) for key in keys}
    differing = {key: counts for key, counts in differing.items() if counts[0] != counts[1]}
    published = [
        (m.offset(), doc["score_seq"], doc["as_of_ts"], doc.get("churn_alert"), doc.get("trigger_event_id"))
        for m in read_to_end(settings, settings.topic_scores)
        if (doc := json.loads(value_of(m)))["user_id"] == user
    ]
    return (
        f"shopper {user}: (ledger, recount) of the differing keys {differing}; stored memory: score_seq "
        f"{memory.score_seq} at {memory.scored_ms}, alert {memory.scored_alert}, pending alerts {memory.alerts}; "
        f"published scorings (offset, score_seq, as_of_ts, churn_alert, trigger): {published}"
    )


Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def live_series(exposition: str) -> Series:
    """The nonzero shoppulse_live_* counters of a /metrics page: (name, labels) -> value."""
    out: Series = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name.startswith("shoppulse_live_") and sample.name.endswith("_total") and sample.value:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def offline_series(outcomes: list[Outcome], held_out_alerts: int) -> Series:
    """What the worker's /metrics would show for these outcomes (its own counters, fed the recount)."""
    metrics = WorkerMetrics()
    metrics.count_live(outcomes, held_out_alerts)
    return live_series(generate_latest(metrics.registry).decode())


def assert_equal_counts(live: Series, offline: Series) -> None:
    """Counts equal exactly; float sums (probabilities, gains) up to the order they were added in."""
    only_live, only_offline = live.keys() - offline.keys(), offline.keys() - live.keys()
    assert not only_live and not only_offline, f"only live: {only_live}; only offline: {only_offline}"
    for key, value in offline.items():
        assert math.isclose(live[key], value, rel_tol=1e-9), f"{key}: live {live[key]}, offline {value}"


def assert_every_kind_resolved(counts: Series, quiet_outcomes: bool = True) -> None:
    """The comparison covers every outcome kind: no parity of empty tables. ``quiet_outcomes``: also
    those decided by the watermark (no purchase, churned, lapsed), which need a short grace period."""
    names = {name for name, _ in counts}
    assert {
        "shoppulse_live_recommendation_opportunities_total",
        "shoppulse_live_recommendation_hits_total",
        "shoppulse_live_score_outcomes_total",
        "shoppulse_live_alert_returns_total",
        "shoppulse_live_alerts_held_out_total",
    } <= names, names
    outcomes = {
        (dict(labels)["score"], dict(labels)["outcome"])
        for name, labels in counts
        if name == "shoppulse_live_score_outcomes_total"
    }
    on_sight = {("churn_risk", "negative"), ("purchase_propensity", "positive")}
    quiet = {("churn_risk", "positive"), ("purchase_propensity", "negative")}
    assert outcomes == on_sight | quiet if quiet_outcomes else on_sight <= outcomes, outcomes
    groups = {
        (dict(labels)["group"], dict(labels)["outcome"])
        for name, labels in counts
        if name == "shoppulse_live_alert_returns_total"
    }
    assert {(ALERTED, "returned"), (HOLDOUT, "returned")} <= groups, groups


@pytest.mark.parametrize("split", [False, True], ids=["champion-only", "split-challengers"])
def test_live_counters_equal_the_offline_recount(broker, tmp_path, split):
    simulator = ShopSimulator(GeneratorConfig(seed=SEED, n_shoppers=300, n_items=300, clock="live"))
    settings = live_settings(broker.bootstrap_servers, tmp_path, simulator, split=split)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready(90)
        producer = traffic(settings, simulator, rate_per_s=300).start()
        time.sleep(15)
        report = producer.stop()
        assert report.failed == 0, report.errors
        scored_until(settings, newest_ts(valid_events(producer.sent)))
        by_shopper, held_out = recounted(settings, producer.sent)
        offline = offline_series([o for outcomes in by_shopper.values() for o in outcomes], held_out)
        deadline = time.monotonic() + 20  # counted right after each flush: let the last one land
        while (live := live_series(worker.metrics_text())) != offline and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        assert worker.stop() == 0, worker.log_tail()
    assert_every_kind_resolved(offline)
    variants = {dict(labels).get("variant") for _, labels in offline} - {None}
    assert variants == ({"champion", "challenger"} if split else {"champion"}), variants
    assert_equal_counts(live, offline)
    assert_ledgers_equal_the_recount(settings, by_shopper)


def test_ledgers_equal_the_offline_recount_after_kill9_mid_stream(broker, tmp_path):
    rng = random.Random(SEED)
    simulator = ShopSimulator(GeneratorConfig(seed=SEED + 1, n_shoppers=300, n_items=300, clock="live"))
    # The default grace period (1 h): a restart's backlog is read across the three topics in any order,
    # and a shorter grace would make some of those events LATE (not applied), which the offline
    # replay would apply. Events are stamped two grace periods early, so that a closing event per
    # shopper one grace period after its last can decide every recommendation (and quiet outcome).
    grace_ms = 3_600_000
    settings = live_settings(broker.bootstrap_servers, tmp_path, simulator, grace_ms=grace_ms)
    worker = WorkerProcess(settings, tmp_path / "worker-0.log")
    worker.wait_ready(90)
    producer = traffic(settings, simulator, rate_per_s=250, earlier_ms=2 * grace_ms).start()
    try:
        for kill in (1, 2, 3):
            time.sleep(rng.uniform(2.0, 5.0))
            worker.kill()
            if kill == 2:
                shutil.rmtree(settings.data_dir)  # the table comes back from the changelog
            worker = WorkerProcess(settings, tmp_path / f"worker-{kill}.log")
            worker.wait_ready(90)
        time.sleep(rng.uniform(2.0, 4.0))
    finally:
        report = producer.stop()
    try:
        assert report.failed == 0, report.errors
        newest = newest_ts(valid_events(producer.sent))
        scored_until(settings, newest)
        closing = close_every_shopper(settings, newest, grace_ms + 1)
        scored_until(settings, newest_ts(valid_events(closing)))
    finally:
        assert worker.stop() == 0, worker.log_tail()
    by_shopper, held_out = recounted(settings, [*producer.sent, *closing])
    outcomes = [o for shopper in by_shopper.values() for o in shopper]
    assert_every_kind_resolved(offline_series(outcomes, held_out), quiet_outcomes=False)
    assert_ledgers_equal_the_recount(settings, by_shopper)
