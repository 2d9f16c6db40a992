"""Whole Kafka fetches to one agent, without Faust's per-event stream machinery.

Faust hands each consumed message to its streams on its own: a task race per message
(``wait_first``), the conductor, an event, a channel queue, the stream's processors and a
per-event ack. On this machine that costs about 90 µs of CPU per event (``bench/faust_floor.py``),
which alone caps a worker near 11k events/s whatever the agent does.

:class:`streams.worker.faust_seam.BatchDrainConsumer` is Faust's aiokafka consumer with its drain loop
replaced: messages of the *batch topics* go, a whole fetch at a time, into the
:class:`MicroBatcher` of this module (plain asyncio, no Faust); messages of any other topic
(table changelogs during recovery) still take Faust's own path. The messages are light
:class:`streams.worker.pipeline.InputMessage` objects, not Faust's ``ConsumerMessage``. The agent takes
micro-batches (``take_batch``) and acks a whole batch once its effects are in Kafka
(``ack_batch``, through :class:`streams.worker.checkpoint.Checkpoint`).

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

from streams.worker.pipeline import InputMessage


class MicroBatch(list):
    """The messages of one micro-batch. Faust's set of unacknowledged messages holds it (weakly)
    while the agent works on it, so it carries the two attributes Faust reads there, and the
    consumer generation its messages were fetched in (the generation guard, :mod:`streams.worker.faust_seam`)."""

    acked = False
    refcount = 1
    generation_id: int | None = None
    # Held in a WeakSet: hashed by identity (no two batches share a message). typeshed types
    # list.__hash__ as None (lists are unhashable), so no subclass may restore it without this.
    __hash__ = object.__hash__  # type: ignore[assignment]


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
                except TimeoutError:
                    pass
        batch = MicroBatch(self._buffer[: self.max_batch])
        del self._buffer[: self.max_batch]
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
