"""The worker's output producer: scores, recommendations, churn alerts and dead letters.

One confluent-kafka producer (librdkafka, in C) per worker. A micro-batch's results are
queued with :meth:`OutputProducer.send`, which only copies them into librdkafka's buffer, and
:meth:`OutputProducer.flush` then waits until the brokers have acknowledged all of them. The
worker flushes at the end of every batch, before Faust may commit the batch's input offsets,
so a crash can repeat outputs (at-least-once) but never lose one.

Going through librdkafka instead of Faust's ``topic.send`` takes the per-message Python work
(futures, callbacks, one record batch per message on the embedded broker) out of the hot path:
librdkafka packs a batch's messages into a few record batches per partition. Changelog
records stay with Faust, whose table recovery needs them one per record batch on Tansu.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

from confluent_kafka import KafkaError, Message, Producer

from streams.config import Settings
from streams.producer import PARTITIONER

log = logging.getLogger(__name__)

#: librdkafka settings for outputs, unless the connection settings say otherwise.
OUTPUT_PRODUCER_SETTINGS: dict[str, Any] = {
    "linger.ms": 2,            # a batch's messages leave together; flush() sends at once anyway
    "acks": "all",
    "compression.type": "none",
}
#: How long one flush may wait for acknowledgements before it gives up, in s.
FLUSH_TIMEOUT_S = 120.0


class OutputDeliveryError(RuntimeError):
    """Outputs could not be delivered; the batch's input offsets must not be committed."""


class OutputProducer:
    """Queues output messages and waits for their delivery, batch by batch.

    Args:
        settings: connection and security settings (``librdkafka_config``).
        buffer_max_messages: most messages librdkafka may hold unacknowledged; ``send`` waits
            for deliveries when the buffer is full, so memory stays bounded.
    """

    def __init__(self, settings: Settings, buffer_max_messages: int = 200_000) -> None:
        config = {**OUTPUT_PRODUCER_SETTINGS, **settings.librdkafka_config(), "partitioner": PARTITIONER,
                  "queue.buffering.max.messages": buffer_max_messages, "log_level": 3}
        self._producer = Producer(config)
        self._failures: list[str] = []

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        if error is not None:
            self._failures.append(f"{message.topic()}: {error.name()} ({error.str()})")

    def send(self, topic: str, key: bytes | None, value: bytes,
             headers: Sequence[tuple[str, bytes]] | None = None) -> None:
        """Queue one message (non-blocking unless the local buffer is full)."""
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=self._on_delivery)
                return
            except BufferError:  # full: serve deliveries until there is room
                self._producer.poll(0.05)

    async def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Wait, off the event loop, until every queued message is acknowledged.

        Raises :class:`OutputDeliveryError` if any was refused or the wait timed out.
        """
        still_queued = await asyncio.to_thread(self._producer.flush, timeout_s)
        failures, self._failures = self._failures, []
        if still_queued or failures:
            shown = "; ".join(failures[:5]) + (f" and {len(failures) - 5} more" if len(failures) > 5 else "")
            raise OutputDeliveryError(
                f"{len(failures)} output messages refused by the brokers ({shown or 'none'}), {still_queued} still "
                f"unacknowledged after {timeout_s:.0f} s; the batch is not committed and will be re-processed after "
                "a restart — check the brokers' health, the output topics' existence and the client's ACLs")

    def close(self, timeout_s: float = 10.0) -> int:
        """Flush what is left (blocking); returns how many messages were still undelivered."""
        return self._producer.flush(timeout_s)
