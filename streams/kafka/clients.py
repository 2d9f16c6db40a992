"""Kafka plumbing shared by the worker and the tools: client settings, broker detection, topics.

Every Kafka client ShopPulse creates takes its settings from one of the builders here, so each
gets the connection, SASL/TLS settings and the message size and buffer limits of
:class:`~streams.config.Settings`: :func:`confluent_admin_config`,
:func:`confluent_producer_config`, :func:`confluent_consumer_config` (confluent-kafka) and
:func:`faust_client_settings` (keyword arguments for ``faust.App``).

The embedded Tansu broker needs a few client settings that production Kafka does not (see
``docs/embedded-broker.md``); :func:`resolve_broker_profile` tells which one we talk to, so
the worker applies them only there.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streams.config import BROKER_PROFILE_AUTO, BROKER_PROFILE_KAFKA, BROKER_PROFILE_TANSU, ConfigError, Settings
from streams.kafka.broker import EMBEDDED_CLUSTER_ID

log = logging.getLogger(__name__)

#: The only partitioner that matches the worker's (aiokafka, murmur2) partition assignment: every
#: producer of the input topics and of the changelogs uses it.
PARTITIONER = "murmur2_random"
#: Retention of the input and output topics ShopPulse creates (7 days, in ms). Explicit,
#: because tools that read topic configs fail on brokers that report none.
TOPIC_RETENTION_MS = 7 * 24 * 3600 * 1000
#: Longest wait for a metadata or admin reply, in seconds.
ADMIN_TIMEOUT_S = 15.0
#: Metadata is asked for in slices this long, in s, so a refused login stops the wait at once.
_METADATA_SLICE_S = 0.5
#: librdkafka errors that mean the brokers answered but refused our SASL login or TLS handshake.
_SECURITY_ERRORS = (KafkaError._AUTHENTICATION, KafkaError._SSL)


class KafkaSetupError(RuntimeError):
    """The brokers are unreachable or refused a setup step; the message says which and why."""


# --------------------------------------------------------------------------- client settings


def confluent_admin_config(settings: Settings) -> dict[str, Any]:
    """confluent-kafka AdminClient settings: connection and security; librdkafka logs errors only."""
    return {**settings.librdkafka_config(), "log_level": 3}


def confluent_producer_config(settings: Settings) -> dict[str, Any]:
    """confluent-kafka Producer settings: connection, security, message size and a bounded buffer.

    ``Producer.produce`` raises ``BufferError`` once the buffer holds ``SHOPPULSE_KAFKA_PRODUCER_BUFFER_*``;
    :func:`streams.kafka.producer.produce` then polls for deliveries and retries, so a flood of input
    waits instead of filling memory.
    """
    return {
        **settings.librdkafka_config(),
        "message.max.bytes": settings.kafka_max_message_bytes,
        "queue.buffering.max.kbytes": settings.kafka_producer_buffer_kbytes,
        "queue.buffering.max.messages": settings.kafka_producer_buffer_messages,
    }


def confluent_consumer_config(settings: Settings, group: str) -> dict[str, Any]:
    """confluent-kafka Consumer settings for consumer group ``group``: connection, security, fetch sizes."""
    return {
        **settings.librdkafka_config(),
        "group.id": group,
        "message.max.bytes": settings.kafka_max_message_bytes,
        "fetch.max.bytes": settings.kafka_fetch_max_bytes,
        "max.partition.fetch.bytes": settings.kafka_max_partition_fetch_bytes,
    }


def _raise(error: KafkaError) -> None:
    raise KafkaException(error)


def consume_data(
    consumer: Consumer,
    max_messages: int,
    timeout_s: float,
    on_error: Callable[[KafkaError], None] = _raise,
    on_end: Callable[[Message], None] | None = None,
) -> Iterator[Message]:
    """The data messages of one ``consumer.consume`` call, in order.

    With ``enable.partition.eof`` librdkafka hands out "partition EOF" events as messages that
    carry an error: they only say a partition is caught up, so they go to ``on_end`` (when given)
    and are dropped. Any other error goes to ``on_error`` (default: raise ``KafkaException``).
    A generator, so ``on_end`` runs after the caller has handled the messages before the EOF
    (an EOF comes once per catching up: its order against data must be kept).
    """
    for message in consumer.consume(max_messages, timeout=timeout_s):
        error = message.error()
        if error is None:
            yield message
        elif error.code() == KafkaError._PARTITION_EOF:
            if on_end is not None:
                on_end(message)
        else:
            on_error(error)


def faust_ssl_context(settings: Settings) -> ssl.SSLContext:
    """TLS context from ``KAFKA_SSL_*``: verifies the brokers against the CA file (or the system CAs)."""
    try:
        context = ssl.create_default_context(cafile=settings.ssl_cafile or None)
        if settings.ssl_certfile:
            context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS files KAFKA_SSL_CAFILE={settings.ssl_cafile!r}, KAFKA_SSL_CERTFILE="
            f"{settings.ssl_certfile!r}, KAFKA_SSL_KEYFILE={settings.ssl_keyfile!r} ({exc}); "
            "point them at readable PEM files"
        ) from None
    return context


def faust_credentials(settings: Settings) -> Any:
    """Faust/aiokafka credentials for the configured security protocol, or None for PLAINTEXT."""
    import faust  # local import: the CLI tools need no Faust

    context = faust_ssl_context(settings) if settings.security_protocol.endswith("SSL") else None
    if settings.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            mechanism=settings.sasl_mechanism,
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def faust_client_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``faust.App``: credentials, message size limit, fetch limits, commits.

    Faust's aiokafka producer refuses messages over ``producer_max_request_size``; its consumer
    fetches at most ``consumer_max_fetch_size`` per partition and Faust buffers at most
    ``stream_buffer_maxsize`` (4096) events per agent, which bounds the worker's input memory.
    Acknowledged input offsets are committed every ``broker_commit_interval`` seconds and after
    ``broker_commit_every`` acks (:mod:`streams.worker.faust_seam` keeps the latter in its drain loop).
    """
    return {
        "broker_credentials": faust_credentials(settings),
        "producer_max_request_size": settings.kafka_max_message_bytes,
        "consumer_max_fetch_size": settings.kafka_max_partition_fetch_bytes,
        "broker_max_poll_records": settings.kafka_max_poll_records or None,
        "broker_commit_interval": settings.commit_interval_s,
        "broker_commit_every": settings.commit_every,
    }


# --------------------------------------------------------------------------- the cluster


class ReportingAdminClient(AdminClient):
    """An AdminClient that keeps the SASL and TLS errors librdkafka reported, in ``security_errors``."""

    def __init__(self, config: dict[str, Any]) -> None:
        errors: list[KafkaError] = []

        def keep_security_errors(error: KafkaError) -> None:  # no reference to the client: no cycle, freed at once
            if error.code() in _SECURITY_ERRORS:
                errors.append(error)

        self.security_errors = errors
        # The stub types the config's values as str/int/float/bool only; librdkafka also takes callbacks.
        full_config: dict[str, Any] = {**config, "error_cb": keep_security_errors}
        super().__init__(full_config)


def admin_client(settings: Settings) -> ReportingAdminClient:
    """An AdminClient with the connection and security settings."""
    try:
        return ReportingAdminClient(confluent_admin_config(settings))
    except KafkaException as exc:
        raise KafkaSetupError(
            f"cannot create a Kafka client ({exc.args[0].str()}); check the KAFKA_SSL_* and KAFKA_SASL_* settings"
        ) from None


def resolve_broker_profile(settings: Settings, admin: ReportingAdminClient | None = None) -> str:
    """``tansu`` or ``kafka``: the configured profile, or detected from the cluster id."""
    if settings.broker_profile != BROKER_PROFILE_AUTO:
        return settings.broker_profile
    cluster_id = cluster_metadata(settings, admin).cluster_id or ""
    return BROKER_PROFILE_TANSU if cluster_id == EMBEDDED_CLUSTER_ID else BROKER_PROFILE_KAFKA


def _security_failure(settings: Settings, error: KafkaError) -> KafkaSetupError:
    where = f"Kafka at KAFKA_BOOTSTRAP_SERVERS={settings.bootstrap_servers}"
    if settings.security_protocol.startswith("SASL") and error.code() == KafkaError._AUTHENTICATION:
        return KafkaSetupError(
            f"{where} refused the SASL login of KAFKA_SASL_USERNAME={settings.sasl_username!r} with "
            f"KAFKA_SASL_MECHANISM={settings.sasl_mechanism} ({error.str()}); check KAFKA_SASL_USERNAME and "
            "KAFKA_SASL_PASSWORD, and that the brokers offer that KAFKA_SASL_MECHANISM"
        )
    return KafkaSetupError(
        f"{where}: TLS or authentication failed with KAFKA_SECURITY_PROTOCOL={settings.security_protocol} "
        f"({error.str()}); check that the brokers listen with that protocol, and KAFKA_SSL_CAFILE, "
        "KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE"
    )


def cluster_metadata(settings: Settings, admin: ReportingAdminClient | None = None):  # -> ClusterMetadata
    """Metadata of the cluster, or :class:`KafkaSetupError` saying how to fix the connection.

    Waits up to :data:`ADMIN_TIMEOUT_S`, but stops as soon as the brokers refuse the SASL
    login or the TLS handshake: a wrong password fails in well under a second, not after the timeout.
    """
    admin = admin or admin_client(settings)
    deadline = time.monotonic() + ADMIN_TIMEOUT_S
    while True:
        try:
            return admin.list_topics(timeout=min(_METADATA_SLICE_S, max(0.0, deadline - time.monotonic())))
        except KafkaException as exc:
            last_error = exc.args[0]
        admin.poll(0)  # serves error_cb
        if admin.security_errors:
            raise _security_failure(settings, admin.security_errors[-1])
        if time.monotonic() >= deadline:
            raise KafkaSetupError(
                f"no answer from Kafka at KAFKA_BOOTSTRAP_SERVERS={settings.bootstrap_servers} within "
                f"{ADMIN_TIMEOUT_S:.0f} s ({last_error}); start a broker (`shoppulse broker` for the embedded one) "
                "or fix the address and the security settings (KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_*, KAFKA_SSL_*: "
                "the brokers may require a SASL login, TLS or a client certificate)"
            )


@dataclass(frozen=True)
class TopicSpec:
    """A topic ShopPulse needs: name, partitions and explicit configs."""

    name: str
    partitions: int
    config: dict[str, str]


def required_topics(settings: Settings) -> list[TopicSpec]:
    """Inputs, erasure requests, outputs, dead letters and erasure confirmations; all with the same
    partition count (co-partitioning: an erasure request reaches the worker that owns its shopper)."""
    retention = {"retention.ms": str(TOPIC_RETENTION_MS), "cleanup.policy": "delete"}
    names = settings.consumed_topics + settings.output_topics
    return [TopicSpec(name, settings.partitions, dict(retention)) for name in names]


def ensure_topics(settings: Settings, topics: list[TopicSpec] | None = None) -> None:
    """Create missing topics; refuse to run if an input topic's partition count differs.

    Co-partitioning is what keeps one shopper's events and state in one worker: the three
    input topics and the erasure requests must have the same number of partitions.
    """
    topics = topics if topics is not None else required_topics(settings)
    admin = admin_client(settings)
    existing = cluster_metadata(settings, admin).topics
    missing = [t for t in topics if t.name not in existing]
    if missing and settings.create_topics:
        futures = admin.create_topics(
            [
                NewTopic(
                    t.name, num_partitions=t.partitions, replication_factor=settings.replication_factor, config=t.config
                )
                for t in missing
            ],
            operation_timeout=ADMIN_TIMEOUT_S,
        )
        for name, future in futures.items():
            try:
                future.result()
                log.info("created topic %s (%d partitions)", name, settings.partitions)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise KafkaSetupError(
                        f"could not create topic {name}: {exc}; create it by hand with "
                        f"{settings.partitions} partitions or check ACLs"
                    ) from None
    elif missing:
        raise KafkaSetupError(
            f"topics {[t.name for t in missing]} do not exist and SHOPPULSE_CREATE_TOPICS is off; "
            f"create them with {settings.partitions} partitions each"
        )
    counts = {name: len(meta.partitions) for name, meta in cluster_metadata(settings, admin).topics.items()}
    inputs = {name: counts.get(name) for name in settings.consumed_topics}
    if len(set(inputs.values())) != 1:
        raise KafkaSetupError(
            f"input topics are not co-partitioned: partition counts {inputs}; give all of them "
            "the same count, or a shopper's events and erasure requests will be split across workers"
        )


#: Longest time Tansu may hold a fetch for which no data is ready, in ms. Tansu does not answer a
#: waiting fetch when data arrives, only when the wait ends (measured: a consumer with librdkafka's
#: 500 ms default saw ~115 ms per message at 7 messages/s), so every wait is added latency. Shorter
#: waits cost the broker CPU while consumers idle (an idle consumer: 8% of a core at 10 ms, 1% at 500 ms).
TANSU_FETCH_MAX_WAIT_MS = 50


def tansu_client_overrides() -> dict[str, object]:
    """Faust settings the embedded Tansu broker needs (measured; see docs/embedded-broker.md).

    * ``producer_max_batch_size=1``: Faust's own producer (the worker's tables and outputs go
      through :mod:`streams.worker.table_writer` and :mod:`streams.kafka.batch_producer` instead) sends one
      record per record batch, so anything it writes to a changelog keeps Tansu's reported end
      of the partition true (Tansu answers ListOffsets(LATEST) with the last batch's base + 1).
    * Short session/heartbeat/rebalance timeouts: group joins wait about half the session
      timeout on Tansu, so the Faust defaults made a worker wait 30 s before processing.
    * ``recovery_consistency_check=False``: Tansu keeps everything in memory, so a broker
      restart empties every changelog while the worker's RocksDB still holds its state. Faust's
      check then stopped the worker with ``ConsistencyError`` (local offset above the empty
      changelog's end), and every restart again: a crash loop. Without it the worker keeps its
      local state and goes on scoring (tests/integration/test_reliability.py).
    """
    return {
        "producer_max_batch_size": 1,
        "broker_session_timeout": 6.0,
        "broker_heartbeat_interval": 1.5,
        "broker_rebalance_timeout": 10.0,
        "recovery_consistency_check": False,
    }


def topic_reader(settings: Settings, purpose: str) -> Consumer:
    """A consumer that is assigned partitions (no group join, nothing committed) and says when each
    ends: for tools that read topics whole (``purpose`` names its throwaway group id)."""
    return Consumer(
        {
            **confluent_consumer_config(settings, f"shoppulse-{purpose}-{os.getpid()}"),
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "log_level": 3,
        }
    )


def read_to_end(consumer: Consumer, starts: list[TopicPartition]) -> Iterator[Message]:
    """Every message from each start position to the end of its partition (the end as of the read).

    Ends are found with partition EOF events, not ListOffsets: the embedded broker answers
    ListOffsets(LATEST) wrongly (docs/embedded-broker.md).
    """
    pending = {(tp.topic, tp.partition) for tp in starts}
    if not pending:
        return
    consumer.assign(starts)
    while pending:
        yield from consume_data(consumer, 1000, 0.5, on_end=lambda eof: pending.discard((eof.topic(), eof.partition())))


def topic_partitions(settings: Settings, topic: str) -> list[int]:
    """The partition numbers of ``topic``; none when it does not exist."""
    topics = cluster_metadata(settings).topics
    if topic not in topics:
        return []
    return sorted(topics[topic].partitions)
