"""``shoppulse train``: train, evaluate and register the models; its options are ``models.train_cli``'s.

``--from-kafka`` is read here (models/ never talks to Kafka): every message of the input topics
from a day before ``--since`` (Kafka timestamps; an event arrives at most the validator's
future-skew limit before its event time) to the end of each partition, in each shopper's arrival
order (:func:`features.archive.arrival_order`), handed to training, which validates them, applies
the worker's late-event rule and keeps the events in ``[--since, --until)``.

``--archive DIR --with-topics`` reads the archive and then, per topic partition, the messages after
the highest offset the archive holds (all of them where it holds none): the newest part, which the
archiver has not written yet, joins the weeks the topics no longer keep.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import cast

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from streams.config import Settings

DAY_MS = 86_400_000


def read_input_topics(
    settings: Settings, since_ms: int | None, after_archive: Path | None = None
) -> tuple[list[tuple[str, bytes, bytes]], dict]:
    """The input topics' messages (from a day before ``since_ms``; all when None; with
    ``after_archive``, those after what that archive holds) in arrival order, and a summary
    (topics, messages read per topic, where each partition started)."""
    from features.archive import Row, archived_until, arrival_order
    from streams.kafka.clients import read_to_end, topic_partitions, topic_reader

    kinds = {topic: kind for kind, topic in settings.topic_by_kind.items()}
    consumer = topic_reader(settings, "train")
    by_partition: dict[int, dict[str, list[Row]]] = {}
    counts = dict.fromkeys(settings.input_topics, 0)
    try:
        wanted = [
            TopicPartition(t, p, OFFSET_BEGINNING if since_ms is None else max(0, since_ms - DAY_MS))
            for t in settings.input_topics
            for p in topic_partitions(settings, t)
        ]
        if after_archive is not None:
            archived = {topic: archived_until(after_archive, topic) for topic in settings.input_topics}
            for tp in wanted:
                if tp.partition in archived[tp.topic]:
                    tp.offset = archived[tp.topic][tp.partition] + 1
        elif since_ms is not None and wanted:  # -1: nothing that recent in that partition
            wanted = [tp for tp in consumer.offsets_for_times(wanted, timeout=15) if tp.offset >= 0]
        started = {f"{tp.topic}/{tp.partition}": "beginning" if tp.offset < 0 else tp.offset for tp in wanted}
        for m in read_to_end(consumer, wanted):
            topic, partition = cast(str, m.topic()), cast(int, m.partition())
            counts[topic] += 1
            by_partition.setdefault(partition, {}).setdefault(topic, []).append(
                (m.timestamp()[1], kinds[topic], m.key() or b"", m.value() or b"")
            )
    finally:
        consumer.close()
    messages = [(kind, key, value) for _, kind, key, value in arrival_order(by_partition)]
    summary = {"bootstrap_servers": settings.bootstrap_servers, "messages_per_topic": counts, "started_at": started}
    return messages, summary


def run(args: argparse.Namespace, settings: Settings) -> int:
    from models.train_cli import TopicMessages
    from models.train_cli import main as train_main

    rest: Sequence[str] = args.rest
    if "--with-topics" in rest:
        where = argparse.ArgumentParser(prog="shoppulse train", add_help=False)
        where.add_argument("--archive", type=Path, default=None)
        archive = where.parse_known_args(rest)[0].archive
        if archive is None or not archive.is_dir():
            return train_main(rest)  # it says what is missing
        messages, summary = read_input_topics(settings, None, after_archive=archive)
        return train_main(rest, TopicMessages(messages, None, None, summary))
    if "--from-kafka" not in rest:
        return train_main(rest)
    from streams.tools.dlq import parse_time_ms

    times = argparse.ArgumentParser(prog="shoppulse train", add_help=False)
    times.add_argument("--since", type=parse_time_ms, default=None)
    times.add_argument("--until", type=parse_time_ms, default=None)
    bounds, _ = times.parse_known_args(rest)
    messages, summary = read_input_topics(settings, bounds.since)
    return train_main(rest, TopicMessages(messages, bounds.since, bounds.until, summary))
