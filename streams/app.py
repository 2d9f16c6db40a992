"""The Faust worker: one agent over the three co-partitioned input topics.

The app's consumer hands whole Kafka fetches of the input topics to a
:class:`streams.batch_consumer.MicroBatcher` rather than through Faust's per-event streams
(which cost about 90 µs of CPU per event here). Per micro-batch (up to ``max_batch`` messages,
or fewer once the oldest has waited ``max_wait_ms``) the agent hands the raw messages to
:class:`streams.pipeline.BatchProcessor`, then

* sends each invalid message, with its original key and bytes, to the dead-letter topic
  with headers that say where it came from and why it was rejected;
* writes each touched shopper's state once to the ``shopper_state`` table (rocksdict store,
  changelog-backed) in the partition of its events, through :class:`streams.table_writer.TableWriter`;
* publishes one result per scored shopper to the scores topic, plus recommendations and
  churn alerts, through a :class:`streams.batch_producer.BatchProducer` (librdkafka);

and waits until Kafka acknowledged every output and changelog record before it acks the batch's
messages. Faust commits only acked offsets, so nothing is committed before its effects are in Kafka (at-least-once; replays are absorbed by
the per-shopper event-id dedup). Tests count every event to prove that nothing is lost or
doubled and that recovery from the changelog is exact.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any, AsyncIterator

import faust
import torch

from features.encoding import StateDecodeError, last_event_ms_of
from features.events import ValidationLimits
from features.spec import DEFAULT_FEATURE_SPEC
from features.state import StateConfig
from models.scoring import BatchScorer
from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL
from streams.alerts import AlertPolicy
from streams.config import Settings
from streams.kafka import (BROKER_PROFILE_TANSU, TANSU_FETCH_MAX_WAIT_MS, ensure_topics, faust_client_settings,
                           resolve_broker_profile, tansu_client_overrides)
from streams.batch_consumer import BatchDrainConsumer, BatchingApp, MicroBatch, MicroBatcher
from streams.batch_producer import BatchProducer
from streams.logs import worker_logging_config
from streams.metrics import HealthState, MetricsServer, WorkerMetrics
from streams.pipeline import BatchOutcome, BatchProcessor, InputMessage
from streams.table_writer import TableWriter

log = logging.getLogger("shoppulse.worker")

STATE_TABLE = "shopper_state"
ALERT_TABLE = "churn_alert_state"
#: The eviction and silent-shopper sweeps yield to the event loop after this many stored shoppers.
SWEEP_YIELD_EVERY = 500
#: The consumer stops fetching while this many micro-batches are buffered ahead of the agent.
BATCHES_BUFFERED = 2


def idle_since_ms(stored: bytes, now_ms: int) -> int:
    """How long a stored shopper has been idle (wall clock minus its latest event time), in ms.

    An undecodable state counts as idle forever: the sweep removes it rather than keep it.
    """
    try:
        return now_ms - last_event_ms_of(stored)
    except StateDecodeError:
        return now_ms


def partition_of(where: InputMessage | int) -> int:
    """The partition a message came from, or the partition number itself (sweeps)."""
    return where if isinstance(where, int) else where.partition


class ScoringWorker:
    """The Faust app, its topics, table and agent, built from :class:`Settings`."""

    def __init__(self, settings: Settings, metrics: WorkerMetrics | None = None) -> None:
        self.settings = settings
        self.profile = resolve_broker_profile(settings)
        self.metrics = metrics or WorkerMetrics()
        self.health = HealthState()
        overrides = tansu_client_overrides() if self.profile == BROKER_PROFILE_TANSU else {}
        self.batcher = MicroBatcher(settings.max_batch, settings.max_wait_ms / 1000.0,
                                    max_buffered=BATCHES_BUFFERED * settings.max_batch)
        self.app = BatchingApp(
            settings.app_id,
            batch_topics=settings.input_topics,
            batcher=self.batcher,
            broker=[f"kafka://{server.strip()}" for server in settings.bootstrap_servers.split(",")],
            **faust_client_settings(settings),
            store="rocksdb://",
            datadir=str(settings.data_dir),
            table_standby_replicas=settings.standby_replicas,
            topic_partitions=settings.partitions,
            topic_replication_factor=settings.replication_factor,
            web_enabled=False,  # our own /metrics, /healthz, /readyz server replaces it
            autodiscover=False,
            consumer_auto_offset_reset="earliest",
            **overrides,
        )
        self.inputs = self.app.topic(*settings.input_topics, partitions=settings.partitions,
                                     key_serializer="raw", value_serializer="raw")
        self.outputs: BatchProducer  # and self.tables: connect only when the worker runs
        self.tables: TableWriter
        self.table = self.app.Table(STATE_TABLE, key_type=bytes, value_type=bytes, partitions=settings.partitions,
                                    help="Per-shopper feature state (features.encoding), keyed by user_id")
        self.alert_table = self.app.Table(ALERT_TABLE, key_type=bytes, value_type=bytes, partitions=settings.partitions,
                                          help="Per-shopper churn alert state (streams.alerts), keyed by user_id")
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.scorer = BatchScorer(DEFAULT_FEATURE_SPEC, settings.models_dir, device=settings.device, top_k=settings.top_k)
        self.state_config = StateConfig(grace_ms=settings.grace_ms, history_len=settings.history_len,
                                        retention_ms=settings.retention_ms)
        self.processor = BatchProcessor(
            topic_kinds=dict(zip(settings.input_topics, ("page_view", "cart", "order"))),
            state_config=self.state_config, spec=DEFAULT_FEATURE_SPEC, scorer=self.scorer,
            limits=ValidationLimits(settings.max_event_bytes, settings.max_future_skew_ms), metrics=self.metrics,
            alert_policy=AlertPolicy(settings.churn_alert_high, settings.churn_alert_low, settings.churn_alert_cooldown_ms),
            pseudonym_key=settings.pseudonym_key.encode())
        self._served_versions: dict[str, str] = {}
        self._positions: dict[tuple[str, int], int] = {}  # last offset handed to a batch, per input partition
        self._seen_load_errors = self.scorer.load_errors
        self._connected: bool | None = None  # broker connectivity last seen by the readiness timer
        self._faust_worker: _Worker | None = None  # set by run(); _fail crashes it
        self._publish_model_info()
        self.metrics_server: MetricsServer | None = None
        self.app.agent(self.inputs, name="score_shoppers")(self._score_shoppers)
        self.app.timer(1.0)(self._refresh_readiness)
        self.app.timer(float(settings.eviction_interval_s))(self._evict_idle_shoppers)
        self.app.timer(float(settings.silent_sweep_interval_s))(self._rescore_silent_shoppers)
        self.app.on_partitions_assigned.connect(self._on_assigned)

    def _load_state(self, where: InputMessage | int, key: bytes) -> bytes | None:
        return self.tables.get(self.table, partition_of(where), key)

    def _load_alert(self, where: InputMessage | int, key: bytes) -> bytes | None:
        return self.tables.get(self.alert_table, partition_of(where), key)

    async def _owned_states(self) -> AsyncIterator[tuple[int, bytes, bytes]]:
        """``(partition, key, stored state)`` of every shopper in the partitions this worker owns,
        yielding to the event loop every :data:`SWEEP_YIELD_EVERY` keys so the event path never stalls."""
        store = self.table.data
        changelog = self.table.changelog_topic_name
        actives = {tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == changelog}
        seen = 0
        for partition, db in list(store._dbs.items()):
            if partition not in actives:
                continue
            for key, value in store._visible_items(db):
                yield partition, key, value
                seen += 1
                if seen % SWEEP_YIELD_EVERY == 0:
                    await asyncio.sleep(0)

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
        empty: the consumer hands the messages to :attr:`batcher` (:mod:`streams.batch_consumer`).
        An error no batch logic handles stops the whole worker (:meth:`_fail`).

        Two batches overlap: batch N+1 is validated, updated and scored while batch N's outputs and
        changelog records are on their way to Kafka. N+1 writes and sends nothing until N is
        delivered and acked, so acks stay in order and N's changelog flush never takes N+1's records.
        """
        consumer = self.app.consumer
        delivering: asyncio.Future[None] | None = None
        try:
            while True:
                batch = await consumer.take_batch()
                positions = self._positions
                for message in batch:
                    positions[(message.topic, message.partition)] = message.offset
                outcome = self.processor.process(batch, self._load_state, self._load_alert)
                self._observe_models()
                if delivering is not None:
                    await delivering  # the previous batch: delivered, then acked
                self._write(outcome)
                delivering = asyncio.ensure_future(self._deliver(outcome, batch, consumer))
        except Exception as exc:  # anything the batch logic did not handle stops the worker, on purpose
            await self._fail(exc, consumer)
        finally:
            if delivering is not None and not delivering.done():
                delivering.cancel()  # unacked: its messages are consumed again after the restart

    async def _fail(self, exc: Exception, consumer: BatchDrainConsumer) -> None:
        """Crash-only: stop the whole worker, exit code 1, for its supervisor to restart.

        Faust would restart the agent alone, which goes on with later batches while the failed one
        is never acked: commits stall behind it, nothing says so, and every restart replays more.
        Stopping instead leaves the failed batch uncommitted, to be consumed again after the restart.
        """
        self.health.alive = False
        unacked = consumer.forget_batches()
        log.critical("scoring stopped on %s: %s. The worker exits with code 1 for its supervisor to restart it; "
                     "its unacknowledged batches (%d) are consumed again then. If it fails the same way after every "
                     "restart, the traceback says where", type(exc).__name__, exc, unacked, exc_info=exc)
        if self._faust_worker is None:  # not started by run(): nobody to stop, so say it loudly
            raise exc
        await self._faust_worker.crash(exc)

    def _write(self, outcome: BatchOutcome) -> None:
        """Queue a batch's dead letters and write its table updates (RocksDB now, changelog queued)."""
        failed_at_ms = int(time.time() * 1000)
        for dead in outcome.dead_letters:
            value, headers = dead.record(failed_at_ms, self.settings.kafka_max_message_bytes)
            if value is not dead.message.value:
                log.warning("dead letter of %s[%d]@%d cut from %d to %d bytes to fit SHOPPULSE_KAFKA_MAX_MESSAGE_BYTES=%d; "
                            "the whole message stays in its source topic", dead.message.topic, dead.message.partition,
                            dead.message.offset, len(dead.message.value or b""), len(value or b""),
                            self.settings.kafka_max_message_bytes)
            self.outputs.send(self.settings.topic_dead_letter, dead.message.key, value, headers)
            self.metrics.dead_lettered.labels(dead.reason).inc()
            log.debug("dead-lettered %s[%d]@%d: %s", dead.message.topic, dead.message.partition,
                      dead.message.offset, dead.detail)
        put = self.tables.put
        for shopper in outcome.scored:
            partition = partition_of(shopper.last_message)
            put(self.table, partition, shopper.key, shopper.state_bytes)
            if shopper.alert_state is not None:
                put(self.alert_table, partition, shopper.key, shopper.alert_state)

    async def _deliver(self, outcome: BatchOutcome, batch: MicroBatch, consumer: BatchDrainConsumer) -> None:
        """Publish a batch's results, wait until Kafka has everything, then ack its messages."""
        await self._publish(outcome)
        consumer.ack_batch(batch)

    async def _publish(self, outcome: BatchOutcome) -> None:
        """Scores, recommendations and alerts of a batch to their topics; returns once all are
        delivered (with the batch's dead letters, queued before)."""
        scores, recommendations, alerts = (self.settings.topic_scores, self.settings.topic_recommendations,
                                           self.settings.topic_churn_alerts)
        published = {scores: 0, recommendations: 0, alerts: 0}
        send = self.outputs.send
        for shopper in outcome.scored:
            send(scores, shopper.output_key, shopper.result)
            published[scores] += 1
            if shopper.recommendation is not None:
                send(recommendations, shopper.output_key, shopper.recommendation)
                published[recommendations] += 1
            if shopper.alert is not None:
                send(alerts, shopper.output_key, shopper.alert)
                published[alerts] += 1
        await asyncio.gather(self.outputs.flush(), self.tables.flush())
        for topic, count in published.items():
            self.metrics.results_published.labels(topic).inc(count)
        delivered_s = time.time()
        for shopper in outcome.scored:
            if shopper.trigger_ts is not None:
                self.metrics.end_to_end_seconds.observe(max(0.0, delivered_s - shopper.trigger_ts / 1000.0))

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
        """Delete shoppers idle past the retention period from the table and, by tombstone, its changelog.

        Also refreshes the shoppers-in-state gauge.
        """
        now_ms = int(time.time() * 1000)
        expired: list[tuple[int, bytes]] = []
        kept = 0
        async for partition, key, value in self._owned_states():
            if idle_since_ms(value, now_ms) > self.state_config.retention_ms:
                expired.append((partition, key))
            else:
                kept += 1
        for partition, key in expired:
            self.tables.put(self.table, partition, key, None)
            self.tables.put(self.alert_table, partition, key, None)
        await self.tables.flush()
        self.metrics.shoppers_in_state.set(kept)
        self.metrics.shoppers_evicted.inc(len(expired))
        if expired:
            log.info("evicted %d shoppers idle for more than %.1f days; %d remain", len(expired),
                     self.state_config.retention_ms / 86_400_000, kept)

    async def _rescore_silent_shoppers(self) -> None:
        """Re-score shoppers idle for at least ``silent_after_ms``: their churn risk rises while
        nothing happens, and a churn alert must fire without waiting for an event that may never come.

        Runs through the same scoring path in batches of ``max_batch``, between event batches.
        """
        now_ms = int(time.time() * 1000)
        silent: list[tuple[int, bytes, bytes]] = []
        rescored = 0
        async for partition, key, value in self._owned_states():
            idle_ms = idle_since_ms(value, now_ms)
            if self.settings.silent_after_ms <= idle_ms <= self.state_config.retention_ms:
                silent.append((partition, key, value))
            if len(silent) >= self.settings.max_batch:
                rescored += await self._publish_silent(silent, now_ms)
                silent = []
        if silent:
            rescored += await self._publish_silent(silent, now_ms)
        self.metrics.silent_rescored.inc(rescored)
        if rescored:
            log.info("re-scored %d shoppers silent for at least %.1f h", rescored,
                     self.settings.silent_after_ms / 3_600_000)

    async def _publish_silent(self, silent: list[tuple[int, bytes, bytes]], now_ms: int) -> int:
        outcome = self.processor.rescore_silent(silent, self._load_alert, now_ms)
        for shopper in outcome.scored:
            if shopper.alert_state is not None:
                self.tables.put(self.alert_table, partition_of(shopper.last_message), shopper.key, shopper.alert_state)
        await self._publish(outcome)
        return len(outcome.scored)

    def _broker_connected(self) -> bool:
        """Whether the consumer holds an open connection to any broker (aiokafka drops them when it goes away)."""
        try:
            client = self.app.consumer._thread._consumer._client
        except AttributeError:  # consumer not started yet
            return False
        return any(conn.connected() for conn in list(client._conns.values()))

    async def _refresh_readiness(self) -> None:
        recovered = self.app.tables.recovery.completed.is_set()
        assigned = bool(self.app.consumer.assignment()) if self.app.consumer else False
        connected = self._broker_connected()
        if connected != self._connected:
            if connected:
                log.info("connected to the brokers at %s", self.settings.bootstrap_servers)
            elif self._connected is not None:
                log.error("lost every connection to the brokers at %s: not ready until one is back",
                          self.settings.bootstrap_servers)
            self._connected = connected
        ready = recovered and not self.app.rebalancing and assigned and connected
        self.health.ready = ready
        self.health.reason = "ready" if ready else ("broker unreachable" if not connected else
                                                    "rebalancing" if self.app.rebalancing else
                                                    "recovering tables" if not recovered else "no partitions assigned")
        self.metrics.ready.set(1 if ready else 0)
        if assigned:
            self._refresh_lag()

    def _refresh_lag(self) -> None:
        """``shoppulse_consumer_lag{topic,partition}`` for the input partitions this worker owns.

        Uses the high watermark from fetch responses (right on Tansu too, unlike ListOffsets)
        and the last offset this worker handed to a batch.
        """
        owned = set()
        for tp in self.app.consumer.assignment():
            if tp.topic not in self.settings.input_topics:
                continue
            owned.add((tp.topic, tp.partition))
            highwater = self.app.consumer.highwater(tp)
            if highwater is None:
                continue
            position = self._positions.get((tp.topic, tp.partition))
            if position is None:  # nothing handled since start: count from the committed offset
                position = self.app.consumer._committed_offset.get(tp, 0) - 1
            lag = highwater - (position + 1)
            self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, lag))
        for topic, partition in set(self._positions) - owned:  # revoked: stop reporting it
            self._positions.pop((topic, partition), None)
            try:
                self.metrics.consumer_lag.remove(topic, str(partition))
            except KeyError:
                pass

    async def _on_assigned(self, sender: Any, assigned: set[Any], **kwargs: Any) -> None:
        mine = sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned if tp.topic in self.settings.input_topics)
        log.info("assigned %d input partitions: %s", len(mine), ", ".join(mine) or "none")

    def _shorten_fetch_wait(self) -> None:
        """On Tansu, cap how long a fetch may wait for data (:data:`TANSU_FETCH_MAX_WAIT_MS`).

        Faust builds its aiokafka consumer with ``fetch_max_wait_ms=1500`` and no setting to
        change it; on Tansu that wait is paid in full whenever the worker has caught up, so
        the worker sets it on the consumer's fetcher once the consumer has started.
        """
        consumer = getattr(getattr(self.app.consumer, "_thread", None), "_consumer", None)
        fetcher = getattr(consumer, "_fetcher", None)
        if fetcher is None or not hasattr(fetcher, "_fetch_max_wait_ms"):
            log.warning("could not shorten the fetch wait on Tansu (Faust/aiokafka internals changed); "
                        "results may wait up to 1.5 s for each fetch")
            return
        fetcher._fetch_max_wait_ms = TANSU_FETCH_MAX_WAIT_MS

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
        log.info("worker started: broker %s (%s profile), inputs %s, outputs %s, micro-batch %d events / %d ms, "
                 "state in %s, models from %s", self.settings.bootstrap_servers, self.profile,
                 ", ".join(self.settings.input_topics), ", ".join(self.settings.output_topics),
                 self.settings.max_batch, self.settings.max_wait_ms, self.settings.data_dir, self.settings.models_dir)

    def run(self) -> int:
        """Create topics, start the metrics server and run the worker until SIGINT/SIGTERM."""
        ensure_topics(self.settings)
        self.outputs = BatchProducer(self.settings)
        self.tables = TableWriter(BatchProducer(self.settings, track_offsets=True),
                                  seal=self.profile == BROKER_PROFILE_TANSU)
        self.metrics_server = MetricsServer(self.metrics, self.health, self.settings.metrics_host,
                                            self.settings.metrics_port).start()
        worker = self._faust_worker = _Worker(self.app, after_start=self._on_startup_finished,
                                              loglevel=self.settings.log_level.lower().replace("warning", "warn"),
                                              logging_config=worker_logging_config(self.settings.log_level,
                                                                                   self.settings.log_format),
                                              quiet=True, redirect_stdouts=False)
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            return int(exc.code or 0)
        finally:
            self.health.alive = False
            self.outputs.close()
            self.tables.producer.close()
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
