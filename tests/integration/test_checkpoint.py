"""The Checkpoint's order with real parts: librdkafka producers on the embedded broker, a Faust
table's RocksDB. Queue writes RocksDB and sends nothing; the ack comes only once the outputs and
the changelog (sealed) are on the broker and the persisted changelog offset is recorded."""

from __future__ import annotations

import asyncio

import pytest

from streams.config import Settings
from streams.kafka.batch_producer import BatchProducer
from streams.kafka.clients import TopicSpec, ensure_topics, required_topics
from streams.worker.app import state_table_store
from streams.worker.batch_consumer import MicroBatch
from streams.worker.checkpoint import Checkpoint
from streams.worker.faust_seam import TP, TableStore
from streams.worker.metrics import WorkerMetrics
from streams.worker.pipeline import BatchOutcome, DeadLetter, InputMessage, ScoredShopper, StateWrite
from streams.worker.publisher import Publisher
from streams.worker.table_writer import SEAL_KEY, TableWriter

from .kafka_helpers import isolated_settings, read_to_end

pytestmark = pytest.mark.integration


@pytest.fixture
def parts(broker, tmp_path) -> tuple[Settings, TableStore]:
    """Isolated settings with one partition, and the shopper table's store of a real (unstarted) app."""
    settings = isolated_settings(broker.bootstrap_servers, tmp_path / "worker", partitions=1)
    store = state_table_store(settings)
    ensure_topics(settings, [*required_topics(settings), TopicSpec(store.changelog_topic, 1, {})])
    return settings, store


def test_queue_then_flush_both_producers_then_persist_then_ack(parts):
    settings, store = parts
    publisher = Publisher(BatchProducer(settings), settings, WorkerMetrics())
    changelog = TableWriter(BatchProducer(settings, track_offsets=True), seal=True)
    seen_at_ack: list[tuple] = []

    def ack(batch: MicroBatch) -> None:
        """What the broker and RocksDB hold when the batch is acked."""
        scores = [m.value() for m in read_to_end(settings, settings.topic_scores)]
        dead = [m.value() for m in read_to_end(settings, settings.topic_dead_letter)]
        records = [(m.key(), m.value(), m.offset()) for m in read_to_end(settings, store.changelog_topic)]
        persisted = store.table.data.persisted_offset(TP(store.changelog_topic, 0))
        seen_at_ack.append((len(batch), scores, dead, records, persisted))

    checkpoint = Checkpoint(publisher, changelog, store, ack)
    source = InputMessage(settings.topic_page_views, 0, 7, b"u1", b"{not json")
    outcome = BatchOutcome(
        dead_letters=[DeadLetter(source, "bad_json", "not JSON")],
        scored=[ScoredShopper("u1", b"u1", b'{"user_id":"u1"}', output_key=b"u1")],
        writes=[StateWrite(0, b"u1", b"stored value")],
    )
    checkpoint.queue(outcome)
    assert store.get(0, b"u1") == b"stored value"  # RocksDB at once; the changelog waits for the flush
    assert not seen_at_ack and store.table.data.persisted_offset(TP(store.changelog_topic, 0)) is None

    asyncio.run(checkpoint.commit(outcome, MicroBatch([source])))
    try:
        assert seen_at_ack == [
            (1, [b'{"user_id":"u1"}'], [b"{not json"], [(b"u1", b"stored value", 0), (SEAL_KEY, None, 1)], 1)
        ]
        assert (
            publisher.metrics.registry.get_sample_value(
                "shoppulse_results_published_total", {"topic": settings.topic_scores}
            )
            == 1
        )
    finally:
        publisher.close()
        changelog.producer.close()


def test_a_sweep_commit_acks_nothing(parts):
    settings, store = parts
    acked: list[MicroBatch] = []
    checkpoint = Checkpoint(
        Publisher(BatchProducer(settings), settings, WorkerMetrics()),
        TableWriter(BatchProducer(settings, track_offsets=True), seal=True),
        store,
        acked.append,
    )
    outcome = BatchOutcome(writes=[StateWrite(0, b"u1", None)])
    checkpoint.queue(outcome)
    asyncio.run(checkpoint.commit(outcome, None))
    assert acked == [] and [(m.key(), m.value()) for m in read_to_end(settings, store.changelog_topic)] == [
        (b"u1", None),
        (SEAL_KEY, None),
    ]
