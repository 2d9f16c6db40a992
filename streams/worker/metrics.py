"""Prometheus metrics and the worker's HTTP endpoints: ``/metrics``, ``/healthz``, ``/readyz``.

Names follow Prometheus conventions: counters end in ``_total``, durations are in seconds.
:data:`METRIC_NAMES` lists every exported family; deploy/ rules and dashboards may use only these.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

# Buckets in seconds, chosen for a millisecond-scale pipeline.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
BATCH_SIZE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)


class WorkerMetrics:
    """The worker's metric families, registered on one registry (a fresh one per worker in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_consumed = Counter(
            "shoppulse_events_consumed_total", "Input messages consumed, by topic", ["topic"], registry=r
        )
        self.invalid_events = Counter(
            "shoppulse_invalid_events_total",
            "Input messages that broke their contract, by reason",
            ["reason"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "shoppulse_dead_letter_total",
            "Messages written to the dead-letter topic, by reason",
            ["reason"],
            registry=r,
        )
        self.late_events = Counter(
            "shoppulse_late_events_total", "Valid events older than the grace period, not applied", registry=r
        )
        self.duplicate_events = Counter(
            "shoppulse_duplicate_events_total", "Valid events seen before (same event_id), applied once", registry=r
        )
        self.replayed_events = Counter(
            "shoppulse_replayed_events_total",
            "Valid events at or below the input offset their shopper's stored value "
            "records: applied before a crash, skipped",
            registry=r,
        )
        self.state_decode_errors = Counter(
            "shoppulse_state_decode_errors_total",
            "Stored shopper states that could not be decoded and were reset",
            registry=r,
        )
        self.results_published = Counter(
            "shoppulse_results_published_total", "Output messages published, by topic", ["topic"], registry=r
        )
        self.batch_size = Histogram(
            "shoppulse_batch_size", "Input messages per micro-batch", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "shoppulse_batch_processing_seconds",
            "Time to process one micro-batch",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "shoppulse_end_to_end_latency_seconds",
            "From event ts to its score being acknowledged by the brokers",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.shoppers_in_batch = Histogram(
            "shoppulse_shoppers_per_batch",
            "Distinct shoppers scored per micro-batch",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.shoppers_in_state = Gauge(
            "shoppulse_shoppers_in_state",
            "Shoppers stored in this worker's partitions (counted by the eviction sweep)",
            registry=r,
        )
        self.shoppers_evicted = Counter(
            "shoppulse_shoppers_evicted_total",
            "Shoppers deleted after being idle past the retention period",
            registry=r,
        )
        self.inference_seconds = Histogram(
            "shoppulse_inference_seconds",
            "Time for all model forward passes of one micro-batch",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.model_inference_seconds = Histogram(
            "shoppulse_model_inference_seconds",
            "One model's forward pass for one micro-batch, by model and device",
            ["model", "device"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.score_values = Histogram(
            "shoppulse_score_value",
            "Distribution of published scores, by score name",
            ["score"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.alerts_fired = Counter("shoppulse_churn_alerts_total", "Churn alerts published", registry=r)
        self.alert_reasons = Counter(
            "shoppulse_churn_alert_reasons_total",
            "Churn alerts that name a feature among their reasons, by feature",
            ["feature"],
            registry=r,
        )
        self.model_info = Gauge(
            "shoppulse_model_info", "1 for each model version being served", ["model", "version"], registry=r
        )
        self.model_load_errors = Counter(
            "shoppulse_model_load_errors_total",
            "Model artifacts that could not be loaded (the last good model stays)",
            registry=r,
        )
        self.silent_rescored = Counter(
            "shoppulse_silent_rescored_total",
            "Shoppers re-scored by the silent-shopper sweep (no new event)",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "shoppulse_consumer_lag",
            "Input messages behind the partition's high watermark (from fetch responses)",
            ["topic", "partition"],
            registry=r,
        )
        self.feature_psi = Gauge(
            "shoppulse_live_feature_psi",
            "Population Stability Index of each feature over the drift window, against the served "
            "classifier's training rows (absent while the window holds too few rows)",
            ["model", "version", "feature"],
            registry=r,
        )
        self.ready = Gauge(
            "shoppulse_ready",
            "1 when a broker connection is up, partitions are assigned and tables recovered",
            registry=r,
        )


METRIC_NAMES = (
    "shoppulse_events_consumed_total",
    "shoppulse_invalid_events_total",
    "shoppulse_dead_letter_total",
    "shoppulse_late_events_total",
    "shoppulse_duplicate_events_total",
    "shoppulse_replayed_events_total",
    "shoppulse_state_decode_errors_total",
    "shoppulse_results_published_total",
    "shoppulse_batch_size",
    "shoppulse_batch_processing_seconds",
    "shoppulse_end_to_end_latency_seconds",
    "shoppulse_shoppers_per_batch",
    "shoppulse_shoppers_in_state",
    "shoppulse_shoppers_evicted_total",
    "shoppulse_inference_seconds",
    "shoppulse_model_inference_seconds",
    "shoppulse_score_value",
    "shoppulse_churn_alerts_total",
    "shoppulse_churn_alert_reasons_total",
    "shoppulse_model_info",
    "shoppulse_model_load_errors_total",
    "shoppulse_silent_rescored_total",
    "shoppulse_consumer_lag",
    "shoppulse_live_feature_psi",
    "shoppulse_ready",
)


class HealthState:
    """What ``/healthz`` and ``/readyz`` report; the worker flips these as it runs."""

    def __init__(self) -> None:
        self.alive = True
        self.ready = False
        self.reason = "starting"


class MetricsServer:
    """A small threaded HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``.

    Args:
        host: address to bind (``127.0.0.1`` keeps it local; ``0.0.0.0`` for a scraper elsewhere).
        port: TCP port; 0 lets the OS pick (see :attr:`port` after :meth:`start`).
    """

    def __init__(self, metrics: WorkerMetrics, health: HealthState, host: str, port: int) -> None:
        self.metrics = metrics
        self.health = health
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._reply(200 if health.alive else 503, b"ok\n" if health.alive else b"dead\n")
                elif path == "/readyz":
                    body = ("ready\n" if health.ready else f"not ready: {health.reason}\n").encode()
                    self._reply(200 if health.ready else 503, body)
                else:
                    self._reply(404, b"try /metrics, /healthz or /readyz\n")

            def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet access log
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="shoppulse-metrics", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)  # an AF_INET server's address: (host, port); bytes only for AF_UNIX
        return f"http://{host}:{port}"

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics on %s/metrics (health: /healthz, readiness: /readyz)", self.url)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
