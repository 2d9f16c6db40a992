"""The worker's outputs: a batch's scores, recommendations, churn alerts and dead letters, to Kafka.

:class:`Publisher` turns a :class:`streams.worker.pipeline.BatchOutcome` into messages of the output
topics and queues them in one :class:`streams.kafka.batch_producer.BatchProducer`; it flushes when
:class:`streams.worker.checkpoint.Checkpoint` says so, and counts what was delivered then (not when
queued: a crash before the flush publishes nothing).
"""

from __future__ import annotations

import logging
import time

from streams.config import Settings
from streams.kafka.batch_producer import BatchProducer
from streams.worker.console import AlertFeed
from streams.worker.metrics import WorkerMetrics
from streams.worker.pipeline import BatchOutcome

log = logging.getLogger("shoppulse.worker")


class Publisher:
    """Queues a batch's output messages and dead letters; reports them once delivered.

    ``alerts`` receives every churn alert once delivered, for the console (None: a feed nobody reads).
    """

    def __init__(
        self, producer: BatchProducer, settings: Settings, metrics: WorkerMetrics, alerts: AlertFeed | None = None
    ) -> None:
        self.producer = producer
        self.settings = settings
        self.metrics = metrics
        self.alerts = alerts or AlertFeed()

    def queue(self, outcome: BatchOutcome) -> None:
        """Dead letters first (with headers that say where each came from and why), then one score
        per scored shopper, plus its recommendation and churn alert where there is one, then the
        erasure confirmations."""
        settings, send = self.settings, self.producer.send
        failed_at_ms = int(time.time() * 1000)
        for dead in outcome.dead_letters:
            value, headers = dead.record(failed_at_ms, settings.kafka_max_message_bytes)
            if value is not dead.message.value:
                log.warning(
                    "dead letter of %s[%d]@%d cut from %d to %d bytes to fit SHOPPULSE_KAFKA_MAX_MESSAGE_BYTES=%d; "
                    "the whole message stays in its source topic",
                    dead.message.topic,
                    dead.message.partition,
                    dead.message.offset,
                    len(dead.message.value or b""),
                    len(value or b""),
                    settings.kafka_max_message_bytes,
                )
            send(settings.topic_dead_letter, dead.message.key, value, headers)
            self.metrics.dead_lettered.labels(dead.reason).inc()
            log.debug(
                "dead-lettered %s[%d]@%d: %s",
                dead.message.topic,
                dead.message.partition,
                dead.message.offset,
                dead.detail,
            )
        scores, recommendations, alerts = (
            settings.topic_scores,
            settings.topic_recommendations,
            settings.topic_churn_alerts,
        )
        for shopper in outcome.scored:
            trace = shopper.headers  # the trigger event's trace context, on everything it caused
            send(scores, shopper.output_key, shopper.result, trace)
            if shopper.recommendation is not None:
                send(recommendations, shopper.output_key, shopper.recommendation, trace)
            if shopper.alert is not None:
                send(alerts, shopper.output_key, shopper.alert, trace)
        for erasure in outcome.erasures:
            send(settings.topic_erasures, erasure.output_key, erasure.confirmation)

    async def flush(self) -> None:
        """Wait until the brokers acknowledged everything queued.

        Raises :class:`streams.kafka.batch_producer.DeliveryError` when they refused records.
        """
        await self.producer.flush()

    def delivered(self, outcome: BatchOutcome) -> None:
        """Count a delivered batch's messages per topic, the end-to-end latency of its scores, and its
        live evaluation outcomes (their memory is in the state writes flushed with these messages);
        hand its churn alerts to the console's feed."""
        scored = outcome.scored
        published = {
            self.settings.topic_scores: len(scored),
            self.settings.topic_recommendations: sum(s.recommendation is not None for s in scored),
            self.settings.topic_churn_alerts: sum(s.alert is not None for s in scored),
            self.settings.topic_erasures: len(outcome.erasures),
        }
        for topic, count in published.items():
            self.metrics.results_published.labels(topic).inc(count)
        self.metrics.count_live(outcome.live, outcome.held_out_alerts)
        delivered_s = time.time()
        for shopper in scored:
            if shopper.trigger_ts is not None:
                self.metrics.end_to_end_seconds.observe(max(0.0, delivered_s - shopper.trigger_ts / 1000.0))
            if shopper.alert is not None:
                self.alerts.record(shopper.alert)

    def close(self) -> int:
        """Flush what is left (blocking); returns how many messages were still undelivered."""
        return self.producer.close()
