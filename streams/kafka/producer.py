"""Put generated or replayed messages on the input topics with confluent-kafka.

The producer always hashes keys with ``murmur2_random`` (the Java client's and aiokafka's
partitioner): with librdkafka's default CRC32 a user's page views, cart changes and orders
would land in different partition numbers on the three topics and break the worker's
co-partitioned state (see ``/work/shared/notes/faust-pitfalls.md``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from streams.kafka.clients import PARTITIONER
from streams.sim.generator import GeneratedMessage

#: Producer settings applied unless the caller's config sets them.
DEFAULT_PRODUCER_SETTINGS: dict[str, Any] = {"linger.ms": 5}
#: Messages between two non-blocking polls that serve delivery callbacks (and progress updates).
_POLL_EVERY = 1000


@dataclass(slots=True)
class ProduceReport:
    """Outcome of :func:`produce`.

    Attributes:
        sent: messages offered to the producer (after a full flush, sent = delivered + failed).
        delivered: messages the brokers acknowledged.
        failed: messages that failed (delivery errors, refusals, and any still queued when the
            final flush timed out).
        seconds: wall time from the first message to the end of the flush, in s.
        errors: failure counts by Kafka error name (e.g. ``MSG_SIZE_TOO_LARGE``, ``_MSG_TIMED_OUT``).
    """

    sent: int = 0
    delivered: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def delivered_per_s(self) -> float:
        """Delivered messages per second of wall time."""
        return self.delivered / self.seconds if self.seconds > 0 else 0.0

    def record_failure(self, error_name: str, count: int = 1) -> None:
        """Count ``count`` failed messages under the Kafka error name ``error_name``."""
        self.failed += count
        self.errors[error_name] = self.errors.get(error_name, 0) + count


class _TokenBucket:
    """Blocks :meth:`take` to keep a mean rate, allowing bursts of up to 0.1 s of tokens."""

    def __init__(self, rate_per_s: float) -> None:
        if rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be positive (or None for no limit), got {rate_per_s}")
        self.rate_per_s = rate_per_s
        self.capacity = max(1.0, rate_per_s * 0.1)
        self.tokens = 1.0
        self.updated = time.monotonic()

    def take(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
            self.updated = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return
            time.sleep((1.0 - self.tokens) / self.rate_per_s)


class ProducibleMessage(Protocol):
    """What :func:`produce` reads of a message: a GeneratedMessage, or a test's hand-made one
    (tests/poison_corpus.PoisonCase, whose key or value may be missing)."""

    @property
    def topic_kind(self) -> str: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


def produce(
    messages: Iterable[ProducibleMessage],
    topics: Mapping[str, str],
    producer_config: dict[str, Any],
    rate_per_s: float | None = None,
    progress: bool = False,
    flush_timeout_s: float = 60.0,
) -> ProduceReport:
    """Produce every message to ``topics[message.topic_kind]`` with its key and value.

    Args:
        messages: what to send (consumed lazily, so a live-clock generator stamps at send time).
        topics: topic name by topic kind (``page_view``, ``cart``, ``order``).
        producer_config: librdkafka settings (``bootstrap.servers``, security, ...); ``linger.ms``
            defaults to 5, ``partitioner`` is set to ``murmur2_random`` (any other value is an error).
        rate_per_s: mean send rate limit in messages per second (token bucket); None = unlimited.
        progress: show a tqdm progress bar on stderr.
        flush_timeout_s: longest wait for outstanding deliveries at the end, in s.

    Returns:
        Counts of sent, delivered and failed messages and the elapsed seconds.
    """
    partitioner = producer_config.get("partitioner", PARTITIONER)
    if partitioner != PARTITIONER:
        raise ValueError(
            f"partitioner {partitioner!r} would split a user's events across partition numbers; "
            f"input topics need {PARTITIONER!r}"
        )
    producer = Producer({**DEFAULT_PRODUCER_SETTINGS, **producer_config, "partitioner": PARTITIONER})
    report = ProduceReport()

    def on_delivery(error: KafkaError | None, _message: Message) -> None:
        if error is None:
            report.delivered += 1
        else:
            report.record_failure(error.name())

    bucket = _TokenBucket(rate_per_s) if rate_per_s is not None else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="msg", unit_scale=True, desc="produce")
    started = time.monotonic()
    try:
        for message in messages:
            topic = topics.get(message.topic_kind)
            if topic is None:
                raise ValueError(f"no topic for topic kind {message.topic_kind!r}; topics has {sorted(topics)}")
            if bucket is not None:
                bucket.take()
            while True:
                try:
                    producer.produce(topic, value=message.value, key=message.key, on_delivery=on_delivery)
                    break
                except BufferError:  # local queue full: let deliveries drain it
                    producer.poll(0.05)
                except KafkaException as exc:  # refused locally, e.g. larger than message.max.bytes
                    report.record_failure(exc.args[0].name())
                    break
            report.sent += 1
            if report.sent % _POLL_EVERY == 0:
                producer.poll(0)
                if bar is not None:
                    bar.update(_POLL_EVERY)
        still_queued = producer.flush(flush_timeout_s)
        if still_queued:
            report.record_failure("_FLUSH_TIMED_OUT", still_queued)
    finally:
        report.seconds = time.monotonic() - started
        if bar is not None:
            bar.update(report.sent % _POLL_EVERY)
            bar.close()
    return report


class BackgroundProducer:
    """:func:`produce` in a thread: messages at a steady rate until :meth:`stop`, each one kept in ``sent``.

    For fault-injection runs, where traffic must keep flowing while workers die and return;
    :meth:`burst` sends a number of messages at full speed (a flood) before the pace resumes.
    ``sent`` lists the messages handed to the producer; :meth:`stop` returns the report, whose
    ``failed`` must be 0 for ``sent`` to be exactly what the brokers hold.
    """

    def __init__(
        self,
        messages: Iterable[GeneratedMessage],
        topics: Mapping[str, str],
        producer_config: dict[str, Any],
        rate_per_s: float,
    ) -> None:
        self.sent: list[GeneratedMessage] = []
        self.report: ProduceReport | None = None
        self._messages = iter(messages)
        self._bucket = _TokenBucket(rate_per_s)
        self._burst_until = 0  # unpaced while len(sent) is below this; written only by burst()
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(topics, producer_config), name="background-producer", daemon=True
        )

    def _paced(self) -> Iterator[GeneratedMessage]:
        for message in self._messages:
            if self._stopping.is_set():
                return
            if len(self.sent) >= self._burst_until:
                self._bucket.take()
            self.sent.append(message)
            yield message

    def _run(self, topics: Mapping[str, str], producer_config: dict[str, Any]) -> None:
        self.report = produce(self._paced(), topics, producer_config)

    def start(self) -> BackgroundProducer:
        self._thread.start()
        return self

    def burst(self, count: int) -> None:
        """Send the next ``count`` messages as fast as the producer takes them."""
        self._burst_until = len(self.sent) + count

    def stop(self) -> ProduceReport:
        """Stop producing, wait for outstanding deliveries, and return the report."""
        self._stopping.set()
        self._thread.join()
        assert self.report is not None
        return self.report
