"""Direct writes to Faust tables: their RocksDB stores and changelogs, a micro-batch at a time.

Faust's ``table[key] = value`` needs a current event (``stream.take()`` has none, faust-streaming
#497) and sends each changelog record through Faust's producer one at a time.
:class:`TableWriter` does what Faust does — write the partition's RocksDB
(:class:`streams.worker.faust_seam.TableStore`), send the same changelog record, and record in the
store the changelog offset it holds once that offset is acknowledged — through a
:class:`streams.kafka.batch_producer.BatchProducer` that packs a batch's records into a few record
batches. :class:`streams.worker.checkpoint.Checkpoint` decides when.

Faust still owns everything else about the tables: assignment, standbys, and recovery from
the changelog, which reads the records written here like its own.

**Sealing, for the embedded broker.** Tansu answers ListOffsets(LATEST) with the base offset
of a partition's last *record batch* + 1, and Faust restores a table only up to that offset
(``docs/embedded-broker.md``). With ``seal=True`` each flush ends every changelog partition it
wrote to with one more record, alone in its record batch: a tombstone for :data:`SEAL_KEY`, a
key that never holds a value, so restoring it changes nothing. The partition's end as Tansu
reports it is then the true end. Offsets are recorded in the store only once the seal is
acknowledged: a crash between the two leaves an unsealed tail that belongs to a batch whose
input offsets were not committed, so its events are consumed again after the restart.
"""

from __future__ import annotations

import asyncio
import logging

from streams.kafka.batch_producer import BatchProducer
from streams.worker.faust_seam import TableStore

log = logging.getLogger(__name__)

#: The key of the seal record; a tombstone, so it never appears in a table.
SEAL_KEY = b"__shoppulse_changelog_seal__"


class TableWriter:
    """Writes (and deletes) keys of Faust tables backed by the rocksdict store.

    Args:
        producer: the changelog producer (``track_offsets=True``).
        seal: end each flush with a seal record per changelog partition written (Tansu).
    """

    def __init__(self, producer: BatchProducer, seal: bool) -> None:
        self.producer = producer
        self.seal = seal
        self._stores: dict[str, TableStore] = {}  # changelog topic -> the table's store
        self._written: set[tuple[str, int]] = set()  # changelog partitions written since the last flush
        self._flushing = asyncio.Lock()

    def put(self, store: TableStore, partition: int, key: bytes, value: bytes | None) -> None:
        """Store ``value`` (None: delete) and queue its changelog record to the same partition."""
        store.put(partition, key, value)
        topic = store.changelog_topic
        self._stores[topic] = store
        self._written.add((topic, partition))
        self.producer.send(topic, key, value, partition=partition)

    async def flush(self) -> None:
        """Wait until every record queued so far is acknowledged (and sealed), then record the offsets.

        One flush at a time: the agent and the sweeps both flush, and a caller whose records a
        concurrent flush took must not return (and let Faust commit) before that flush sealed them.
        Raises :class:`streams.kafka.batch_producer.DeliveryError` when the brokers refused records.
        """
        async with self._flushing:
            if not self._written:
                return
            written, self._written = self._written, set()
            offsets = await asyncio.to_thread(self._deliver_sealed, written)
            for (topic, partition), offset in offsets.items():
                if not self._stores[topic].set_persisted_offset(partition, offset):
                    log.info(
                        "%s[%d] closed during a flush; its next restore replays from the older offset", topic, partition
                    )

    def _deliver_sealed(self, written: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Deliver the queued records, then the seals (blocking; one thread call for both round trips,
        so the event loop being busy with the next batch does not hold the seals back)."""
        self.producer.deliver()
        if self.seal:
            for topic, partition in written:
                self.producer.send(topic, SEAL_KEY, None, partition=partition)
            self.producer.deliver()
        return self.producer.take_offsets()
