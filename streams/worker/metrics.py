"""Prometheus metrics and the worker's HTTP endpoints: ``/metrics``, ``/healthz``, ``/readyz``,
``/shoppers/{user_id}`` (:mod:`streams.worker.lookup`) and the live console, ``/console`` with the
``/console/stats`` it polls (:mod:`streams.worker.console`).

Names follow Prometheus conventions: counters end in ``_total``, durations are in seconds.
:data:`METRIC_NAMES` lists every exported family; deploy/ rules and dashboards may use only these.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from urllib.parse import parse_qs

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from models.outcomes import Outcome, metric_increments
from streams.worker.console import AlertFeed, ConsoleStats, page
from streams.worker.http_front import SERVER_THREADS, AnswerHandler, HttpFront, PooledHTTPServer, encode_frame
from streams.worker.lookup import FORWARDED_HEADER, LOOKUP_PATH, Reply, ShopperLookup

log = logging.getLogger(__name__)

# Buckets in seconds, chosen for a millisecond-scale pipeline.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
BATCH_SIZE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
# Finer at the low end: a local lookup's goal is a p99 of 10 ms.
LOOKUP_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


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
        self.commit_seconds = Histogram(
            "shoppulse_commit_seconds",
            "From a micro-batch's records queued to all of them acknowledged (outputs, changelog, its seals)",
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
        self.erasures = Counter(
            "shoppulse_erasures_total",
            "Erasure requests carried out, by outcome: deleted (something was held) or nothing_found",
            ["outcome"],
            registry=r,
        )
        self.trace_context_invalid = Counter(
            "shoppulse_trace_context_invalid_total",
            "Input events whose traceparent header was malformed: ignored, the event is scored without it",
            registry=r,
        )
        self.ready = Gauge(
            "shoppulse_ready",
            "1 when a broker connection is up, partitions are assigned and tables recovered",
            registry=r,
        )
        self.lookup_seconds = Histogram(
            "shoppulse_lookup_seconds",
            "Time to answer GET /shoppers/{user_id}, by route (mirror: this worker owns the shopper and its HTTP "
            "server process answered from its copy; local: this worker owns the shopper and answered; forwarded: "
            "relayed from the owner) and HTTP status code",
            ["route", "code"],
            buckets=LOOKUP_BUCKETS_S,
            registry=r,
        )
        # Live evaluation (models.outcomes, docs/evaluation.md): counted once their batch committed.
        self._live: dict[str, Counter] = {}
        served = ["model", "version", "variant"]
        self.live_recommendation_opportunities = self._live_counter(
            "shoppulse_live_recommendation_opportunities_total",
            "Served recommendation lists resolved by the shopper's next item interaction",
            served,
        )
        self.live_recommendation_hits = self._live_counter(
            "shoppulse_live_recommendation_hits_total",
            "Resolved recommendation lists whose top k held the next item, by k",
            [*served, "k"],
        )
        self.live_recommendation_gain = self._live_counter(
            "shoppulse_live_recommendation_gain_total",
            "Sum of NDCG@10 gains 1/log2(rank + 1) of resolved recommendation lists",
            served,
        )
        scored = [*served, "score", "decile", "outcome"]
        self.live_score_outcomes = self._live_counter(
            "shoppulse_live_score_outcomes_total",
            "Resolved churn and purchase scores, by score decile and observed outcome",
            scored,
        )
        self.live_score_probability_sum = self._live_counter(
            "shoppulse_live_score_probability_sum_total",
            "Sum of the probabilities of resolved scores (with the count: a reliability diagram)",
            scored,
        )
        self.live_score_brier_sum = self._live_counter(
            "shoppulse_live_score_brier_sum_total",
            "Sum of (p - y)^2 over resolved scores (divided by their count: the Brier score)",
            [*served, "score"],
        )
        self.live_alert_returns = self._live_counter(
            "shoppulse_live_alert_returns_total",
            "Churn-alerted and held-out shoppers by whether they returned within the churn horizon",
            ["group", "outcome"],
        )
        self.live_alerts_held_out = self._live_counter(
            "shoppulse_live_alerts_held_out_total",
            "Churn alerts computed and recorded but not sent (the holdout)",
        )
        self.live_pending_dropped = self._live_counter(
            "shoppulse_live_pending_dropped_total",
            "Pending scores (SHOPPULSE_LIVE_MAX_PENDING) and waiting served lists (score=recommendation) "
            "dropped unresolved by their per-shopper cap",
            ["score"],
        )
        self.live_out_of_order = self._live_counter(
            "shoppulse_live_out_of_order_events_total",
            "Item interactions folded out of event-time order (behind one the buffer cap or a silent-shopper "
            "sweep folded already): the shopper's recommendation outcomes may differ from the offline recount "
            "from then on (docs/evaluation.md)",
        )

    def _live_counter(self, name: str, documentation: str, labels: list[str] | None = None) -> Counter:
        counter = Counter(name, documentation, labels or [], registry=self.registry)
        self._live[name] = counter
        return counter

    def count_live(self, outcomes: list[Outcome], held_out_alerts: int) -> None:
        """Add a committed batch's resolved outcomes to the ``shoppulse_live_*`` counters."""
        for (name, *labels), amount in metric_increments(outcomes, held_out_alerts).items():
            counter = self._live[name]
            (counter.labels(*labels) if labels else counter).inc(amount)


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
    "shoppulse_commit_seconds",
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
    "shoppulse_erasures_total",
    "shoppulse_trace_context_invalid_total",
    "shoppulse_ready",
    "shoppulse_lookup_seconds",
    "shoppulse_live_recommendation_opportunities_total",
    "shoppulse_live_recommendation_hits_total",
    "shoppulse_live_recommendation_gain_total",
    "shoppulse_live_score_outcomes_total",
    "shoppulse_live_score_probability_sum_total",
    "shoppulse_live_score_brier_sum_total",
    "shoppulse_live_alert_returns_total",
    "shoppulse_live_alerts_held_out_total",
    "shoppulse_live_pending_dropped_total",
    "shoppulse_live_out_of_order_events_total",
)


class HealthState:
    """What ``/healthz`` and ``/readyz`` report; the worker flips these as it runs."""

    def __init__(self) -> None:
        self.alive = True
        self.ready = False
        self.reason = "starting"


class MetricsServer:
    """The worker's HTTP endpoints: ``/metrics``, ``/healthz``, ``/readyz``, the shopper lookup and the console.

    Not on the worker's event loop: a lookup must not wait for a micro-batch to finish (tens of
    ms). With ``process`` (the worker's default, ``SHOPPULSE_HTTP_PROCESS``) a child process
    speaks HTTP and asks this process for each answer over a socket pair
    (:mod:`streams.worker.http_front`: one wait for the GIL per request instead of one per socket
    call); otherwise threads of this process serve the socket themselves.

    Args:
        host: address to bind (``127.0.0.1`` keeps it local; ``0.0.0.0`` for a scraper elsewhere).
        port: TCP port; 0 lets the OS pick (see :attr:`url` after :meth:`start`).
        lookup: answers ``/shoppers/{user_id}``; None: that path answers 404.
        alerts: the churn alerts the console lists (the publisher records them); None: an empty feed.
        process: serve HTTP from a child process.
    """

    def __init__(
        self,
        metrics: WorkerMetrics,
        health: HealthState,
        host: str,
        port: int,
        lookup: ShopperLookup | None = None,
        alerts: AlertFeed | None = None,
        process: bool = False,
    ) -> None:
        self.metrics = metrics
        self.health = health
        self.lookup = lookup
        self.console = ConsoleStats(metrics.registry, health, alerts or AlertFeed())
        self.front: HttpFront | None = None
        self._process = process
        respond = self.respond

        class Handler(AnswerHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                reply = respond(self.path, self.request_headers())
                self.send_answer(reply.status, reply.content_type, reply.headers, reply.body)

        self._server = PooledHTTPServer((host, port), Handler)

    def respond(self, target: str, headers: Mapping[str, str]) -> Reply:
        """The answer to ``GET target``; ``headers`` have lower-case names."""
        path, _, query = target.partition("?")
        health = self.health
        if path == "/metrics":
            # ?name[]=...: only those series, as prometheus_client's own handler offers (a poller
            # that reads one counter several times a second then costs the batch loop little)
            names = parse_qs(query).get("name[]")
            registry = self.metrics.registry if names is None else self.metrics.registry.restricted_registry(names)
            return Reply(200, generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
        if path == "/healthz":
            return _text(200, "ok\n") if health.alive else _text(503, "dead\n")
        if path == "/readyz":
            return _text(200, "ready\n") if health.ready else _text(503, f"not ready: {health.reason}\n")
        if self.lookup is not None and path.startswith(LOOKUP_PATH):
            started = time.perf_counter()
            reply = self.lookup.handle(target, headers.get(FORWARDED_HEADER.lower()))
            route = "local" if reply.served_here else "forwarded"
            self.metrics.lookup_seconds.labels(route, str(reply.status)).observe(time.perf_counter() - started)
            return reply
        if path in ("/console", "/console/"):
            return Reply(200, page(), content_type="text/html; charset=utf-8")
        if path == "/console/stats":
            return Reply(200, json.dumps(self.console.snapshot()).encode())
        return _text(404, "try /metrics, /healthz, /readyz, /shoppers/USER_ID or /console\n")

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)  # an AF_INET server's address: (host, port); bytes only for AF_UNIX
        return f"http://{host}:{port}"

    def start(self) -> MetricsServer:
        if self._process:
            greeting = encode_frame(self.lookup.mirror_greeting()) if self.lookup is not None else None
            self.front = HttpFront(self._server.socket, self.respond, greeting=greeting, on_report=self._report).start()
        else:
            self._server.serve(SERVER_THREADS, "shoppulse-http")
        log.info("metrics on %s/metrics (health: /healthz, readiness: /readyz, console: /console)", self.url)
        return self

    @property
    def mirrors_lookups(self) -> bool:
        """Whether the HTTP server process answers lookups itself and wants :meth:`feed` called."""
        return self.front is not None and self.front.greeting is not None

    def feed(self, frame: bytes) -> None:
        """Send ``frame`` to the HTTP server process's lookup mirror (:mod:`streams.worker.lookup`)."""
        if self.front is not None:
            self.front.send(frame)

    def _report(self, head: Mapping[str, object]) -> None:
        """Time the lookups the HTTP server process answered itself (route ``mirror``)."""
        seconds = head.get("seconds")
        if head.get("kind") == "lookup_seconds" and isinstance(seconds, list):
            observed = self.metrics.lookup_seconds.labels("mirror", "200")
            for value in seconds:
                observed.observe(value)

    def stop(self) -> None:
        if self.front is not None:
            self.front.stop()
        self._server.stop()


def _text(status: int, text: str) -> Reply:
    return Reply(status, text.encode(), content_type="text/plain; charset=utf-8")
