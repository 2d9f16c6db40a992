"""The ``shoppulse`` command: broker, worker, generate, replay, tail, forget, dlq, demo, archive, train, retrain
and model tools."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from streams.config import ConfigError, Settings
from streams.logs import setup_logging

log = logging.getLogger("shoppulse")


#: The commands: name -> (module with ``run(args, settings)`` and optionally ``add_arguments(parser)``, help).
#: Only the chosen command's module is imported, so ``shoppulse worker`` loads the worker and nothing else.
COMMANDS: dict[str, tuple[str, str]] = {
    "broker": ("streams.tools.broker", "run the embedded Tansu broker on 127.0.0.1"),
    "worker": ("streams.tools.worker", "run the scoring worker (Faust) against KAFKA_BOOTSTRAP_SERVERS"),
    "generate": ("streams.tools.generate", "synthetic shop traffic to the input topics or a JSONL file"),
    "replay": ("streams.tools.replay", "replay recorded events (ours, REES46 CSV, OTTO JSONL) to the input topics"),
    "tail": ("streams.tools.tail", "pretty-print messages of an output topic as they arrive"),
    "forget": ("streams.tools.forget", "erase shoppers: `shoppulse forget USER_ID...` (docs/privacy.md)"),
    "dlq": ("streams.tools.dlq", "dead-letter tools: `shoppulse dlq replay` resends fixed dead letters"),
    "demo": ("streams.tools.demo", "embedded broker + worker + generator, with a live view"),
    "archive": (
        "streams.tools.archive",
        "the input topics' valid events into date-partitioned Parquet files (SHOPPULSE_ARCHIVE_DIR)",
    ),
    "train": ("streams.tools.train", "train, evaluate and register the models (`shoppulse train --help`)"),
    "retrain": (
        "streams.tools.retrain",
        "train on the archive's last N days; the candidate becomes the challenger only when it beats the champion",
    ),
    "models": (
        "streams.tools.models",
        "the model registry: list | show | promote MODEL VERSION | rollback MODEL | migrate [--dry-run]",
    ),
    "bench-nextitem": ("streams.tools.bench_nextitem", "next-item benchmark on a `user item item ...` file"),
}
#: Commands whose options belong to another module's parser: everything after the name goes there.
PASS_THROUGH = ("train", "retrain", "models", "bench-nextitem")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``shoppulse`` parser; ``command``'s own options are added (its module imported) when given."""
    parser = argparse.ArgumentParser(
        prog="shoppulse", description=__doc__, epilog="Settings come from environment variables; see README.md."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, add_help=name not in PASS_THROUGH)
        if name in PASS_THROUGH:
            p.add_argument("rest", nargs=argparse.REMAINDER)
        if name == command:
            module = importlib.import_module(module_name)
            if hasattr(module, "add_arguments"):
                module.add_arguments(p)
            p.set_defaults(func=module.run)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line, parsed with the options of the command it names (``func`` runs it)."""
    argv = list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command in PASS_THROUGH:
        args = build_parser(command).parse_args(argv[:1])
        args.rest = argv[1:]
        return args
    return build_parser(command).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
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
