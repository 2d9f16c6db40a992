"""The sweeps write only inside one assignment (streams.worker.sweeps, "Sweeps and rebalances")."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from prometheus_client import CollectorRegistry

from features.state import StateConfig
from streams.worker.checkpoint import Checkpoint
from streams.worker.metrics import WorkerMetrics
from streams.worker.pipeline import BatchOutcome, BatchProcessor, StateWrite
from streams.worker.sweeps import RebalanceFence, Sweeps

#: Undecodable values: idle "forever" (since the epoch), so with this retention they are silent
#: (re-scored) and not yet expired.
RETENTION_MS = 10**14


class FakeStore:
    """Three stored shoppers in partition 0; reads are recorded."""

    def __init__(self) -> None:
        self.values = {b"u1": b"?", b"u2": b"?", b"u3": b"?"}
        self.reads: list[bytes] = []
        self.listed: list[bytes] = []

    def items(self, partitions: set[int]) -> Any:
        for key, value in self.values.items():
            if 0 in partitions:
                self.listed.append(key)  # a revoked partition's RocksDB is closed: iterating it must stop
                yield 0, key, value

    def get(self, partition: int, key: bytes) -> bytes | None:
        self.reads.append(key)
        return self.values.get(key)


class FakeCheckpoint:
    """Records what is queued and committed; a commit waits for :attr:`release` while it is unset."""

    def __init__(self) -> None:
        self.store = FakeStore()
        self.writing = asyncio.Lock()
        self.queued: list[StateWrite] = []
        self.events: list[str] = []
        self.committing = asyncio.Event()
        self.release = asyncio.Event()

    def queue(self, outcome: BatchOutcome) -> None:
        self.queued += outcome.writes

    async def commit(self, outcome: BatchOutcome, batch: object) -> None:
        self.committing.set()
        await self.release.wait()
        self.events.append("committed")


class RescoreAll:
    """Stands in for the processor: "re-scores" each shopper by writing its value back."""

    def rescore_silent(self, stored: list[tuple[int, bytes, bytes]], now_ms: int) -> BatchOutcome:
        return BatchOutcome(writes=[StateWrite(p, k, v) for p, k, v in stored], scored=cast(Any, list(stored)))


def sweeps(checkpoint: FakeCheckpoint, fence: RebalanceFence, max_batch: int = 1) -> Sweeps:
    return Sweeps(
        cast(Checkpoint, checkpoint),
        lambda: {0},
        cast(BatchProcessor, RescoreAll()),
        StateConfig(retention_ms=RETENTION_MS),
        silent_after_ms=1,
        max_batch=max_batch,
        metrics=WorkerMetrics(CollectorRegistry()),
        committed=lambda topic, partition: None,
        fence=fence,
    )


def open_fence() -> RebalanceFence:
    fence = RebalanceFence()
    fence.assigned()
    fence.recovered()
    return fence


def test_a_revocation_waits_for_the_sweeps_write_in_flight_and_the_sweep_writes_nothing_after_it():
    async def scenario() -> tuple[FakeCheckpoint, list[str]]:
        checkpoint, fence = FakeCheckpoint(), open_fence()
        sweep = asyncio.create_task(sweeps(checkpoint, fence).rescore_silent())
        await checkpoint.committing.wait()  # the first shopper's write is being flushed
        revocation = asyncio.create_task(fence.revoked())
        await asyncio.sleep(0.05)
        order = ["revocation done" if revocation.done() else "revocation waiting"]
        checkpoint.release.set()
        await revocation
        checkpoint.events.append("revocation done")
        await sweep
        return checkpoint, order + checkpoint.events

    checkpoint, events = asyncio.run(scenario())
    assert events == ["revocation waiting", "committed", "revocation done"]
    assert [write.key for write in checkpoint.queued] == [b"u1"]  # not u2, u3: their partition may be gone
    assert checkpoint.store.reads == [b"u1"]
    assert checkpoint.store.listed == [b"u1"]


def test_no_sweep_starts_before_the_tables_of_an_assignment_are_recovered():
    async def scenario(fence: RebalanceFence) -> FakeCheckpoint:
        checkpoint = FakeCheckpoint()
        checkpoint.release.set()
        run = sweeps(checkpoint, fence, max_batch=10)
        await run.rescore_silent()
        await run.evict_idle()
        return checkpoint

    never_assigned = RebalanceFence()
    assert asyncio.run(scenario(never_assigned)).queued == []

    revoked = open_fence()
    asyncio.run(revoked.revoked())
    assert asyncio.run(scenario(revoked)).queued == []

    # a recovery that ends after the next revocation is stale: the fence stays closed
    stale = open_fence()
    asyncio.run(stale.revoked())
    stale.assigned()
    asyncio.run(stale.revoked())
    stale.recovered()
    assert asyncio.run(scenario(stale)).queued == []

    stale.assigned()
    stale.recovered()
    assert [write.key for write in asyncio.run(scenario(stale)).queued] == [b"u1", b"u2", b"u3"]


def test_an_eviction_that_a_revocation_overtook_deletes_nothing():
    async def scenario() -> FakeCheckpoint:
        checkpoint, fence = FakeCheckpoint(), open_fence()
        checkpoint.release.set()
        run = sweeps(checkpoint, fence)
        run.retention_ms = 1  # every (undecodable) value has expired
        async with checkpoint.writing:  # the agent holds the values while the sweep scans
            eviction = asyncio.create_task(run.evict_idle())
            await asyncio.sleep(0.05)
            revocation = asyncio.create_task(fence.revoked())
            await asyncio.sleep(0.05)
        await revocation
        await eviction
        return checkpoint

    checkpoint = asyncio.run(scenario())
    assert checkpoint.queued == []
