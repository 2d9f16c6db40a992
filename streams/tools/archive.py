"""``shoppulse archive``: the input topics' validated events into date-partitioned Parquet files.

Topics keep days (7 by default), churn needs weeks: this consumer, in its own consumer group
(``<SHOPPULSE_APP_ID>-archive``, so the worker's offsets are untouched), writes every valid event
to ``SHOPPULSE_ARCHIVE_DIR`` in the layout of :mod:`features.archive`. Invalid messages are
validated with the worker's validator and limits, counted by reason and skipped (the worker
dead-letters them with their bytes).

Exactly once, across crashes:

* each topic partition is buffered on its own, at most ``SHOPPULSE_ARCHIVE_FLUSH_EVENTS`` messages
  or ``SHOPPULSE_ARCHIVE_FLUSH_INTERVAL_S`` seconds (that bounds memory), and never across an
  arrival date;
* a flush writes one part file atomically (temp name, fsync, rename), THEN commits the offset after
  its range: a crash before the rename leaves nothing and the range is read again;
* a crash between the rename and the commit leaves a committed offset behind the files, so on
  every assignment the archiver seeks to the later of the committed offset and one past the highest
  offset in the file names (:func:`features.archive.archived_until`): nothing is written twice.

Retention: date folders older than ``SHOPPULSE_ARCHIVE_RETENTION_DAYS`` go at start and hourly.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, Message, TopicPartition

from features.archive import PartBuffer, apply_retention, archived_until, remove_temp_files, utc_date, write_part
from features.events import InvalidEvent, ValidationLimits, parse_event
from streams.config import Settings
from streams.kafka.clients import cluster_metadata, confluent_consumer_config, consume_data

log = logging.getLogger(__name__)

#: Seconds between retention sweeps and between progress lines.
RETENTION_SWEEP_S = 3600.0
PROGRESS_EVERY_S = 10.0
#: Messages taken per consume call.
_CONSUME_BATCH = 1000


def archive_group(settings: Settings) -> str:
    """The archiver's consumer group: its own, so its offsets are independent of the worker's."""
    return f"{settings.app_id}-archive"


@dataclass
class ArchiveStats:
    """Counts since start: messages consumed, events archived, invalid by reason, parts written, flushes."""

    consumed: int = 0
    archived: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    parts: int = 0
    commits: int = 0

    def line(self) -> str:
        skipped = sum(self.invalid.values())
        reasons = f" ({', '.join(f'{r} {n}' for r, n in sorted(self.invalid.items()))})" if skipped else ""
        return (
            f"archive: {self.consumed:,} messages read, {self.archived:,} events archived in {self.parts:,} "
            f"part files, {skipped:,} invalid skipped{reasons}"
        )


class Archiver:
    """One consumer over the input topics and a buffer per assigned partition (see the module docstring).

    ``after_write`` (tests) runs between a part's rename and its commit: the crash window.
    """

    def __init__(
        self,
        settings: Settings,
        root: Path,
        flush_events: int,
        flush_interval_s: float,
        retention_days: int,
        after_write: Callable[[Path], None] | None = None,
    ) -> None:
        self.settings = settings
        self.root = root
        self.flush_events = max(1, flush_events)
        self.flush_interval_s = flush_interval_s
        self.retention_days = retention_days
        self.after_write = after_write
        self.limits = ValidationLimits(settings.max_event_bytes, settings.max_future_skew_ms)
        self.kind_of_topic = {topic: kind for kind, topic in settings.topic_by_kind.items()}
        self.stats = ArchiveStats()
        self.buffers: dict[tuple[str, int], PartBuffer] = {}
        self.opened_at: dict[tuple[str, int], float] = {}
        self.assigned: set[tuple[str, int]] = set()
        self.at_end: set[tuple[str, int]] = set()
        self.consumer = Consumer(
            {
                **confluent_consumer_config(settings, archive_group(settings)),
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": True,
                "session.timeout.ms": 6000,
                "log_level": 3,
            }
        )

    # ------------------------------------------------------------------ rebalances
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start each partition after the later of its committed offset and the archived files."""
        committed = {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(partitions, timeout=30)}
        by_topic = {topic: archived_until(self.root, topic) for topic in {tp.topic for tp in partitions}}
        for tp in partitions:
            where = (tp.topic, tp.partition)
            remove_temp_files(self.root, tp.topic, tp.partition)
            in_files = by_topic[tp.topic].get(tp.partition)
            if in_files is not None and in_files + 1 > committed[where]:
                log.info(
                    "archive: %s[%d] resumes at %d, after its archived files (committed: %d)",
                    tp.topic,
                    tp.partition,
                    in_files + 1,
                    committed[where],
                )
                tp.offset = in_files + 1
            self.assigned.add(where)
        consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Write and commit what the revoked partitions buffered, while they are still ours."""
        for tp in partitions:
            self._flush((tp.topic, tp.partition))
            self.assigned.discard((tp.topic, tp.partition))
            self.at_end.discard((tp.topic, tp.partition))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Another member owns them now: drop their buffers unwritten (it reads that range again)."""
        for tp in partitions:
            where = (tp.topic, tp.partition)
            self.buffers.pop(where, None)
            self.assigned.discard(where)
            self.at_end.discard(where)

    # ------------------------------------------------------------------ messages
    def _add(self, message: Message, now_ms: int) -> None:
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        assert topic is not None and partition is not None and offset is not None, "a data message has a place"
        where = (topic, partition)
        self.at_end.discard(where)
        ts_type, kafka_ts_ms = message.timestamp()
        arrived_ms = kafka_ts_ms if ts_type != TIMESTAMP_NOT_AVAILABLE and kafka_ts_ms > 0 else now_ms
        date = utc_date(arrived_ms)
        buffer = self.buffers.get(where)
        if buffer is not None and buffer.date != date:  # a part never spans two arrival dates
            self._flush(where)
            buffer = None
        if buffer is None:
            buffer = self.buffers[where] = PartBuffer(topic, partition, date, offset)
            self.opened_at[where] = time.monotonic()
        kind = self.kind_of_topic[topic]
        key, value = message.key(), message.value()
        self.stats.consumed += 1
        try:
            event = parse_event(kind, key, value, now_ms, self.limits)
        except InvalidEvent as exc:
            self.stats.invalid[exc.reason] += 1
            buffer.add(offset, arrived_ms, kind, b"", b"", None)
        else:
            assert key is not None and value is not None, "a valid event has its key and value"
            buffer.add(offset, arrived_ms, kind, key, value, event)
            self.stats.archived += 1
        if buffer.last_offset - buffer.first_offset + 1 >= self.flush_events:
            self._flush(where)

    def _flush(self, where: tuple[str, int]) -> None:
        """Write one partition's buffer (when it holds valid events), then commit the offset after it."""
        buffer = self.buffers.pop(where, None)
        if buffer is None:
            return
        path = write_part(self.root, buffer)
        if path is not None:
            self.stats.parts += 1
            if self.after_write is not None:
                self.after_write(path)
        self.consumer.commit(offsets=[TopicPartition(where[0], where[1], buffer.last_offset + 1)], asynchronous=False)
        self.stats.commits += 1

    def flush_all(self) -> None:
        for where in list(self.buffers):
            self._flush(where)

    def _flush_old(self) -> None:
        now = time.monotonic()
        for where in [w for w in self.buffers if now - self.opened_at[w] >= self.flush_interval_s]:
            self._flush(where)

    def _retention(self) -> None:
        removed = apply_retention(self.root, self.retention_days, int(time.time() * 1000))
        if removed:
            log.info("archive: retention (%d days) removed %s", self.retention_days, ", ".join(removed))

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event, stop_at_end: bool = False) -> ArchiveStats:
        """Archive until ``stop`` is set (or, with ``stop_at_end``, every assigned partition is read to
        its end); buffers are written and committed before it returns."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._retention()
        last_retention = last_progress = time.monotonic()
        self.consumer.subscribe(
            list(self.settings.input_topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        try:
            while not stop.is_set():
                now_ms = int(time.time() * 1000)
                for message in consume_data(
                    self.consumer,
                    _CONSUME_BATCH,
                    0.5,
                    on_error=lambda error: log.warning("archive: consumer error: %s", error),
                    on_end=lambda eof: self.at_end.add((eof.topic() or "", eof.partition() or 0)),
                ):
                    self._add(message, now_ms)
                self._flush_old()
                now = time.monotonic()
                if now - last_progress >= PROGRESS_EVERY_S:
                    log.info("%s", self.stats.line())
                    last_progress = now
                if now - last_retention >= RETENTION_SWEEP_S:
                    self._retention()
                    last_retention = now
                if stop_at_end and self.assigned and self.assigned <= self.at_end:
                    break
            self.flush_all()
        finally:
            self.consumer.close()
        log.info("%s", self.stats.line())
        return self.stats


# --------------------------------------------------------------------------- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=None, help="archive folder (default: SHOPPULSE_ARCHIVE_DIR)")
    parser.add_argument(
        "--retention-days",
        type=int,
        default=None,
        help="delete arrival dates older than this (default: SHOPPULSE_ARCHIVE_RETENTION_DAYS; 0 keeps all)",
    )
    parser.add_argument(
        "--flush-events",
        type=int,
        default=None,
        help="write a partition's part after this many messages (default: SHOPPULSE_ARCHIVE_FLUSH_EVENTS)",
    )
    parser.add_argument(
        "--flush-interval-s",
        type=float,
        default=None,
        help="... or after this many seconds (default: SHOPPULSE_ARCHIVE_FLUSH_INTERVAL_S)",
    )
    parser.add_argument(
        "--stop-at-end",
        action="store_true",
        help="stop once every assigned partition is read to its end (a one-off copy, tests)",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    from streams.tools.process import stop_on_signals

    stop = stop_on_signals()
    cluster_metadata(settings)  # a wrong address or password stops here, with a message
    archiver = Archiver(
        settings,
        Path(args.dir) if args.dir else settings.archive_dir,
        args.flush_events if args.flush_events is not None else settings.archive_flush_events,
        args.flush_interval_s if args.flush_interval_s is not None else settings.archive_flush_interval_s,
        args.retention_days if args.retention_days is not None else settings.archive_retention_days,
    )
    log.info(
        "archive: %s -> %s (group %s)",
        ", ".join(settings.input_topics),
        archiver.root,
        archive_group(settings),
    )
    archiver.run(stop, stop_at_end=args.stop_at_end)
    return 0
