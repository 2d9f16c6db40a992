"""``shoppulse train --from-kafka``: the input topics read in each shopper's arrival order, validated,
the worker's late-event rule applied, the event-time range kept; then the usual training path."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import defaultdict
from itertools import islice
from pathlib import Path

import pytest

from features.events import Event, InvalidEvent, encode_event, parse_event, topic_kind_of
from features.offline import split_late
from features.state import StateConfig
from models.train_cli import TopicMessages, load_events
from streams.kafka.clients import confluent_producer_config, ensure_topics
from streams.kafka.producer import produce
from streams.sim.generator import GeneratedMessage, GeneratorConfig, ShopSimulator
from streams.tools import train
from streams.tools.cli import parse_args

from .kafka_helpers import WorkerProcess, isolated_settings

pytestmark = pytest.mark.integration


def test_the_topics_give_the_events_the_worker_would_apply_in_the_time_range(
    broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = isolated_settings(broker.bootstrap_servers, tmp_path / "worker")
    ensure_topics(settings)
    now_ms = int(time.time() * 1000)
    config = GeneratorConfig(seed=8, n_shoppers=80, malformed_fraction=0.05, duration_days=3.0)
    config = dataclasses.replace(config, start_ms=now_ms - config.span_ms)
    sent = list(islice(ShopSimulator(config).messages(), 4000))
    valid: list[Event] = []
    for m in sent:
        try:
            valid.append(parse_event(m.topic_kind, m.key, m.value, now_ms))
        except InvalidEvent:
            pass
    report = produce(sent, settings.topic_by_kind, confluent_producer_config(settings), progress=False)
    assert report.failed == 0
    # Late arrivals: copies of early events with new ids, sent after their shoppers' newest events.
    stale = [dataclasses.replace(e, event_id=f"late-{e.event_id}") for e in valid[:200:10]]
    time.sleep(0.1)  # later Kafka timestamps than everything above
    stale_messages = [GeneratedMessage(topic_kind_of(e), e.user_id.encode(), encode_event(e)) for e in stale]
    report = produce(stale_messages, settings.topic_by_kind, confluent_producer_config(settings), progress=False)
    assert report.failed == 0
    sent += stale_messages

    messages, summary = train.read_input_topics(settings, None)
    assert sum(summary["messages_per_topic"].values()) == len(sent)
    arrived: dict[tuple[bytes, str], list[bytes]] = defaultdict(list)
    for kind, key, value in messages:
        arrived[key, kind].append(value)
    produced: dict[tuple[bytes, str], list[bytes]] = defaultdict(list)
    for m in sent:
        produced[m.key, m.topic_kind].append(m.value)
    assert arrived == produced, "each shopper's messages of each topic in the order they were sent"

    times = sorted(e.ts_ms for e in valid)
    since, until = min(e.ts_ms for e in stale[1:]), times[3 * len(times) // 4]
    assert since > times[0], "the range cuts at both ends"
    args = argparse.Namespace(from_kafka=True, topics=TopicMessages(messages, since, until, summary))
    loaded = load_events(args)
    assert not isinstance(loaded, int)
    events, source = loaded
    in_arrival_order = []
    for kind, key, value in messages:
        try:
            in_arrival_order.append(parse_event(kind, key, value, now_ms))
        except InvalidEvent:
            pass
    kept = split_late([e for e in in_arrival_order if e.ts_ms >= since])[0]
    assert events == [e for e in kept if e.ts_ms < until]
    # Independently of split_late: a copy is LATE when its shopper's newest regular event (all of
    # which arrived before the copies) is more than the grace period after it.
    newest: dict[str, int] = {}
    for e in valid:
        newest[e.user_id] = max(newest.get(e.user_id, 0), e.ts_ms)
    in_range = {e.event_id: e for e in stale if since <= e.ts_ms < until}
    late_ids = {i for i, e in in_range.items() if e.ts_ms < newest[e.user_id] - StateConfig().grace_ms}
    ids = {e.event_id for e in events}
    assert late_ids and not late_ids & ids, "late copies are left out, as the worker leaves them out"
    assert set(in_range) - late_ids <= ids, "copies within the grace period are applied, as by the worker"
    assert source["kind"] == "kafka" and sum(source["invalid"].values()) > 0

    # The command: reads the topics itself and trains through the usual path (three days: too short).
    argv = ["train", "--from-kafka", "--since", str(since), "--no-progress", "--registry", str(tmp_path / "r")]
    assert train.run(parse_args(argv), settings) == 1
    err = capsys.readouterr().err
    assert "from the input topics" in err and "longer log" in err
    assert json.dumps(summary)  # the summary goes into the artifacts' training data


def test_an_archive_then_the_topics_after_it_give_every_event_once(broker, tmp_path: Path) -> None:
    """``--archive DIR --with-topics``: the archive, then per partition the messages after its
    highest archived offset; every valid event sent exactly once, archived or not."""
    archive = tmp_path / "archive"
    settings = isolated_settings(broker.bootstrap_servers, tmp_path / "worker", archive_dir=archive)
    ensure_topics(settings)
    now_ms = int(time.time() * 1000)
    config = GeneratorConfig(seed=9, n_shoppers=60, malformed_fraction=0.05, duration_days=3.0)
    sent = list(islice(ShopSimulator(dataclasses.replace(config, start_ms=now_ms - config.span_ms)).messages(), 3000))
    archived, newest = sent[:2000], sent[2000:]
    assert produce(archived, settings.topic_by_kind, confluent_producer_config(settings), progress=False).failed == 0
    command = "import sys; from streams.tools.cli import main; sys.exit(main(['archive', '--stop-at-end']))"
    archiver = WorkerProcess(settings, tmp_path / "archive.log", script=command)
    assert archiver.process.wait(timeout=120) == 0, archiver.log_tail()
    assert produce(newest, settings.topic_by_kind, confluent_producer_config(settings), progress=False).failed == 0

    messages, summary = train.read_input_topics(settings, None, after_archive=archive)
    assert sorted(messages) == sorted((m.topic_kind, m.key, m.value) for m in newest)
    topics = TopicMessages(messages, None, None, summary)
    args = argparse.Namespace(from_kafka=False, archive=str(archive), days=None, with_topics=True, topics=topics)
    loaded = load_events(args)
    assert not isinstance(loaded, int)
    events, source = loaded
    valid = []
    for m in sent:
        try:
            valid.append(parse_event(m.topic_kind, m.key, m.value, now_ms).event_id)
        except InvalidEvent:
            pass
    assert sorted(e.event_id for e in events) == sorted(valid)
    assert source["kind"] == "archive+kafka" and source["topics"]["messages_per_topic"]
