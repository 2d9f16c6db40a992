"""``make demo``: the embedded broker, a worker and the generator, with a live view.

Everything runs on this machine: Tansu on a free 127.0.0.1 port, the worker as a child
process (exactly what ``shoppulse worker`` runs), the generator in a thread at a fixed rate.
It prints the worker's console URL first (``/console``: the same figures, alerts and a shopper
lookup in a browser). Every second it prints events in, results out and dead letters; every few
seconds an example result. Ctrl-C, SIGTERM or ``--duration`` stops everything and leaves no process behind.

``--archive`` also runs ``shoppulse archive`` (in a thread) into ``var/demo/archive``, and
``--clock simulated`` stamps the traffic with the simulated shop's compressed time (28 days
ending now) instead of the wall clock, so the archive holds weeks of history after minutes and
``shoppulse retrain --archive var/demo/archive --quick`` has enough to learn from.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shutil
import sys
import threading
import time
from pathlib import Path

from streams.config import Settings
from streams.kafka.broker import EmbeddedBroker, free_port
from streams.kafka.clients import consume_data, ensure_topics
from streams.tools.process import WorkerProcess, stop_on_signals
from streams.tools.tail import output_consumer

DEMO_DIR = Path("var/demo")
#: The demo's archive: a new broker starts its offsets at 0, so each demo archives afresh.
DEMO_ARCHIVE = DEMO_DIR / "archive"
#: Share of deliberately malformed events, so the dead-letter path shows up in the demo.
DEMO_MALFORMED_FRACTION = 0.005
#: Simulated shop behind the live traffic. Many shoppers make many concurrent sessions (as in a
#: real shop at thousands of events/s); 28 days of 50k shoppers is ~3M events, 27 min at 2,000/s.
DEMO_SHOPPERS = 50_000
#: Shoppers in the simulated history the demo's first-run models are trained on.
DEMO_TRAIN_SHOPPERS = 2_000
#: Seconds between example output lines in the live view.
DEMO_EXAMPLE_EVERY_S = 5.0
DEMO_SIMULATED_DAYS = 28.0


class _Generator(threading.Thread):
    """Produces simulated traffic at a rate until stopped; counts what it handed over."""

    def __init__(self, settings: Settings, rate_per_s: float, seed: int, clock: str = "live") -> None:
        super().__init__(name="demo-generator", daemon=True)
        self.settings, self.rate_per_s, self.seed, self.clock = settings, rate_per_s, seed, clock
        self.stop_event = threading.Event()
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        from streams.kafka.clients import confluent_producer_config
        from streams.kafka.producer import produce
        from streams.sim.generator import GeneratorConfig, ShopSimulator

        config = GeneratorConfig(
            seed=self.seed,
            malformed_fraction=DEMO_MALFORMED_FRACTION,
            clock="live" if self.clock == "live" else "simulated",
            n_shoppers=DEMO_SHOPPERS,
            duration_days=DEMO_SIMULATED_DAYS,
        )
        if self.clock != "live":  # end the simulated span at now: the worker rejects future event times
            config = dataclasses.replace(config, start_ms=int(time.time() * 1000) - config.span_ms)
        messages = itertools.takewhile(lambda _: not self.stop_event.is_set(), ShopSimulator(config).messages())

        def counted():
            for message in messages:
                self.sent += 1
                yield message

        try:
            produce(
                counted(),
                self.settings.topic_by_kind,
                confluent_producer_config(self.settings),
                rate_per_s=self.rate_per_s,
                progress=False,
            )
        except BaseException as exc:  # shown by the main thread
            self.error = exc


def console_url(settings: Settings) -> str:
    """Where a browser on this machine finds the worker's console (a wildcard bind is reached on loopback)."""
    host = "127.0.0.1" if settings.metrics_host in ("", "0.0.0.0", "::") else settings.metrics_host
    return f"http://{host}:{settings.metrics_port}/console"


class _ArchiverThread(threading.Thread):
    """``shoppulse archive`` over the demo's topics into :data:`DEMO_ARCHIVE`, until stopped."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="demo-archive", daemon=True)
        from streams.tools.archive import Archiver

        self.stop_event = threading.Event()
        self.archiver = Archiver(
            settings, DEMO_ARCHIVE, settings.archive_flush_events, settings.archive_flush_interval_s, 0
        )
        self.summary = "archive: not started"

    def run(self) -> None:
        try:
            self.summary = self.archiver.run(self.stop_event).line()
        except BaseException as exc:  # shown when the demo ends
            self.summary = f"archive failed: {exc}"


def ensure_models(settings: Settings) -> None:
    """Train small models on simulated traffic when the registry has none (first run: ~20 s)."""
    from models.training import models_ready
    from streams.tools.cli import main as cli_main

    if models_ready(settings.models_dir):
        print(f"models: using the current versions in {settings.models_dir} (`shoppulse models list`)", flush=True)
        return
    print(
        f"models: none in {settings.models_dir} yet; training small ones on {DEMO_TRAIN_SHOPPERS:,} simulated "
        "shoppers (first run only) …",
        flush=True,
    )
    started = time.monotonic()
    code = cli_main(
        [
            "train",
            "--simulate",
            str(DEMO_TRAIN_SHOPPERS),
            "--quick",
            "--no-progress",
            "--registry",
            str(settings.models_dir),
            "--report",
            str(DEMO_DIR / "training-report"),
        ]
    )
    if code != 0:
        raise RuntimeError(f"training the demo models failed (exit {code}); see the output above")
    print(
        f"models: trained in {time.monotonic() - started:.0f} s; report in {DEMO_DIR / 'training-report'}", flush=True
    )


def run_demo(
    settings: Settings,
    duration_s: float = 0,
    rate_per_s: float = 2000,
    seed: int = 7,
    archive: bool = False,
    clock: str = "live",
) -> int:
    """Run the demo until Ctrl-C, SIGTERM or ``duration_s`` seconds (0 = no limit); with ``archive``
    the archiver runs too, writing :data:`DEMO_ARCHIVE`."""
    started = time.monotonic()
    # The console's address comes first, so it can be opened while the models train and the worker starts.
    settings = dataclasses.replace(settings, metrics_port=settings.metrics_port or free_port())
    print(f"console  {console_url(settings)}  (live; it answers once the worker is up)", flush=True)
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir(parents=True)
    stop = stop_on_signals()

    ensure_models(settings)
    print("ShopPulse demo: starting the embedded broker, a worker and the generator …", flush=True)
    broker = EmbeddedBroker(log_path=DEMO_DIR / "broker.log").start()
    worker = None
    generator = None
    consumer = None
    archiver: _ArchiverThread | None = None
    try:
        settings = dataclasses.replace(
            settings,
            bootstrap_servers=broker.bootstrap_servers,
            data_dir=DEMO_DIR / "worker",
        )
        ensure_topics(settings)
        worker = WorkerProcess(settings, DEMO_DIR / "worker.log")
        if archive:
            archiver = _ArchiverThread(settings)
            archiver.start()
        generator = _Generator(settings, rate_per_s, seed, clock)
        generator.start()
        consumer = output_consumer(settings, list(settings.output_topics), from_beginning=True, name="demo")
        print(f"  broker   {broker.bootstrap_servers} (Tansu, in memory; log {DEMO_DIR / 'broker.log'})")
        print(f"  worker   pid {worker.pid}, log {DEMO_DIR / 'worker.log'}")
        print(f"  console  {console_url(settings)}")
        print(f"  metrics  http://{settings.metrics_host}:{settings.metrics_port}/metrics  (/healthz, /readyz)")
        print(f"  topics   in: {', '.join(settings.input_topics)}  out: {', '.join(settings.output_topics)}")
        print(
            f"  traffic  {rate_per_s:,.0f} events/s, {DEMO_MALFORMED_FRACTION:.1%} deliberately malformed; "
            "Ctrl-C stops",
            flush=True,
        )
        if archiver is not None:
            print(f"  archive  {DEMO_ARCHIVE} (then: shoppulse retrain --archive {DEMO_ARCHIVE} --quick)", flush=True)
        return _watch(settings, consumer, generator, worker, stop, started, duration_s)
    finally:
        if generator is not None:
            generator.stop_event.set()
            generator.join(timeout=10)
        if archiver is not None:
            archiver.stop_event.set()
            archiver.join(timeout=60)
            print(archiver.summary, flush=True)
        if consumer is not None:
            consumer.close()
        if worker is not None:
            code = worker.stop()
            print(f"worker stopped (exit code {code})")
        broker.stop()
        print("broker stopped; demo over.", flush=True)


def _describe(topic_kind: str, doc: dict) -> str:
    """One line for an example output message."""
    if topic_kind == "scores":
        return f"scores   user {doc['user_id']}: {doc['scores']}"
    if topic_kind == "recommendations":
        items = ", ".join(item["item_id"] for item in doc["items"][:5])
        return f"next     user {doc['user_id']}: {items} …"
    reasons = ", ".join(reason["feature"] for reason in doc["reasons"])
    return f"ALERT    user {doc['user_id']}: churn risk {doc['churn_risk']:.2f} (because of {reasons or 'n/a'})"


def _watch(
    settings: Settings,
    consumer,
    generator: _Generator,
    worker: WorkerProcess,
    stop: threading.Event,
    started: float,
    duration_s: float,
) -> int:
    kinds = {
        settings.topic_scores: "scores",
        settings.topic_recommendations: "recommendations",
        settings.topic_churn_alerts: "alerts",
        settings.topic_dead_letter: "dead letters",
        settings.topic_erasures: "erasures",
    }
    totals = dict.fromkeys(kinds.values(), 0)
    examples: dict[str, bytes] = {}
    first_result_s: float | None = None
    last_tick = last_example = time.monotonic()
    last_sent = last_results = 0
    while not stop.is_set():
        now = time.monotonic()
        if duration_s and now - started >= duration_s:
            break
        if worker.process.poll() is not None:
            print(
                f"the worker exited with code {worker.process.returncode}; see {DEMO_DIR / 'worker.log'}",
                file=sys.stderr,
            )
            return 1
        if generator.error is not None:
            print(f"the generator failed: {generator.error}", file=sys.stderr)
            return 1
        for message in consume_data(
            consumer, 500, 0.2, on_error=lambda error: print(f"reading outputs: {error}", file=sys.stderr)
        ):
            topic, value = message.topic(), message.value()
            assert topic is not None  # a consumed message has its topic
            kind = kinds[topic]
            totals[kind] += 1
            if value is not None:  # outputs are JSON; only a dead letter of a tombstone has none (never shown)
                examples[kind] = value
            if first_result_s is None and kind == "scores":
                first_result_s = time.monotonic() - started
                print(f"first result {first_result_s:.1f} s after start", flush=True)
        if not generator.is_alive() and generator.error is None and not generator.stop_event.is_set():
            print("the simulated shop has run its course (no more generated traffic)", flush=True)
            generator.stop_event.set()
        if now - last_tick >= 1.0:
            span = now - last_tick
            print(
                f"[{now - started:5.0f} s] in {(generator.sent - last_sent) / span:7,.0f} events/s | "
                f"out {(totals['scores'] - last_results) / span:7,.0f} results/s | totals: {generator.sent:,} in, "
                + ", ".join(f"{count:,} {kind}" for kind, count in totals.items()),
                flush=True,
            )
            last_tick, last_sent, last_results = now, generator.sent, totals["scores"]
            if now - last_example >= DEMO_EXAMPLE_EVERY_S:
                for kind in ("scores", "recommendations", "alerts"):
                    if kind in examples:
                        print(f"    {_describe(kind, json.loads(examples.pop(kind)))}", flush=True)
                last_example = now
    shown = f"{first_result_s:.1f} s" if first_result_s is not None else "never"
    print(
        f"summary: {generator.sent:,} events in, "
        + ", ".join(f"{count:,} {kind}" for kind, count in totals.items())
        + f"; first result after {shown}",
        flush=True,
    )
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=0, help="seconds to run (0 = until Ctrl-C)")
    parser.add_argument("--rate", type=float, default=2_000, help="generated events per second")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--archive", action="store_true", help=f"also archive the traffic to {DEMO_ARCHIVE}")
    parser.add_argument(
        "--clock",
        choices=("live", "simulated"),
        default="live",
        help="live: events stamped with the wall clock; simulated: 28 compressed days ending now (retrain needs weeks)",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    return run_demo(
        settings,
        duration_s=args.duration,
        rate_per_s=args.rate,
        seed=args.seed,
        archive=args.archive,
        clock=args.clock,
    )
