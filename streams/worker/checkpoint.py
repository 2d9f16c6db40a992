"""The commit protocol of one micro-batch, in one object, and why it makes state exactly-once.

:class:`Checkpoint` runs the four steps, always in this order:

1. **queue** the batch's outputs (scores, recommendations, churn alerts, dead letters) in the
   output producer, and its state writes in RocksDB with their changelog records queued in the
   changelog producer (:meth:`Checkpoint.queue`);
2. **flush both producers** until the brokers acknowledged every record (on Tansu, the
   changelog partitions written are then sealed, :mod:`streams.worker.table_writer`);
3. **persist**: record in each changelog partition's RocksDB the changelog offset it now holds
   (where recovery starts). The input offsets need no step of their own: they are inside the
   state values written in step 1 and carried to the changelog in step 2;
4. **ack** the batch's input messages: only now may Faust commit them.

A crash anywhere replays the uncommitted input. Outputs may then repeat (at-least-once), but
no event is applied to a state twice, however many crashes chain:

**Where the input offsets live, and why there.** Each shopper's stored value
(:mod:`streams.worker.envelope`) holds its state, its churn alert state, and the highest input offset
per input topic partition whose event the state holds. A replayed event at or below that
offset is skipped (:class:`streams.worker.pipeline.BatchProcessor`). The alternatives fail under a crash:

* *Only the event-id dedup* (before 2026-12): a shopper remembers its last 64 event ids, so a
  replay of more than 64 of its events (crashes chained before a commit) applied the older ones
  again (RELIABILITY.md kept that as a limit).
* *One "offsets" key per partition, written first or last in the same flush.* Its RocksDB
  write could be made atomic with the states (one write batch), but the changelog cannot: a
  crash delivers any prefix of a flush's changelog records (librdkafka sends several record
  batches per partition and retries them separately). After a restore from such a prefix the
  marker is new while some states are old (their events are then lost), or the reverse (their
  events are applied twice). Faust's recovery reads the changelog, so the changelog must be
  exact on its own.
* *The offsets in each shopper's own value* make state and offsets one value: one RocksDB put,
  one changelog record, atomic in both. Any prefix of a flush leaves every shopper either with
  its new state and new offsets or with its old ones; the replay applies exactly what is
  missing. The alert state is in the same value for the same reason: an alert state restored
  without the state it belongs to (or the reverse) re-fires or loses an alert.

The cost: 6 bytes per value (and the live memory, :mod:`models.outcomes`), plus 13 bytes and the
topic name per input topic a shopper has events on (co-partitioned inputs: one partition each).

The event-id dedup stays: a producer that sends one event twice gives it two offsets.

**Writers do not interleave.** The agent reads states, awaits the previous batch's delivery and
writes; the sweeps read and write the same values. :attr:`Checkpoint.writing` is held from a
read to its queued write, so neither overwrites a value the other wrote in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from streams.worker.batch_consumer import MicroBatch
from streams.worker.faust_seam import TableStore
from streams.worker.pipeline import BatchOutcome
from streams.worker.publisher import Publisher
from streams.worker.table_writer import TableWriter


class Checkpoint:
    """Owns the commit protocol: queue, flush both producers, persist, ack (module docstring).

    Args:
        publisher: the output producer and what is published per batch.
        changelog: writes values to RocksDB and their changelog, records persisted offsets.
        store: the shopper table's store (the values of :mod:`streams.worker.envelope`).
        ack: makes a batch's input offsets committable
            (:meth:`streams.worker.faust_seam.BatchDrainConsumer.ack_batch`).
        on_queued: told of every outcome as it is queued, before its values are stored, from the
            agent and the sweeps alike (the shopper lookup keeps the outputs:
            :class:`streams.worker.lookup.KeptOutputs`).
    """

    def __init__(
        self,
        publisher: Publisher,
        changelog: TableWriter,
        store: TableStore,
        ack: Callable[[MicroBatch], None],
        on_queued: Callable[[BatchOutcome], None] | None = None,
    ) -> None:
        self.publisher = publisher
        self.changelog = changelog
        self.store = store
        self.ack = ack
        self.on_queued = on_queued
        #: Held from reading stored values to queueing their writes (the agent and the sweeps).
        self.writing = asyncio.Lock()

    def queue(self, outcome: BatchOutcome) -> None:
        """Step 1: the outputs and dead letters into the output producer; the state writes into
        RocksDB, their changelog records into the changelog producer. Sends nothing itself."""
        self.publisher.queue(outcome)
        if self.on_queued is not None:
            self.on_queued(outcome)
        put = self.changelog.put
        for write in outcome.writes:
            put(self.store, write.partition, write.key, write.value)

    async def commit(self, outcome: BatchOutcome, batch: MicroBatch | None) -> None:
        """Steps 2 to 4 for what :meth:`queue` took: flush both producers (the changelog's flush
        records the persisted changelog offsets once sealed), then ack ``batch`` (None: a sweep).

        Raises :class:`streams.kafka.batch_producer.DeliveryError` (nothing acked) when the brokers refused records.
        """
        await asyncio.gather(self.publisher.flush(), self.changelog.flush())
        self.publisher.delivered(outcome)
        if batch is not None:
            self.ack(batch)
