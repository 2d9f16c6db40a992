"""A producer that works a micro-batch at a time: queue every message, then wait for all of them.

The worker has two (confluent-kafka, librdkafka in C): one for scores, recommendations, churn
alerts and dead letters, one for its tables' changelogs (:mod:`streams.worker.table_writer`).
:meth:`BatchProducer.send` only copies a message into librdkafka's buffer;
:meth:`BatchProducer.flush` waits, off the event loop, until the brokers acknowledged all of
them. The worker flushes both at the end of every batch, before Faust may commit the batch's
input offsets, so a crash can repeat outputs (at-least-once) but never lose one.

Going through librdkafka instead of Faust's ``topic.send`` takes the per-message Python work
(futures, callbacks, and on the embedded broker one request round trip per changelog record)
out of the hot path: librdkafka keeps many requests in flight and packs output messages into
a few record batches per partition.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from streams.config import Settings
from streams.kafka.clients import PARTITIONER, confluent_producer_config

log = logging.getLogger(__name__)

#: librdkafka settings, unless the connection settings say otherwise.
BATCH_PRODUCER_SETTINGS: dict[str, Any] = {
    "linger.ms": 2,  # a batch's messages leave together; flush() sends at once anyway
    "acks": "all",
}
#: How long one flush may wait for acknowledgements before it gives up, in s.
FLUSH_TIMEOUT_S = 120.0


class DeliveryError(RuntimeError):
    """Messages could not be delivered; the batch's input offsets must not be committed."""


class BatchProducer:
    """Queues messages and waits for their delivery, batch by batch.

    Args:
        settings: connection, security, message size and buffer limits
            (:func:`streams.kafka.clients.confluent_producer_config`); ``send`` waits for deliveries
            when the buffer is full, so memory stays bounded.
        track_offsets: remember the highest delivered offset per topic partition
            (:meth:`take_offsets`); the changelog producer needs them, outputs do not.
    """

    def __init__(self, settings: Settings, track_offsets: bool = False) -> None:
        config = {
            **BATCH_PRODUCER_SETTINGS,
            **confluent_producer_config(settings),
            "partitioner": PARTITIONER,
            "log_level": 3,
        }
        self._producer = Producer(config)
        self._failures: list[str] = []
        self._offsets: dict[tuple[str, int], int] = {}
        self._on_delivery = self._record_offset if track_offsets else self._record_failure

    def _record_failure(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._failures.append(f"{message.topic()}: {error.name()} ({error.str()})")

    def _record_offset(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._record_failure(error, message)
            return
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        # A delivered message always has its topic, partition and offset (None only before delivery).
        assert topic is not None and partition is not None and offset is not None
        tp = (topic, partition)
        if offset > self._offsets.get(tp, -1):
            self._offsets[tp] = offset

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] | None = None,
        partition: int = -1,
    ) -> None:
        """Queue one message (-1: the partitioner picks the partition); waits only if the buffer is full."""
        # produce takes headers as a list (or a dict), not as any sequence
        header_list: list[tuple[str, str | bytes | None]] | None = None if headers is None else list(headers)
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=header_list, partition=partition, on_delivery=self._on_delivery
                )
                return
            except BufferError:  # full: serve deliveries until there is room
                self._producer.poll(0.05)

    async def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Wait, off the event loop, until every queued message is acknowledged.

        Raises :class:`DeliveryError` if any was refused or the wait timed out.
        """
        await asyncio.to_thread(self.deliver, timeout_s)

    def deliver(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """:meth:`flush`, blocking the calling thread."""
        still_queued = self._producer.flush(timeout_s)
        failures, self._failures = self._failures, []
        if still_queued or failures:
            shown = "; ".join(failures[:5]) + (f" and {len(failures) - 5} more" if len(failures) > 5 else "")
            raise DeliveryError(
                f"{len(failures)} messages refused by the brokers ({shown or 'none'}), {still_queued} still "
                f"unacknowledged after {timeout_s:.0f} s; the batch is not committed and will be re-processed after "
                "a restart; check the brokers' health, that the topics exist, and the client's ACLs"
            )

    def take_offsets(self) -> dict[tuple[str, int], int]:
        """Highest delivered offset per ``(topic, partition)`` since the last call (``track_offsets`` only)."""
        offsets, self._offsets = self._offsets, {}
        return offsets

    def close(self, timeout_s: float = 10.0) -> int:
        """Flush what is left (blocking); returns how many messages were still undelivered."""
        return self._producer.flush(timeout_s)
