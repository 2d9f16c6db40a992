"""``shoppulse broker``: the embedded Tansu broker on 127.0.0.1, until Ctrl-C."""

from __future__ import annotations

import argparse

from streams.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: a free one)")


def run(args: argparse.Namespace, settings: Settings) -> int:
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
