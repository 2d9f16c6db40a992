"""The ``shoppulse`` command: broker, worker, generate, replay, tail, dlq, demo, train and model tools."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from streams import dlq
from streams.config import ConfigError, Settings
from streams.logs import setup_logging

log = logging.getLogger("shoppulse")


def cmd_broker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.kafka.broker import EmbeddedBroker
    from streams.tools.process import stop_on_signals

    stop = stop_on_signals()
    with EmbeddedBroker(port=args.port) as broker:
        print(f"embedded Tansu broker on {broker.bootstrap_servers} (in memory; data is lost when it stops)")
        print(f"  export KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap_servers}")
        print("Ctrl-C stops it.", flush=True)
        while not stop.wait(0.5):
            pass
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from streams.worker.app import ScoringWorker

    return ScoringWorker(settings).run()


def _simulator_messages(args: argparse.Namespace):
    from streams.sim.generator import GeneratorConfig, ShopSimulator

    config = GeneratorConfig(seed=args.seed, n_shoppers=args.shoppers, malformed_fraction=args.malformed_fraction,
                             clock=args.clock, duration_days=args.days)
    if args.clock == "simulated":  # end the simulated span at now: the worker rejects future event times
        config = dataclasses.replace(config, start_ms=int(time.time() * 1000) - config.span_ms)
    return ShopSimulator(config).messages(limit=args.count or None)


def _send(messages, args: argparse.Namespace, settings: Settings) -> int:
    from streams.kafka.clients import confluent_producer_config, ensure_topics
    from streams.kafka.producer import produce

    if args.out:
        from streams.sim.replay import write_jsonl

        written = write_jsonl(messages, Path(args.out))
        print(f"wrote {written} messages to {args.out}")
        return 0
    ensure_topics(settings)
    report = produce(messages, settings.topic_by_kind, confluent_producer_config(settings), rate_per_s=args.rate,
                     progress=not args.quiet)
    print(f"sent {report.sent}, delivered {report.delivered}, failed {report.failed} in {report.seconds:.1f} s "
          f"({report.delivered / max(report.seconds, 1e-9):,.0f} msg/s)")
    return 0 if report.failed == 0 else 1


def cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    return _send(_simulator_messages(args), args, settings)


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from streams.sim import replay

    path = Path(args.path)
    if args.format == "jsonl":
        messages = replay.read_jsonl(path)
    else:
        reader = replay.read_rees46_csv if args.format == "rees46" else replay.read_otto_jsonl
        events = sorted(reader(path), key=lambda e: e.ts_ms)  # OTTO comes session by session
        if events and not args.keep_times:
            # Faster than recorded: end the shifted times at now (none in the future);
            # at recorded speed or slower: start at now, so ts tracks the wall clock.
            span_ms = events[-1].ts_ms - events[0].ts_ms
            now_ms = int(time.time() * 1000)
            start_ms = now_ms if args.speed is not None and args.speed <= 1 else now_ms - span_ms
            events = list(replay.rebase_times(events, start_ms))
        messages = replay.events_to_messages(replay.paced(events, lambda e: e.ts_ms, args.speed))
    return _send(messages, args, settings)


def cmd_tail(args: argparse.Namespace, settings: Settings) -> int:
    from streams.tools.tail import tail

    return tail(settings, args.topic, from_beginning=args.from_beginning, limit=args.limit)


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from streams.tools.demo import run_demo

    return run_demo(settings, duration_s=args.duration, rate_per_s=args.rate, seed=args.seed)


def simulated_events(args: argparse.Namespace):
    """Events of the simulated shop for ``shoppulse train --simulate N`` (models/ cannot import streams/)."""
    from streams.sim.generator import GeneratorConfig, ShopSimulator

    return ShopSimulator(GeneratorConfig(seed=args.seed, n_shoppers=args.simulate, duration_days=args.days)).events()


def cmd_train(args: argparse.Namespace, settings: Settings) -> int:
    from models.train_cli import main as train_main

    return train_main(args.rest, events_factory=simulated_events)


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from models.train_cli import models_main

    return models_main(args.rest)


def cmd_bench_nextitem(args: argparse.Namespace, settings: Settings) -> int:
    from models.bench_nextitem import main as bench_main

    return bench_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoppulse", description=__doc__,
                                     epilog="Settings come from environment variables; see README.md.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run the embedded Tansu broker on 127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser("worker", help="run the scoring worker (Faust) against KAFKA_BOOTSTRAP_SERVERS")
    p.set_defaults(func=cmd_worker)

    def add_output_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rate", type=float, default=None, help="messages per second (default: as fast as possible)")
        p.add_argument("--out", default=None, help="write our JSONL to this file instead of the topics")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("generate", help="synthetic shop traffic to the input topics or a JSONL file")
    p.add_argument("--count", type=int, default=10_000,
                   help="messages to send (0 = the whole simulated span, see --days)")
    p.add_argument("--days", type=float, default=28.0, help="simulated span in days")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--shoppers", type=int, default=5_000)
    p.add_argument("--malformed-fraction", type=float, default=0.0, help="share of deliberately invalid messages")
    p.add_argument("--clock", choices=("live", "simulated"), default="live",
                   help="live: stamp events with the wall clock; simulated: compressed event time")
    add_output_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("replay", help="replay recorded events (ours, REES46 CSV, OTTO JSONL) to the input topics")
    p.add_argument("path")
    p.add_argument("--format", choices=("jsonl", "rees46", "otto"), default="jsonl")
    p.add_argument("--speed", type=float, default=None, help="x recorded speed (default: as fast as possible)")
    p.add_argument("--keep-times", action="store_true",
                   help="keep recorded event times (default: shift them to now, keeping the gaps)")
    add_output_options(p)
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("tail", help="pretty-print messages of an output topic as they arrive")
    p.add_argument("topic")
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--limit", type=int, default=0, help="stop after this many messages (0 = never)")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("dlq", help="dead-letter tools: `shoppulse dlq replay` resends fixed dead letters")
    dlq.add_arguments(p)
    p.set_defaults(func=dlq.run)

    p = sub.add_parser("demo", help="embedded broker + worker + generator, with a live view")
    p.add_argument("--duration", type=float, default=0, help="seconds to run (0 = until Ctrl-C)")
    p.add_argument("--rate", type=float, default=2_000, help="generated events per second")
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train, evaluate and register the models (`shoppulse train --help`)",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("models", help="the model registry: list | show | promote MODEL VERSION | rollback MODEL | "
                       "migrate [--dry-run]", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bench-nextitem", help="next-item benchmark on a `user item item ...` file", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench_nextitem)
    return parser


#: Subcommands whose options belong to another module's parser: everything after the name goes there.
PASS_THROUGH = ("train", "models", "bench-nextitem")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASS_THROUGH:
        args = build_parser().parse_args(argv[:1])
        args.rest = argv[1:]
    else:
        args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"shoppulse: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    try:
        return int(args.func(args, settings) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a clear last line instead of a bare traceback for known failures
        from streams.kafka.broker import BrokerError
        from streams.kafka.clients import KafkaSetupError

        if isinstance(exc, (BrokerError, KafkaSetupError, ConfigError)):
            print(f"shoppulse {args.command}: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
