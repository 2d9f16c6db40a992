"""The embedded broker: starts, answers Kafka metadata, and never outlives its owner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from confluent_kafka.admin import AdminClient

from streams.config import Settings
from streams.kafka.broker import EMBEDDED_CLUSTER_ID, EmbeddedBroker
from streams.kafka.clients import (
    BROKER_PROFILE_KAFKA,
    BROKER_PROFILE_TANSU,
    KafkaSetupError,
    ensure_topics,
    resolve_broker_profile,
)

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"


def test_starts_answers_metadata_and_stops(tmp_path):
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    pid = broker.pid
    metadata = AdminClient({"bootstrap.servers": broker.bootstrap_servers}).list_topics(timeout=5)
    assert metadata.cluster_id == EMBEDDED_CLUSTER_ID
    assert broker.bootstrap_servers.startswith("127.0.0.1:")
    broker.stop()
    broker.stop()  # idempotent
    assert not _alive(pid)


def test_broker_dies_with_a_killed_owner():
    """kill -9 of the owning process must not leave an orphan broker (PR_SET_PDEATHSIG)."""
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "from streams.kafka.broker import EmbeddedBroker; import time, sys\n"
                "b = EmbeddedBroker().start(); print(b.pid, flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    broker_pid = int(owner.stdout.readline())
    assert _alive(broker_pid)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    deadline = time.monotonic() + 10
    while _alive(broker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(broker_pid), "the broker outlived its killed owner"


def test_cli_broker_stops_on_sigterm():
    cli = subprocess.Popen([sys.executable, "-m", "streams.tools.cli", "broker"], stdout=subprocess.PIPE, text=True)
    assert cli.stdout is not None
    banner = cli.stdout.readline()
    assert "embedded Tansu broker on 127.0.0.1:" in banner
    cli.send_signal(signal.SIGTERM)
    assert cli.wait(timeout=15) == 0


def test_profile_detection(broker):
    embedded = Settings.from_env({}, bootstrap_servers=broker.bootstrap_servers)
    assert resolve_broker_profile(embedded) == BROKER_PROFILE_TANSU
    forced = Settings.from_env({}, bootstrap_servers=broker.bootstrap_servers, broker_profile="kafka")
    assert resolve_broker_profile(forced) == BROKER_PROFILE_KAFKA


def test_unreachable_broker_gives_a_clear_error():
    from streams.kafka.broker import free_port

    settings = Settings.from_env({}, bootstrap_servers=f"127.0.0.1:{free_port()}")
    with pytest.raises(KafkaSetupError, match="KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:.*start a broker"):
        import streams.kafka.clients as kafka

        kafka.ADMIN_TIMEOUT_S, saved = 2.0, kafka.ADMIN_TIMEOUT_S
        try:
            ensure_topics(settings)
        finally:
            kafka.ADMIN_TIMEOUT_S = saved


def test_ensure_topics_refuses_uneven_inputs(broker):
    settings = Settings.from_env(
        {},
        bootstrap_servers=broker.bootstrap_servers,
        topic_page_views="uneven.views",
        topic_cart="uneven.cart",
        topic_orders="uneven.orders",
        topic_scores="uneven.scores",
        topic_dead_letter="uneven.dlq",
        partitions=2,
    )
    ensure_topics(settings)
    with pytest.raises(KafkaSetupError, match="not co-partitioned"):
        from streams.kafka.clients import TopicSpec, required_topics

        specs = required_topics(settings)
        uneven = Settings.from_env(
            {},
            bootstrap_servers=broker.bootstrap_servers,
            topic_page_views="uneven.views",
            topic_cart="uneven.cart2",
            topic_orders="uneven.orders",
            topic_scores="uneven.scores",
            topic_dead_letter="uneven.dlq",
            partitions=3,
        )
        ensure_topics(uneven, [TopicSpec("uneven.cart2", 3, specs[0].config)])
