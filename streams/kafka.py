"""Kafka plumbing shared by the worker and the tools: broker detection and topic creation.

The embedded Tansu broker needs a few client settings that production Kafka does not (see
``docs/embedded-broker.md``); :func:`resolve_broker_profile` tells which one we talk to, so
the worker applies them only there.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streams.broker import EMBEDDED_CLUSTER_ID
from streams.config import BROKER_PROFILE_AUTO, BROKER_PROFILE_KAFKA, BROKER_PROFILE_TANSU, Settings

log = logging.getLogger(__name__)

#: Retention of the input and output topics ShopPulse creates (7 days, in ms). Explicit,
#: because tools that read topic configs fail on brokers that report none.
TOPIC_RETENTION_MS = 7 * 24 * 3600 * 1000
#: Longest wait for a metadata or admin reply, in seconds.
ADMIN_TIMEOUT_S = 15.0


class KafkaSetupError(RuntimeError):
    """The brokers are unreachable or refused a setup step; the message says which and why."""


def admin_client(settings: Settings) -> AdminClient:
    """An AdminClient with the connection and security settings."""
    return AdminClient({**settings.librdkafka_config(), "log_level": 3})


def resolve_broker_profile(settings: Settings, admin: AdminClient | None = None) -> str:
    """``tansu`` or ``kafka``: the configured profile, or detected from the cluster id."""
    if settings.broker_profile != BROKER_PROFILE_AUTO:
        return settings.broker_profile
    cluster_id = cluster_metadata(settings, admin).cluster_id or ""
    return BROKER_PROFILE_TANSU if cluster_id == EMBEDDED_CLUSTER_ID else BROKER_PROFILE_KAFKA


def cluster_metadata(settings: Settings, admin: AdminClient | None = None):  # -> ClusterMetadata
    """Metadata of the cluster, or :class:`KafkaSetupError` saying how to fix the connection."""
    admin = admin or admin_client(settings)
    try:
        return admin.list_topics(timeout=ADMIN_TIMEOUT_S)
    except KafkaException as exc:
        raise KafkaSetupError(
            f"no answer from Kafka at KAFKA_BOOTSTRAP_SERVERS={settings.bootstrap_servers} within "
            f"{ADMIN_TIMEOUT_S:.0f} s ({exc.args[0]}); start a broker (`shoppulse broker` for the embedded one) "
            "or fix the address and security settings") from None


@dataclass(frozen=True)
class TopicSpec:
    """A topic ShopPulse needs: name, partitions and explicit configs."""

    name: str
    partitions: int
    config: dict[str, str]


def required_topics(settings: Settings) -> list[TopicSpec]:
    """Inputs, outputs and dead letters; all with the same partition count (co-partitioning)."""
    retention = {"retention.ms": str(TOPIC_RETENTION_MS), "cleanup.policy": "delete"}
    names = settings.input_topics + settings.output_topics
    return [TopicSpec(name, settings.partitions, dict(retention)) for name in names]


def ensure_topics(settings: Settings, topics: list[TopicSpec] | None = None) -> None:
    """Create missing topics; refuse to run if an input topic's partition count differs.

    Co-partitioning is what keeps one shopper's events and state in one worker: the three
    input topics must have the same number of partitions.
    """
    topics = topics if topics is not None else required_topics(settings)
    admin = admin_client(settings)
    existing = cluster_metadata(settings, admin).topics
    missing = [t for t in topics if t.name not in existing]
    if missing and settings.create_topics:
        futures = admin.create_topics([NewTopic(t.name, num_partitions=t.partitions,
                                                replication_factor=settings.replication_factor, config=t.config)
                                       for t in missing], operation_timeout=ADMIN_TIMEOUT_S)
        for name, future in futures.items():
            try:
                future.result()
                log.info("created topic %s (%d partitions)", name, settings.partitions)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise KafkaSetupError(f"could not create topic {name}: {exc}; create it by hand with "
                                          f"{settings.partitions} partitions or check ACLs") from None
    elif missing:
        raise KafkaSetupError(f"topics {[t.name for t in missing]} do not exist and SHOPPULSE_CREATE_TOPICS is off; "
                              f"create them with {settings.partitions} partitions each")
    counts = {name: len(meta.partitions) for name, meta in cluster_metadata(settings, admin).topics.items()}
    inputs = {name: counts.get(name) for name in settings.input_topics}
    if len(set(inputs.values())) != 1:
        raise KafkaSetupError(f"input topics are not co-partitioned: partition counts {inputs}; give all three "
                              "the same count, or a shopper's events will be split across workers")


def tansu_client_overrides() -> dict[str, object]:
    """Faust settings the embedded Tansu broker needs (measured; see docs/embedded-broker.md).

    * ``producer_max_batch_size=1``: Tansu answers ListOffsets(LATEST) with the last record
      batch's base offset + 1, so Faust restores a changelog only up to there; one record per
      batch makes that the true end, and table recovery exact.
    * Short session/heartbeat/rebalance timeouts: group joins wait about half the session
      timeout on Tansu, so the Faust defaults made a worker wait 30 s before processing.
    * ``recovery_consistency_check=False``: Tansu keeps everything in memory, so a broker
      restart empties every changelog while the worker's RocksDB still holds its state. Faust's
      check then stopped the worker with ``ConsistencyError`` (local offset above the empty
      changelog's end), and every restart again: a crash loop. Without it the worker keeps its
      local state and goes on scoring (tests/integration/test_reliability.py).
    """
    return {"producer_max_batch_size": 1, "broker_session_timeout": 6.0,
            "broker_heartbeat_interval": 1.5, "broker_rebalance_timeout": 10.0,
            "recovery_consistency_check": False}

