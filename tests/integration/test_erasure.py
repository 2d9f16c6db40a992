"""Erasure end to end on the embedded broker: `shoppulse forget`, the confirmation, no more outputs,
the state gone from table and changelog, still gone after a restart and after a restore from the
changelog into an empty data directory; a new event starts afresh; an erasure before the events
are committed, through kill -9. Also the trace context: a ``traceparent`` on an input event comes
back on the score, recommendations and churn alert it caused."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time

import pytest
from confluent_kafka import Producer

from features.encoding import decode_state, encode_state
from features.events import Event, encode_event
from features.offline import final_states
from models.registry import ModelRegistry
from streams.config import Settings
from streams.kafka.clients import PARTITIONER, ensure_topics
from streams.tools import forget

from .kafka_helpers import WorkerProcess, headers_of, isolated_settings, read_topic, value_of
from .test_lookup import lookup, mirrored_lookups
from .test_model_serving import publish_models
from .test_worker import changelog_values

pytestmark = pytest.mark.integration

TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def view(user: str, n: int, ts_ms: int) -> Event:
    return Event(
        "view", f"{user}-e{n}", user, ts_ms, session_id="s", item_id=f"i{n}", category="c", price=5.0, quantity=1
    )


def send(settings, events: list[Event], headers: list[tuple[str, str | bytes | None]] | None = None) -> None:
    """Page views keyed by user id with the inputs' partitioner, each with ``headers``."""
    producer = Producer({**settings.librdkafka_config(), "partitioner": PARTITIONER})
    for event in events:
        producer.produce(
            settings.topic_page_views, key=event.user_id.encode(), value=encode_event(event), headers=headers
        )
    assert producer.flush(30) == 0


def own_topics(broker, tmp_path, **overrides) -> Settings:
    """Settings of topics for this test alone, created (``overrides``: other settings)."""
    settings = isolated_settings(broker.bootstrap_servers, tmp_path / "worker", **overrides)
    ensure_topics(settings)
    return settings


def scores_of(settings, user: str, until_event: str, timeout_s: float = 60.0) -> list[dict]:
    """Every score so far, read until the one triggered by ``until_event`` arrived; those of ``user`` returned."""

    def arrived(messages) -> bool:
        return any(json.loads(value_of(m))["trigger_event_id"] == until_event for m in messages)

    messages = read_topic(settings, settings.topic_scores, until=arrived, timeout_s=timeout_s)
    assert arrived(messages), f"no score for {until_event} within {timeout_s:.0f} s"
    return [doc for doc in (json.loads(value_of(m)) for m in messages) if doc["user_id"] == user]


def test_forget_erases_a_shopper_for_good_and_a_new_event_starts_afresh(broker, tmp_path, capsys):
    # Silent shoppers re-scored every second: a shopper whose state survived would show up in the scores.
    settings = own_topics(broker, tmp_path, commit_interval_s=0.5, silent_after_ms=1000, silent_sweep_interval_s=1)
    now_ms = int(time.time() * 1000)
    gone, kept = "shopper-gone", "shopper-kept"
    worker = WorkerProcess(settings, tmp_path / "worker-1.log")
    try:
        worker.wait_ready()
        send(settings, [view(gone, n, now_ms - 10_000 + n) for n in range(5)], headers=[("traceparent", TRACEPARENT)])
        send(settings, [view(kept, 1, now_ms - 9_000)])
        traced = read_topic(
            settings,
            [settings.topic_scores, settings.topic_recommendations],
            until=lambda ms: any(json.loads(value_of(m))["trigger_event_id"] == f"{gone}-e4" for m in ms),
        )
        caused = [m for m in traced if json.loads(value_of(m))["trigger_event_id"] == f"{gone}-e4"]
        assert caused and all(headers_of(m)["traceparent"] == TRACEPARENT for m in caused)
        time.sleep(2.0)  # a few commit intervals: the events are committed, so the erasure is a tombstone
        assert lookup(worker.url, gone)[0] == 200
        assert mirrored_lookups(worker), "answered by the HTTP server process, which holds a copy of the shopper"
        code = forget.run(argparse.Namespace(user_ids=[gone], wait=30.0), settings)
        assert code == 0, capsys.readouterr().err
        (printed,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        confirmation = json.loads(printed)
        assert confirmation["user_id"] == gone and confirmation["found"] is True
        assert confirmation["store"] == "shopper_state" and "state" in confirmation["deleted"]
        erased_at = confirmation["erased_at"]
        assert worker.metric("shoppulse_erasures_total") == 1
        status, answer = lookup(worker.url, gone)
        assert (status, answer["error"]) == (404, "unknown_shopper"), "the HTTP server process forgot them too"
        time.sleep(3.0)  # three silent sweeps
        send(settings, [view(kept, 2, now_ms - 8_000)])
        after = [s for s in scores_of(settings, gone, f"{kept}-e2") if s["scored_at"] > erased_at]
        assert after == [], "no score of an erased shopper, not even a silent re-score"
    finally:
        assert worker.stop() == 0, worker.log_tail()
    values = changelog_values(settings)
    assert gone not in values and kept in values, "the changelog's last record for the shopper is a tombstone"

    for run, lose_data_dir in ((2, False), (3, True)):
        if lose_data_dir:
            shutil.rmtree(settings.data_dir)  # the table is restored from the changelog
        started_ms = int(time.time() * 1000)
        worker = WorkerProcess(settings, tmp_path / f"worker-{run}.log")
        try:
            worker.wait_ready()
            time.sleep(3.0)  # three silent sweeps over whatever was restored
            send(settings, [view(kept, 10 + run, now_ms - 7_000 + run)])
            restored = [s for s in scores_of(settings, gone, f"{kept}-e{10 + run}") if s["scored_at"] >= started_ms]
            assert restored == [], f"run {run}: the erased shopper came back"
        finally:
            assert worker.stop() == 0, worker.log_tail()
        assert gone not in changelog_values(settings)

    new = view(gone, 100, int(time.time() * 1000) - 1000)
    worker = WorkerProcess(settings, tmp_path / "worker-4.log")
    try:
        worker.wait_ready()
        send(settings, [new])
        assert new.event_id in {s["trigger_event_id"] for s in scores_of(settings, gone, new.event_id)}
    finally:
        assert worker.stop() == 0, worker.log_tail()
    state = changelog_values(settings)[gone].state
    assert state is not None
    assert encode_state(decode_state(state)) == encode_state(final_states([new])[gone]), "afresh: the new event only"


def test_an_erasure_before_its_events_are_committed_survives_kill_9_and_a_reordered_replay(broker, tmp_path, capsys):
    """Nothing committed (a commit only every hour): kill -9 after the erasure replays the events and the
    request from the start, in whatever order the fetches bring them. The erasure marker skips the
    erased events, also restored from the changelog into an empty data directory; once they are
    committed, the eviction sweep replaces it with a tombstone."""
    settings = own_topics(broker, tmp_path, commit_interval_s=3600.0, commit_every=1_000_000, eviction_interval_s=1)
    gone, kept, now_ms = "shopper-gone", "shopper-kept", int(time.time() * 1000)
    worker = WorkerProcess(settings, tmp_path / "worker-1.log")
    try:
        worker.wait_ready()
        send(settings, [view(gone, n, now_ms - 10_000 + n) for n in range(5)])
        scores_of(settings, gone, f"{gone}-e4")
        assert forget.run(argparse.Namespace(user_ids=[gone], wait=30.0), settings) == 0, capsys.readouterr().err
        time.sleep(3.0)  # eviction sweeps: the marker stays, its events are not committed
        assert worker.metric("shoppulse_shoppers_evicted_total") == 0
    finally:
        worker.kill()
    shutil.rmtree(settings.data_dir)  # the marker comes back from the changelog, or nothing would skip the replay

    started_ms = int(time.time() * 1000)
    worker = WorkerProcess(settings, tmp_path / "worker-2.log")
    try:
        worker.wait_ready()
        assert worker.wait_for_metric("shoppulse_replayed_events_total", 5, timeout_s=30) >= 5, "skipped as applied"
        send(settings, [view(kept, 1, now_ms - 5_000)])  # a probe: scored after the replayed batches' outputs
        replayed = [s for s in scores_of(settings, gone, f"{kept}-e1") if s["scored_at"] >= started_ms]
        assert replayed == [], "the replayed events of the erased shopper were scored"
    finally:
        assert worker.stop() == 0, worker.log_tail()  # a graceful stop commits what was consumed
    marker = changelog_values(settings)[gone]
    assert marker.state is not None and decode_state(marker.state).last_event_ms == 0 and marker.alert is None

    settings = dataclasses.replace(settings, commit_interval_s=0.5)
    worker = WorkerProcess(settings, tmp_path / "worker-3.log")
    try:
        worker.wait_ready()
        assert worker.wait_for_metric("shoppulse_shoppers_evicted_total", 1, timeout_s=30) >= 1
    finally:
        assert worker.stop() == 0, worker.log_tail()
    assert gone not in changelog_values(settings), "once committed, the marker is replaced by a tombstone"


def test_the_traceparent_reaches_score_recommendations_and_alert_and_forget_deletes_the_alert_state(
    broker, tmp_path, capsys
):
    registry = ModelRegistry(tmp_path / "registry")
    publish_models(registry, "v1", [f"i{n}" for n in range(20)], seed=1)
    # thresholds low enough that the first score alerts
    settings = own_topics(broker, tmp_path, models_dir=registry.root, churn_alert_high=0.01, churn_alert_low=0.005)
    event = view("traced", 1, int(time.time() * 1000) - 1000)
    outputs = [settings.topic_scores, settings.topic_recommendations, settings.topic_churn_alerts]
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        send(settings, [event], headers=[("traceparent", TRACEPARENT), ("tracestate", b"shop=1")])
        caused = read_topic(settings, outputs, until=lambda ms: {m.topic() for m in ms} == set(outputs))
        assert forget.run(argparse.Namespace(user_ids=["traced"], wait=30.0), settings) == 0
    finally:
        assert worker.stop() == 0, worker.log_tail()
    assert {m.topic() for m in caused} == set(outputs)
    for message in caused:
        assert headers_of(message) == {"traceparent": TRACEPARENT, "tracestate": b"shop=1"}, message.topic()
    (printed,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert json.loads(printed)["deleted"] == ["state", "alert", "memory"]
