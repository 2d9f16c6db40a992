"""Helpers for integration tests: settings isolated per test, a worker process, reading topics."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Consumer, Message

from streams.config import Settings
from streams.kafka.broker import free_port
from streams.kafka.clients import confluent_consumer_config, consume_data
from streams.tools.process import WorkerProcess  # noqa: F401 - re-exported for the tests


def isolated_settings(bootstrap_servers: str, data_dir: Path, partitions: int = 4, **overrides) -> Settings:
    """Settings with topic names and app id unique to one test, on the shared test broker."""
    tag = uuid.uuid4().hex[:8]
    return Settings.from_env(
        {},
        bootstrap_servers=bootstrap_servers,
        app_id=f"shoppulse-test-{tag}",
        topic_page_views=f"t{tag}.page_views",
        topic_cart=f"t{tag}.cart",
        topic_orders=f"t{tag}.orders",
        topic_scores=f"t{tag}.scores",
        topic_recommendations=f"t{tag}.recommendations",
        topic_churn_alerts=f"t{tag}.churn_alerts",
        topic_dead_letter=f"t{tag}.dead_letter",
        topic_erasure_requests=f"t{tag}.erasure_requests",
        topic_erasures=f"t{tag}.erasures",
        partitions=partitions,
        data_dir=data_dir,
        metrics_port=free_port(),
        **overrides,
    )


def read_topic(
    settings: Settings, topic: str | list[str], until: Callable[[list[Message]], bool], timeout_s: float = 60.0
) -> list[Message]:
    """Read ``topic`` (or several) from the beginning until ``until(messages)`` holds or the timeout passes."""
    consumer = Consumer(
        {
            **confluent_consumer_config(settings, f"test-reader-{uuid.uuid4().hex[:8]}"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe([topic] if isinstance(topic, str) else topic)
    messages: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not until(messages):
            messages.extend(consume_data(consumer, 1000, 0.5))
    finally:
        consumer.close()
    return messages


def read_to_end(settings: Settings, topic: str, timeout_s: float = 60.0) -> list[Message]:
    """Every message of ``topic`` up to the end of each partition (for a topic nobody writes to any more)."""
    consumer = Consumer(
        {
            **confluent_consumer_config(settings, f"test-reader-{uuid.uuid4().hex[:8]}"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "enable.partition.eof": True,
        }
    )
    partitions = len(consumer.list_topics(topic, timeout=10).topics[topic].partitions)
    consumer.subscribe([topic])
    messages: list[Message] = []
    at_end: set[int] = set()

    def on_end(eof: Message) -> None:
        partition = eof.partition()
        assert partition is not None, "a partition EOF names its partition"
        at_end.add(partition)

    deadline = time.monotonic() + timeout_s
    try:
        while len(at_end) < partitions:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"reading {topic}: only partitions {sorted(at_end)} of {partitions} reached "
                    f"their end within {timeout_s:.0f} s"
                )
            for message in consume_data(consumer, 1000, 0.5, on_end=on_end):
                at_end.discard(message.partition())
                messages.append(message)
    finally:
        consumer.close()
    return messages


def _where(message: Message) -> str:
    return f"{message.topic()}[{message.partition()}]@{message.offset()}"


def key_of(message: Message) -> bytes:
    """The key of a consumed message that has one (every message the tests read is keyed)."""
    key = message.key()
    assert key is not None, f"no key at {_where(message)}"
    return key


def value_of(message: Message) -> bytes:
    """The value of a consumed message that has one (not a tombstone)."""
    value = message.value()
    assert value is not None, f"no value (a tombstone) at {_where(message)}"
    return value


def headers_of(message: Message) -> dict[str, bytes | None]:
    """A consumed message's headers by name, as ``dict(message.headers())`` (the last of a repeated name wins).

    confluent-kafka types ``headers()`` with the produce-side union (a dict or a list, values str, bytes
    or None); a consumed message has a list of (name, bytes or None), or None when it has no headers.
    """
    headers = message.headers()
    assert isinstance(headers, list), f"no headers at {_where(message)}"
    found: dict[str, bytes | None] = {}
    for name, value in headers:
        assert not isinstance(value, str), "consumed header values are bytes"
        found[name] = value
    return found


def decoded_headers(message: Message) -> dict[str, str]:
    """Every header of a consumed message, decoded from UTF-8 (each must have a value)."""
    decoded: dict[str, str] = {}
    for name, value in headers_of(message).items():
        assert value is not None, f"header {name!r} without a value at {_where(message)}"
        decoded[name] = value.decode()
    return decoded
