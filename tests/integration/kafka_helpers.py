"""Helpers for integration tests: settings isolated per test, a worker process, reading topics."""
from __future__ import annotations

import dataclasses
import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Callable

from confluent_kafka import Consumer, KafkaError, Message

from streams.broker import free_port
from streams.config import Settings
from streams.demo import start_worker, stop_process


def isolated_settings(bootstrap_servers: str, data_dir: Path, partitions: int = 4, **overrides) -> Settings:
    """Settings with topic names and app id unique to one test, on the shared test broker."""
    tag = uuid.uuid4().hex[:8]
    return Settings.from_env({}, bootstrap_servers=bootstrap_servers, app_id=f"shoppulse-test-{tag}",
                             topic_page_views=f"t{tag}.page_views", topic_cart=f"t{tag}.cart",
                             topic_orders=f"t{tag}.orders", topic_scores=f"t{tag}.scores",
                             topic_dead_letter=f"t{tag}.dead_letter", partitions=partitions, data_dir=data_dir,
                             metrics_port=free_port(), web_port=free_port(), **overrides)


class WorkerProcess:
    """``shoppulse worker`` as a real child process, with its log kept for failure messages."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.process = start_worker(settings, log_path)

    @property
    def url(self) -> str:
        return f"http://{self.settings.metrics_host}:{self.settings.metrics_port}"

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Seconds until ``/readyz`` says ready; fails with the worker's log otherwise."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as reply:
                    if reply.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"worker not ready after {timeout_s} s:\n{self.log_tail()}")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def stop(self) -> int:
        return stop_process(self.process)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


def read_topic(settings: Settings, topic: str | list[str], until: Callable[[list[Message]], bool],
               timeout_s: float = 60.0) -> list[Message]:
    """Read ``topic`` (or several) from the beginning until ``until(messages)`` holds or the timeout passes."""
    consumer = Consumer({**settings.librdkafka_config(), "group.id": f"test-reader-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False, "session.timeout.ms": 6000})
    consumer.subscribe([topic] if isinstance(topic, str) else topic)
    messages: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not until(messages):
            for message in consumer.consume(1000, timeout=0.5):
                if message.error():
                    if message.error().code() != KafkaError._PARTITION_EOF:
                        raise AssertionError(f"reading {topic}: {message.error()}")
                    continue
                messages.append(message)
    finally:
        consumer.close()
    return messages


def latest_by_key(messages: list[Message]) -> dict[bytes, dict]:
    """The last JSON value per key."""
    return {m.key(): json.loads(m.value()) for m in messages}


def with_overrides(settings: Settings, **changes) -> Settings:
    return dataclasses.replace(settings, **changes)
