"""The Faust worker: one agent over the co-partitioned input topics and erasure requests, built from small parts.

The app's consumer (:mod:`streams.worker.faust_seam`, the only module that touches Faust's internals)
hands whole Kafka fetches of the input topics to a :class:`streams.worker.batch_consumer.MicroBatcher`
rather than through Faust's per-event streams (which cost about 90 µs of CPU per event here).
Per micro-batch (up to ``max_batch`` messages, or fewer once the oldest has waited
``max_wait_ms``) the agent hands the raw messages and the shopper table's reader to
:class:`streams.worker.pipeline.BatchProcessor`, which returns the values to store, the messages to
publish and the dead letters as data. :class:`streams.worker.checkpoint.Checkpoint` then queues them
(outputs through :class:`streams.worker.publisher.Publisher`, states into RocksDB and the changelog
through :class:`streams.worker.table_writer.TableWriter`), flushes both producers, records the
persisted changelog offsets, and only then acks the batch: Faust commits only acked offsets.

Each stored value holds the input offsets applied to it (:mod:`streams.worker.envelope`), so a replay
after any number of crashes applies no event twice; outputs may repeat (at-least-once).
:class:`streams.worker.sweeps.Sweeps` evicts idle shoppers and re-scores silent ones;
:class:`streams.worker.health.Health` keeps ``/readyz`` and the lag gauge.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from typing import Any

import faust
import torch
from faust.types import TP

from features.events import ValidationLimits
from features.spec import DEFAULT_FEATURE_SPEC
from features.state import StateConfig
from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL
from models.scoring import BatchScorer
from streams.config import Settings
from streams.kafka.batch_producer import BatchProducer
from streams.kafka.broker import free_port
from streams.kafka.clients import (
    BROKER_PROFILE_TANSU,
    TANSU_FETCH_MAX_WAIT_MS,
    confluent_consumer_config,
    ensure_topics,
    faust_client_settings,
    resolve_broker_profile,
    tansu_client_overrides,
)
from streams.logs import worker_logging_config
from streams.worker.alerts import AlertPolicy
from streams.worker.batch_consumer import MicroBatch, MicroBatcher
from streams.worker.bulk_restore import BulkRestorer
from streams.worker.checkpoint import Checkpoint
from streams.worker.console import AlertFeed
from streams.worker.drift import DriftGauge
from streams.worker.faust_seam import BatchDrainConsumer, BatchingApp, SeamBroken, TableStore, set_fetch_max_wait_ms
from streams.worker.health import Health
from streams.worker.lookup import (
    FORWARD_TIMEOUT_S,
    REBALANCING_FRAME,
    KeptOutputs,
    ShopperLookup,
    ShopperView,
    advertised_url,
    forward,
    ownership_frame,
    queued_frames,
)
from streams.worker.metrics import HealthState, MetricsServer, WorkerMetrics
from streams.worker.pipeline import STATE_TABLE, BatchOutcome, BatchProcessor
from streams.worker.publisher import Publisher
from streams.worker.sweeps import RebalanceFence, Sweeps
from streams.worker.table_writer import TableWriter

log = logging.getLogger("shoppulse.worker")

#: The consumer stops fetching while this many micro-batches are buffered ahead of the agent.
BATCHES_BUFFERED = 2


def state_table_store(settings: Settings) -> TableStore:
    """The shopper table's store over ``settings.data_dir``, from an app that is never started: for
    benches and tests that read or write a worker's RocksDB while no worker has it open."""
    app = BatchingApp(
        settings.app_id,
        batch_topics=settings.input_topics,
        batcher=MicroBatcher(10, 0.01, 20),
        broker=f"kafka://{settings.bootstrap_servers}",
        store="rocksdb://",
        datadir=str(settings.data_dir),
        autodiscover=False,
        web_enabled=False,
    )
    return TableStore(app.Table(STATE_TABLE, key_type=bytes, value_type=bytes, partitions=settings.partitions))


class ScoringWorker:
    """The Faust app, its topics, table and agent, built from :class:`Settings`; the parts are
    wired here, the work is theirs."""

    def __init__(self, settings: Settings, metrics: WorkerMetrics | None = None) -> None:
        self.settings = settings
        self.profile = resolve_broker_profile(settings)
        self.metrics = metrics or WorkerMetrics()
        self.health_state = HealthState()
        self.alert_feed = AlertFeed()  # delivered churn alerts, for the console
        overrides = tansu_client_overrides() if self.profile == BROKER_PROFILE_TANSU else {}
        # The port is fixed before the app exists: the assignor publishes the URL to the group.
        self.http_port = settings.metrics_port or free_port(settings.metrics_host)
        self.advertised_url = advertised_url(settings, self.http_port)
        self.batcher = MicroBatcher(
            settings.max_batch, settings.max_wait_ms / 1000.0, max_buffered=BATCHES_BUFFERED * settings.max_batch
        )
        self.app = BatchingApp(
            settings.app_id,
            batch_topics=settings.consumed_topics,
            batcher=self.batcher,
            bulk_restorer=BulkRestorer(
                confluent_consumer_config(settings, f"{settings.app_id}-bulk-restore"),
                settings.bulk_restore_min_records,
            )
            if settings.bulk_restore_min_records > 0
            else None,
            broker=[f"kafka://{server.strip()}" for server in settings.bootstrap_servers.split(",")],
            **faust_client_settings(settings),
            store="rocksdb://",
            datadir=str(settings.data_dir),
            table_standby_replicas=settings.standby_replicas,
            topic_partitions=settings.partitions,
            topic_replication_factor=settings.replication_factor,
            web_enabled=False,  # our own /metrics, /healthz, /readyz, /shoppers, /console server replaces it
            canonical_url=self.advertised_url,  # what the assignor tells the group: lookups are forwarded there
            autodiscover=False,
            consumer_auto_offset_reset="earliest",
            **overrides,
        )
        self.inputs = self.app.topic(
            *settings.consumed_topics, partitions=settings.partitions, key_serializer="raw", value_serializer="raw"
        )
        self.table = self.app.Table(
            STATE_TABLE,
            key_type=bytes,
            value_type=bytes,
            partitions=settings.partitions,
            help="Per-shopper state, churn alert state, live evaluation memory and applied input offsets "
            "(streams.worker.envelope), keyed by user_id",
        )
        self.store = TableStore(self.table)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.scorer = BatchScorer(
            DEFAULT_FEATURE_SPEC, settings.models_dir, device=settings.device, top_k=settings.top_k
        )
        self.state_config = StateConfig(
            grace_ms=settings.grace_ms, history_len=settings.history_len, retention_ms=settings.retention_ms
        )
        self.drift = DriftGauge(self.scorer, self.metrics.feature_psi, settings.drift_window_s, settings.drift_min_rows)
        self.processor = BatchProcessor(
            topic_kinds=dict(zip(settings.input_topics, ("page_view", "cart", "order"), strict=False)),
            state_config=self.state_config,
            spec=DEFAULT_FEATURE_SPEC,
            scorer=self.scorer,
            limits=ValidationLimits(settings.max_event_bytes, settings.max_future_skew_ms),
            metrics=self.metrics,
            alert_policy=AlertPolicy(
                settings.churn_alert_high, settings.churn_alert_low, settings.churn_alert_cooldown_ms
            ),
            pseudonym_key=settings.pseudonym_key.encode(),
            feature_watch=self.drift.observe,
            erasure_topic=settings.topic_erasure_requests,
            eval_config=settings.live_eval_config(),
            alert_holdout_share=settings.alert_holdout_share,
            alert_holdout_salt=settings.alert_holdout_salt,
        )
        self.health = Health(self.app, settings, self.metrics, self.health_state)
        lookup_scorer = BatchScorer(  # the lookup threads' own: see streams.worker.lookup
            DEFAULT_FEATURE_SPEC, settings.models_dir, device=settings.device, top_k=settings.top_k
        )
        self.kept_outputs = KeptOutputs(settings.lookup_keep_shoppers)
        self.lookup = ShopperLookup(
            ShopperView(
                DEFAULT_FEATURE_SPEC,
                lookup_scorer,
                self.processor.alert_policy,
                self.processor.public_id,
                self.kept_outputs,
            ),
            settings.partitions,
            self.advertised_url,
            owners=lambda: self.app.partition_owners(self.store.changelog_topic),
            read=self.store.get_if_open,
            ready=lambda: self.health_state.ready,
            forwarder=lambda owner, target, via: forward(owner, target, via, FORWARD_TIMEOUT_S),
        )
        self.checkpoint: Checkpoint  # and self.sweeps: their producers connect only when the worker runs
        self.sweeps: Sweeps
        self._served_versions: dict[str, str] = {}
        self._seen_load_errors = self.scorer.load_errors
        self._faust_worker: _Worker | None = None  # set by run(); _fail crashes it
        self._publish_model_info()
        self.metrics_server: MetricsServer | None = None
        self.app.agent(self.inputs, name="score_shoppers")(self._score_shoppers)
        self.app.timer(1.0)(self._refresh_health)
        self.app.timer(float(settings.eviction_interval_s))(self._evict_idle_shoppers)
        self.app.timer(float(settings.silent_sweep_interval_s))(self._rescore_silent_shoppers)
        self.app.on_partitions_assigned.connect(self._on_assigned)
        # sweeps write only inside one assignment (streams.worker.sweeps, "Sweeps and rebalances")
        self.fence = RebalanceFence()
        self.app.on_partitions_revoked.connect(self._on_revoked)
        self.app.on_rebalance_complete.connect(self._on_recovered)

    def _publish_model_info(self) -> bool:
        """``shoppulse_model_info{model,version}``: 1 for what is served now, old versions removed.
        Returns True when the served versions changed."""
        versions = self.scorer.served
        if versions == self._served_versions:
            return False
        for model, version in self._served_versions.items():
            self.metrics.model_info.remove(model, version)
        for model, version in versions.items():
            self.metrics.model_info.labels(model, version).set(1)
        self._served_versions = dict(versions)
        log.info("serving %s on %s", ", ".join(f"{m}={v}" for m, v in versions.items()), self.scorer.device)
        return True

    async def _score_shoppers(self, stream: faust.StreamT) -> None:
        """The agent: score micro-batches until the worker stops.

        Faust subscribes the input topics for it and owns their partitions, but ``stream`` stays
        empty: the consumer hands the messages to :attr:`batcher` (:mod:`streams.worker.batch_consumer`).
        An error no batch logic handles stops the whole worker (:meth:`_fail`).

        Two batches overlap: batch N+1 is validated, updated and scored while batch N's outputs and
        changelog records are on their way to Kafka. N+1 queues nothing until N is delivered and
        acked, so acks stay in order and N's changelog flush never takes N+1's records. States are
        read and written under :attr:`Checkpoint.writing <streams.worker.checkpoint.Checkpoint.writing>`.
        """
        consumer = self.app.batch_consumer
        checkpoint, load, committed = self.checkpoint, self.store.get, self._input_committed
        delivering: asyncio.Future[None] | None = None
        try:
            while True:
                batch = await consumer.take_batch()
                self.health.taken(batch)
                async with checkpoint.writing:
                    outcome = self.processor.process(batch, load, committed=committed)
                    self._observe_models()
                    if delivering is not None:
                        await delivering  # the previous batch: delivered, then acked
                    checkpoint.queue(outcome)
                delivering = asyncio.ensure_future(self._commit(outcome, batch))
        except Exception as exc:  # anything the batch logic did not handle stops the worker, on purpose
            await self._fail(exc, consumer)
        finally:
            if delivering is not None and not delivering.done():
                delivering.cancel()  # unacked: its messages are consumed again after the restart

    async def _commit(self, outcome: BatchOutcome, batch: MicroBatch) -> None:
        """The batch's commit (:meth:`Checkpoint.commit`), timed: with the processing time, the part
        of its latency the worker spends on it."""
        started = time.perf_counter()
        await self.checkpoint.commit(outcome, batch)
        self.metrics.commit_seconds.observe(time.perf_counter() - started)

    def _input_committed(self, topic: str, partition: int) -> int | None:
        """The committed offset of an input partition (the next to read): what a restart resumes from."""
        return self.app.batch_consumer.committed_offset(TP(topic, partition))

    async def _fail(self, exc: Exception, consumer: BatchDrainConsumer) -> None:
        """Crash-only: stop the whole worker, exit code 1, for its supervisor to restart.

        Faust would restart the agent alone, which goes on with later batches while the failed one
        is never acked: commits stall behind it, nothing says so, and every restart replays more.
        Stopping instead leaves the failed batch uncommitted, to be consumed again after the restart.
        """
        self.health_state.alive = False
        unacked = consumer.forget_batches()
        log.critical(
            "scoring stopped on %s: %s. The worker exits with code 1 for its supervisor to restart it; "
            "its unacknowledged batches (%d) are consumed again then. If it fails the same way after every "
            "restart, the traceback says where",
            type(exc).__name__,
            exc,
            unacked,
            exc_info=exc,
        )
        if self._faust_worker is None:  # not started by run(): nobody to stop, so say it loudly
            raise exc
        await self._faust_worker.crash(exc)

    def _observe_models(self) -> None:
        timings, device = self.scorer.timings, str(self.scorer.device)
        if self.scorer.classifier is not None:
            self.metrics.model_inference_seconds.labels(CLASSIFIER_MODEL, device).observe(timings.classifier_s)
        if self.scorer.recommender is not None:
            self.metrics.model_inference_seconds.labels(NEXTITEM_MODEL, device).observe(timings.nextitem_s)
        new_errors = self.scorer.load_errors - self._seen_load_errors
        if new_errors:
            self.metrics.model_load_errors.inc(new_errors)
            self._seen_load_errors = self.scorer.load_errors
        if self._publish_model_info() and gc.get_freeze_count():
            # A hot reload: the replaced models were frozen with everything else at start-up
            # (_on_startup_finished), so whatever of them sits in reference cycles would never be
            # collected. Unfreeze, collect once, freeze again.
            gc.unfreeze()
            gc.collect()
            gc.freeze()

    async def _evict_idle_shoppers(self) -> None:
        await self.sweeps.evict_idle()

    async def _rescore_silent_shoppers(self) -> None:
        await self.sweeps.rescore_silent()

    def _on_queued(self, outcome: BatchOutcome) -> None:
        """Keep a queued batch's outputs for lookups, here and in the HTTP server process."""
        self.kept_outputs.remember(outcome)
        if self.metrics_server is not None and self.metrics_server.mirrors_lookups:
            self.metrics_server.feed(queued_frames(outcome))

    async def _refresh_health(self) -> None:
        await self.health.refresh()
        if self.metrics_server is not None and self.metrics_server.mirrors_lookups:
            self.metrics_server.feed(ownership_frame(self.lookup.owned_partitions(), self.health_state.ready))

    async def _on_revoked(self, sender: Any, /, *args: Any, **kwargs: Any) -> None:
        # Outputs kept from before may not belong to the values a partition holds when it comes back.
        self.kept_outputs.clear()
        if self.metrics_server is not None:
            self.metrics_server.feed(REBALANCING_FRAME)
        await self.fence.revoked()  # Faust awaits this before the worker rejoins its group

    async def _on_recovered(self, sender: Any, /, *args: Any, **kwargs: Any) -> None:
        self.fence.recovered()

    async def _on_assigned(self, sender: Any, /, *args: set[Any], **kwargs: Any) -> None:
        # Faust sends ``(sender, assigned, signal=...)``; mode types a handler as taking the sender
        # positionally, then any positionals and keywords.
        (assigned,) = args
        mine = sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned if tp.topic in self.settings.consumed_topics)
        log.info("assigned %d input partitions: %s", len(mine), ", ".join(mine) or "none")
        self.fence.assigned()
        if self.profile == BROKER_PROFILE_TANSU:
            # Before the table recovery that follows: each of its offset requests otherwise waits out a
            # 1.5 s fetch on the same connection (2.5 s of every restart, measured).
            self._shorten_fetch_wait()

    def _shorten_fetch_wait(self) -> None:
        """On Tansu, cap how long a fetch may wait for data (:data:`TANSU_FETCH_MAX_WAIT_MS`): that
        wait is paid in full whenever the worker has caught up (docs/embedded-broker.md)."""
        try:
            set_fetch_max_wait_ms(self.app, TANSU_FETCH_MAX_WAIT_MS)
        except SeamBroken as exc:
            log.error(
                "could not shorten the fetch wait on Tansu (%s); results may wait up to 1.5 s for each fetch. "
                "The installed Faust/aiokafka differ from the tested versions (docs/deploy.md)",
                exc,
            )

    async def _on_startup_finished(self) -> None:
        # The worker's spinner/log setup leaves the root logger at DEBUG, and every aiokafka and
        # Faust debug call then builds a record that is thrown away (13% of CPU, measured).
        logging.getLogger().setLevel(self.settings.log_level.upper())
        for noisy in ("faust", "aiokafka", "mode"):
            logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
        if self.profile == BROKER_PROFILE_TANSU:
            self._shorten_fetch_wait()
        # What exists now (Faust, aiokafka, torch, the models: ~400k objects) lives as long as the
        # worker. Frozen, it is left out of the cyclic collector's full passes, which rescanned all of
        # it a few times a second at saturation (12% of the batch work, measured; 3% once frozen).
        gc.freeze()
        log.info(
            "worker started: broker %s (%s profile), inputs %s, outputs %s, micro-batch %d events / %d ms, "
            "state in %s, models from %s",
            self.settings.bootstrap_servers,
            self.profile,
            ", ".join(self.settings.consumed_topics),
            ", ".join(self.settings.output_topics),
            self.settings.max_batch,
            self.settings.max_wait_ms,
            self.settings.data_dir,
            self.settings.models_dir,
        )

    def run(self) -> int:
        """Create topics, start the metrics server and run the worker until SIGINT/SIGTERM."""
        sys.setswitchinterval(self.settings.gil_switch_interval_ms / 1000)
        # Every batch's records, states and outputs live long enough to reach the middle generation,
        # and with Python's default a full pass follows every 10 middle passes, found nothing to
        # free and rescanned the whole unfrozen heap (20-140 ms each, 97-98 passes and 3.8-4.3 s in a
        # 400k-event run: about 10 % of the worker's CPU, measured; BENCHMARKS.md).
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, self.settings.gc_full_collection_every)
        ensure_topics(self.settings)
        publisher = Publisher(BatchProducer(self.settings), self.settings, self.metrics, self.alert_feed)
        changelog = TableWriter(
            BatchProducer(self.settings, track_offsets=True), seal=self.profile == BROKER_PROFILE_TANSU
        )
        self.checkpoint = Checkpoint(
            publisher,
            changelog,
            self.store,
            lambda batch: self.app.batch_consumer.ack_batch(batch),
            on_queued=self._on_queued,
        )
        self.sweeps = Sweeps(
            self.checkpoint,
            lambda: self.app.owned_partitions(self.store.changelog_topic),
            self.processor,
            self.state_config,
            self.settings.silent_after_ms,
            self.settings.max_batch,
            self.metrics,
            committed=self._input_committed,
            fence=self.fence,
        )
        self.metrics_server = MetricsServer(
            self.metrics,
            self.health_state,
            self.settings.metrics_host,
            self.http_port,
            self.lookup,
            alerts=self.alert_feed,
            process=self.settings.http_process,
        ).start()
        worker = self._faust_worker = _Worker(
            self.app,
            after_start=self._on_startup_finished,
            loglevel=self.settings.log_level.lower().replace("warning", "warn"),
            logging_config=worker_logging_config(self.settings.log_level, self.settings.log_format),
            quiet=True,
            redirect_stdouts=False,
        )
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            return int(exc.code or 0)
        finally:
            self.health_state.alive = False
            publisher.close()
            changelog.producer.close()
            self.metrics_server.stop()
        return 0


class _Worker(faust.Worker):
    """Faust's worker, plus a hook after start-up (Faust's own ``on_startup_finished`` slot is the worker's)."""

    def __init__(self, app: faust.App, after_start: Any, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._after_start = after_start
        if not self.stdout.isatty():  # Faust's spinner writes cursor escapes even into a log file
            self.spinner = None

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        await self._after_start()
