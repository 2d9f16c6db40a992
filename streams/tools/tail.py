"""``shoppulse tail TOPIC``: an example consumer that pretty-prints any ShopPulse topic."""

from __future__ import annotations

import argparse
import json
import os
from typing import cast

from confluent_kafka import Consumer, Message

from streams.config import Settings
from streams.kafka.clients import cluster_metadata, confluent_consumer_config, consume_data
from streams.tools.process import stop_on_signals


def output_consumer(settings: Settings, topics: list[str], from_beginning: bool, name: str = "tail") -> Consumer:
    """A consumer in a throwaway group that never commits: reading does not disturb anyone."""
    consumer = Consumer(
        {
            **confluent_consumer_config(settings, f"shoppulse-{name}-{os.getpid()}"),
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            "log_level": 3,
        }
    )
    consumer.subscribe(topics)
    return consumer


def format_message(message: Message) -> str:
    """One readable block: where the message is, its key, headers and a pretty JSON value."""
    key = (message.key() or b"").decode(errors="replace")
    lines = [f"{message.topic()}[{message.partition()}]@{message.offset()} key={key}"]
    # A consumed message's headers are a list of (name, bytes or None), never a dict.
    for name, value in cast("list[tuple[str, bytes | None]] | None", message.headers()) or []:
        lines.append(f"  {name}: {(value or b'').decode(errors='replace')}")
    raw = message.value()
    if raw is None:  # a tombstone
        lines.append("  (no value)")
        return "\n".join(lines)
    try:
        lines.append(json.dumps(json.loads(raw), indent=2, ensure_ascii=False))
    except (ValueError, UnicodeDecodeError):
        lines.append(f"  (not JSON) {raw[:200]!r}")
    return "\n".join(lines)


def tail(settings: Settings, topic: str, from_beginning: bool = False, limit: int = 0) -> int:
    """Print messages of ``topic`` until Ctrl-C or ``limit`` messages (0 = no limit)."""
    cluster_metadata(settings)  # a wrong address or password stops here, with a message, instead of polling forever
    stop = stop_on_signals()
    consumer = output_consumer(settings, [topic], from_beginning)
    shown = 0
    try:
        while not stop.is_set() and (limit == 0 or shown < limit):
            for message in consume_data(
                consumer, 1, 0.5, on_error=lambda error: print(f"error reading {topic}: {error}", flush=True)
            ):
                print(format_message(message), flush=True)
                shown += 1
    finally:
        consumer.close()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("topic")
    parser.add_argument("--from-beginning", action="store_true")
    parser.add_argument("--limit", type=int, default=0, help="stop after this many messages (0 = never)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    return tail(settings, args.topic, from_beginning=args.from_beginning, limit=args.limit)
