"""Whole Kafka fetches to one agent, without Faust's per-event stream machinery.

Faust hands each consumed message to its streams on its own: a task race per message
(``wait_first``), the conductor, an event, a channel queue, the stream's processors and a
per-event ack. On this machine that costs about 90 µs of CPU per event (``bench/faust_floor.py``),
which alone caps a worker near 11k events/s whatever the agent does.

:class:`BatchDrainConsumer` is Faust's aiokafka consumer with its drain loop replaced: messages
of the *batch topics* go, a whole fetch at a time, into a :class:`MicroBatcher`; messages of any
other topic (table changelogs during recovery) still take Faust's own path. The messages are
light :class:`streams.pipeline.InputMessage` objects, not Faust's ``ConsumerMessage``. The agent
takes micro-batches (:meth:`BatchDrainConsumer.take_batch`) and acks a whole batch once its
effects are in Kafka (:meth:`BatchDrainConsumer.ack_batch`).

Faust keeps everything else: group membership and assignment, offsets (an ack makes an offset
committable, with Faust's own bookkeeping; gaps in a partition are recorded as Faust records
them), tables and rebalances. A taken batch is tracked among Faust's unacknowledged messages,
so a rebalance or shutdown waits for the batches in flight (``Consumer.wait_empty``); messages
still buffered when Faust stops the flow are dropped, and Faust seeks every assigned partition
back to its committed offset after the rebalance.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any, Iterable

import faust
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.types import TP, ConsumerT
from faust.types.tuples import ack_lock
from mode.utils.futures import notify

from streams.pipeline import InputMessage


class MicroBatch(list):
    """The messages of one micro-batch. Faust's set of unacknowledged messages holds it (weakly)
    while the agent works on it, so it carries the two attributes Faust reads there."""

    acked = False
    refcount = 1
    __hash__ = object.__hash__  # held in a WeakSet: by identity (no two batches share a message)


class MicroBatcher:
    """A bounded buffer of consumed messages, taken in micro-batches.

    Args:
        max_batch: most messages in one batch.
        max_wait_s: longest a buffered message waits for its batch to fill, in seconds.
        max_buffered: the consumer waits (and stops fetching) while this many are buffered.
    """

    def __init__(self, max_batch: int, max_wait_s: float, max_buffered: int) -> None:
        if max_batch < 1 or max_buffered < max_batch:
            raise ValueError(f"need 1 <= max_batch ({max_batch}) <= max_buffered ({max_buffered})")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_buffered = max_buffered
        self._buffer: list[InputMessage] = []
        self._arrivals: deque[tuple[float, int]] = deque()  # per put, oldest first: (monotonic arrival, messages left)
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._cleared = 0  # times clear() ran: a put waiting across a clear drops its messages

    def __len__(self) -> int:
        return len(self._buffer)

    async def put(self, messages: list[InputMessage]) -> None:
        """Buffer messages, first waiting while the buffer is at its bound.

        Messages whose wait spans a :meth:`clear` are dropped with the rest.
        """
        cleared = self._cleared
        while len(self._buffer) >= self.max_buffered:
            self._room.clear()
            await self._room.wait()
        if self._cleared != cleared or not messages:
            return
        self._arrivals.append((time.monotonic(), len(messages)))
        self._buffer.extend(messages)
        self._arrived.set()
        if len(self._buffer) >= self.max_batch:
            self._full.set()

    async def take(self) -> MicroBatch:
        """The next batch: ``max_batch`` messages, or fewer once the oldest has waited ``max_wait_s``."""
        while not self._buffer:
            self._arrived.clear()
            await self._arrived.wait()
        if len(self._buffer) < self.max_batch:
            left_s = self.max_wait_s - (time.monotonic() - self._arrivals[0][0])  # the oldest message's wait
            if left_s > 0:
                self._full.clear()
                try:
                    await asyncio.wait_for(self._full.wait(), left_s)
                except asyncio.TimeoutError:
                    pass
        batch = MicroBatch(self._buffer[:self.max_batch])
        del self._buffer[:self.max_batch]
        self._forget_arrivals(len(batch))
        if not self._buffer:
            self._full.clear()
        self._room.set()
        return batch

    def _forget_arrivals(self, taken: int) -> None:
        """The first ``taken`` messages left the buffer: the oldest remaining one keeps its arrival time."""
        arrivals = self._arrivals
        while taken:
            arrived_at, left = arrivals[0]
            if left > taken:
                arrivals[0] = (arrived_at, left - taken)
                return
            taken -= left
            arrivals.popleft()

    def clear(self) -> int:
        """Drop every buffered message (the flow stopped for a rebalance); returns how many."""
        dropped = len(self._buffer)
        self._cleared += 1
        self._buffer.clear()
        self._arrivals.clear()
        self._full.clear()
        self._room.set()
        return dropped


class BatchDrainConsumer(AIOKafkaConsumer):
    """Faust's aiokafka consumer, handing the messages of :attr:`batch_topics` to a :class:`MicroBatcher`.

    Call :meth:`batch_into` before the app starts.
    """

    batch_topics: frozenset[str] = frozenset()
    batcher: MicroBatcher | None = None

    def batch_into(self, topics: Iterable[str], batcher: MicroBatcher) -> None:
        """Send the messages of ``topics`` to ``batcher`` instead of Faust's streams."""
        self.batch_topics = frozenset(topics)
        self.batcher = batcher

    def stop_flow(self) -> None:
        super().stop_flow()
        if self.batcher is not None:
            self.batcher.clear()

    async def take_batch(self) -> MicroBatch:
        """The next micro-batch, tracked until :meth:`ack_batch`: a rebalance waits for it."""
        assert self.batcher is not None, "batch_into() first"
        batch = await self.batcher.take()
        self._unacked_messages.add(batch)
        return batch

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
            self._unacked_messages.discard(batch)
            notify(self._waiting_for_ack)

    def forget_batches(self) -> int:
        """Stop waiting for the batches taken but not acked, without acking them: their offsets stay
        uncommitted, so they are consumed again after a restart. For a worker about to stop after a
        failure, whose shutdown would otherwise wait for acks that never come. Returns how many."""
        with ack_lock:
            batches = [m for m in self._unacked_messages if isinstance(m, MicroBatch)]
            self._unacked_messages.difference_update(batches)
            notify(self._waiting_for_ack)
        return len(batches)

    async def _drain_messages(self, fetcher: Any) -> None:  # a loop over the broker; tested end to end
        """Faust's drain loop, with each fetch's batch-topic messages handed over in one call."""
        consumer_stopped = self._stopped.is_set
        fetcher_stopped = fetcher._stopped.is_set
        while not (consumer_stopped() or fetcher_stopped()):
            await self.sleep(0)
            if self.should_stop:
                break
            await self._hand_over(await self._read_fetch())

    async def _read_fetch(self) -> list[InputMessage]:
        """One fetch: batch-topic messages returned, any other topic's through Faust's callback.

        Faust's ``getmany`` with its per-message work done once per partition: the high
        watermark, the monitor, and no round-robin between partitions (the whole fetch goes
        to one buffer anyway). Batch-topic records become light :class:`InputMessage` objects.
        Faust's checks are kept: partitions not active are skipped, offsets already read are
        dropped, gaps are recorded, and records fetched while the flow is stopped are dropped and
        the partitions sought back to their committed offsets.
        """
        records, active = await self._wait_next_records(1.0)
        if not records or self.should_stop:
            return []
        if not self.flow_active:
            try:
                await self.perform_seek()
            except Exception as exc:  # Faust's own getmany only warns here too
                self.log.warning("could not seek back to the committed offsets while the flow is stopped: %r", exc)
            return []
        fetched: list[InputMessage] = []
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        buffered = self._buffered_partitions
        monitor = self.app.monitor
        for tp, tp_records in records.items():
            if active is not None and tp not in active and tp not in buffered:
                continue
            monitor.track_tp_end_offset(tp, self.highwater(tp))
            to_batcher = self.batcher is not None and tp.topic in self.batch_topics
            gaps_matter = acks_enabled_for(tp.topic)
            last = read_offset[tp]
            for record in tp_records:
                offset = record.offset
                if last is not None and offset < last:
                    continue  # already read: Faust drops it the same way
                if last and offset - last > 1 and gaps_matter:
                    await self._add_gap(tp, last + 1, offset)
                if to_batcher:
                    fetched.append(InputMessage(tp.topic, tp.partition, offset, record.key, record.value))
                else:
                    if not self.flow_active:
                        break
                    await self.wait_first(self.callback(self._to_message(tp, record)), self.suspend_flow.wait())
                last = read_offset[tp] = offset
        return fetched

    async def _hand_over(self, fetched: list[InputMessage]) -> None:
        if fetched and self.flow_active and self.batcher is not None:
            await self.batcher.put(fetched)


class BatchingApp(faust.App):
    """A Faust app whose consumer hands the messages of ``batch_topics`` to ``batcher``."""

    def __init__(self, *args: Any, batch_topics: Iterable[str], batcher: MicroBatcher, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_topics = frozenset(batch_topics)
        self.batcher = batcher

    def _new_consumer(self) -> ConsumerT:
        self.transport.Consumer = BatchDrainConsumer
        consumer = super()._new_consumer()
        consumer.batch_into(self.batch_topics, self.batcher)
        return consumer
