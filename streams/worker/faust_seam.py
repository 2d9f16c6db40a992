"""The one place where ShopPulse touches internals of Faust, mode and aiokafka.

The worker replaced Faust's per-event drain loop, its ``getmany``, its ack path and its table
writes (each cost more than the scoring itself; BENCHMARKS.md). Doing so needs members those
libraries do not promise to keep. All of them are used here and nowhere else, each listed below;
``tests/unit/streams/worker/test_faust_seam.py`` checks that every one exists with the kind and signature this
module expects, and that the upstream methods whose logic is copied here still hash to
:data:`UPSTREAM_SOURCE_SHA256`. An upgrade that moves a member or changes copied logic fails
that test, not the worker. How to upgrade them: docs/deploy.md ("Upgrading Faust, mode or aiokafka").

============================================  ==========================================================
internal                                      what it touches, and why
============================================  ==========================================================
``Consumer._drain_messages`` (overridden)     the fetch loop: hands whole fetches to the micro-batcher
                                              instead of one ``callback`` per message (~90 µs each)
``Consumer._wait_next_records``               one fetch from aiokafka, as Faust's ``getmany`` does
``Consumer._read_offset``                     last offset read per partition: drops re-fetched records
``Consumer._buffered_partitions``             partitions Faust still reads while paused (recovery)
``Consumer._add_gap``                         records offset gaps, as Faust's drain loop does
``Consumer.perform_seek`` (overridden),       the seek to the committed offsets that ends each recovery,
``Consumer.seek``                             counted so that no input record fetched from a position
                                              it reset is handed over; records dropped are sought back
``Consumer._to_message``                      builds Faust's message for non-batch topics (changelogs)
``Consumer._stopped``, fetcher ``._stopped``  mode's stop flags, ended the drain loop upstream too
``Consumer._unacked_messages``                a taken batch is tracked there, so a rebalance or
                                              shutdown (``wait_empty``) waits for it
``Consumer._acked``, ``_acked_index``,        Faust's ack bookkeeping, done once per partition per
``_committed_offset``, ``_n_acked``           batch instead of once per message (``Consumer.ack``)
``Consumer._waiting_for_ack``                 woken after an ack, as ``Consumer.ack`` does
``Consumer._commit_every``                    ``broker_commit_every``: commit after that many acks
``faust.types.tuples.ack_lock``               the lock ``Consumer.ack`` holds for the same bookkeeping
``mode.utils.futures.notify``                 wakes ``_waiting_for_ack``
``App._new_consumer`` (overridden)            installs :class:`BatchDrainConsumer` as the consumer class
``App.consumer_generation_id``                the generation guard (below)
``App.assignor.assigned_actives()``           partitions this worker owns (the sweeps)
``App.assignor.table_metadata()``             the table's partition -> owner URL map (shopper lookup);
                                              a public assignor method, listed for its contract test
``rocksdb.Store._db_for_partition``           the RocksDB of one partition: reads and writes without
                                              Faust's current-event context (faust-streaming #497)
``rocksdb.Store._key_index``                  Faust's key -> partition cache, kept right on writes
``rocksdb.Store._dbs``, ``_visible_items``    every stored key of a partition (the sweeps)
``Consumer._thread._consumer._client._conns`` aiokafka's open connections: readiness
``_thread._consumer._fetcher``                aiokafka's fetcher: the fetch wait on Tansu
``._fetch_max_wait_ms``
``App(TableManager=...)``,                    installs :class:`BulkRecovery` as the tables' recovery service
``TableManager._recovery``, ``.recovery``
(overridden)
``Recovery._build_offsets`` (overridden)      where Faust has each active changelog partition's start
                                              (persisted offset) and end (high watermark): partitions far
                                              behind are bulk-restored (:mod:`streams.worker.bulk_restore`)
``Recovery.active_offsets``,                  Faust's start offsets and ends of the active partitions;
``active_highwaters``, ``active_tps``,        the restored offsets are written back into ``active_offsets``
``tp_to_table``, ``_generation_id``
``Recovery.signal_recovery_start``,           the bulk restore leaves Faust's recovery pass with
``faust.tables.recovery.RebalanceAgain``      ``RebalanceAgain`` and starts a new pass once it is done
``Recovery.on_partitions_revoked``,           stop a running bulk restore (its partitions may move, the
``Recovery.on_stop``                          worker may stop)
``rocksdb.Store.offset_key``                  the key Faust keeps a partition's persisted offset under
============================================  ==========================================================

Upstream guards the override keeps:

* **Generation id.** Faust's ``getmany`` stops handing out records once the consumer
  generation changes, and its streams skip a message fetched in an older generation. Here a
  fetch whose generation changed before it reached the batcher is dropped, every batch carries
  the generation its messages were fetched in, and :meth:`BatchDrainConsumer.take_batch`
  drops a batch of an older generation (Faust seeks the partitions back to their committed
  offsets after the rebalance, so its messages are read again).
* **broker_commit_every.** The drain loop commits once that many offsets were acked since the
  last commit, as upstream's loop does; Faust's timer (``broker_commit_interval``) commits too.

* **Bulk restore inside Faust's recovery pass.** Faust's ``_restart_recovery`` builds the active
  partitions' high watermarks, then their start offsets (:meth:`BulkRecovery._build_offsets`),
  then seeks and reads what is left record by record. Each of those steps runs under
  ``broker_request_timeout``, and a timeout there stops the recovery service for good, so the
  restore does not run inside one: the override starts it as a task and leaves the pass with
  Faust's own ``RebalanceAgain`` (the pass is abandoned, nothing else changes). When the task
  ends it writes the restored offsets into ``active_offsets`` and starts a new pass, which finds
  nothing (or only what the restore could not finish) left. A real rebalance meanwhile stops the
  restore and starts its own pass from the persisted offsets, which moved with every write batch.

A missing internal is reported where it is read: :class:`SeamBroken` names it, and readiness
says so in its reason and in an ERROR log line (``streams.worker.health``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, cast
from weakref import WeakSet

import faust
from faust.tables import TableManager
from faust.tables.recovery import RebalanceAgain, Recovery
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP
from faust.types.tuples import Message, ack_lock
from mode.utils.futures import notify

from streams.worker.batch_consumer import MicroBatch, MicroBatcher
from streams.worker.bulk_restore import BulkRestorer, PartitionRestore
from streams.worker.lookup import PartitionNotOpen
from streams.worker.pipeline import InputMessage

#: sha256 of ``inspect.getsource`` of each upstream method whose logic is copied here, read from
#: faust-streaming 0.15.3. ``tests/unit/streams/worker/test_faust_seam.py`` recomputes them. When an upgrade
#: changes one, re-read the method, carry its change over here, then update the hash.
UPSTREAM_SOURCE_SHA256: dict[str, str] = {
    # _read_fetch: the checks of getmany; _drain_messages: the loop, gaps and broker_commit_every
    "faust.transport.consumer:Consumer.getmany": "4b168d84882a70d6e3e2f9804430a63b92f8fd117d3187cbb4aeb54305bda34e",
    "faust.transport.consumer:Consumer._drain_messages": "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417",  # noqa: E501
    # ack_batch: the bookkeeping of ack, per partition
    "faust.transport.consumer:Consumer.ack": "5fcf41cf45153475de3790dc56fec1b83335956dc8b3bf7ff6bbb2b57627f03f",
    # TableStore.put: what _set and _del do to RocksDB and the key index
    "faust.stores.rocksdb:Store._set": "4227e561e288d9413bf663a3a67940fd4976f5484e70e49445858ce4d400d26e",
    "faust.stores.rocksdb:Store._del": "07f42ff3caefffddb002ba3c316120ee8a608a15021fa226fd8e9ba2635004a9",
    # TableWriter.flush: records the persisted changelog offset once it is acknowledged, as this does
    "faust.tables.base:Collection._on_changelog_sent": "60122c86a120d82cffa95da4c22323e12d67fa82f3112f08ac7f8edde7c47826",  # noqa: E501
    # bulk_restore: the persisted offset's key and encoding, written in each write batch
    "faust.stores.rocksdb:Store.set_persisted_offset": "b4c811926678346ebb8c40486dbc46d0fbac2bbeaa592384bd955112556acf45",  # noqa: E501
    # BulkRecovery: the order of the pass (highwaters, offsets, seek, need_recovery) and RebalanceAgain
    "faust.tables.recovery:Recovery._restart_recovery": "6bd8a8558a2dffe4c60b8150f23d721baa6b3d658367f911a3ad2187e20efc6f",  # noqa: E501
    "faust.tables.recovery:Recovery.on_rebalance": "aa4d997a1795ceae3880f98311b46935d9ae1a183a699b9a283bb4306bc8641f",
    # BulkTableManager.recovery: how the recovery service is built
    "faust.tables.manager:TableManager.recovery": "f0bf5de78b4c3d235c3554010480f407010ccb7c481c68852a985542b952df32",
}

log = logging.getLogger("shoppulse.worker.recovery")


class SeamBroken(RuntimeError):
    """An internal of Faust, mode or aiokafka this module relies on is missing (an upgrade)."""


class BatchDrainConsumer(AIOKafkaConsumer):
    """Faust's aiokafka consumer, handing the messages of :attr:`batch_topics` to a :class:`MicroBatcher`.

    Call :meth:`batch_into` before the app starts.
    """

    batch_topics: frozenset[str] = frozenset()
    batcher: MicroBatcher | None = None
    _buffer_generation: int | None = None  # the consumer generation of the messages in the batcher
    # The positions guard (:meth:`_inputs_positioned`): seeks to the committed offsets under way and
    # done, and the consumer generation of the last one done.
    _seeking = 0
    _seeks_done = 0
    _sought_generation: int | None = None

    @property
    def _unacked(self) -> WeakSet[Message | MicroBatch]:
        """Faust's set of unacknowledged messages (a WeakSet, typed as a set of messages), which
        also holds the batches taken and not yet acked."""
        return cast("WeakSet[Message | MicroBatch]", self._unacked_messages)

    def batch_into(self, topics: Iterable[str], batcher: MicroBatcher) -> None:
        """Send the messages of ``topics`` to ``batcher`` instead of Faust's streams."""
        self.batch_topics = frozenset(topics)
        self.batcher = batcher

    def stop_flow(self) -> None:
        super().stop_flow()
        if self.batcher is not None:
            self.batcher.clear()

    async def take_batch(self) -> MicroBatch:
        """The next micro-batch of the current generation, tracked until :meth:`ack_batch`:
        a rebalance waits for it. A batch fetched in an older generation is dropped."""
        assert self.batcher is not None, "batch_into() first"
        while True:
            batch = await self.batcher.take()
            generation = batch.generation_id = self._buffer_generation  # of the buffer the batch was cut from
            if generation == self.app.consumer_generation_id:
                self._unacked.add(batch)
                return batch
            self.log.info(
                "dropped a micro-batch of %d messages fetched in consumer generation %r (now %r); "
                "they are read again from the committed offsets",
                len(batch),
                generation,
                self.app.consumer_generation_id,
            )

    def ack_batch(self, batch: MicroBatch) -> None:
        """Mark a batch done: its offsets become committable (Faust commits on its timer).

        Faust's ``Consumer.ack`` bookkeeping, once per partition instead of once per message.
        """
        by_tp: dict[tuple[str, int], list[int]] = {}
        for message in batch:
            by_tp.setdefault((message.topic, message.partition), []).append(message.offset)
        inbound = self.app.monitor.stream_inbound_time
        now = time.monotonic()
        with ack_lock:
            for (topic, partition), offsets in by_tp.items():
                tp = TP(topic, partition)
                inbound[tp] = now  # Faust's livelock detector reads when a stream last took an event
                if not self.app.topics.acks_enabled_for(topic):
                    continue
                committed = self._committed_offset[tp]
                acked_index, acked = self._acked_index[tp], self._acked[tp]
                for offset in offsets:
                    if (committed is None or offset >= committed) and offset not in acked_index:
                        acked_index.add(offset)
                        acked.append(offset)
                        self._n_acked += 1
            batch.acked = True
            self._unacked.discard(batch)
            notify(self._waiting_for_ack)

    def forget_batches(self) -> int:
        """Stop waiting for the batches taken but not acked, without acking them: their offsets stay
        uncommitted, so they are consumed again after a restart. For a worker about to stop after a
        failure, whose shutdown would otherwise wait for acks that never come. Returns how many."""
        with ack_lock:
            unacked = self._unacked
            batches = [m for m in unacked if isinstance(m, MicroBatch)]
            unacked.difference_update(batches)
            notify(self._waiting_for_ack)
        return len(batches)

    async def perform_seek(self) -> None:
        """Faust's seek of every assigned partition to its committed offset, counted for the positions guard."""
        self._seeking += 1
        try:
            await super().perform_seek()
        except BaseException:
            self._sought_generation = None  # positions unknown: no input record is handed over until a seek works
            raise
        finally:
            self._seeking -= 1
            self._seeks_done += 1
        self._sought_generation = self.app.consumer_generation_id

    def _inputs_positioned(self, seeks_before_fetch: int, generation: int) -> bool:
        """Whether a fetch's batch-topic records may be handed over: no seek to the committed offsets ran
        while it was under way, and one has run since the assignment of ``generation``.

        After an assignment Faust resumes the input partitions, then seeks them to their committed
        offsets (the end of its recovery); a fetch in between, or one that a seek overtook, returns
        records from wherever the fetcher stood. Handing those over would move the last-read offsets
        past records never handed over, and both of Faust's checks that follow would then lose them:
        "already read" drops a record below the last-read offset, and a jump above it is recorded as a
        gap, committed as if done.
        """
        return self._seeking == 0 and self._seeks_done == seeks_before_fetch and self._sought_generation == generation

    async def _rewind(self, first_dropped: dict[TP, int]) -> None:
        """Undo a fetch whose batch-topic records were not handed over: seek every partition to its
        committed offset, and a partition with none (never committed) back to its first dropped record."""
        try:
            await self.perform_seek()
            assigned = self.assignment()
            for tp, offset in first_dropped.items():
                # a seek to the committed offsets leaves a partition with none where it is
                if tp in assigned and not self._committed_offset.get(tp):
                    await self.seek(tp, offset)
        except Exception as exc:  # the broker away, say: every fetch is dropped until a seek works
            self._sought_generation = None
            self.log.warning("could not seek the input partitions back (%r); the next fetch tries again", exc)
            return
        self.log.info(
            "re-reading %d input partitions fetched while their positions were being reset", len(first_dropped)
        )

    def committed_offset(self, tp: TP) -> int | None:
        """The offset Faust last committed for ``tp`` (the next to read), None before any commit."""
        return self._committed_offset.get(tp)

    async def _drain_messages(self, fetcher: Any) -> None:  # a loop over the broker; tested end to end
        """Faust's drain loop, with each fetch's batch-topic messages handed over in one call."""
        consumer_stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        commit_every = self._commit_every
        while not (consumer_stopped() or fetcher_stopped()):
            await self.sleep(0)
            if self.should_stop:
                break
            if commit_every is not None and self._n_acked >= commit_every:  # upstream's broker_commit_every
                self._n_acked = 0
                await self.commit()
            await self._hand_over(*await self._read_fetch())

    async def _read_fetch(self) -> tuple[list[InputMessage], int]:
        """One fetch: batch-topic messages returned, any other topic's through Faust's callback.

        Faust's ``getmany`` with its per-message work done once per partition: the high
        watermark, the monitor, and no round-robin between partitions (the whole fetch goes
        to one buffer anyway). Batch-topic records become light :class:`InputMessage` objects.
        Faust's checks are kept: partitions not active are skipped, offsets already read are
        dropped, gaps are recorded, and records fetched while the flow is stopped are dropped and
        the partitions sought back to their committed offsets. Batch-topic records are handed over
        only from positions Faust has reset since the last assignment (:meth:`_inputs_positioned`);
        others, and those of paused partitions, are dropped and read again (:meth:`_rewind`).

        Also returns the consumer generation the records belong to, read (as ``getmany`` reads
        it) once the fetch returned: the wait for it may span a whole rebalance, and a
        generation read before the wait would drop the first records after the rebalance's seek.
        """
        seeks_before_fetch = self._seeks_done
        records, active = await self._wait_next_records(1.0)
        generation = self.app.consumer_generation_id
        if not records or self.should_stop:
            return [], generation
        if not self.flow_active:
            try:
                await self.perform_seek()
            except Exception as exc:  # Faust's own getmany only warns here too
                self.log.warning("could not seek back to the committed offsets while the flow is stopped: %r", exc)
            return [], generation
        fetched: list[InputMessage] = []
        positioned = self._inputs_positioned(seeks_before_fetch, generation)
        dropped: dict[TP, int] = {}  # batch-topic partition -> its first record not handed over
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        buffered = self._buffered_partitions
        monitor = self.app.monitor
        for tp, tp_records in records.items():
            paused = active is not None and tp not in active and tp not in buffered
            to_batcher = self.batcher is not None and tp.topic in self.batch_topics
            if to_batcher and (paused or not positioned):
                if tp_records:
                    dropped[tp] = tp_records[0].offset
                continue
            if paused:
                continue
            monitor.track_tp_end_offset(tp, self.highwater(tp))
            gaps_matter = acks_enabled_for(tp.topic)
            last = read_offset[tp]
            for record in tp_records:
                offset = record.offset
                if last is not None and offset < last:
                    continue  # already read: Faust drops it the same way
                if last and offset - last > 1 and gaps_matter:
                    await self._add_gap(tp, last + 1, offset)
                if to_batcher:
                    fetched.append(
                        InputMessage(tp.topic, tp.partition, offset, record.key, record.value, record.headers)
                    )
                else:
                    if not self.flow_active:
                        break
                    await self.wait_first(self.callback(self._to_message(tp, record)), self.suspend_flow.wait())
                last = read_offset[tp] = offset
        if dropped:
            await self._rewind(dropped)
        return fetched, generation

    async def _hand_over(self, fetched: list[InputMessage], generation: int) -> None:
        """Buffer a fetch, unless the flow stopped or the generation changed while it was read.

        Either means a rebalance is under way: it ends with Faust seeking every partition back to
        its committed offset, so dropped messages are read again. (Dropping them otherwise would
        leave a hole that later, applied offsets would mark as applied.)
        """
        if not fetched or not self.flow_active or self.batcher is None:
            return
        if generation != self.app.consumer_generation_id:
            self.log.info(
                "dropped a fetch of %d messages from consumer generation %r (now %r)",
                len(fetched),
                generation,
                self.app.consumer_generation_id,
            )
            return
        if generation != self._buffer_generation:
            self.batcher.clear()  # one generation in the buffer at a time (stop_flow cleared it already)
            self._buffer_generation = generation
        await self.batcher.put(fetched)


class BulkRecovery(Recovery):
    """Faust's recovery service, restoring active changelog partitions far behind in bulk first.

    Which partitions: those whose persisted offset lies at least ``BulkRestorer.min_records``
    below Faust's high watermark, once per consumer generation (a partition the restore could not
    finish is left to Faust's per-record recovery, from where the restore got to).
    How it fits Faust's pass: the module docstring ("Bulk restore inside Faust's recovery pass").
    """

    _bulk_generation: int | None = None
    _bulk_tried: set[TP]
    _bulk_stop: threading.Event | None = None
    _bulk_task: asyncio.Future[None] | None = None

    def __init__(self, app: faust.App, tables: Any, *, restorer: BulkRestorer | None, **kwargs: Any) -> None:
        super().__init__(app, tables, **kwargs)
        self.restorer = restorer
        self._bulk_tried = set()

    async def _build_offsets(self, consumer: Any, tps: set[TP], destination: Any, title: str) -> None:
        await super()._build_offsets(consumer, tps, destination, title)
        if destination is self.active_offsets:
            self._maybe_start_bulk_restore(tps)

    def _maybe_start_bulk_restore(self, tps: set[TP]) -> None:
        """Start restoring the partitions of ``tps`` far behind, and leave Faust's pass (RebalanceAgain)."""
        restorer = self.restorer
        if restorer is None:
            return
        if self._bulk_generation != self._generation_id:
            self._bulk_generation, self._bulk_tried = self._generation_id, set()
        behind = {
            tp: (self.active_offsets[tp] + 1, self.active_highwaters[tp])
            for tp in tps
            if tp not in self._bulk_tried
            and self.active_highwaters.get(tp) is not None
            and restorer.worth_it(self.active_offsets[tp] + 1, self.active_highwaters[tp])
        }
        if not behind:
            return
        self._bulk_tried.update(behind)
        self._bulk_stop = threading.Event()
        self._bulk_task = asyncio.ensure_future(self._bulk_restore(restorer, behind, self._bulk_stop))
        raise RebalanceAgain()  # Faust's pass ends here; _bulk_restore starts the next one

    async def _bulk_restore(
        self, restorer: BulkRestorer, behind: dict[TP, tuple[int, int]], stop: threading.Event
    ) -> None:
        """Restore ``behind`` (partition -> first and last offset) table by table in a thread, then
        hand Faust the persisted offsets and start its next pass (unless a rebalance took over)."""
        generation = self._generation_id
        by_table: dict[Any, list[TP]] = {}
        for tp in behind:
            by_table.setdefault(self.tp_to_table[tp], []).append(tp)
        try:
            for table, tps in by_table.items():
                store = TableStore(table)
                parts = [PartitionRestore(tp.partition, store.db(tp.partition), *behind[tp]) for tp in sorted(tps)]
                log.info(
                    "bulk-restoring %d records of %s (partitions %s) from the changelog",
                    sum(p.last_offset - p.first_offset + 1 for p in parts),
                    store.changelog_topic,
                    ", ".join(str(p.partition) for p in parts),
                )
                report = await asyncio.to_thread(restorer.restore, store.changelog_topic, parts, store.offset_key, stop)
                log.info(
                    "bulk restore of %s %s: %d records, %.1f MB of values in %.1f s (%.0f records/s)%s",
                    store.changelog_topic,
                    "done" if report.finished else "stopped",
                    report.records,
                    report.value_bytes / 1e6,
                    report.seconds,
                    report.records / max(report.seconds, 1e-9),
                    f"; {report.keyless} records without a key skipped" if report.keyless else "",
                )
        except Exception as exc:  # Faust's per-record recovery goes on from what was persisted
            log.error(
                "bulk restore failed (%r); Faust's per-record recovery restores the rest from the offsets "
                "persisted so far",
                exc,
            )
        if stop.is_set() or self.should_stop or self._generation_id != generation:
            return  # a rebalance (its own pass reads the persisted offsets) or a shutdown
        for tp in behind.keys() & self.active_tps:
            persisted = self.tp_to_table[tp].persisted_offset(tp)
            if persisted is not None:
                self.active_offsets[tp] = persisted
        self.signal_recovery_start.set()

    def on_partitions_revoked(self, revoked: set[TP]) -> None:
        self._stop_bulk_restore()
        super().on_partitions_revoked(revoked)

    async def on_stop(self) -> None:
        self._stop_bulk_restore()
        if self._bulk_task is not None:
            await asyncio.wait([self._bulk_task])  # short: the thread checks the flag after each consume call
        await super().on_stop()

    def _stop_bulk_restore(self) -> None:
        if self._bulk_stop is not None:
            self._bulk_stop.set()


class BulkTableManager(TableManager):
    """Faust's table manager with :class:`BulkRecovery` as its recovery service (``App(TableManager=...)``)."""

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            app = cast("BatchingApp", self.app)
            self._recovery = BulkRecovery(app, self, restorer=app.bulk_restorer, beacon=self.beacon, loop=self.loop)
        return self._recovery


class BatchingApp(faust.App):
    """A Faust app whose consumer hands the messages of ``batch_topics`` to ``batcher``, and whose
    tables restore changelog partitions far behind with ``bulk_restorer`` (None: Faust's recovery only)."""

    def __init__(
        self,
        *args: Any,
        batch_topics: Iterable[str],
        batcher: MicroBatcher,
        bulk_restorer: BulkRestorer | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, TableManager=BulkTableManager, **kwargs)
        self.batch_topics = frozenset(batch_topics)
        self.batcher = batcher
        self.bulk_restorer = bulk_restorer

    def _new_consumer(self) -> BatchDrainConsumer:
        # Faust declares Transport.Consumer a ClassVar; set on this app's transport only, so that
        # other apps in the process keep Faust's consumer class.
        self.transport.Consumer = BatchDrainConsumer  # type: ignore[misc]
        consumer = super()._new_consumer()
        assert isinstance(consumer, BatchDrainConsumer)
        consumer.batch_into(self.batch_topics, self.batcher)
        return consumer

    @property
    def batch_consumer(self) -> BatchDrainConsumer:
        """The app's consumer: the one :meth:`_new_consumer` creates."""
        consumer = self.consumer
        assert isinstance(consumer, BatchDrainConsumer)
        return consumer

    def tables_recovered(self) -> bool:
        """Whether Faust has recovered the tables from their changelogs."""
        tables = self.tables
        assert isinstance(tables, TableManager)  # Faust's own; the type it is declared as lacks ``recovery``
        return tables.recovery.completed.is_set()

    def owned_partitions(self, changelog_topic: str) -> set[int]:
        """Partitions of ``changelog_topic`` this worker is the active owner of."""
        return {tp.partition for tp in self.assignor.assigned_actives() if tp.topic == changelog_topic}

    def partition_owners(self, changelog_topic: str) -> dict[int, str]:
        """Partition -> URL (``canonical_url``) of the worker that actively owns it, for every member
        of the group: the map the group leader's assignor hands every member after each rebalance.
        Empty before the first assignment."""
        return {
            partition: url
            for url, topics in self.assignor.table_metadata(changelog_topic).items()
            for partition in topics.get(changelog_topic, ())
        }


class TableStore:
    """A Faust table's rocksdict store, a partition at a time, without Faust's current event.

    Faust's ``table[key] = value`` needs a current event (``stream.take()`` has none,
    faust-streaming #497); these do what ``Store._set``/``_del``/``_get`` do for a known
    partition. The changelog records are the caller's (:mod:`streams.worker.table_writer`).
    """

    def __init__(self, table: Any) -> None:
        self.table = table

    @property
    def changelog_topic(self) -> str:
        return self.table.changelog_topic_name

    @property
    def offset_key(self) -> bytes:
        """The key under which each partition's RocksDB keeps its persisted changelog offset."""
        return cast(bytes, self.table.data.offset_key)

    def db(self, partition: int) -> Any:
        """``partition``'s RocksDB (a rocksdict ``Rdict`` in raw mode), opened if it is not yet."""
        return self.table.data._db_for_partition(partition)

    def get(self, partition: int, key: bytes) -> bytes | None:
        """The stored value of ``key`` in ``partition``, or None."""
        return self.table.data._db_for_partition(partition).get(key)

    def get_if_open(self, partition: int, key: bytes) -> bytes | None:
        """Like :meth:`get`, for another thread: never opens a partition's RocksDB (that is Faust's,
        on assignment), and raises :class:`~streams.worker.lookup.PartitionNotOpen` when it is not open."""
        db = self.table.data._dbs.get(partition)
        if db is None:
            raise PartitionNotOpen(partition)
        value: bytes | None = db.get(key)
        return value

    def put(self, partition: int, key: bytes, value: bytes | None) -> None:
        """Store ``value`` (None: delete) in ``partition``'s RocksDB, keeping Faust's key index right."""
        store = self.table.data
        db = store._db_for_partition(partition)
        if value is None:
            db.delete(key)
            store._key_index.pop(key, None)
        else:
            db.put(key, value)
            store._key_index[key] = partition

    def set_persisted_offset(self, partition: int, offset: int) -> bool:
        """Record that the changelog holds everything of ``partition`` up to ``offset`` (recovery starts
        after it); False, recording nothing, when the partition's RocksDB is no longer open.

        A flush (a sweep's, say) can outlive its partition: revoked, or closed by a shutdown while the
        flush waited for the brokers. Reopening it here would race Faust's close ("LOCK: No locks
        available") and crash the stop. Skipping is safe: the records are in the changelog, and a
        persisted offset that stays behind only makes the next restore replay them again, which
        writes the same values.
        """
        if partition not in self.table.data._dbs:
            return False
        self.table.data.set_persisted_offset(TP(self.changelog_topic, partition), offset)
        return True

    def items(self, partitions: set[int]) -> Iterator[tuple[int, bytes, bytes]]:
        """``(partition, key, value)`` of every stored key in ``partitions`` that this worker has open."""
        store = self.table.data
        for partition, db in list(store._dbs.items()):
            if partition in partitions:
                for key, value in store._visible_items(db):
                    yield partition, key, value


def _aiokafka_consumer(app: faust.App) -> Any:
    """aiokafka's consumer inside Faust's consumer thread; None before it started."""
    thread = getattr(app.consumer, "_thread", None)
    if thread is None or not hasattr(thread, "_consumer"):
        raise SeamBroken("faust's Consumer has no _thread._consumer (faust.transport.drivers.aiokafka changed)")
    return thread._consumer


def broker_connected(app: faust.App) -> bool:
    """Whether the consumer holds an open connection to any broker (aiokafka drops them when it goes away).

    False before the consumer started; :class:`SeamBroken` when the internals read are gone.
    """
    consumer = _aiokafka_consumer(app)
    if consumer is None:
        return False
    try:
        conns = consumer._client._conns
    except AttributeError as exc:
        raise SeamBroken(f"aiokafka's consumer has no _client._conns ({exc})") from None
    return any(conn.connected() for conn in list(conns.values()))


def set_fetch_max_wait_ms(app: faust.App, wait_ms: int) -> None:
    """Cap how long a fetch may wait for data: Faust builds its aiokafka consumer with
    ``fetch_max_wait_ms=1500`` and no setting to change it. Call once the consumer has started."""
    fetcher = getattr(_aiokafka_consumer(app), "_fetcher", None)
    if fetcher is None or not hasattr(fetcher, "_fetch_max_wait_ms"):
        raise SeamBroken("aiokafka's consumer has no _fetcher._fetch_max_wait_ms")
    fetcher._fetch_max_wait_ms = wait_ms
