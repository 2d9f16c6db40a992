"""Bulk restore (streams/worker/bulk_restore.py) against the embedded broker and real Faust stores:
a table restored in bulk equals the same table built by Faust's own per-record changelog replay
(values, deletions, and the persisted offset Faust resumes from), also when the restore is
stopped part-way and a later one finishes it, and when a worker is killed during a restore."""

from __future__ import annotations

import dataclasses
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Message as KafkaMessage
from confluent_kafka import Producer
from faust.types.tuples import Message

from streams.config import Settings
from streams.kafka.clients import PARTITIONER, TopicSpec, confluent_consumer_config, ensure_topics
from streams.worker.app import STATE_TABLE, state_table_store
from streams.worker.bulk_restore import BulkRestorer, PartitionRestore, WritableDB
from streams.worker.faust_seam import TP, TableStore
from streams.worker.table_writer import SEAL_KEY

from .kafka_helpers import WorkerProcess, isolated_settings, key_of, read_to_end


def partition_of(record: KafkaMessage) -> int:
    partition = record.partition()
    assert partition is not None, "a consumed record has its partition"
    return partition


def offset_of(record: KafkaMessage) -> int:
    offset = record.offset()
    assert offset is not None, "a consumed record has its offset"
    return offset


pytestmark = pytest.mark.integration

PARTITIONS = 3


def table_store(settings: Settings, data_dir: Path) -> TableStore:
    """The shopper table's store of a real (unstarted) worker app, its RocksDB under ``data_dir``."""
    return state_table_store(dataclasses.replace(settings, data_dir=data_dir))


@pytest.fixture
def changelog(broker, tmp_path) -> tuple[Settings, str, dict[int, int]]:
    """A changelog with overwrites and deletions in every partition (several records per record
    batch, as the worker writes them); returns settings, topic and each partition's last offset."""
    settings = isolated_settings(broker.bootstrap_servers, tmp_path / "unused", partitions=PARTITIONS)
    topic = f"{settings.app_id}-{STATE_TABLE}-changelog"
    ensure_topics(settings, [TopicSpec(topic, PARTITIONS, {"cleanup.policy": "compact"})])
    rng = random.Random(17)
    producer = Producer({**settings.librdkafka_config(), "linger.ms": 20})
    last: dict[int, int] = {}

    def delivered(error, message) -> None:
        assert error is None, error
        last[message.partition()] = max(last.get(message.partition(), -1), message.offset())

    for n in range(30_000):
        partition = rng.randrange(PARTITIONS)
        key = f"shopper-{partition}-{rng.randrange(2_000)}".encode()
        value = None if rng.random() < 0.1 else rng.randbytes(rng.randrange(1, 300)) + str(n).encode()
        producer.produce(topic, key=key, value=value, partition=partition, on_delivery=delivered)
        producer.poll(0)
    assert producer.flush(30) == 0
    return settings, topic, last


def per_record_replay(settings: Settings, topic: str, store: TableStore) -> None:
    """Faust's own recovery path: every changelog record, one at a time, through ``apply_changelog_batch``."""

    @dataclass
    class Event:
        message: Message

    for record in read_to_end(settings, topic):
        key, value = key_of(record), record.value()
        message = Message(topic, partition_of(record), offset_of(record), 0.0, 0, None, key, value, None)
        store.table.data.apply_changelog_batch([Event(message)], to_key=None, to_value=None)


def contents(store: TableStore, topic: str) -> tuple[dict[int, dict[bytes, bytes]], dict[int, int | None]]:
    """Every stored key and value per partition, and the persisted offset Faust would resume from."""
    values: dict[int, dict[bytes, bytes]] = {p: {} for p in range(PARTITIONS)}
    for partition, key, value in store.items(set(range(PARTITIONS))):
        values[partition][key] = value
    offsets = {p: store.table.data.persisted_offset(TP(topic, p)) for p in range(PARTITIONS)}
    return values, offsets


def restore(
    settings: Settings, topic: str, store: TableStore, first: dict[int, int], last: dict[int, int], **kwargs
) -> None:
    """Bulk-restore every partition from ``first`` (default 0) to ``last`` and check it finished."""
    restorer = BulkRestorer(confluent_consumer_config(settings, "restore-test"), min_records=1, **kwargs)
    parts = [PartitionRestore(p, store.db(p), first.get(p, 0), last[p]) for p in range(PARTITIONS)]
    report = restorer.restore(topic, parts, store.offset_key, threading.Event())
    assert report.finished and report.restored_to == last


def test_bulk_restore_equals_faust_per_record_replay(changelog, tmp_path):
    settings, topic, last = changelog
    reference = table_store(settings, tmp_path / "per-record")
    per_record_replay(settings, topic, reference)
    expected = contents(reference, topic)
    assert expected[1] == last and all(expected[0].values()), "the reference replay read every partition"
    assert sum(len(v) for v in expected[0].values()) < 3 * 2_000, "some keys were deleted and stay deleted"

    bulk = table_store(settings, tmp_path / "bulk")
    restore(settings, topic, bulk, {}, last, batch_records=997)
    assert contents(bulk, topic) == expected


class StopAfterWrites:
    """A real RocksDB partition that sets ``stop`` after ``writes`` write batches (a stop request or
    a kill between two batches; the batch written is kept, as after kill -9)."""

    def __init__(self, db: WritableDB, stop: threading.Event, writes: int) -> None:
        self.db, self.stop, self.left = db, stop, writes

    def write(self, write_batch) -> None:
        self.db.write(write_batch)
        self.left -= 1
        if self.left <= 0:
            self.stop.set()


def test_a_stopped_restore_keeps_a_consistent_prefix_and_the_next_one_finishes_it(changelog, tmp_path):
    settings, topic, last = changelog
    reference = table_store(settings, tmp_path / "per-record")
    per_record_replay(settings, topic, reference)

    store = table_store(settings, tmp_path / "bulk")
    stop = threading.Event()
    restorer = BulkRestorer(confluent_consumer_config(settings, "restore-test"), min_records=1, batch_records=1_500)
    parts = [PartitionRestore(p, StopAfterWrites(store.db(p), stop, 2), 0, last[p]) for p in range(PARTITIONS)]
    report = restorer.restore(topic, parts, store.offset_key, stop)
    assert not report.finished

    # Each partition holds exactly the changelog replayed up to its persisted offset.
    persisted = contents(store, topic)[1]
    assert any(persisted[p] is None or persisted[p] < last[p] for p in range(PARTITIONS)), "stopped part-way"
    prefix = table_store(settings, tmp_path / "prefix")
    for record in read_to_end(settings, topic):
        partition, offset = partition_of(record), persisted[partition_of(record)]
        if offset is not None and offset_of(record) <= offset:
            prefix.put(partition, key_of(record), record.value())
    assert contents(store, topic)[0] == contents(prefix, topic)[0]

    # The next start resumes after the persisted offsets and ends equal to the per-record replay.
    first = {p: 0 if (offset := persisted[p]) is None else offset + 1 for p in range(PARTITIONS)}
    restore(settings, topic, store, first, last)
    assert contents(store, topic) == contents(reference, topic)


def data_dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


@pytest.mark.slow
def test_a_worker_killed_during_a_bulk_restore_finishes_it_on_the_next_start(broker, tmp_path):
    """A worker restoring a large changelog into an empty data directory is killed (-9) once its
    first whole write batches are on disk; the next start bulk-restores only the rest, and the table
    then holds exactly the changelog's last value of every key, deletions included."""
    settings = isolated_settings(broker.bootstrap_servers, tmp_path / "worker")
    ensure_topics(settings)
    store = state_table_store(settings)
    topic = store.changelog_topic
    ensure_topics(settings, [TopicSpec(topic, settings.partitions, {"cleanup.policy": "compact"})])
    rng = random.Random(23)
    producer = Producer({**settings.librdkafka_config(), "partitioner": PARTITIONER, "linger.ms": 50})
    expected: dict[bytes, bytes] = {}
    for n in range(300_000):
        key = f"shopper-{rng.randrange(200_000)}".encode()
        value = None if rng.random() < 0.05 else rng.randbytes(300) + str(n).encode()
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.05)
        if value is None:
            expected.pop(key, None)
        else:
            expected[key] = value
    assert producer.flush(60) == 0
    for partition in range(settings.partitions):  # the worker's seal: the end Tansu reports is then the true end
        producer.produce(topic, key=SEAL_KEY, value=None, partition=partition)
    assert producer.flush(30) == 0
    total = sum(1 for _ in read_to_end(settings, topic))

    first = WorkerProcess(settings, tmp_path / "worker-1.log")
    deadline = time.monotonic() + 120
    # RocksDB appends a write batch (~20k records, ~6.3 MB here) to its log in chunks, and a batch
    # cut by the kill is dropped when the log is replayed: wait for 2.5 batches' worth, so that at
    # least one whole batch is on disk whichever write the kill interrupts.
    while data_dir_bytes(settings.data_dir) < 16_000_000:
        assert time.monotonic() < deadline and first.process.poll() is None, first.log_tail()
        time.sleep(0.05)
    first.kill()
    assert "bulk restore of" not in first.log_path.read_text(), "killed too late: the restore had finished"

    second = WorkerProcess(settings, tmp_path / "worker-2.log")
    try:
        second.wait_ready(120)
    finally:
        assert second.stop() == 0, second.log_tail()
    log = second.log_path.read_text()
    resumed = [int(n) for n in re.findall(r"bulk-restoring (\d+) records", log)]
    assert resumed and sum(resumed) < total, f"the second start restored {resumed} of {total} records again"
    assert re.search(r"bulk restore of \S+ done", log), second.log_tail()

    restored = state_table_store(settings)
    partitions = set(range(settings.partitions))
    for partition in partitions:
        restored.db(partition)
    assert {key: value for _, key, value in restored.items(partitions)} == expected
