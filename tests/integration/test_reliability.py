"""Faults while events flow, each judged by the accounting checker (tests/support/accounting.py): every
input message scored or dead-lettered with its reason, no churn alert repeated within its
cooldown, and the final per-shopper state equal to an offline replay. RELIABILITY.md explains
the guarantees; bench/soak.py runs the long version."""

from __future__ import annotations

import dataclasses
import random
import shutil
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from features.encoding import decode_state, encode_state
from features.events import Event, InvalidEvent, encode_event, parse_event
from features.offline import final_states
from features.spec import DEFAULT_FEATURE_SPEC
from features.state import ShopperState, StateConfig, event_id_hash
from models.registry import ModelRegistry
from streams.config import Settings
from streams.kafka.broker import EmbeddedBroker, free_port
from streams.kafka.clients import ensure_topics
from streams.kafka.producer import BackgroundProducer, produce
from streams.sim.generator import GeneratedMessage, GeneratorConfig, ShopSimulator, at_most_per_shopper
from streams.tools.process import histogram_quantile
from tests.poison_corpus import poison_corpus
from tests.support.accounting import AccountingReport, OutputReader, await_accounted, produced_from

from .kafka_helpers import WorkerProcess, isolated_settings, key_of, read_to_end, value_of
from .test_model_serving import publish_models
from .test_scale_out import owned_partitions
from .test_worker import (
    changelog_history,
    changelog_states,
    changelog_steps_back,
    changelog_values,
    newest_ts,
    scored_until,
    valid_events,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 20261122
LATENCY = "shoppulse_end_to_end_latency_seconds"


def alerting_settings(bootstrap_servers: str, tmp_path: Path, simulator: ShopSimulator) -> Settings:
    """Isolated settings serving small real models, with thresholds so low that every scored
    shopper alerts once: any repeated alert within the 7-day cooldown is then a failure."""
    registry = ModelRegistry(tmp_path / "registry")
    publish_models(registry, "v1", sorted({e.item_id for e in simulator.events(limit=2000) if e.item_id}), seed=5)
    settings = isolated_settings(
        bootstrap_servers, tmp_path / "worker", models_dir=registry.root, churn_alert_high=0.01, churn_alert_low=0.005
    )
    ensure_topics(settings)
    return settings


def assert_accounted(settings: Settings, sent: list, timeout_s: float = 120) -> AccountingReport:
    """Every sent message accounted for in the outputs; prints the report (repeated scores included)."""
    with OutputReader(settings) as reader:
        report = await_accounted(
            reader, reader.expect(produced_from(sent, settings.topic_by_kind)), timeout_s, settle_s=2
        )
    print(report.summary())
    assert report.ok, report.summary()
    return report


def assert_state_is_offline_replay(settings: Settings, sent: list) -> None:
    """The changelog's last state of every shopper, and its feature vector, equal the offline replay's."""
    offline = final_states(valid_events(sent))
    online = {user: decode_state(raw) for user, raw in changelog_states(settings).items()}
    wrong = [user for user, state in offline.items() if encode_state(online[user]) != encode_state(state)]
    if wrong:
        first, replayed = online[wrong[0]], offline[wrong[0]]
        fields = {
            name: (getattr(first, name), getattr(replayed, name))
            for name in replayed.__slots__
            if getattr(first, name) != getattr(replayed, name)
        }
        raise AssertionError(
            f"{len(wrong)} of {len(offline)} shoppers' state differs from the offline replay; "
            f"{wrong[0]} (changelog, replay): {str(fields)[:1500]}; its changelog records: "
            + "; ".join(changelog_history(settings, wrong[0]))
            + "; input records its state lacks: "
            + ", ".join(lacking_inputs(settings, wrong[0], first))
            + f"; the others: {wrong[1:20]}"
        )
    for user, state in offline.items():
        now = state.last_event_ms
        np.testing.assert_array_equal(
            DEFAULT_FEATURE_SPEC.row(online[user], now),
            DEFAULT_FEATURE_SPEC.row(state, now),
            err_msg=f"feature vector of {user}",
        )


def lacking_inputs(settings: Settings, user: str, state: ShopperState) -> list[str]:
    """Where each of ``user``'s input events sits (topic[partition]@offset) whose id ``state``
    does not hold among its recent ids (for failure messages; exact up to ``dedup_ids`` events)."""
    lacking = []
    for kind, topic in settings.topic_by_kind.items():
        for m in read_to_end(settings, topic):
            if key_of(m) != user.encode():
                continue
            event = parse_event(kind, key_of(m), value_of(m), m.timestamp()[1])
            if event_id_hash(event.event_id) not in state.recent_ids:
                lacking.append(f"{topic.rsplit('.', 1)[-1]}[{m.partition()}]@{m.offset()} (ts {event.ts_ms})")
    return lacking


def traffic(settings: Settings, simulator: ShopSimulator, rate_per_s: float) -> BackgroundProducer:
    """Live traffic, at most ``dedup_ids`` events per shopper: the envelope in which the state does
    not depend on the order the three topics are read in (docs/features.md; RELIABILITY.md)."""
    messages = at_most_per_shopper(simulator.messages(), StateConfig().dedup_ids)
    return BackgroundProducer(messages, settings.topic_by_kind, settings.librdkafka_config(), rate_per_s)


def test_kill9_restarts_mid_stream(broker, tmp_path):
    """Four kill -9 at seeded random moments while events are produced, one of them followed by
    the loss of the data directory (state rebuilt from the changelog)."""
    rng = random.Random(SEED)
    simulator = ShopSimulator(GeneratorConfig(seed=SEED, n_shoppers=1500, n_items=300, clock="live"))
    settings = alerting_settings(broker.bootstrap_servers, tmp_path, simulator)
    kills, lose_data_after = 4, rng.randrange(1, 4)
    worker = WorkerProcess(settings, tmp_path / "worker-0.log")
    worker.wait_ready(90)
    producer = traffic(settings, simulator, rate_per_s=250).start()
    try:
        for kill in range(1, kills + 1):
            time.sleep(rng.uniform(2.0, 6.0))
            worker.kill()
            if kill == lose_data_after:
                shutil.rmtree(settings.data_dir)
            worker = WorkerProcess(settings, tmp_path / f"worker-{kill}.log")
            worker.wait_ready(90)
        time.sleep(rng.uniform(1.0, 3.0))
    finally:
        report = producer.stop()
    try:
        assert report.failed == 0, f"producing failed: {report.errors}"
        assert_accounted(settings, producer.sent)
    finally:
        assert worker.stop() == 0, worker.log_tail()
    assert_state_is_offline_replay(settings, producer.sent)


def assert_offsets_are_the_input_log(settings: Settings) -> None:
    """Each shopper's stored input offsets are, per input partition, the highest offset of its valid messages."""
    now_ms = int(time.time() * 1000)
    expected: dict[str, dict[tuple[str, int], int]] = {}
    for kind, topic in settings.topic_by_kind.items():
        for m in read_to_end(settings, topic):
            try:
                user = parse_event(kind, m.key(), m.value(), now_ms).user_id
            except InvalidEvent:
                continue
            offsets = expected.setdefault(user, {})
            partition, offset = m.partition(), m.offset()
            assert partition is not None and offset is not None, "a consumed message has its position"
            offsets[(topic, partition)] = max(offsets.get((topic, partition), -1), offset)
    stored = {user: value.offsets for user, value in changelog_values(settings).items()}
    assert stored == expected


def one_shoppers_views(user_id: str, n_events: int) -> list[GeneratedMessage]:
    """``n_events`` page views of one shopper, 1 s apart and in order, all within the grace period:
    one topic and event-time order, so the state is independent of how the worker batches them."""
    first_ms = int(time.time() * 1000) - 1000 * (n_events + 60)
    return [
        GeneratedMessage(
            "page_view",
            user_id.encode(),
            encode_event(
                Event(
                    "view",
                    f"{user_id}-v{n}",
                    user_id,
                    first_ms + 1000 * n,
                    session_id=f"{user_id}-s1",
                    item_id=f"item-{n % 17}",
                    category="toys",
                    price=9.5,
                    quantity=1,
                )
            ),
        )
        for n in range(n_events)
    ]


def test_kill9_chain_across_more_events_of_one_shopper_than_the_dedup_window(broker, tmp_path):
    """Nothing is committed (a one-hour commit interval) while four kill -9 chain their replays over
    4 x ``dedup_ids`` events of one shopper: each restart replays everything since the start. The
    event-id dedup alone applied the older replayed events again (RELIABILITY.md's old limit); the
    offsets stored with each state skip them. Other shoppers' events flow on all three topics."""
    rng = random.Random(SEED + 1)
    settings = isolated_settings(
        broker.bootstrap_servers, tmp_path / "worker", commit_interval_s=3600.0, commit_every=10_000_000
    )
    ensure_topics(settings)
    dedup_ids, rounds = StateConfig().dedup_ids, 4
    heavy = one_shoppers_views("heavy-shopper", rounds * dedup_ids)
    others = at_most_per_shopper(
        ShopSimulator(GeneratorConfig(seed=SEED, n_shoppers=40, clock="live")).messages(), dedup_ids
    )
    sent: list[GeneratedMessage] = []

    def send(messages: list[GeneratedMessage]) -> None:
        report = produce(messages, settings.topic_by_kind, settings.librdkafka_config())
        assert report.failed == 0, report.errors
        sent.extend(messages)

    worker = WorkerProcess(settings, tmp_path / "worker-0.log")
    try:
        worker.wait_ready(90)
        for kill in range(1, rounds + 1):
            chunk = heavy[(kill - 1) * dedup_ids : kill * dedup_ids]
            send(chunk[: dedup_ids // 2] + list(islice(others, 40)))
            scored_until(settings, newest_ts(valid_events(sent)))  # stored: the restart's replay must skip it
            send(chunk[dedup_ids // 2 :] + list(islice(others, 40)))
            time.sleep(rng.uniform(0.0, 1.0))  # kill -9 while the rest may be half processed, half delivered
            worker.kill()
            worker = WorkerProcess(settings, tmp_path / f"worker-{kill}.log")
            worker.wait_ready(90)
        scored_until(settings, newest_ts(valid_events(sent)))
    finally:
        assert worker.stop() == 0, worker.log_tail()
    assert_state_is_offline_replay(settings, sent)
    assert_offsets_are_the_input_log(settings)


def test_rebalance_while_events_flow(broker, tmp_path):
    """A second worker joins the group and later leaves it, while events are produced."""
    rng = random.Random(SEED + 1)
    simulator = ShopSimulator(GeneratorConfig(seed=SEED + 1, n_shoppers=1500, n_items=300, clock="live"))
    settings = alerting_settings(broker.bootstrap_servers, tmp_path, simulator)
    other = dataclasses.replace(settings, data_dir=tmp_path / "worker-b", metrics_port=free_port())
    a = WorkerProcess(settings, tmp_path / "a.log")
    a.wait_ready(90)
    producer = traffic(settings, simulator, rate_per_s=250).start()
    b = None
    try:
        time.sleep(rng.uniform(2.0, 4.0))
        b = WorkerProcess(other, tmp_path / "b.log")
        b.wait_ready(90)
        time.sleep(rng.uniform(3.0, 5.0))
        b_owned, b_consumed = owned_partitions(b), b.metric("shoppulse_events_consumed_total")
        assert b.stop() == 0, b.log_tail()
        time.sleep(rng.uniform(2.0, 4.0))
    finally:
        report = producer.stop()
        if b is not None:
            b.stop()
    try:
        assert b_owned and b_consumed > 0, f"the second worker never took part: owned {b_owned}, consumed {b_consumed}"
        assert report.failed == 0, f"producing failed: {report.errors}"
        assert_accounted(settings, producer.sent)
    finally:
        assert a.stop() == 0, a.log_tail()
    assert changelog_steps_back(settings) == []
    assert_state_is_offline_replay(settings, producer.sent)


def test_broker_restart(tmp_path):
    """The embedded broker stops (losing every topic) and a new one starts on the same port:
    the worker stays up without spinning, is not ready meanwhile, says why, and scores new events
    once the topics are back."""
    outage_s = 8.0
    port = free_port()
    broker = EmbeddedBroker(port=port, log_path=tmp_path / "tansu-1.log").start()
    settings = isolated_settings(broker.bootstrap_servers, tmp_path / "worker")
    ensure_topics(settings)
    stream = ShopSimulator(GeneratorConfig(seed=SEED + 2, n_shoppers=100, clock="live")).messages()
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready(90)
        before = [next(stream) for _ in range(500)]
        produce(before, settings.topic_by_kind, settings.librdkafka_config())
        assert_accounted(settings, before)

        broker.stop(timeout_s=1)
        deadline = time.monotonic() + 15
        while worker.readiness()[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        cpu_before, started = worker.cpu_seconds(), time.monotonic()
        time.sleep(outage_s)
        cpu_share = (worker.cpu_seconds() - cpu_before) / (time.monotonic() - started)
        status, text = worker.readiness()
        assert worker.process.poll() is None, f"the worker exited during the outage:\n{worker.log_tail()}"
        assert (status, text) == (503, "not ready: broker unreachable"), f"/readyz during the outage: {status} {text}"
        assert worker.metric("shoppulse_ready") == 0
        assert cpu_share < 0.25, f"the worker used {cpu_share:.0%} of a core while the broker was down"
        assert "lost every connection to the brokers" in worker.log_path.read_text(), "the outage was not logged"

        broker = EmbeddedBroker(port=port, log_path=tmp_path / "tansu-2.log").start()
        ensure_topics(settings)  # what the operator's topic job does
        ready_after_s = worker.wait_ready(60)
        after = [next(stream) for _ in range(300)]
        produce(after, settings.topic_by_kind, settings.librdkafka_config())
        assert_accounted(settings, after, timeout_s=60)
        print(f"CPU {cpu_share:.1%} of a core during the outage; ready {ready_after_s:.1f} s after the broker was back")
    finally:
        assert worker.stop() == 0, worker.log_tail()
        broker.stop()


def test_flood_drains_with_bounded_memory(broker, tmp_path):
    """Events produced much faster than the worker scores: lag builds up and drains to 0, the
    latency histogram shows the backlog, peak RSS stays bounded, and every event is accounted.

    The flood must outlast a few samples of the lag gauge (refreshed once a second): once the
    worker took whole fetches, a 30,000-event flood drained between samples (the highest lag
    seen was 3,965); 100,000 events peaked at 89,000 and took 8 s."""
    events = 100_000
    settings = isolated_settings(broker.bootstrap_servers, tmp_path / "worker")
    ensure_topics(settings)
    simulator = ShopSimulator(GeneratorConfig(seed=SEED + 3, n_shoppers=3000, clock="live"))
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready(90)
        messages = list(simulator.messages(limit=events))  # stamped now: latency counts from here
        rss_ready = worker.memory_bytes("VmRSS")
        latency_before = worker.histogram(LATENCY)
        produced_at = time.monotonic()
        report = produce(messages, settings.topic_by_kind, settings.librdkafka_config())
        assert report.failed == 0, f"producing failed: {report.errors}"
        peak_lag, lag = 0.0, None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            lag = worker.metric("shoppulse_consumer_lag")
            peak_lag = max(peak_lag, lag)
            if lag == 0 and worker.metric("shoppulse_events_consumed_total") >= events:
                break
            time.sleep(0.5)
        drained_s = time.monotonic() - produced_at
        latency = [(le, count - dict(latency_before).get(le, 0)) for le, count in worker.histogram(LATENCY)]
        p99 = histogram_quantile(latency, 0.99)
        peak_rss = worker.memory_bytes("VmHWM")
        assert_accounted(settings, messages)
    finally:
        assert worker.stop() == 0, worker.log_tail()
    print(
        f"peak lag {peak_lag:.0f}, drained in {drained_s:.1f} s, latency p99 <= {p99} s, "
        f"RSS {rss_ready / 2**20:.0f} MiB at ready, peak {peak_rss / 2**20:.0f} MiB"
    )
    assert lag == 0, f"lag did not drain in 120 s: {lag}"
    assert peak_lag >= events / 4, f"lag peaked at {peak_lag:.0f}: the flood never built a backlog"
    assert p99 >= 1.0, f"the latency histogram's p99 is {p99} s after a {drained_s:.0f} s backlog"
    assert peak_rss - rss_ready < 150 * 2**20, (
        f"peak RSS grew {(peak_rss - rss_ready) / 2**20:.0f} MiB over the {rss_ready / 2**20:.0f} MiB at ready"
    )


def test_poison_corpus_is_dead_lettered_and_memory_stays_flat(broker, tmp_path):
    """The hostile corpus (tests/poison_corpus.py), fed again and again: each message gets its
    documented answer, the worker never stops, and its RSS does not grow round after round."""
    rounds, copies = 6, 5
    settings = isolated_settings(broker.bootstrap_servers, tmp_path / "worker")
    ensure_topics(settings)
    corpus = poison_corpus(int(time.time() * 1000)) * copies
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    sent: list = []
    rss: list[int] = []
    try:
        worker.wait_ready(90)
        for _ in range(rounds):
            report = produce(corpus, settings.topic_by_kind, settings.librdkafka_config())
            assert report.failed == 0, f"producing failed: {report.errors}"
            sent += corpus
            consumed = worker.wait_for_metric("shoppulse_events_consumed_total", len(sent), timeout_s=60)
            assert consumed >= len(sent), f"the worker consumed {consumed} of {len(sent)}:\n{worker.log_tail()}"
            rss.append(worker.memory_bytes("VmRSS"))
        accounted = assert_accounted(settings, sent)
        duplicates = worker.metric("shoppulse_duplicate_events_total")
    finally:
        assert worker.stop() == 0, worker.log_tail()
    growth = rss[-1] - rss[1]
    print(f"RSS per round (MiB): {[round(r / 2**20) for r in rss]}")
    assert growth < 20 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over {rounds - 2} rounds of the corpus"
    assert duplicates == accounted.repeated_event_ids, (
        f"{accounted.repeated_event_ids} repeated event ids sent, the worker counted {duplicates:.0f} duplicates"
    )
