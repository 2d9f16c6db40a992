"""The worker end to end on the embedded broker: every event is scored or dead-lettered, and the
state it keeps is exactly what the offline replay of the same events computes — also after the
worker loses its data directory and restores the table from the changelog."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from collections import Counter
from itertools import islice

import numpy as np
import pytest
from confluent_kafka import Consumer, Message, TopicPartition

from features.encoding import decode_state, encode_state
from features.events import parse_event
from features.offline import final_states
from features.spec import DEFAULT_FEATURE_SPEC
from features.state import StateConfig
from streams.kafka.clients import confluent_consumer_config, ensure_topics
from streams.kafka.producer import produce
from streams.sim.generator import GeneratedMessage, GeneratorConfig, ShopSimulator, at_most_per_shopper
from streams.worker.app import STATE_TABLE
from streams.worker.envelope import Stored
from streams.worker.table_writer import SEAL_KEY

from .kafka_helpers import (
    WorkerProcess,
    decoded_headers,
    isolated_settings,
    key_of,
    read_to_end,
    read_topic,
    value_of,
)

pytestmark = pytest.mark.integration


def valid_events(messages) -> list:
    """The events the worker must accept, parsed exactly as it parses them."""
    now_ms = int(time.time() * 1000)
    return [parse_event(m.topic_kind, m.key, m.value, now_ms) for m in messages if m.malformed_reason is None]


def changelog_records(settings) -> list[Message]:
    """Every record of the shopper table's changelog, oldest first (the worker has stopped)."""
    return read_to_end(settings, f"{settings.app_id}-{STATE_TABLE}-changelog")


def changelog_values(settings) -> dict[str, Stored]:
    """The last value each shopper's changelog holds (read to the end: the worker has stopped)."""
    values: dict[str, Stored] = {}
    for m in changelog_records(settings):
        # a tombstone (None) deletes, as compaction and table recovery read it
        user, value = key_of(m).decode(), m.value()
        if value is None:
            values.pop(user, None)
        else:
            values[user] = Stored.decode(value)
    return values


def changelog_history(settings, user: str) -> list[str]:
    """One shopper's changelog records, oldest first: where each sits, the input offsets it holds
    and how many events its state has seen (for failure messages)."""
    history: list[str] = []
    for m in changelog_records(settings):
        if key_of(m) != user.encode():
            continue
        value = m.value()
        if value is None:
            history.append(f"@{m.offset()} tombstone")
            continue
        stored = Stored.decode(value)
        events = decode_state(stored.state).events_lifetime if stored.state else 0
        offsets = ", ".join(f"{t.rsplit('.', 1)[-1]}[{p}]={o}" for (t, p), o in sorted(stored.offsets.items()))
        history.append(f"[{m.partition()}]@{m.offset()} events {events}: {offsets}")
    return history


def changelog_steps_back(settings) -> list[str]:
    """Every changelog record that holds fewer applied input offsets than the shopper's record
    before it (a tombstone starts afresh): a writer that lost the state it should have built on.

    The final states can hide such a record (a later write covers it), so this finds lost updates
    that the offline comparison sees only when they are the last word."""
    previous: dict[bytes, tuple[int, dict[tuple[str, int], int]]] = {}
    found: list[str] = []
    for m in changelog_records(settings):
        key, value = key_of(m), m.value()
        if value is None:
            previous.pop(key, None)
            continue
        offsets, offset = Stored.decode(value).offsets, m.offset()
        assert offset is not None, "a consumed record has its offset"
        before = previous.get(key)
        if before is not None:
            behind = {tp: (was, offsets.get(tp, -1)) for tp, was in before[1].items() if offsets.get(tp, -1) < was}
            if behind:
                found.append(
                    f"{key.decode()} at changelog [{m.partition()}]@{m.offset()} (after @{before[0]}): "
                    + ", ".join(f"{t}[{p}] {was} -> {now}" for (t, p), (was, now) in sorted(behind.items()))
                )
        previous[key] = (offset, offsets)
    return found


def changelog_states(settings) -> dict[str, bytes]:
    """The last state (encoded) each shopper's changelog holds."""
    states: dict[str, bytes] = {}
    for user, value in changelog_values(settings).items():
        assert value.state is not None, f"{user}'s changelog value holds no state"
        states[user] = value.state
    return states


def scored_until(settings, expected_last_ts: dict[str, int]):
    """Read scores until every shopper's newest event has been scored."""

    def done(messages):
        latest: dict[str, int] = {}
        for m in messages:
            doc = json.loads(value_of(m))
            latest[doc["user_id"]] = max(latest.get(doc["user_id"], 0), doc["trigger_ts"])
        return all(latest.get(user, -1) >= ts for user, ts in expected_last_ts.items())

    return read_topic(settings, settings.topic_scores, until=done, timeout_s=90)


def newest_ts(events) -> dict[str, int]:
    newest: dict[str, int] = {}
    for e in events:
        newest[e.user_id] = max(newest.get(e.user_id, 0), e.ts_ms)
    return newest


@pytest.fixture
def settings(broker, tmp_path):
    settings = isolated_settings(broker.bootstrap_servers, tmp_path / "worker")
    ensure_topics(settings)
    return settings


def test_every_event_scored_or_dead_lettered(settings, tmp_path):
    # Within the envelope docs/features.md promises byte-exact parity for (a live clock packs days
    # into seconds: more than dedup_ids tied events per shopper may fold in arrival order).
    simulator = ShopSimulator(GeneratorConfig(seed=11, n_shoppers=200, malformed_fraction=0.03, clock="live"))
    messages = list(islice(at_most_per_shopper(simulator.messages(), StateConfig().dedup_ids), 3000))
    malformed = [m for m in messages if m.malformed_reason is not None]
    assert len(malformed) > 30
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        report = produce(messages, settings.topic_by_kind, settings.librdkafka_config())
        assert report.failed == 0
        events = valid_events(messages)
        scores = scored_until(settings, newest_ts(events))
        dead = read_topic(
            settings, settings.topic_dead_letter, until=lambda ms: len(ms) >= len(malformed), timeout_s=30
        )
        dead_total = worker.metric("shoppulse_dead_letter_total")
    finally:
        assert worker.stop() == 0, worker.log_tail()

    # Scores: every shopper with a valid event, the newest event of each covered, no stranger.
    by_user = Counter(json.loads(value_of(m))["user_id"] for m in scores)
    assert set(by_user) == {e.user_id for e in events}
    for m in scores:
        doc = json.loads(value_of(m))
        assert m.key() == doc["user_id"].encode()
        assert doc["schema_version"] == 1 and doc["feature_spec"] == DEFAULT_FEATURE_SPEC.hash

    # Dead letters: each malformed message exactly once, original bytes, reason and source position.
    assert len(dead) == len(malformed)
    expected = Counter((m.value, m.malformed_reason) for m in malformed)
    got = Counter((d.value(), decoded_headers(d)["shoppulse.dlq.reason"]) for d in dead)
    assert got == expected
    inputs = read_topic(settings, list(settings.input_topics), until=lambda ms: len(ms) >= len(messages))
    sources = {(m.topic(), m.partition(), m.offset()): m.value() for m in inputs}
    for d in dead:
        headers = decoded_headers(d)
        position = (
            headers["shoppulse.dlq.source_topic"],
            int(headers["shoppulse.dlq.source_partition"]),
            int(headers["shoppulse.dlq.source_offset"]),
        )
        assert sources[position] == d.value(), f"dead letter points at the wrong source message {position}"
        assert headers["shoppulse.dlq.detail"]
    assert dead_total == len(malformed)

    # State: exactly what the offline replay of the valid events gives, feature vector and all.
    offline = final_states(events)
    online = {user: decode_state(raw) for user, raw in changelog_states(settings).items()}
    for user, state in offline.items():
        assert encode_state(online[user]) == encode_state(state), (
            f"state of {user} differs from offline replay: "
            + str(
                {
                    n: (getattr(online[user], n), getattr(state, n))
                    for n in state.__slots__
                    if getattr(online[user], n) != getattr(state, n)
                }
            )[:1500]
        )
        now = state.last_event_ms
        np.testing.assert_array_equal(DEFAULT_FEATURE_SPEC.row(online[user], now), DEFAULT_FEATURE_SPEC.row(state, now))


def committed_offsets(settings) -> int:
    """How many input offsets the worker's consumer group has committed, over every input partition."""
    consumer = Consumer({**confluent_consumer_config(settings, settings.app_id), "enable.auto.commit": False})
    try:
        partitions = [TopicPartition(topic, p) for topic in settings.input_topics for p in range(settings.partitions)]
        return sum(max(tp.offset, 0) for tp in consumer.committed(partitions, timeout=10))
    finally:
        consumer.close()


def test_offsets_are_committed_after_commit_every_acks_between_timed_commits(broker, tmp_path):
    """Faust's broker_commit_every, which the replaced drain loop had dropped: with an hour between
    timed commits, acked offsets are committed once SHOPPULSE_COMMIT_EVERY of them gathered."""
    settings = isolated_settings(
        broker.bootstrap_servers, tmp_path / "worker", commit_interval_s=3600.0, commit_every=100
    )
    ensure_topics(settings)
    messages = list(ShopSimulator(GeneratorConfig(seed=12, n_shoppers=50, clock="live")).messages(limit=400))
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        produce(messages, settings.topic_by_kind, settings.librdkafka_config())
        scored_until(settings, newest_ts(valid_events(messages)))
        deadline = time.monotonic() + 30
        while committed_offsets(settings) < 300 and time.monotonic() < deadline:
            time.sleep(0.5)
        committed = committed_offsets(settings)
    finally:
        worker.kill()  # no commit on the way out: what is committed was committed while running
    assert 300 <= committed <= len(messages)


def test_a_dead_letter_too_large_to_send_whole_is_cut_to_fit_and_the_worker_goes_on(broker, tmp_path):
    """An invalid input bigger than the worker may produce (SHOPPULSE_KAFKA_MAX_MESSAGE_BYTES) made
    librdkafka refuse its dead letter (MSG_SIZE_TOO_LARGE), which failed every batch it was in."""
    settings = isolated_settings(broker.bootstrap_servers, tmp_path / "worker", kafka_max_message_bytes=20_000)
    ensure_topics(settings)
    too_big = GeneratedMessage("page_view", b"u-too-big", b"{" + b"x" * 30_000, "bad_json")
    simulator = ShopSimulator(GeneratorConfig(seed=5, n_shoppers=20, clock="live"))
    after = [m for m in islice(simulator.messages(), 200) if m.malformed_reason is None]
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        assert produce([too_big], settings.topic_by_kind, settings.librdkafka_config()).failed == 0
        assert produce(after, settings.topic_by_kind, settings.librdkafka_config()).failed == 0
        scored_until(settings, newest_ts(valid_events(after)))
        dead = read_topic(settings, settings.topic_dead_letter, until=lambda ms: len(ms) >= 1, timeout_s=30)
    finally:
        assert worker.stop() == 0, worker.log_tail()
    assert len(dead) == 1
    headers = decoded_headers(dead[0])
    assert headers["shoppulse.dlq.reason"] == "bad_json" and headers["shoppulse.dlq.value_truncated_from"] == "30001"
    assert dead[0].key() == too_big.key and too_big.value.startswith(value_of(dead[0]))
    assert 15_000 < len(value_of(dead[0])) < 20_000


#: A worker whose batch logic raises on its second batch: a bug no handler anticipates.
FAULTY_WORKER = """
import sys
from streams.worker.app import ScoringWorker
from streams.config import Settings

worker = ScoringWorker(Settings.from_env())
process, batches = worker.processor.process, []

def fail_on_the_second_batch(*args, **kwargs):
    batches.append(1)
    if len(batches) == 2:
        raise RuntimeError("injected fault in the batch logic")
    return process(*args, **kwargs)

worker.processor.process = fail_on_the_second_batch
sys.exit(worker.run())
"""


def test_an_error_no_batch_logic_handles_stops_the_worker_and_its_batch_is_scored_after_a_restart(settings, tmp_path):
    """Faust alone restarts a failed agent, which then goes on without the failed batch's ack: the
    worker looked healthy while its commits stalled. It must stop instead, with exit code 1."""
    simulator = ShopSimulator(GeneratorConfig(seed=9, n_shoppers=50, clock="live"))
    messages = [m for m in islice(simulator.messages(), 400) if m.malformed_reason is None]
    first, second = messages[:200], messages[200:]
    faulty = WorkerProcess(settings, tmp_path / "faulty.log", script=FAULTY_WORKER)
    try:
        faulty.wait_ready()
        assert produce(first, settings.topic_by_kind, settings.librdkafka_config()).failed == 0
        read_topic(settings, settings.topic_scores, until=lambda ms: len(ms) > 0, timeout_s=30)
        assert produce(second, settings.topic_by_kind, settings.librdkafka_config()).failed == 0
        exit_code = faulty.process.wait(timeout=60)
    finally:
        if faulty.process.poll() is None:
            faulty.kill()
    log_text = faulty.log_tail(400)
    assert exit_code == 1, log_text
    assert "scoring stopped on RuntimeError: injected fault in the batch logic" in log_text

    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        scored_until(settings, newest_ts(valid_events(messages)))
    finally:
        assert worker.stop() == 0, worker.log_tail()


@pytest.mark.parametrize(
    "stop, lose_data_dir, bulk_restore",
    [("sigterm", True, True), ("kill", False, True), ("kill", True, True), ("kill", True, False)],
    ids=["graceful-lost-data-dir", "kill9-kept-data-dir", "kill9-lost-data-dir", "kill9-lost-data-dir-faust-recovery"],
)
def test_state_survives_a_restart(settings, tmp_path, stop, lose_data_dir, bulk_restore):
    """A worker stopped (gracefully or with kill -9) and restarted, with its RocksDB kept or
    deleted, ends with exactly the state of an uninterrupted offline replay. Catches Tansu's
    silent partial restore: with batched changelog writes a restored table lost updates
    without any error (docs/embedded-broker.md). A lost data directory is restored in bulk
    (streams/worker/bulk_restore.py; a threshold of one record forces it here), or, with bulk
    restore off, by Faust's per-record recovery."""
    settings = dataclasses.replace(settings, bulk_restore_min_records=1 if bulk_restore else 0)
    stream = at_most_per_shopper(
        ShopSimulator(GeneratorConfig(seed=5, n_shoppers=150, clock="live")).messages(), StateConfig().dedup_ids
    )  # the parity envelope, as above
    first = [next(stream) for _ in range(2000)]
    second = [next(stream) for _ in range(1000)]

    worker = WorkerProcess(settings, tmp_path / "worker-1.log")
    worker.wait_ready()
    produce(first, settings.topic_by_kind, settings.librdkafka_config())
    first_events = valid_events(first)
    scored_until(settings, newest_ts(first_events))
    if stop == "kill":
        worker.kill()
    else:
        assert worker.stop() == 0, worker.log_tail()
    if lose_data_dir:
        shutil.rmtree(settings.data_dir)

    worker = WorkerProcess(settings, tmp_path / "worker-2.log")
    try:
        worker.wait_ready()
        produce(second, settings.topic_by_kind, settings.librdkafka_config())
        events = first_events + valid_events(second)
        scored_until(settings, newest_ts(events))
    finally:
        assert worker.stop() == 0, worker.log_tail()
    if lose_data_dir:
        bulk_done = re.findall(r"bulk restore of \S+ done: (\d+) records", worker.log_path.read_text())
        assert bool(bulk_done) == bulk_restore, worker.log_tail()
    offline = final_states(events)
    online = {user: decode_state(raw) for user, raw in changelog_states(settings).items()}
    wrong = [user for user, state in offline.items() if encode_state(online[user]) != encode_state(state)]
    assert not wrong, f"{len(wrong)} of {len(offline)} shoppers restored wrongly, e.g. {wrong[:3]}"


def test_idle_shoppers_are_evicted_from_table_and_changelog(broker, tmp_path):
    settings = isolated_settings(
        broker.bootstrap_servers, tmp_path / "worker", retention_ms=4000, eviction_interval_s=1
    )
    ensure_topics(settings)
    messages = list(ShopSimulator(GeneratorConfig(seed=8, n_shoppers=60, clock="live")).messages(limit=300))
    users = {e.user_id for e in valid_events(messages)}
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        produce(messages, settings.topic_by_kind, settings.librdkafka_config())
        evicted = worker.wait_for_metric("shoppulse_shoppers_evicted_total", len(users), timeout_s=30)
        in_state = worker.metric("shoppulse_shoppers_in_state")
    finally:
        assert worker.stop() == 0, worker.log_tail()
    assert evicted == len(users)
    assert in_state == 0
    topic = f"{settings.app_id}-{STATE_TABLE}-changelog"
    changelog = read_topic(
        settings, topic, until=lambda ms: users <= {key_of(m).decode() for m in ms if m.value() is None}
    )
    last = {key_of(m).decode(): m.value() for m in changelog if m.key() != SEAL_KEY}
    assert set(last) == users and all(value is None for value in last.values()), "expected a tombstone per shopper"
