"""Worker throughput and table recovery on the embedded broker, next to a bare loop.

Pre-produces simulated shop events into the embedded Tansu broker, then measures, in one run
and on the same broker and topics:

* the ceiling: a bare confluent-kafka loop (consume, json.loads, a dict of per-user counts,
  one produced output per event) — the "bare loop" row of ../shared/notes/performance-anchors.md —
  run just before and just after each worker run; the row gives their mean, since this machine's
  speed drifts by tens of percent within minutes (``--repeat`` runs the worker that many times);
* Faust's own floor: an agent taking micro-batches and doing nothing (bench/faust_floor.py),
  once through Faust's per-event stream (``take_events``) and once through whole fetches
  (:mod:`streams.worker.batch_consumer`, the worker's own path);
* the ShopPulse worker (``shoppulse worker``, a child process): events/s from ready to the last
  event consumed, with validation, state updates in RocksDB, scoring and publishing;
* end-to-end latency at a fixed fraction of the worker's saturation rate (``--latency-fraction``):
  live-clock events produced at that rate for ``--latency-s`` seconds, first to the worker,
  then (worker stopped, so the two never share the cores) to the bare loop, the apparatus's
  floor. The producer and the reader each run in a process of their own, and the reader and the
  bare loop fetch with a short wait (:data:`READER_FETCH_WAIT_MS`). Latency is the time from an
  output's triggering event ts to the moment the reader consumes the output, and to the output's
  own CreateTime (p50 / p99 over the outputs of that phase); for the worker, its own
  ``shoppulse_end_to_end_latency_seconds`` over the phase is given beside them;
* with ``--recovery``: time to ready after a restart with the data directory kept, and after
  losing it (every shopper restored from the changelog);
* with ``--shadow``: each repeat runs the worker twice, alternating, on the same broker and events:
  once serving the registry as it is, once with a shadow challenger for every model kind (each
  champion registered again as ``<version>-shadow``: the same model twice, so the shadow costs one
  more inference of the served size and whatever the pipeline does with it). Rows are recorded only
  if the shadow runs measured challenger outcomes (``shoppulse_live_*{variant="challenger"}``): a
  shadow path that does nothing is not a figure.

Prints the figures and appends them, with this exact command, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from bench.record import append_row, this_command, utc_now  # noqa: E402
from models.live_compare import OPPORTUNITIES, OUTCOMES  # noqa: E402
from models.live_sources import parse_exposition  # noqa: E402
from models.registry import SHADOW, ModelRegistry  # noqa: E402
from models.training import models_ready  # noqa: E402
from models.variants import CHALLENGER  # noqa: E402
from streams.config import Settings  # noqa: E402
from streams.kafka.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.kafka.clients import (  # noqa: E402
    TANSU_FETCH_MAX_WAIT_MS,
    TopicSpec,
    confluent_consumer_config,
    confluent_producer_config,
    ensure_topics,
)
from streams.kafka.producer import produce  # noqa: E402
from streams.sim.generator import GeneratorConfig, ShopSimulator  # noqa: E402
from streams.tools.process import WorkerProcess, histogram_quantile  # noqa: E402

THROUGHPUT_SECTION = "## Worker throughput (embedded broker, this machine)"
THROUGHPUT_HEADER = (
    "| date (UTC) | events | shoppers | partitions | bare loop ev/s | Faust no-op agent ev/s "
    "| worker ev/s | worker / bare | batches | mean batch | models | workers | command |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
LATENCY_SECTION = (
    "## End-to-end latency at a fixed rate, the apparatus in its own processes (embedded broker, this machine)"
)
LATENCY_HEADER = (
    "| date (UTC) | rate ev/s | share of worker saturation | seconds | worker p50 / p99 ms, read "
    "| worker p50 / p99 ms, output CreateTime | worker histogram p50 / p99 ms (bucket bound) | worker outputs "
    "| floor p50 / p99 ms, read | floor p50 / p99 ms, output CreateTime | floor outputs | models | command |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)
#: The share of the offered events the workers must have consumed for a latency phase to be at the load asked for.
KEPT_UP = 0.95
#: The fetch wait of the latency reader and of the bare loop in the latency phase, in ms. Tansu holds
#: a waiting fetch to its end however soon data arrives, so each hop of the apparatus adds up to
#: this; the worker keeps its own (TANSU_FETCH_MAX_WAIT_MS), which its figures include.
READER_FETCH_WAIT_MS = 5
RECOVERY_SECTION = "## Table recovery (embedded broker, one worker)"
RECOVERY_HEADER = (
    "| date (UTC) | shoppers in table | ready, data dir kept (s) | ready, data dir lost (s) "
    "| command |\n|---|---|---|---|---|"
)


def simulated_messages(events: int, shoppers: int, days: float, seed: int) -> list:
    """``events`` generated messages whose event times end at now (the worker rejects future ts)."""
    config = GeneratorConfig(seed=seed, n_shoppers=shoppers, duration_days=days)
    config = dataclasses.replace(config, start_ms=int(time.time() * 1000) - config.span_ms - 60_000)
    return list(ShopSimulator(config).messages(limit=events))


def bench_settings(broker: EmbeddedBroker, partitions: int, workdir: Path, models: str, **overrides: Any) -> Settings:
    """A benchmark worker's settings: the embedded broker, a data dir under ``workdir``, a free
    metrics port, warnings only, the model registry at ``models``."""
    return Settings.from_env(
        {},
        bootstrap_servers=broker.bootstrap_servers,
        partitions=partitions,
        data_dir=workdir / "worker",
        metrics_port=free_port(),
        log_level="WARNING",
        models_dir=Path(models).resolve(),
        **overrides,
    )


def bare_loop(
    settings: Settings,
    total: int | None,
    group: str,
    stop: Any = None,
    ready: Any = None,
    offset_reset: str = "earliest",
    fetch_wait_ms: int = TANSU_FETCH_MAX_WAIT_MS,
) -> float:
    """events/s of consume → parse → dict state → produce, the ceiling for this broker and machine.

    Runs until ``total`` events (or, with ``total=None``, until the ``stop`` event is set); sets
    the ``ready`` event once it holds its partitions. The output carries the event's ts as
    ``trigger_ts`` for the latency phase.
    """
    consumer = Consumer(
        {
            **confluent_consumer_config(settings, group),
            "auto.offset.reset": offset_reset,
            "enable.auto.commit": True,
            "session.timeout.ms": 6000,
            "fetch.wait.max.ms": fetch_wait_ms,  # by default the worker's setting on Tansu
        }
    )
    producer = Producer({**confluent_producer_config(settings), "linger.ms": 5, "partitioner": "murmur2_random"})
    consumer.subscribe(list(settings.input_topics))
    counts: dict[bytes | None, dict[str, int]] = {}
    seen = 0
    started = None
    output = settings.topic_scores + ".bare"
    while (seen < total) if total is not None else not stop.is_set():
        batch = consumer.consume(1000, timeout=0.05 if total is None else 1.0)
        if ready is not None and not ready.is_set() and consumer.assignment():
            ready.set()
        for message in batch:
            if message.error():
                continue
            if started is None:
                started = time.perf_counter()
            seen += 1
            raw, topic = message.value(), message.topic()
            assert raw is not None and topic is not None  # consumed from the input topics: JSON events
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            user = counts.setdefault(message.key(), {})
            user[topic] = user.get(topic, 0) + 1
            value = json.dumps({"user_id": doc.get("user_id"), "trigger_ts": doc.get("ts"), "counts": user}).encode()
            while True:
                try:
                    producer.produce(output, value, message.key())
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
    producer.flush()
    elapsed = time.perf_counter() - (started or time.perf_counter())
    consumer.close()
    return seen / elapsed if elapsed > 0 else 0.0


def _bare_loop_until_stopped(settings: Settings, stop: Any, ready: Any) -> None:
    """The bare loop for the latency phase: a fresh group that starts at the end of the inputs, with
    the reader's short fetch wait (the apparatus's floor, not Tansu's idle wait)."""
    bare_loop(
        settings,
        None,
        f"bare-latency-{time.time_ns()}",
        stop,
        ready,
        offset_reset="latest",
        fetch_wait_ms=READER_FETCH_WAIT_MS,
    )


def _read_output_latencies(settings: Settings, topic: str, since_ms: int, ready: Any, until: Any, results: Any) -> None:
    """The latency reader, in its own process (sharing no GIL with the producer or a worker).

    For each output on ``topic`` triggered by an event at or after ``since_ms``, records two delays
    from that event's ts: to the moment this reader consumes the output, and to the output's own
    CreateTime (stamped by the producer that wrote it, so no reader delay at all). Starts near the
    end of the topic (Tansu's reported end can be a little early: the ``since_ms`` filter drops what
    precedes), reads until ``until`` is set and the topic is drained, then sends both lists to ``results``.
    """
    consumer = Consumer(
        {
            **confluent_consumer_config(settings, f"latency-{time.time_ns()}"),
            "enable.auto.commit": False,
            "fetch.wait.max.ms": READER_FETCH_WAIT_MS,
        }
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    starts = [
        TopicPartition(topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1])
        for p in partitions
    ]
    consumer.assign(starts)
    ready.set()
    received: list[float] = []
    created: list[float] = []
    idle_since = None
    while True:
        batch = consumer.consume(1000, timeout=0.01)
        now_ms = time.time() * 1000
        for message in batch:
            value = message.value()
            if message.error() or value is None:
                continue
            trigger_ts = json.loads(value).get("trigger_ts")
            if trigger_ts is not None and trigger_ts >= since_ms:
                received.append(now_ms - trigger_ts)
                created.append(message.timestamp()[1] - trigger_ts)
        if until.is_set():
            idle_since = idle_since or time.monotonic()
            if batch:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > 3.0:
                break
    consumer.close()
    results.send((received, created))


def produce_live(
    config: GeneratorConfig, total: int, settings: Settings, rate_per_s: float, delivered: Synchronized | None = None
) -> None:
    """Produce ``total`` live-clock events at ``rate_per_s`` (the load; runs in a child process);
    sets ``delivered`` to how many the broker acknowledged."""
    messages = ShopSimulator(config).messages(limit=total)
    report = produce(messages, settings.topic_by_kind, confluent_producer_config(settings), rate_per_s)
    if report.failed:
        print(f"  the load producer: {report.failed:,} of {report.sent:,} not delivered ({report.errors})", flush=True)
    if delivered is not None:
        delivered.value = report.delivered


def consumed_by(workers: list[WorkerProcess]) -> float:
    """Events the workers consumed so far, between them."""
    return sum(worker.metric("shoppulse_events_consumed_total") for worker in workers)


def live_saturation(
    workers: list[WorkerProcess], settings: Settings, config: GeneratorConfig, backlog_rate: float, seconds: float
) -> float:
    """Events/s the workers consume of live-clock events while they are behind them: the rate a load
    is a share of. Offers 1.3x ``backlog_rate`` (the pre-produced backlog's rate, which overstated
    the live one about 2x at 20k shoppers: live events come through a producer and a broker that
    share the workers' cores here) for ``seconds``, measures from the second second on, and
    returns once the workers have caught up again."""
    total = int(1.3 * backlog_rate * seconds)
    start = consumed_by(workers)
    delivered = multiprocessing.Value("q", 0)
    producer = multiprocessing.Process(
        target=produce_live, args=(config, total, settings, 1.3 * backlog_rate, delivered)
    )
    producer.start()
    deadline = time.monotonic() + 300
    while consumed_by(workers) <= start:  # the simulator sets up its shoppers first (minutes at 260k)
        if time.monotonic() > deadline or not producer.is_alive():
            raise RuntimeError("the workers consumed none of the live events offered to measure their saturation")
        time.sleep(0.1)
    time.sleep(1.0)  # the lag builds up
    first, first_at = consumed_by(workers), time.perf_counter()
    time.sleep(seconds - 1.0)
    rate = (consumed_by(workers) - first) / (time.perf_counter() - first_at)
    producer.join()
    wait_consumed(workers, start + delivered.value)
    return rate


def paced_latency(
    settings: Settings, topic: str, rate: float, seconds: float, config: GeneratorConfig
) -> tuple[list[float], list[float]]:
    """Produce live-clock events of ``config`` at ``rate``/s for ``seconds`` (one process) while
    another reads ``topic``; returns the outputs' latencies in ms, as read and by their CreateTime."""
    since_ms = int(time.time() * 1000)
    ready, done = multiprocessing.Event(), multiprocessing.Event()
    results, sender = multiprocessing.Pipe(duplex=False)
    reader = multiprocessing.Process(
        target=_read_output_latencies, args=(settings, topic, since_ms, ready, done, sender), daemon=True
    )
    reader.start()
    if not ready.wait(60):
        raise RuntimeError(f"the latency reader could not position itself on {topic} within 60 s")
    producer = multiprocessing.Process(target=produce_live, args=(config, int(rate * seconds), settings, rate))
    producer.start()
    producer.join()
    done.set()
    if not results.poll(120):
        raise RuntimeError(f"the latency reader of {topic} sent nothing within 120 s of the last event")
    received, created = results.recv()
    reader.join(10)
    return received, created


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else float("nan")


def faust_floor(settings: Settings, total: int, batch_drain: bool) -> float:
    """events/s of a Faust agent that takes micro-batches and does nothing (a child process)."""
    command = [
        sys.executable,
        str(REPO / "bench" / "faust_floor.py"),
        "--bootstrap",
        settings.bootstrap_servers,
        "--topics",
        ",".join(settings.input_topics),
        "--events",
        str(total),
        "--partitions",
        str(settings.partitions),
    ] + (["--batch-drain"] if batch_drain else [])
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    rates = re.findall(r"(\d+)\s*$", done.stdout, re.MULTILINE)  # the line may carry terminal escapes
    if not rates:
        raise RuntimeError(f"faust_floor.py printed no rate:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return float(rates[-1])


def git_revision(checkout: Path) -> str:
    """The short commit a checkout is at."""
    return subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def wait_consumed(workers: list[WorkerProcess], total: float) -> None:
    """Until ``workers`` have consumed ``total`` events between them (``shoppulse_events_consumed_total``);
    raises with its log's tail if one dies first."""
    while consumed_by(workers) < total:
        for worker in workers:
            if worker.process.poll() is not None:
                raise RuntimeError(f"worker died:\n{worker.log_tail()}")
        time.sleep(0.2)


def run_workers(
    settings: Settings, total: int, workdir: Path, count: int, checkout: Path | None = None
) -> tuple[float, float, float, list[WorkerProcess]]:
    """(events/s, batches, mean batch size) of ``count`` workers in one group, from all ready to
    the last event consumed, counting only the events consumed in that time (a worker starts
    consuming the pre-produced events before it reports ready); the workers keep running.
    Prints where the workers' time went.
    ``checkout``: another checkout whose worker code to run (see :class:`WorkerProcess`)."""
    workers = [
        WorkerProcess(
            dataclasses.replace(
                settings,
                data_dir=workdir / f"worker-{n}",
                metrics_port=settings.metrics_port if n == 0 else free_port(),
            ),
            workdir / f"worker-{n}.log",
            checkout,
        )
        for n in range(count)
    ]
    for worker in workers:
        worker.wait_ready(120)
    cpu_before = sum(worker.cpu_seconds() for worker in workers)
    started = time.perf_counter()
    measured = total - consumed_by(workers)
    if measured < total / 2:
        raise RuntimeError(
            f"{total - measured:,.0f} of {total:,} events were consumed before the workers were ready; "
            "pre-produce more (--events) for a measurement"
        )
    wait_consumed(workers, total)
    elapsed = time.perf_counter() - started
    cpu_us = (sum(worker.cpu_seconds() for worker in workers) - cpu_before) / measured * 1e6
    batches = sum(worker.metric("shoppulse_batch_size_count") for worker in workers)
    processing_s = sum(worker.metric("shoppulse_batch_processing_seconds_sum") for worker in workers)
    models_s = sum(worker.metric("shoppulse_inference_seconds_sum") for worker in workers)
    scored_per_event = sum(worker.metric("shoppulse_shoppers_per_batch_sum") for worker in workers) / total
    print(
        f"  worker CPU {cpu_us:.1f} µs per event (all threads); in BatchProcessor.process "
        f"{processing_s / total * 1e6:.1f} µs per event, of which the models {models_s / total * 1e6:.1f}; "
        f"{total - measured:,.0f} events consumed before ready, not counted",
        flush=True,
    )
    print(
        f"  {scored_per_event * total / max(batches, 1):,.0f} shoppers scored per batch on average "
        f"({scored_per_event:.2f} per event): {cpu_us / max(scored_per_event, 1e-9):.0f} µs of worker CPU "
        "per shopper scored",
        flush=True,
    )
    return measured / elapsed, batches, total / max(batches, 1), workers


def shadow_registry(models: Path, workdir: Path) -> Path:
    """A copy of the registry ``models`` where each champion is also its own shadow challenger
    (registered again as ``<version>-shadow``)."""
    root = workdir / "shadow-registry"
    shutil.copytree(models, root)
    registry = ModelRegistry(root)
    for info in registry.list_models():
        if info.current is not None:
            version = registry.register(
                info.name, registry.version_dir(info.name, info.current), version=f"{info.current}-shadow"
            )
            registry.set_challenger(info.name, version, SHADOW)
    return root


def challenger_outcomes(workers: list[WorkerProcess]) -> float:
    """Resolved outcomes the workers counted for challengers (recommendation lists and scores)."""
    return sum(
        value
        for worker in workers
        for name, labels, value in parse_exposition(worker.metrics_text())
        if labels.get("variant") == CHALLENGER and name in (OPPORTUNITIES, OUTCOMES)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--shoppers", type=int, default=20_000)
    parser.add_argument("--days", type=float, default=28.0, help="simulated span (shorter: more shoppers early)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument(
        "--models", default="artifacts/models", help="model registry the worker serves (empty: the heuristic)"
    )
    parser.add_argument("--workers", type=int, default=1, help="workers in one consumer group")
    parser.add_argument("--device", default="auto", help="where the worker runs its models: auto, cpu or cuda")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=Settings.torch_threads,
        help="the worker's torch CPU threads (0: torch's default, one per core)",
    )
    parser.add_argument(
        "--standby-replicas",
        type=int,
        default=Settings.standby_replicas,
        help="warm table copies on other workers (SHOPPULSE_STANDBY_REPLICAS; matters with --workers 2+)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="worker runs, each a fresh group between two bare-loop runs (the machine's speed drifts)",
    )
    parser.add_argument(
        "--compare-with",
        type=Path,
        default=None,
        metavar="CHECKOUT",
        help="another checkout of this repository (git worktree add DIR REV): each repeat also runs "
        "its worker, alternating with this one, on the same broker and events (no latency or "
        "recovery phase then)",
    )
    parser.add_argument(
        "--compare-models",
        default=None,
        help="model registry the --compare-with checkout's worker serves (default: --models); for a revision "
        "that reads another artifact format, a registry of the same models in that format",
    )
    parser.add_argument(
        "--shadow",
        action="store_true",
        help="each repeat also runs the worker with a shadow challenger for every model (the champion "
        "registered twice), alternating with the plain one, on the same broker and events (no latency or "
        "recovery phase then)",
    )
    parser.add_argument("--recovery", action="store_true", help="also measure restart and restore times")
    parser.add_argument(
        "--latency-fraction",
        type=float,
        default=0.5,
        help="latency phase rate as a share of the measured worker saturation (0: skip)",
    )
    parser.add_argument("--latency-s", type=float, default=20.0, help="length of each latency phase, in s")
    parser.add_argument(
        "--saturation-s",
        type=float,
        default=10.0,
        help="length of the phase that measures the saturation rate for live events (before the latency phases)",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=int,
        default=Settings.max_wait_ms,
        help="the workers' SHOPPULSE_MAX_WAIT_MS: longest wait for a micro-batch to fill (0: take what is there)",
    )
    parser.add_argument("--no-record", action="store_true", help="print only; do not touch BENCHMARKS.md")
    args = parser.parse_args()
    if args.shadow and args.compare_with is not None:
        parser.error("--shadow and --compare-with each alternate two workers; run them separately")
    if args.shadow and not models_ready(args.models):
        parser.error(
            f"--shadow needs trained models in {args.models} (`shoppulse train`): the heuristic has no challenger"
        )

    workdir = Path(tempfile.mkdtemp(prefix="shoppulse-bench-"))
    try:
        measure(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def measure(args: argparse.Namespace, workdir: Path) -> None:
    models = f"{'trained' if models_ready(args.models) else 'heuristic'} on {args.device}"
    print(f"generating {args.events:,} events from {args.shoppers:,} shoppers …", flush=True)
    messages = simulated_messages(args.events, args.shoppers, args.days, args.seed)
    with EmbeddedBroker(log_path=workdir / "tansu.log") as broker:
        settings = bench_settings(
            broker,
            args.partitions,
            workdir,
            args.models,
            device=args.device,
            torch_threads=args.torch_threads,
            standby_replicas=args.standby_replicas,
            max_wait_ms=args.max_wait_ms,
        )
        ensure_topics(settings)
        ensure_topics(settings, [TopicSpec(settings.topic_scores + ".bare", args.partitions, {})])
        report = produce(messages, settings.topic_by_kind, confluent_producer_config(settings))
        print(f"pre-produced {report.delivered:,} messages in {report.seconds:.1f} s", flush=True)

        per_event = faust_floor(settings, len(messages), batch_drain=False)
        print(f"Faust no-op agent:         {per_event:,.0f} events/s (per-event stream, take_events)", flush=True)
        whole_fetch = faust_floor(settings, len(messages), batch_drain=True)
        print(f"Faust no-op agent:         {whole_fetch:,.0f} events/s (whole fetches, the worker's path)", flush=True)
        # (checkout whose worker runs or None for this one, its registry or None for --models, label)
        arms: list[tuple[Path | None, str | Path | None, str]] = [(None, None, "this checkout")]
        if args.compare_with is not None:
            code = f"code of {git_revision(args.compare_with)}"
            arms.insert(0, (args.compare_with.resolve(), args.compare_models, code))
        if args.shadow:
            shadow = shadow_registry(Path(args.models), workdir)
            arms = [(None, shadow, "shadow challenger"), (None, None, "no challenger")]
        rows: list[str] = []
        shadow_measured: list[float] = []
        workers: list[WorkerProcess] = []
        runs = 0
        for attempt in range(1, args.repeat + 1):
            for checkout, registry, code in arms if attempt % 2 else arms[::-1]:
                for worker in workers:
                    worker.stop()
                runs += 1
                # Each run is a fresh consumer group with empty tables: the same work from the first event.
                run_settings = (
                    dataclasses.replace(settings, app_id=f"{settings.app_id}-{runs}") if runs > 1 else settings
                )
                if registry is not None:
                    run_settings = dataclasses.replace(run_settings, models_dir=Path(registry).resolve())
                run_dir = workdir / f"run-{runs}"
                run_dir.mkdir()
                cpu_s = time.process_time()
                before = bare_loop(settings, len(messages), f"bare-{time.time_ns()}")
                print(
                    f"  bare loop CPU {(time.process_time() - cpu_s) / len(messages) * 1e6:.1f} µs per event",
                    flush=True,
                )
                worker_rate, batches, mean_batch, workers = run_workers(
                    run_settings, len(messages), run_dir, args.workers, checkout
                )
                peak_rss_mib = max(worker.memory_bytes("VmHWM") for worker in workers) / 2**20
                after = bare_loop(settings, len(messages), f"bare-{time.time_ns()}")  # the workers idle, caught up
                bare = (before + after) / 2
                print(
                    f"bare confluent-kafka loop: {before:,.0f} before, {after:,.0f} after the worker events/s",
                    flush=True,
                )
                print(
                    f"shoppulse worker x{args.workers} ({code}): {worker_rate:,.0f} events/s "
                    f"({worker_rate / bare:.2f} of "
                    f"the bare loop; {batches:.0f} batches of {mean_batch:.0f} events on average; "
                    f"peak RSS {peak_rss_mib:,.0f} MiB, the largest of one worker)",
                    flush=True,
                )
                if args.shadow and registry is not None:
                    shadow_measured.append(challenger_outcomes(workers))
                    print(f"  shadow challengers: {shadow_measured[-1]:,.0f} resolved outcomes counted", flush=True)
                rows.append(
                    f"| {utc_now()} | {len(messages):,} | {args.shoppers:,} | {args.partitions} | {bare:,.0f} | "
                    f"{per_event:,.0f} per event / {whole_fetch:,.0f} whole fetches | {worker_rate:,.0f} "
                    f"| {worker_rate / bare:.2f} | {batches:.0f} | "
                    f"{mean_batch:.0f} | {models}{'' if len(arms) == 1 else ', ' + code} | "
                    f"{args.workers} (peak RSS {peak_rss_mib:,.0f} MiB) | `{this_command()}` |"
                )

        if args.shadow and not all(shadow_measured):
            print(
                "NOT RECORDED: a shadow run counted no challenger outcomes, so this checkout's pipeline does not "
                "run the shadow challenger and the comparison would measure nothing",
                flush=True,
            )
        elif not args.no_record:
            for row in rows:
                append_row(THROUGHPUT_SECTION, THROUGHPUT_HEADER, row)
        if len(arms) > 1:  # the last run may have been the other arm's
            for worker in workers:
                worker.stop()
            print("latency and recovery phases skipped: they measure this checkout alone", flush=True)
            return
        if args.latency_fraction > 0:
            measure_latency(args, settings, worker_rate, workers, models)
        for worker in workers[1:]:
            worker.stop()
        worker = workers[0]
        if args.recovery:
            worker.stop()
            kept = WorkerProcess(worker.settings, workdir / "worker-kept.log")
            kept_s = kept.wait_ready(300)
            kept.stop()
            shutil.rmtree(worker.settings.data_dir)
            lost = WorkerProcess(worker.settings, workdir / "worker-lost.log")
            lost_s = lost.wait_ready(600)
            lost.stop()
            shoppers = len({m.key for m in messages})
            print(
                f"ready after restart: {kept_s:.1f} s with the data dir kept, {lost_s:.1f} s after losing it "
                f"({shoppers:,} shoppers restored from the changelog)",
                flush=True,
            )
            if not args.no_record:
                append_row(
                    RECOVERY_SECTION,
                    RECOVERY_HEADER,
                    f"| {utc_now()} | {shoppers:,} | {kept_s:.1f} | {lost_s:.1f} | `{this_command()}` |",
                )
        else:
            worker.stop()


def histogram_delta(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The cumulative buckets of what a histogram observed between two scrapes."""
    counted = dict(before)
    return [(le, count - counted.get(le, 0.0)) for le, count in after]


def p50_p99(values: list[float]) -> str:
    return f"{percentile(values, 50):,.1f} / {percentile(values, 99):,.1f}"


def measure_latency(
    args: argparse.Namespace, settings: Settings, worker_rate: float, workers: list[WorkerProcess], models: str
) -> None:
    """Latency at ``latency_fraction`` of the workers' saturation rate for live events: the running
    workers, then (workers stopped: a worker still scoring starved the bare loop to 3-4 s) the bare
    loop, the floor.

    The saturation rate is measured first, with live-clock events offered faster than the workers
    take them (:func:`live_saturation`); ``worker_rate``, the backlog's rate, overstates it. The
    producer and the reader each run in their own process; the reader records each output's delay
    from its trigger event both when it reads it and by the output's CreateTime. For the workers,
    their own ``shoppulse_end_to_end_latency_seconds`` over the phase is reported beside them, with
    the parts they spend themselves (batch processing, commit) and the phase's mean batch size.
    """
    saturating = GeneratorConfig(seed=args.seed + 3, n_shoppers=args.shoppers, clock="live")
    saturation = live_saturation(workers, settings, saturating, worker_rate, args.saturation_s)
    rate = args.latency_fraction * saturation
    print(
        f"latency phase: {rate:,.0f} events/s ({args.latency_fraction:.2f} of {saturation:,.0f} live events/s "
        f"at saturation; {worker_rate:,.0f} of the backlog) for {args.latency_s:.0f} s each …",
        flush=True,
    )
    consumed_before = consumed_by(workers)
    # the worker's own view: end to end, and the two parts of it the worker spends itself
    parts = {
        "": "shoppulse_end_to_end_latency_seconds",
        "processing ": "shoppulse_batch_processing_seconds",
        "commit ": "shoppulse_commit_seconds",
    }
    before = {name: [worker.histogram(name) for worker in workers] for name in parts.values()}
    batches_before = [
        (worker.metric("shoppulse_batch_size_sum"), worker.metric("shoppulse_batch_size_count")) for worker in workers
    ]
    live = GeneratorConfig(seed=args.seed + 1, n_shoppers=args.shoppers, clock="live")
    worker_read, worker_created = paced_latency(settings, settings.topic_scores, rate, args.latency_s, live)
    # by the time the reader has every output: below KEPT_UP, the workers fell behind the load
    kept_up = (consumed_by(workers) - consumed_before) / int(rate * args.latency_s)
    quantiles = []
    for label, name in parts.items():
        observed = [histogram_delta(b, worker.histogram(name)) for b, worker in zip(before[name], workers, strict=True)]
        merged = [(le, sum(buckets[i][1] for buckets in observed)) for i, (le, _) in enumerate(observed[0])]
        quantiles.append(
            f"{label}{histogram_quantile(merged, 0.5) * 1000:,.0f} / {histogram_quantile(merged, 0.99) * 1000:,.0f}"
        )
    events = sum(worker.metric("shoppulse_batch_size_sum") for worker in workers) - sum(n for n, _ in batches_before)
    batches = sum(worker.metric("shoppulse_batch_size_count") for worker in workers) - sum(c for _, c in batches_before)
    worker_histogram = f"{'; '.join(quantiles)}; {events / max(batches, 1):,.0f} events per batch"
    for worker in workers:
        worker.stop()
    stop, ready = multiprocessing.Event(), multiprocessing.Event()
    bare_process = multiprocessing.Process(target=_bare_loop_until_stopped, args=(settings, stop, ready))
    bare_process.start()
    if not ready.wait(60):
        raise RuntimeError("the bare loop got no partitions within 60 s")
    time.sleep(1.0)  # its first fetch positions it at the end of each partition
    bare_live = GeneratorConfig(seed=args.seed + 2, n_shoppers=args.shoppers, clock="live")
    bare_read, bare_created = paced_latency(settings, settings.topic_scores + ".bare", rate, args.latency_s, bare_live)
    stop.set()
    bare_process.join(30)
    verdict = f"the workers consumed {kept_up:.0%} of the offered events" + (
        "" if kept_up >= KEPT_UP else ": behind the load, not the share of saturation asked for"
    )
    print(
        f"worker p50/p99 {p50_p99(worker_read)} ms read, {p50_p99(worker_created)} ms by output CreateTime, "
        f"its own histograms (bucket bounds, ms): end to end {worker_histogram}, over {len(worker_read):,} outputs; "
        f"{verdict}; floor (bare loop) {p50_p99(bare_read)} ms read, {p50_p99(bare_created)} ms by CreateTime, "
        f"over {len(bare_read):,} (goal: floor p99 <= 20 ms)",
        flush=True,
    )
    if not args.no_record:
        share = f"{args.latency_fraction:.2f} of {saturation:,.0f} live ({kept_up:.0%} consumed)"
        append_row(
            LATENCY_SECTION,
            LATENCY_HEADER,
            f"| {utc_now()} | {rate:,.0f} | {share} | {args.latency_s:.0f} | "
            f"{p50_p99(worker_read)} | {p50_p99(worker_created)} | {worker_histogram} | {len(worker_read):,} | "
            f"{p50_p99(bare_read)} | {p50_p99(bare_created)} | {len(bare_read):,} | {models} | `{this_command()}` |",
        )


if __name__ == "__main__":
    main()
