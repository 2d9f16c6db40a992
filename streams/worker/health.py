"""Readiness and consumer lag: what ``/readyz``, ``shoppulse_ready`` and ``shoppulse_consumer_lag`` say.

Ready means: a broker connection is up, tables are recovered, no rebalance is under way, and
partitions are assigned. Whether a broker connection is up is read from aiokafka's internals
(:func:`streams.worker.faust_seam.broker_connected`); if an upgrade removed them the worker is not
ready, says why in ``/readyz``, and logs it at ERROR once, rather than report "broker
unreachable" forever.
"""

from __future__ import annotations

import logging

from streams.config import Settings
from streams.worker.batch_consumer import MicroBatch
from streams.worker.faust_seam import BatchingApp, SeamBroken, broker_connected
from streams.worker.metrics import HealthState, WorkerMetrics

log = logging.getLogger("shoppulse.worker")


class Health:
    """Refreshes readiness and lag (a 1 s timer), from the app and the batches taken."""

    def __init__(self, app: BatchingApp, settings: Settings, metrics: WorkerMetrics, state: HealthState) -> None:
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.state = state
        self._positions: dict[tuple[str, int], int] = {}  # last offset handed to a batch, per input partition
        self._connected: bool | None = None  # broker connectivity last seen
        self._broken: str | None = None  # the seam failure last logged

    def taken(self, batch: MicroBatch) -> None:
        """Note the offsets of a batch handed to the agent (the lag counts from them)."""
        positions = self._positions
        for message in batch:
            positions[(message.topic, message.partition)] = message.offset

    def _broker_connected(self) -> bool | None:
        """Connectivity, or None (logged once at ERROR) when the internals it is read from are missing."""
        try:
            connected = broker_connected(self.app)
        except SeamBroken as exc:
            if str(exc) != self._broken:
                log.error(
                    "readiness cannot tell whether the brokers are reachable: %s. The installed Faust/aiokafka "
                    "differ from the tested versions; install the pinned ones (docs/deploy.md)",
                    exc,
                )
                self._broken = str(exc)
            return None
        self._broken = None
        if connected != self._connected:
            if connected:
                log.info("connected to the brokers at %s", self.settings.bootstrap_servers)
            elif self._connected is not None:
                log.error(
                    "lost every connection to the brokers at %s: not ready until one is back",
                    self.settings.bootstrap_servers,
                )
            self._connected = connected
        return connected

    async def refresh(self) -> None:
        connected = self._broker_connected()
        if connected is None:
            self._set(False, f"faust internals missing ({self._broken})")
            return
        recovered = self.app.tables_recovered()
        assigned = bool(self.app.consumer.assignment())
        ready = recovered and not self.app.rebalancing and assigned and connected
        self._set(
            ready,
            "ready"
            if ready
            else "broker unreachable"
            if not connected
            else "rebalancing"
            if self.app.rebalancing
            else "recovering tables"
            if not recovered
            else "no partitions assigned",
        )
        if assigned:
            self._refresh_lag()

    def _set(self, ready: bool, reason: str) -> None:
        self.state.ready, self.state.reason = ready, reason
        self.metrics.ready.set(1 if ready else 0)

    def _refresh_lag(self) -> None:
        """``shoppulse_consumer_lag{topic,partition}`` for the input partitions this worker owns.

        Uses the high watermark from fetch responses (right on Tansu too, unlike ListOffsets)
        and the last offset this worker handed to a batch.
        """
        consumer = self.app.batch_consumer
        owned = set()
        for tp in consumer.assignment():
            if tp.topic not in self.settings.consumed_topics:
                continue
            owned.add((tp.topic, tp.partition))
            highwater = consumer.highwater(tp)
            if highwater is None:
                continue
            position = self._positions.get((tp.topic, tp.partition))
            if position is None:  # nothing handled since start: count from the committed offset
                position = (consumer.committed_offset(tp) or 0) - 1
            lag = highwater - (position + 1)
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, lag))
        for topic, partition in set(self._positions) - owned:  # revoked: stop reporting it
            self._positions.pop((topic, partition), None)
            try:
                self.metrics.consumer_lag.remove(topic, str(partition))
            except KeyError:
                pass
