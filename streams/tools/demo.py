"""``make demo``: the embedded broker, a worker and the generator, with a live view.

Everything runs on this machine: Tansu on a free 127.0.0.1 port, the worker as a child
process (exactly what ``shoppulse worker`` runs), the generator in a thread at a fixed rate.
It prints the worker's console URL first (``/console``: the same figures, alerts and a shopper
lookup in a browser). Every second it prints events in, results out and dead letters; every few
seconds an example result; churn alerts as they arrive; every few seconds the live hit rate of the
served recommendations and every quarter minute the champion/challenger comparison (both from the
worker's own ``shoppulse_live_*`` counters on its ``/metrics``, the ``shoppulse models compare`` table).
Ctrl-C, SIGTERM or ``--duration`` (seconds of traffic, after any training) stops everything and leaves
no process behind.

The first run trains small champions and weaker challengers (fewer shoppers), the challengers on
trial in split mode (half the shoppers each). The live outcomes' horizons and grace period are
compressed to seconds (:data:`DEMO_COMPRESSED`, each unless its
``SHOPPULSE_`` variable is set), so outcomes resolve within a minute; the live view says so.

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
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from models.live_compare import KindComparison, Sample
from streams.config import SETTINGS_DOC, Settings
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
#: The shop behind ``--clock simulated``: its 28 days (~0.65M events) pass in under 3 min at 4,000
#: events/s, so one demo archives the weeks retrain needs, from 5x the shoppers the first-run
#: champions saw (on 2026-12-03 a retrain on it beat them on both kinds; 4,000 shoppers did not).
DEMO_SIMULATED_SHOPPERS = 10_000
#: Shoppers in the simulated history the demo's first-run models are trained on.
DEMO_TRAIN_SHOPPERS = 2_000
#: Seconds between example output lines in the live view.
DEMO_EXAMPLE_EVERY_S = 5.0
DEMO_SIMULATED_DAYS = 28.0
#: Shoppers behind the first run's challengers: a quarter of the champions' history (the same simulated
#: shop: same seed, so the same catalogue), so they train in a fraction of the time and usually do
#: worse, which gives the comparison something to find.
DEMO_CHALLENGER_SHOPPERS = 500
#: Split mode, half of the shoppers each: both variants are published and judged at the same pace.
DEMO_CHALLENGER_SHARE = 0.5
#: Seconds between live hit-rate lines and between champion/challenger tables in the live view.
DEMO_LIVE_EVERY_S = 5.0
DEMO_COMPARE_EVERY_S = 15.0
#: Churn alerts printed per second at most (the rest are counted): a burst must not bury the view.
DEMO_ALERTS_SHOWN_PER_S = 3
#: The demo's time compression (settings field -> value): the label horizons of 24 h and 14 d would
#: resolve nothing in a minute. A quiet outcome (no purchase, churned) resolves once horizon + grace
#: have passed, at the shopper's next event, so both are seconds.
DEMO_COMPRESSED: dict[str, int] = {
    "live_purchase_horizon_ms": 15_000,
    "live_churn_horizon_ms": 20_000,
    "grace_ms": 5_000,
}


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
            n_shoppers=DEMO_SHOPPERS if self.clock == "live" else DEMO_SIMULATED_SHOPPERS,
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


def _local_base_url(settings: Settings) -> str:
    """The worker's metrics server as reached from this machine (a wildcard bind is reached on loopback)."""
    host = "127.0.0.1" if settings.metrics_host in ("", "0.0.0.0", "::") else settings.metrics_host
    return f"http://{host}:{settings.metrics_port}"


def console_url(settings: Settings) -> str:
    """Where a browser on this machine finds the worker's console."""
    return f"{_local_base_url(settings)}/console"


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


def _train(settings: Settings, report: Path, argv: list[str]) -> None:
    """Quick ``shoppulse train`` into the demo's registry, in this process; raises when it fails (its
    output says why)."""
    from streams.tools.cli import main as cli_main

    code = cli_main(
        ["train", "--quick", "--no-progress", "--registry", str(settings.models_dir), "--report", str(report), *argv]
    )
    if code != 0:
        raise RuntimeError(f"training the demo models failed (exit {code}); see the output above")


def ensure_models(settings: Settings) -> None:
    """Train small models on simulated traffic when the registry has none (first run: ~1 min), and
    challengers for them when none is on trial (:func:`ensure_challengers`)."""
    from models.training import models_ready

    trained = not models_ready(settings.models_dir)
    if not trained:
        print(f"models: using the current versions in {settings.models_dir} (`shoppulse models list`)", flush=True)
    else:
        print(
            f"models: none in {settings.models_dir} yet; training small ones on {DEMO_TRAIN_SHOPPERS:,} simulated "
            "shoppers (first run only) …",
            flush=True,
        )
        started = time.monotonic()
        report = DEMO_DIR / "training-report"
        _train(settings, report, ["--simulate", str(DEMO_TRAIN_SHOPPERS)])
        print(f"models: trained in {time.monotonic() - started:.0f} s; report in {report}", flush=True)
    ensure_challengers(settings, replace=trained)


def ensure_challengers(settings: Settings, replace: bool = False) -> None:
    """Put a challenger on trial (split mode, :data:`DEMO_CHALLENGER_SHARE`) for each model without one
    (each model with ``replace``: new champions were just trained, perhaps on another feature spec):
    small models trained on :data:`DEMO_CHALLENGER_SHOPPERS` shoppers, registered without promotion.
    Otherwise a challenger set by hand is left as it is."""
    from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL
    from models.registry import SPLIT, ModelRegistry

    registry = ModelRegistry(settings.models_dir)
    missing = [m for m in (CLASSIFIER_MODEL, NEXTITEM_MODEL) if replace or registry.challenger(m) is None]
    if missing:
        print(
            f"models: training weaker challengers for {', '.join(missing)} on {DEMO_CHALLENGER_SHOPPERS:,} "
            "simulated shoppers (first run only) …",
            flush=True,
        )
        started = time.monotonic()
        version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-challenger"
        report = DEMO_DIR / "challenger-report"
        _train(
            settings,
            report,
            ["--simulate", str(DEMO_CHALLENGER_SHOPPERS), "--no-promote", "--version", version],
        )
        for model in missing:
            registry.set_challenger(model, version, SPLIT, DEMO_CHALLENGER_SHARE)
        print(f"models: challengers trained in {time.monotonic() - started:.0f} s; report in {report}", flush=True)
    for model in (CLASSIFIER_MODEL, NEXTITEM_MODEL):
        challenger = registry.challenger(model)
        assert challenger is not None  # set above or found
        scope = f"split, {challenger.share:.0%} of shoppers" if challenger.mode == SPLIT else "shadow"
        print(
            f"models: {model} champion {registry.current(model)} against challenger {challenger.version} ({scope})",
            flush=True,
        )


def _duration_text(ms: int) -> str:
    """``15 s``, ``24 h``, ``14 d``: a setting's value as the live view names it."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("min", 60_000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size} {unit}"
    return f"{ms / 1000:g} s"


def compress_for_demo(settings: Settings, environ: dict[str, str]) -> tuple[Settings, str]:
    """The settings with :data:`DEMO_COMPRESSED` applied where ``environ`` does not set the variable,
    and the live view's line that says what was compressed (empty when nothing was)."""
    changes: dict[str, Any] = {}
    said: list[str] = []
    for field, value in DEMO_COMPRESSED.items():
        variable, default, _ = SETTINGS_DOC[field]
        if variable in environ:
            continue
        changes[field] = value
        scale = 1000 if field.endswith("_s") else 1
        said.append(
            f"{field.removesuffix('_ms').removesuffix('_s').replace('_', ' ')} "
            f"{_duration_text(value * scale)} (default {_duration_text(int(default) * scale)})"
        )
    if not changes:
        return settings, ""
    return dataclasses.replace(settings, **changes), "horizons compressed for the demo: " + ", ".join(said)


def live_comparisons(samples: list[Sample], versions: dict[tuple[str, str], str]) -> list[KindComparison]:
    """Champion against challenger of both model kinds on the worker's live counters (the comparison of
    ``shoppulse models compare``; ``versions`` as :func:`models.train_cli.trial_versions` gives them)."""
    from models.live_compare import collect, compare_kind
    from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL

    arms = collect(samples, versions)
    return [compare_kind(model, arms.get(model, {})) for model in (NEXTITEM_MODEL, CLASSIFIER_MODEL)]


def hit_rate_line(comparisons: list[KindComparison]) -> str:
    """The live view's line: hit@5, hit@10 and NDCG@10 of the served recommendations per variant, over
    the lists resolved so far, and how many churn and purchase scores have resolved."""
    from models.live_compare import SCORES
    from models.names import NEXTITEM_MODEL
    from models.variants import CHALLENGER, CHAMPION

    parts = []
    for kc in comparisons:
        by_metric = {m.metric: m for m in kc.metrics}
        if kc.model == NEXTITEM_MODEL:
            for variant in (CHAMPION, CHALLENGER):
                estimates = [getattr(by_metric[name], variant) for name in ("hit@5", "hit@10", "ndcg@10")]
                if estimates[0] is None:
                    parts.append(f"{variant} no resolved lists yet")
                    continue
                hit5, hit10, ndcg10 = (e.value for e in estimates)
                parts.append(
                    f"{variant} hit@5 {hit5:.3f} hit@10 {hit10:.3f} NDCG@10 {ndcg10:.3f} ({estimates[0].n:,} lists)"
                )
        else:
            resolved = []
            for score in SCORES:
                brier = by_metric[f"{score} brier"]
                n = sum(e.n for e in (brier.champion, brier.challenger) if e is not None)
                resolved.append(f"{n:,} {score}")
            parts.append("resolved scores: " + ", ".join(resolved))
    return "live hit rate  " + " | ".join(parts)


def live_report(samples: list[Sample], versions: dict[tuple[str, str], str], source: str, calibration: bool) -> str:
    """The live hit-rate line and the ``models compare`` table (``calibration``: with the per-decile
    tables, which the periodic view leaves to the end)."""
    from models.live_compare import render_text

    comparisons = live_comparisons(samples, versions)
    shown = comparisons if calibration else [dataclasses.replace(kc, calibration={}) for kc in comparisons]
    return hit_rate_line(comparisons) + "\n" + render_text(shown, source)


def run_demo(
    settings: Settings,
    duration_s: float = 0,
    rate_per_s: float = 2000,
    seed: int = 7,
    archive: bool = False,
    clock: str = "live",
) -> int:
    """Run the demo until Ctrl-C, SIGTERM or ``duration_s`` seconds of traffic (0 = no limit; training
    on a first run comes before); with ``archive`` the archiver runs too, writing :data:`DEMO_ARCHIVE`."""
    from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL
    from models.registry import ModelRegistry
    from models.train_cli import trial_versions

    # The console's address comes first, so it can be opened while the models train and the worker starts.
    settings = dataclasses.replace(settings, metrics_port=settings.metrics_port or free_port())
    print(f"console  {console_url(settings)}  (live; it answers once the worker is up)", flush=True)
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir(parents=True)
    stop = stop_on_signals()

    ensure_models(settings)
    versions = trial_versions(ModelRegistry(settings.models_dir), [CLASSIFIER_MODEL, NEXTITEM_MODEL])
    settings, compressed = compress_for_demo(settings, dict(os.environ))
    started = time.monotonic()
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
        if compressed:
            print(f"  {compressed}", flush=True)
        return _watch(settings, consumer, generator, worker, stop, started, duration_s, versions)
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
    versions: dict[tuple[str, str], str],
) -> int:
    metrics_url = f"{_local_base_url(settings)}/metrics"
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
    last_tick = last_example = last_live = last_compare = time.monotonic()
    last_sent = last_results = 0
    alerts_hidden = alerts_shown = 0  # in the current second
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
            if value is None:  # outputs are JSON; only a dead letter of a tombstone has none (never shown)
                continue
            if kind != "alerts":
                examples[kind] = value
            elif alerts_shown < DEMO_ALERTS_SHOWN_PER_S:
                print(f"    #{totals[kind]:<5,} {_describe(kind, json.loads(value))}", flush=True)
                alerts_shown += 1
            else:
                alerts_hidden += 1
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
            if alerts_hidden:
                print(f"    … and {alerts_hidden:,} more churn alerts in this second", flush=True)
            last_tick, last_sent, last_results = now, generator.sent, totals["scores"]
            alerts_hidden = alerts_shown = 0
            if now - last_example >= DEMO_EXAMPLE_EVERY_S:
                for kind in ("scores", "recommendations"):
                    if kind in examples:
                        print(f"    {_describe(kind, json.loads(examples.pop(kind)))}", flush=True)
                last_example = now
            if now - last_compare >= DEMO_COMPARE_EVERY_S:
                _print_live(metrics_url, versions, calibration=False)
                last_compare = last_live = now
            elif now - last_live >= DEMO_LIVE_EVERY_S:
                _print_live(metrics_url, versions, calibration=None)
                last_live = now
    shown = f"{first_result_s:.1f} s" if first_result_s is not None else "never"
    print(
        f"summary: {generator.sent:,} events in, "
        + ", ".join(f"{count:,} {kind}" for kind, count in totals.items())
        + f"; first result after {shown}",
        flush=True,
    )
    _print_live(metrics_url, versions, calibration=True)
    return 0


def _print_live(metrics_url: str, versions: dict[tuple[str, str], str], calibration: bool | None) -> None:
    """Read the worker's live counters and print the hit-rate line (``calibration`` None) or the whole
    :func:`live_report`; a worker not answering yet is said in one line, not fatal."""
    from models.live_sources import SourceError, read_worker

    try:
        samples = read_worker(metrics_url, timeout_s=2.0)
    except SourceError as exc:
        print(f"    live outcomes: not readable yet ({exc})", flush=True)
        return
    if calibration is None:
        print(f"    {hit_rate_line(live_comparisons(samples, versions))}", flush=True)
    else:
        print(live_report(samples, versions, f"the worker's {metrics_url}", calibration), flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration", type=float, default=0, help="seconds of traffic, after any training (0 = until Ctrl-C)"
    )
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
