"""ShopPulse settings: one object, read from environment variables with documented defaults.

Every setting is listed in :data:`SETTINGS_DOC` (the README's configuration table is made
from it, and a test keeps the two in step). Kafka connection settings use the usual names
(``KAFKA_BOOTSTRAP_SERVERS``, ``KAFKA_SECURITY_PROTOCOL``, ``KAFKA_SASL_*``, ``KAFKA_SSL_*``)
so the same worker runs against the embedded broker and a production Apache Kafka cluster.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from models.outcomes import EvalConfig
from streams.logs import LOG_FORMATS

BROKER_PROFILE_AUTO = "auto"
BROKER_PROFILE_KAFKA = "kafka"
BROKER_PROFILE_TANSU = "tansu"
BROKER_PROFILES = (BROKER_PROFILE_AUTO, BROKER_PROFILE_KAFKA, BROKER_PROFILE_TANSU)
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class ConfigError(ValueError):
    """A setting has a value the worker cannot use; the message names the variable."""


# name -> (env var, default, meaning)
SETTINGS_DOC: dict[str, tuple[str, str, str]] = {
    "bootstrap_servers": ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092", "Kafka brokers, host:port[,host:port]"),
    "security_protocol": ("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"),
    "sasl_mechanism": ("KAFKA_SASL_MECHANISM", "", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with SASL_*)"),
    "sasl_username": ("KAFKA_SASL_USERNAME", "", "SASL user name"),
    "sasl_password": ("KAFKA_SASL_PASSWORD", "", "SASL password (never logged)"),
    "ssl_cafile": ("KAFKA_SSL_CAFILE", "", "CA bundle (PEM) to verify the brokers"),
    "ssl_certfile": ("KAFKA_SSL_CERTFILE", "", "client certificate (PEM) for mutual TLS"),
    "ssl_keyfile": ("KAFKA_SSL_KEYFILE", "", "client private key (PEM) for mutual TLS"),
    "kafka_max_message_bytes": (
        "SHOPPULSE_KAFKA_MAX_MESSAGE_BYTES",
        "1048576",
        "largest message a producer sends, in bytes (librdkafka message.max.bytes, aiokafka max_request_size)",
    ),
    "kafka_fetch_max_bytes": (
        "SHOPPULSE_KAFKA_FETCH_MAX_BYTES",
        "52428800",
        "most bytes one fetch of a confluent-kafka consumer returns (fetch.max.bytes)",
    ),
    "kafka_max_partition_fetch_bytes": (
        "SHOPPULSE_KAFKA_MAX_PARTITION_FETCH_BYTES",
        "1048576",
        "most bytes a consumer fetches per partition (max.partition.fetch.bytes; the worker's consumer_max_fetch_size)",
    ),
    "kafka_max_poll_records": (
        "SHOPPULSE_KAFKA_MAX_POLL_RECORDS",
        "0",
        "most records the worker's consumer returns per poll (0 = no cap; the fetch sizes bound memory)",
    ),
    "kafka_producer_buffer_kbytes": (
        "SHOPPULSE_KAFKA_PRODUCER_BUFFER_KBYTES",
        "65536",
        "KiB a confluent-kafka producer buffers before send waits (queue.buffering.max.kbytes)",
    ),
    "kafka_producer_buffer_messages": (
        "SHOPPULSE_KAFKA_PRODUCER_BUFFER_MESSAGES",
        "100000",
        "messages a confluent-kafka producer buffers before send waits (queue.buffering.max.messages)",
    ),
    "broker_profile": (
        "SHOPPULSE_BROKER_PROFILE",
        "auto",
        "auto (detect the embedded Tansu broker by cluster id), kafka or tansu",
    ),
    "app_id": ("SHOPPULSE_APP_ID", "shoppulse", "Faust app id: consumer group and changelog topic prefix"),
    "topic_page_views": ("SHOPPULSE_TOPIC_PAGE_VIEWS", "shop.page_views", "input topic of page views"),
    "topic_cart": ("SHOPPULSE_TOPIC_CART", "shop.cart", "input topic of cart changes"),
    "topic_orders": ("SHOPPULSE_TOPIC_ORDERS", "shop.orders", "input topic of orders"),
    "topic_scores": ("SHOPPULSE_TOPIC_SCORES", "shoppulse.scores", "output topic of per-shopper scores"),
    "topic_recommendations": (
        "SHOPPULSE_TOPIC_RECOMMENDATIONS",
        "shoppulse.recommendations",
        "output topic of top-K next items",
    ),
    "topic_churn_alerts": (
        "SHOPPULSE_TOPIC_CHURN_ALERTS",
        "shoppulse.churn_alerts",
        "output topic of churn alerts (marketing triggers)",
    ),
    "topic_dead_letter": (
        "SHOPPULSE_TOPIC_DEAD_LETTER",
        "shoppulse.dead_letter",
        "invalid input, original bytes plus reason headers",
    ),
    "topic_erasure_requests": (
        "SHOPPULSE_TOPIC_ERASURE_REQUESTS",
        "shoppulse.erasure_requests",
        "input topic of erasure requests (`shoppulse forget`), keyed by user_id, co-partitioned with the inputs",
    ),
    "topic_erasures": (
        "SHOPPULSE_TOPIC_ERASURES",
        "shoppulse.erasures",
        "output topic of erasure confirmations: who, when, what was deleted (docs/privacy.md)",
    ),
    "partitions": ("SHOPPULSE_PARTITIONS", "4", "partitions of every topic ShopPulse creates (inputs must match)"),
    "replication_factor": ("SHOPPULSE_REPLICATION_FACTOR", "1", "replication factor of topics ShopPulse creates"),
    "create_topics": ("SHOPPULSE_CREATE_TOPICS", "true", "create missing topics at start-up"),
    "data_dir": ("SHOPPULSE_DATA_DIR", "./var/worker", "where the worker keeps its RocksDB tables"),
    "standby_replicas": (
        "SHOPPULSE_STANDBY_REPLICAS",
        "0",
        "warm copies of each table partition on other workers (Faust table_standby_replicas): each makes every worker "
        "also apply the others' changelog; 0 = a worker that takes over a partition restores it from the changelog",
    ),
    "bulk_restore_min_records": (
        "SHOPPULSE_BULK_RESTORE_MIN_RECORDS",
        "1000",
        "a table partition with at least this many changelog records to restore (lost data dir, scale-out) is "
        "restored in bulk (a fast consumer, RocksDB write batches) before Faust's per-record recovery; 0 = never",
    ),
    "commit_interval_s": (
        "SHOPPULSE_COMMIT_INTERVAL_S",
        "2.8",
        "seconds between commits of acknowledged input offsets (Faust broker_commit_interval); a crash "
        "replays at most about this much",
    ),
    "commit_every": (
        "SHOPPULSE_COMMIT_EVERY",
        "10000",
        "also commit once this many input offsets were acknowledged since the last commit (Faust broker_commit_every)",
    ),
    "max_batch": ("SHOPPULSE_MAX_BATCH", "1000", "micro-batch: most events handled in one step"),
    "max_wait_ms": ("SHOPPULSE_MAX_WAIT_MS", "50", "micro-batch: longest wait, in ms, for a batch to fill"),
    "grace_ms": (
        "SHOPPULSE_GRACE_MS",
        "3600000",
        "out-of-order tolerance per shopper, in ms; older events count as late",
    ),
    "history_len": ("SHOPPULSE_HISTORY_LEN", "50", "item interactions kept per shopper (the next-item model's input)"),
    "retention_ms": ("SHOPPULSE_RETENTION_MS", "7776000000", "a shopper idle this long (ms, default 90 d) is evicted"),
    "eviction_interval_s": ("SHOPPULSE_EVICTION_INTERVAL_S", "300", "seconds between sweeps that evict idle shoppers"),
    "silent_after_ms": (
        "SHOPPULSE_SILENT_AFTER_MS",
        "86400000",
        "re-score shoppers idle this long (ms, default 1 d) without a new event",
    ),
    "silent_sweep_interval_s": (
        "SHOPPULSE_SILENT_SWEEP_INTERVAL_S",
        "3600",
        "seconds between silent-shopper re-scoring sweeps",
    ),
    "max_event_bytes": ("SHOPPULSE_MAX_EVENT_BYTES", "65536", "larger input messages are dead-lettered as oversized"),
    "max_future_skew_ms": (
        "SHOPPULSE_MAX_FUTURE_SKEW_MS",
        "300000",
        "events stamped further ahead of the worker clock are dead-lettered",
    ),
    "archive_dir": (
        "SHOPPULSE_ARCHIVE_DIR",
        "./var/archive",
        "where `shoppulse archive` writes the input events as date-partitioned Parquet (and training reads them)",
    ),
    "archive_retention_days": (
        "SHOPPULSE_ARCHIVE_RETENTION_DAYS",
        "90",
        "the archive deletes arrival dates older than this many days (0 = keep everything)",
    ),
    "archive_flush_events": (
        "SHOPPULSE_ARCHIVE_FLUSH_EVENTS",
        "50000",
        "the archive writes a partition's Parquet part after this many messages (bounds its memory)",
    ),
    "archive_flush_interval_s": (
        "SHOPPULSE_ARCHIVE_FLUSH_INTERVAL_S",
        "60",
        "... or after this many seconds, whichever comes first (the most an archive part lags the topic)",
    ),
    "models_dir": ("SHOPPULSE_MODELS_DIR", "artifacts/models", "model registry folder (`shoppulse train` writes it)"),
    "device": ("SHOPPULSE_DEVICE", "auto", "auto (CUDA when present), cpu or cuda"),
    "torch_threads": (
        "SHOPPULSE_TORCH_THREADS",
        "1",
        "torch CPU threads for inference (0 = torch's default: one per core)",
    ),
    "top_k": ("SHOPPULSE_TOP_K", "10", "recommended items per shopper"),
    "churn_alert_high": ("SHOPPULSE_CHURN_ALERT_HIGH", "0.7", "churn risk at or above this fires an alert"),
    "churn_alert_low": ("SHOPPULSE_CHURN_ALERT_LOW", "0.5", "churn risk below this re-arms a shopper's alert"),
    "churn_alert_cooldown_ms": (
        "SHOPPULSE_CHURN_ALERT_COOLDOWN_MS",
        "604800000",
        "at most one alert per shopper in this long (ms, default 7 d)",
    ),
    "drift_window_s": (
        "SHOPPULSE_DRIFT_WINDOW_S",
        "3600",
        "feature drift (PSI) is measured over the rows scored in the last this many seconds (12 buckets)",
    ),
    "drift_min_rows": (
        "SHOPPULSE_DRIFT_MIN_ROWS",
        "1000",
        "no PSI is exported while the drift window holds fewer scored rows than this",
    ),
    "alert_holdout_share": (
        "SHOPPULSE_ALERT_HOLDOUT_SHARE",
        "0",
        "share (0..1) of shoppers whose churn alerts are computed and recorded but not sent: the holdout "
        "that measures campaign uplift (docs/outputs.md)",
    ),
    "alert_holdout_salt": (
        "SHOPPULSE_ALERT_HOLDOUT_SALT",
        "shoppulse-alert-holdout",
        "salt of the holdout's user-id hash: a new salt draws a new holdout group",
    ),
    "live_purchase_horizon_ms": (
        "SHOPPULSE_LIVE_PURCHASE_HORIZON_MS",
        "86400000",
        "live evaluation: a purchase score resolves positive on an order within this long (ms, default 24 h)",
    ),
    "live_churn_horizon_ms": (
        "SHOPPULSE_LIVE_CHURN_HORIZON_MS",
        "1209600000",
        "live evaluation: a churn score (and an alert's return) resolves on an event within this long "
        "(ms, default 14 d)",
    ),
    "live_max_pending": (
        "SHOPPULSE_LIVE_MAX_PENDING",
        "32",
        "live evaluation: pending scores kept per shopper; beyond it the oldest is dropped and counted",
    ),
    "pseudonym_key": (
        "SHOPPULSE_PSEUDONYM_KEY",
        "",
        "when set, outputs carry HMAC-SHA256(key, user_id) instead of user ids (never logged)",
    ),
    "metrics_host": (
        "SHOPPULSE_METRICS_HOST",
        "127.0.0.1",
        "address of the /metrics, /healthz, /readyz and /console server",
    ),
    "metrics_port": ("SHOPPULSE_METRICS_PORT", "9108", "port of that server (0 = pick a free one)"),
    "advertised_url": (
        "SHOPPULSE_ADVERTISED_URL",
        "",
        "URL other workers forward shopper lookups to (http://host:port of that server); empty = "
        "http://SHOPPULSE_METRICS_HOST:port, or the host's FQDN when that host is 0.0.0.0; unique per worker",
    ),
    "lookup_keep_shoppers": (
        "SHOPPULSE_LOOKUP_KEEP_SHOPPERS",
        "50000",
        "shoppers whose last published scores and recommendations the shopper lookup keeps in memory "
        "(about 1.3 KB each at SHOPPULSE_TOP_K=10; the HTTP server process holds their stored values too, "
        "4-5 KB each in all; 0 = keep none, compute every answer)",
    ),
    "http_process": (
        "SHOPPULSE_HTTP_PROCESS",
        "true",
        "serve that server's HTTP from a child process, which asks the worker for each answer over a socket pair "
        "(false: threads of the worker serve it, and each request waits for the worker's GIL at every socket call)",
    ),
    "gil_switch_interval_ms": (
        "SHOPPULSE_GIL_SWITCH_INTERVAL_MS",
        "1.0",
        "how long a worker thread waiting for Python's GIL waits before the running one must hand it over "
        "(sys.setswitchinterval; Python's default is 5 ms): each request to the worker's HTTP server (a shopper "
        "lookup, a scrape) waits for it once, or a few times without SHOPPULSE_HTTP_PROCESS; nothing else in the "
        "worker asks for it",
    ),
    "gc_full_collection_every": (
        "SHOPPULSE_GC_FULL_COLLECTION_EVERY",
        "100",
        "middle-generation passes of Python's cyclic garbage collector between two full passes "
        "(gc.set_threshold's third value; Python's default is 10, which rescans the whole heap a few times a "
        "second at saturation)",
    ),
    "log_level": ("SHOPPULSE_LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR"),
    "log_format": (
        "SHOPPULSE_LOG_FORMAT",
        "text",
        "text (for people) or json (one object per line: time, level, logger, message, exception)",
    ),
}


def settings_markdown() -> str:
    """The README's configuration table (``python -m streams.config`` prints it)."""
    rows = [f"| `{var}` | `{default}` | {meaning} |" for var, default, meaning in SETTINGS_DOC.values()]
    return "\n".join(["| variable | default | meaning |", "|---|---|---|", *rows])


def _as_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={text!r} is not a boolean; use true or false")


def _as_float(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number") from None


def _as_int(name: str, text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a whole number") from None
    if value < minimum:
        raise ConfigError(f"{name}={value} is below the minimum {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    """All ShopPulse settings; build with :meth:`from_env`. Times carry their unit in the name."""

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    kafka_max_message_bytes: int = 1_048_576
    kafka_fetch_max_bytes: int = 52_428_800
    kafka_max_partition_fetch_bytes: int = 1_048_576
    kafka_max_poll_records: int = 0
    kafka_producer_buffer_kbytes: int = 65_536
    kafka_producer_buffer_messages: int = 100_000
    broker_profile: str = BROKER_PROFILE_AUTO
    app_id: str = "shoppulse"
    topic_page_views: str = "shop.page_views"
    topic_cart: str = "shop.cart"
    topic_orders: str = "shop.orders"
    topic_scores: str = "shoppulse.scores"
    topic_recommendations: str = "shoppulse.recommendations"
    topic_churn_alerts: str = "shoppulse.churn_alerts"
    topic_dead_letter: str = "shoppulse.dead_letter"
    topic_erasure_requests: str = "shoppulse.erasure_requests"
    topic_erasures: str = "shoppulse.erasures"
    partitions: int = 4
    replication_factor: int = 1
    create_topics: bool = True
    data_dir: Path = Path("./var/worker")
    standby_replicas: int = 0
    bulk_restore_min_records: int = 1000
    commit_interval_s: float = 2.8
    commit_every: int = 10_000
    max_batch: int = 1000
    max_wait_ms: int = 50
    grace_ms: int = 3_600_000
    history_len: int = 50
    retention_ms: int = 7_776_000_000
    eviction_interval_s: int = 300
    silent_after_ms: int = 86_400_000
    silent_sweep_interval_s: int = 3600
    max_event_bytes: int = 65536
    max_future_skew_ms: int = 300_000
    archive_dir: Path = Path("./var/archive")
    archive_retention_days: int = 90
    archive_flush_events: int = 50_000
    archive_flush_interval_s: float = 60.0
    models_dir: Path = Path("artifacts/models")
    device: str = "auto"
    torch_threads: int = 1
    top_k: int = 10
    churn_alert_high: float = 0.7
    churn_alert_low: float = 0.5
    churn_alert_cooldown_ms: int = 604_800_000
    drift_window_s: int = 3600
    drift_min_rows: int = 1000
    alert_holdout_share: float = 0.0
    alert_holdout_salt: str = "shoppulse-alert-holdout"
    live_purchase_horizon_ms: int = 86_400_000
    live_churn_horizon_ms: int = 1_209_600_000
    live_max_pending: int = 32
    pseudonym_key: str = field(default="", repr=False)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9108
    advertised_url: str = ""
    lookup_keep_shoppers: int = 50_000
    http_process: bool = True
    gil_switch_interval_ms: float = 1.0
    gc_full_collection_every: int = 100
    log_level: str = "INFO"
    log_format: str = "text"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every setting from ``environ`` (default ``os.environ``); ``overrides`` win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            var, default, _ = SETTINGS_DOC[f.name]
            text = env.get(var, default)
            if f.type in ("int", int):
                values[f.name] = _as_int(var, text, 0)
            elif f.type in ("float", float):
                values[f.name] = _as_float(var, text)
            elif f.type in ("bool", bool):
                values[f.name] = _as_bool(var, text)
            elif f.type in ("Path", Path):
                values[f.name] = Path(text)
            else:
                values[f.name] = text.strip()
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def live_eval_config(self) -> EvalConfig:
        """The live evaluation's horizons, grace period and cap (:mod:`models.outcomes`)."""
        return EvalConfig(
            purchase_horizon_ms=self.live_purchase_horizon_ms,
            churn_horizon_ms=self.live_churn_horizon_ms,
            grace_ms=self.grace_ms,
            max_pending=self.live_max_pending,
        )

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the variable of the first unusable value."""
        if self.broker_profile not in BROKER_PROFILES:
            raise ConfigError(
                f"SHOPPULSE_BROKER_PROFILE={self.broker_profile!r}; use one of {', '.join(BROKER_PROFILES)}"
            )
        if not 0.0 <= self.alert_holdout_share <= 1.0:
            raise ConfigError(f"SHOPPULSE_ALERT_HOLDOUT_SHARE={self.alert_holdout_share}; use a share in [0, 1]")
        if min(self.live_purchase_horizon_ms, self.live_churn_horizon_ms, self.live_max_pending) < 1:
            raise ConfigError(
                "SHOPPULSE_LIVE_PURCHASE_HORIZON_MS, SHOPPULSE_LIVE_CHURN_HORIZON_MS and "
                "SHOPPULSE_LIVE_MAX_PENDING must be at least 1"
            )
        if self.security_protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            raise ConfigError(
                f"KAFKA_SECURITY_PROTOCOL={self.security_protocol!r}; use PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
            )
        if self.security_protocol.startswith("SASL") and not (self.sasl_mechanism and self.sasl_username):
            raise ConfigError(
                "KAFKA_SECURITY_PROTOCOL uses SASL but KAFKA_SASL_MECHANISM or KAFKA_SASL_USERNAME is empty; set both"
            )
        if self.security_protocol.startswith("SASL") and self.sasl_mechanism not in SASL_MECHANISMS:
            raise ConfigError(f"KAFKA_SASL_MECHANISM={self.sasl_mechanism!r}; use {', '.join(SASL_MECHANISMS)}")
        if not self.security_protocol.startswith("SASL") and (self.sasl_username or self.sasl_password):
            raise ConfigError(
                f"KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD are set but KAFKA_SECURITY_PROTOCOL="
                f"{self.security_protocol} does not use them; set SASL_SSL or SASL_PLAINTEXT, "
                "or unset the credentials"
            )
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ConfigError("KAFKA_SSL_KEYFILE is set without KAFKA_SSL_CERTFILE; mutual TLS needs both")
        self._validate_kafka_limits()
        if self.partitions < 1:
            raise ConfigError("SHOPPULSE_PARTITIONS must be at least 1")
        if self.max_batch < 1:
            raise ConfigError("SHOPPULSE_MAX_BATCH must be at least 1")
        if self.archive_flush_events < 1 or self.archive_flush_interval_s <= 0:
            raise ConfigError(
                "SHOPPULSE_ARCHIVE_FLUSH_EVENTS must be at least 1 and SHOPPULSE_ARCHIVE_FLUSH_INTERVAL_S above 0"
            )
        if self.commit_every < 1 or self.commit_interval_s <= 0:
            raise ConfigError("SHOPPULSE_COMMIT_EVERY must be at least 1 and SHOPPULSE_COMMIT_INTERVAL_S above 0")
        if self.history_len < 1 or self.eviction_interval_s < 1 or self.silent_sweep_interval_s < 1:
            raise ConfigError(
                "SHOPPULSE_HISTORY_LEN, SHOPPULSE_EVICTION_INTERVAL_S and "
                "SHOPPULSE_SILENT_SWEEP_INTERVAL_S must be at least 1"
            )
        if self.drift_window_s < 1 or self.drift_min_rows < 1:
            raise ConfigError("SHOPPULSE_DRIFT_WINDOW_S and SHOPPULSE_DRIFT_MIN_ROWS must be at least 1")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"SHOPPULSE_LOG_LEVEL={self.log_level!r}; use DEBUG, INFO, WARNING or ERROR")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"SHOPPULSE_LOG_FORMAT={self.log_format!r}; use text or json")
        if not 0.0 <= self.churn_alert_low < self.churn_alert_high <= 1.0:
            raise ConfigError("SHOPPULSE_CHURN_ALERT_LOW must be below SHOPPULSE_CHURN_ALERT_HIGH, both in [0, 1]")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"SHOPPULSE_DEVICE={self.device!r}; use auto, cpu or cuda")
        if not 0.01 <= self.gil_switch_interval_ms <= 100:
            raise ConfigError(f"SHOPPULSE_GIL_SWITCH_INTERVAL_MS={self.gil_switch_interval_ms}; use 0.01 to 100")
        if self.gc_full_collection_every < 1:
            raise ConfigError(f"SHOPPULSE_GC_FULL_COLLECTION_EVERY={self.gc_full_collection_every}; use 1 or more")
        if self.advertised_url and not self.advertised_url.startswith("http://"):
            raise ConfigError(
                f"SHOPPULSE_ADVERTISED_URL={self.advertised_url!r}; "
                "use http://HOST:PORT (the lookup server speaks plain HTTP)"
            )
        topics = self.consumed_topics + self.output_topics
        if len(set(topics)) != len(topics):
            raise ConfigError(f"topic names must differ, got {topics}")

    def _validate_kafka_limits(self) -> None:
        """The message, fetch and buffer limits must be ones librdkafka accepts and that fit together."""
        if not 1000 <= self.kafka_max_message_bytes <= 1_000_000_000:
            raise ConfigError(
                f"SHOPPULSE_KAFKA_MAX_MESSAGE_BYTES={self.kafka_max_message_bytes}; "
                "use 1000 to 1000000000 (librdkafka's range)"
            )
        if self.kafka_fetch_max_bytes < self.kafka_max_message_bytes:
            raise ConfigError(
                f"SHOPPULSE_KAFKA_FETCH_MAX_BYTES={self.kafka_fetch_max_bytes} is below "
                f"SHOPPULSE_KAFKA_MAX_MESSAGE_BYTES={self.kafka_max_message_bytes}; raise it"
            )
        if not 1 <= self.kafka_max_partition_fetch_bytes <= 1_000_000_000:
            raise ConfigError(
                f"SHOPPULSE_KAFKA_MAX_PARTITION_FETCH_BYTES={self.kafka_max_partition_fetch_bytes}; use 1 to 1000000000"
            )
        if self.kafka_producer_buffer_messages < 1:
            raise ConfigError("SHOPPULSE_KAFKA_PRODUCER_BUFFER_MESSAGES must be at least 1")
        if self.kafka_producer_buffer_kbytes * 1024 < self.kafka_max_message_bytes:
            raise ConfigError(
                f"SHOPPULSE_KAFKA_PRODUCER_BUFFER_KBYTES={self.kafka_producer_buffer_kbytes} cannot hold "
                f"one message of SHOPPULSE_KAFKA_MAX_MESSAGE_BYTES={self.kafka_max_message_bytes}; "
                "a producer would wait forever: raise the buffer or lower the message size"
            )

    @property
    def input_topics(self) -> tuple[str, str, str]:
        """Input topic names, in the order page views, cart, orders."""
        return (self.topic_page_views, self.topic_cart, self.topic_orders)

    @property
    def consumed_topics(self) -> tuple[str, str, str, str]:
        """What the worker's agent consumes, co-partitioned: the input topics, then the erasure requests
        (in the same agent and checkpoint, so an erasure is ordered and committed with the events)."""
        return (*self.input_topics, self.topic_erasure_requests)

    @property
    def output_topics(self) -> tuple[str, str, str, str, str]:
        """Scores, recommendations, churn alerts, dead letters, erasure confirmations."""
        return (
            self.topic_scores,
            self.topic_recommendations,
            self.topic_churn_alerts,
            self.topic_dead_letter,
            self.topic_erasures,
        )

    @property
    def topic_by_kind(self) -> dict[str, str]:
        """Input topic name by contract kind (``page_view``, ``cart``, ``order``)."""
        return {"page_view": self.topic_page_views, "cart": self.topic_cart, "order": self.topic_orders}

    def librdkafka_config(self) -> dict[str, str]:
        """Connection settings for confluent-kafka clients (producer, consumer, admin)."""
        config = {"bootstrap.servers": self.bootstrap_servers, "security.protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            config.update(
                {
                    "sasl.mechanism": self.sasl_mechanism,
                    "sasl.username": self.sasl_username,
                    "sasl.password": self.sasl_password,
                }
            )
        if self.security_protocol.endswith("SSL"):
            for key, value in (
                ("ssl.ca.location", self.ssl_cafile),
                ("ssl.certificate.location", self.ssl_certfile),
                ("ssl.key.location", self.ssl_keyfile),
            ):
                if value:
                    config[key] = value
        return config

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict safe to log: secrets masked."""
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        for secret in ("sasl_password", "pseudonym_key"):
            if shown[secret]:
                shown[secret] = "***"
        return shown


if __name__ == "__main__":
    print(settings_markdown())
