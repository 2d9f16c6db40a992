"""Bulk restore of a table's changelog into its RocksDB partitions: a fast consumer and write batches.

Faust's own recovery hands every changelog record through its consumer, a queue and one
coroutine step each (about 3k records/s here: 50 minutes per million shoppers). A worker that
lost its data directory, or takes over a partition it never held, waits that long before it
scores anything. This module reads the changelog partitions with one confluent-kafka consumer
(large fetches, no consumer group work: partitions are assigned at explicit offsets) and writes
them with RocksDB write batches, the last value of a key winning and a null value deleting it,
exactly as replaying the records one by one would.

**The persisted offset moves with the data.** Every write batch also holds the partition's
persisted changelog offset (the key and encoding Faust reads, passed in by
:mod:`streams.worker.faust_seam`), set to the last record in that batch. RocksDB applies a write
batch atomically, so the partition always equals the changelog replayed up to its persisted
offset, whenever the process dies. A worker killed during a bulk restore (kill -9 included)
therefore resumes after the last batch written: the next start restores the rest, and no
record is applied out of order or lost. Applying a prefix again is harmless (in order, last
value wins), so even a write-ahead log lost with the machine only costs time.

Faust decides where each partition starts and ends (its persisted offset and its high watermark);
:class:`streams.worker.faust_seam.BulkRecovery` calls :meth:`BulkRestorer.restore` from
inside its recovery and hands Faust the restored offsets, so Faust's per-record recovery then
finds nothing left to do.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from rocksdict import WriteBatch

log = logging.getLogger(__name__)

#: Records per RocksDB write batch (and per persisted-offset update): large enough that the write
#: costs little per record, small enough that a stop request or a kill loses little work.
BATCH_RECORDS = 20_000
#: Messages taken from the consumer per call.
CONSUME_MESSAGES = 10_000
#: How long one consume call waits for messages, in s.
CONSUME_TIMEOUT_S = 0.5
#: Fetch sizes of the restore consumer, in bytes: much larger than the worker's own, since
#: nothing else runs on the partition while it restores.
MAX_PARTITION_FETCH_BYTES = 16 * 1024 * 1024
FETCH_MAX_BYTES = 64 * 1024 * 1024
#: How long a fetch waits at the end of a partition, in ms (Tansu answers only when the wait ends).
FETCH_WAIT_MAX_MS = 50


class RestoreStalled(RuntimeError):
    """No changelog record arrived for :attr:`BulkRestorer.stall_s` while records were still due."""


class WritableDB(Protocol):
    """What this module needs of a rocksdict ``Rdict`` opened in raw mode."""

    def write(self, write_batch: WriteBatch) -> None: ...


@dataclass(frozen=True, slots=True)
class PartitionRestore:
    """One changelog partition to restore into ``db``: offsets ``first_offset`` to ``last_offset``, both included.

    ``first_offset`` may lie before the partition's earliest offset (compaction, retention):
    reading then starts at the earliest.
    """

    partition: int
    db: WritableDB
    first_offset: int
    last_offset: int


@dataclass(slots=True)
class RestoreReport:
    """What :meth:`BulkRestorer.restore` did: records applied, bytes read, seconds, and per partition
    the offset the partition is now restored (and persisted) up to; ``finished`` when every
    partition reached its ``last_offset``."""

    records: int = 0
    value_bytes: int = 0
    seconds: float = 0.0
    restored_to: dict[int, int] = field(default_factory=dict)
    finished: bool = False
    #: Records without a key (no table holds them; Faust's recovery would fail on them): skipped, counted.
    keyless: int = 0


class BulkRestorer:
    """Restores changelog partitions into RocksDB with one consumer and write batches.

    Args:
        consumer_config: confluent-kafka settings (connection, security, a group id that is never
            joined or committed to); the fetch sizes here are added.
        min_records: a partition is bulk-restored when at least this many records are left; fewer
            go through Faust's per-record recovery (starting a consumer costs more). 0: never.
        batch_records: records per write batch.
        stall_s: give up when no record arrives for this long while some are due.
    """

    def __init__(
        self,
        consumer_config: dict[str, Any],
        min_records: int,
        batch_records: int = BATCH_RECORDS,
        stall_s: float = 60.0,
    ) -> None:
        self.consumer_config = {
            **consumer_config,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "max.partition.fetch.bytes": MAX_PARTITION_FETCH_BYTES,
            "fetch.max.bytes": FETCH_MAX_BYTES,
            "receive.message.max.bytes": FETCH_MAX_BYTES + 1024 * 1024,
            "fetch.wait.max.ms": FETCH_WAIT_MAX_MS,
        }
        self.min_records = min_records
        self.batch_records = batch_records
        self.stall_s = stall_s

    def worth_it(self, first_offset: int, last_offset: int) -> bool:
        """Whether a partition with these offsets left is bulk-restored (rather than by Faust, per record)."""
        return self.min_records > 0 and last_offset - first_offset + 1 >= self.min_records

    def restore(
        self, topic: str, parts: list[PartitionRestore], offset_key: bytes, stop: threading.Event
    ) -> RestoreReport:
        """Restore ``parts`` of changelog ``topic`` (blocking; run it in a thread).

        Each write batch also sets ``offset_key`` to the last offset it holds (module docstring).
        Returns early, with what was written so far, once ``stop`` is set (a rebalance or shutdown).
        Raises :class:`RestoreStalled`, or ``KafkaException`` on a consumer error; what was written
        before stays valid.
        """
        started = time.monotonic()
        report = RestoreReport()
        pending = {p.partition: p for p in parts if p.first_offset <= p.last_offset}
        report.restored_to = {p.partition: p.last_offset for p in parts if p.partition not in pending}
        if not pending:
            report.finished = True
            return report
        consumer = Consumer(self.consumer_config)
        try:
            consumer.assign([TopicPartition(topic, p.partition, max(p.first_offset, 0)) for p in pending.values()])
            self._read(consumer, pending, offset_key, stop, report)
        finally:
            consumer.close()
            report.seconds = time.monotonic() - started
        report.finished = not pending
        return report

    def _read(
        self,
        consumer: Consumer,
        pending: dict[int, PartitionRestore],
        offset_key: bytes,
        stop: threading.Event,
        report: RestoreReport,
    ) -> None:
        """The consume loop: fills one write batch per partition, writes it every ``batch_records``
        records and at the partition's last offset, then drops the partition from ``pending``."""
        dbs = {partition: part.db for partition, part in pending.items()}
        batches = {partition: WriteBatch(raw_mode=True) for partition in pending}
        in_batch = dict.fromkeys(pending, 0)
        last_read = {partition: part.first_offset - 1 for partition, part in pending.items()}

        def write(partition: int, up_to: int) -> None:
            batch = batches[partition]
            batch.put(offset_key, str(up_to).encode())  # the persisted offset, in the same atomic write
            dbs[partition].write(batch)
            batches[partition] = WriteBatch(raw_mode=True)  # a written batch cannot be reused
            in_batch[partition] = 0
            report.restored_to[partition] = up_to

        def finish(partition: int) -> None:
            write(partition, pending.pop(partition).last_offset)  # the partition's end: restored

        last_record_at = time.monotonic()
        while pending and not stop.is_set():
            messages = consumer.consume(CONSUME_MESSAGES, timeout=CONSUME_TIMEOUT_S)
            if not messages:
                if time.monotonic() - last_record_at > self.stall_s:
                    raise RestoreStalled(
                        f"no changelog record for {self.stall_s:.0f} s; partitions left: "
                        + ", ".join(f"{p}: read to {last_read[p]} of {pending[p].last_offset}" for p in sorted(pending))
                    )
                continue
            last_record_at = time.monotonic()
            for message in messages:
                partition = message.partition()
                part = None if partition is None else pending.get(partition)
                if part is None or partition is None:
                    continue  # finished already; the consumer may still hold fetched records
                error = message.error()
                offset = message.offset()
                assert offset is not None, "a consumed message or partition end has an offset"
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(error)
                    if offset - 1 >= part.last_offset:  # the partition's end lies past what is due
                        finish(partition)
                    continue
                if offset > part.last_offset:
                    finish(partition)
                    continue
                key, value = message.key(), message.value()
                last_read[partition] = offset
                if key is None:
                    report.keyless += 1
                elif value is None:
                    batches[partition].delete(key)
                else:
                    batches[partition].put(key, value)
                    report.value_bytes += len(value)
                report.records += 1
                in_batch[partition] += 1
                if offset == part.last_offset:
                    finish(partition)
                elif in_batch[partition] >= self.batch_records:
                    write(partition, offset)
        for partition in list(pending):  # stopped: keep what was read, persisted with its offset
            if in_batch[partition]:
                write(partition, last_read[partition])
