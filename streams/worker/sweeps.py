"""Timers over every stored shopper: evict the idle ones, re-score the silent ones.

Both walk the shopper table of the partitions this worker owns, yielding to the event loop
every :data:`SWEEP_YIELD_EVERY` keys so the event path never stalls, and write through the
same :class:`streams.worker.checkpoint.Checkpoint` as the agent: values are re-read and written while
holding :attr:`Checkpoint.writing <streams.worker.checkpoint.Checkpoint.writing>`, so a sweep never
overwrites a state the agent wrote since the sweep read it.

**Sweeps and rebalances** (:class:`RebalanceFence`). A rebalance waits for the agent's batches
(Faust's ``wait_empty``), but a sweep is no batch: without the fence, one that listed a partition
before a rebalance could write it after, when another worker owns it and has restored it from the
changelog. Its changelog record would then overwrite that worker's newer value for the shopper
(reading the partition's RocksDB also reopens it), and the events the new owner applied in between
would be lost for good. So a revocation closes the fence and waits for a sweep's write in flight;
a sweep whose rebalance generation passed writes nothing; and sweeps start again only once the
tables of the new assignment are recovered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from features.encoding import StateDecodeError, last_event_ms_of
from features.state import StateConfig
from streams.worker.checkpoint import Checkpoint
from streams.worker.envelope import EnvelopeDecodeError, Stored
from streams.worker.metrics import WorkerMetrics
from streams.worker.pipeline import BatchOutcome, BatchProcessor, CommittedOffsets, StateWrite, offsets_committed

log = logging.getLogger("shoppulse.worker")

#: The sweeps yield to the event loop after this many stored shoppers.
SWEEP_YIELD_EVERY = 500


class RebalanceFence:
    """Keeps the sweeps' writes inside one assignment: see the module docstring.

    The worker calls :meth:`revoked` from Faust's ``on_partitions_revoked`` signal (awaited before
    the worker rejoins its group), :meth:`assigned` from ``on_partitions_assigned`` and
    :meth:`recovered` from ``on_rebalance_complete``. A sweep takes :attr:`generation` when it starts
    (only while :attr:`open`) and holds :attr:`writing` through each write and its flush.
    """

    def __init__(self) -> None:
        #: Bumped by every revocation; a sweep that started in an older one writes nothing more.
        self.generation = 0
        #: Whether sweeps may start: the tables of the current assignment are recovered.
        self.open = False
        self._assigned_generation: int | None = None
        #: Held through a sweep's write and its flush: a revocation waits for it.
        self.writing = asyncio.Lock()

    async def revoked(self) -> None:
        """Close the fence, then wait until a sweep's write in flight is acknowledged."""
        self.generation += 1
        self.open = False
        async with self.writing:
            pass

    def assigned(self) -> None:
        self._assigned_generation = self.generation

    def recovered(self) -> None:
        """Open the fence, unless a revocation came after the last assignment (its recovery is stale)."""
        if self._assigned_generation == self.generation:
            self.open = True

    def current(self, generation: int) -> bool:
        """Whether no revocation happened since ``generation`` was taken."""
        return generation == self.generation


def idle_since_ms(stored: bytes | None, now_ms: int) -> int:
    """How long a stored shopper has been idle (wall clock minus its latest event time), in ms.

    An undecodable value counts as idle forever: the sweep removes it rather than keep it.
    """
    try:
        state = Stored.decode(stored).state
        return now_ms - last_event_ms_of(state) if state is not None else now_ms
    except (EnvelopeDecodeError, StateDecodeError):
        return now_ms


class Sweeps:
    """The eviction and silent-shopper sweeps of one worker.

    Args:
        checkpoint: writes and publishes (its store is the shopper table).
        owned_partitions: the table partitions this worker owns now.
        processor: scores silent shoppers.
        state_config: the retention period (ms).
        silent_after_ms: idle this long, a shopper is re-scored.
        max_batch: shoppers re-scored per step.
        committed: the committed input offsets; a value whose applied offsets are not all committed is kept.
        fence: keeps the writes inside one assignment (:class:`RebalanceFence`).
    """

    def __init__(
        self,
        checkpoint: Checkpoint,
        owned_partitions: Callable[[], set[int]],
        processor: BatchProcessor,
        state_config: StateConfig,
        silent_after_ms: int,
        max_batch: int,
        metrics: WorkerMetrics,
        committed: CommittedOffsets,
        fence: RebalanceFence,
    ) -> None:
        self.checkpoint = checkpoint
        self.owned_partitions = owned_partitions
        self.processor = processor
        self.retention_ms = state_config.retention_ms
        self.silent_after_ms = silent_after_ms
        self.max_batch = max_batch
        self.metrics = metrics
        self.committed = committed
        self.fence = fence

    async def _stored(self, generation: int) -> AsyncIterator[tuple[int, bytes, bytes]]:
        """``(partition, key, value)`` of every shopper in the owned partitions, yielding now and then;
        ends early when a rebalance began meanwhile (it closes the revoked partitions' RocksDBs)."""
        for seen, item in enumerate(self.checkpoint.store.items(self.owned_partitions()), start=1):
            yield item  # the caller may wait here too (a re-scoring step)
            if seen % SWEEP_YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if not self.fence.current(generation):
                return

    async def _write(self, generation: int, build: Callable[[], BatchOutcome]) -> BatchOutcome | None:
        """Build an outcome from values read now, queue it and flush it, inside the fence: None
        (nothing built or written) when a rebalance began since the sweep started."""
        async with self.fence.writing:
            async with self.checkpoint.writing:
                if not self.fence.current(generation):
                    return None
                outcome = build()
                self.checkpoint.queue(outcome)
            await self.checkpoint.commit(outcome, None)
            return outcome

    async def evict_idle(self) -> None:
        """Delete shoppers idle past the retention period from the table and, by tombstone, its changelog.

        This also deletes the erasure markers (:meth:`streams.worker.pipeline.BatchProcessor._erased_write`:
        a state of no events counts as idle forever), but no value whose applied input offsets are not
        all committed yet: a restart would consume those events again, and without the value to
        say they were applied, bring the shopper back. Also refreshes the shoppers-in-state gauge.
        """
        if not self.fence.open:
            return
        generation = self.fence.generation
        now_ms = int(time.time() * 1000)
        expired: list[tuple[int, bytes]] = []
        kept = 0
        async for partition, key, value in self._stored(generation):
            if idle_since_ms(value, now_ms) > self.retention_ms:
                expired.append((partition, key))
            else:
                kept += 1

        def evict() -> BatchOutcome:
            nonlocal kept
            outcome = BatchOutcome()
            get = self.checkpoint.store.get
            for partition, key in expired:
                current = get(partition, key)  # an event may have come since the scan
                if idle_since_ms(current, now_ms) > self.retention_ms and self._replay_safe(current):
                    outcome.writes.append(StateWrite(partition, key, None))
                else:
                    kept += 1
            return outcome

        outcome = await self._write(generation, evict)
        if outcome is None:
            return  # a rebalance: the new assignment's sweep counts again
        self.metrics.shoppers_in_state.set(kept)
        self.metrics.shoppers_evicted.inc(len(outcome.writes))
        if outcome.writes:
            log.info(
                "evicted %d shoppers idle for more than %.1f days; %d remain",
                len(outcome.writes),
                self.retention_ms / 86_400_000,
                kept,
            )

    def _replay_safe(self, value: bytes | None) -> bool:
        """Whether no restart can consume again an input message whose effect ``value`` records."""
        try:
            offsets = Stored.decode(value).offsets
        except EnvelopeDecodeError:
            return True  # unreadable: it records nothing
        return offsets_committed(offsets, self.committed, skip_topic=self.processor.erasure_topic)

    async def rescore_silent(self) -> None:
        """Re-score shoppers idle for at least ``silent_after_ms``: their churn risk rises while
        nothing happens, and a churn alert must fire without waiting for an event that may never come.

        Runs through the same scoring path in batches of ``max_batch``, between event batches.
        """
        if not self.fence.open:
            return
        generation = self.fence.generation
        now_ms = int(time.time() * 1000)
        silent: list[tuple[int, bytes]] = []
        rescored = 0
        async for partition, key, value in self._stored(generation):
            if self.silent_after_ms <= idle_since_ms(value, now_ms) <= self.retention_ms:
                silent.append((partition, key))
            if len(silent) >= self.max_batch:
                rescored += await self._rescore(generation, silent, now_ms)
                silent = []
        if silent:
            rescored += await self._rescore(generation, silent, now_ms)
        self.metrics.silent_rescored.inc(rescored)
        if rescored:
            log.info("re-scored %d shoppers silent for at least %.1f h", rescored, self.silent_after_ms / 3_600_000)

    async def _rescore(self, generation: int, silent: list[tuple[int, bytes]], now_ms: int) -> int:
        def rescore() -> BatchOutcome:
            get = self.checkpoint.store.get
            current = [
                (partition, key, value)
                for partition, key in silent
                if (value := get(partition, key)) is not None
                and self.silent_after_ms <= idle_since_ms(value, now_ms) <= self.retention_ms
            ]
            return self.processor.rescore_silent(current, now_ms)

        outcome = await self._write(generation, rescore)
        return 0 if outcome is None else len(outcome.scored)
