"""The embedded broker, shared by every integration test in a run (topics are per test)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from streams.kafka.broker import EmbeddedBroker


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as running:
        yield running
