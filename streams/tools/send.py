"""What ``generate`` and ``replay`` share: where their messages go (the input topics or a JSONL file)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from streams.config import Settings

if TYPE_CHECKING:  # the simulator's message type; importing it at run time would load the simulator
    from streams.sim.generator import GeneratedMessage


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=None, help="messages per second (default: as fast as possible)")
    parser.add_argument("--out", default=None, help="write our JSONL to this file instead of the topics")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def send(messages: Iterable[GeneratedMessage], args: argparse.Namespace, settings: Settings) -> int:
    """To ``--out`` as JSONL, or to the input topics at ``--rate``; exit code 1 when any delivery failed."""
    if args.out:
        from streams.sim.replay import write_jsonl

        written = write_jsonl(messages, Path(args.out))
        print(f"wrote {written} messages to {args.out}")
        return 0
    from streams.kafka.clients import confluent_producer_config, ensure_topics
    from streams.kafka.producer import produce

    ensure_topics(settings)
    report = produce(
        messages,
        settings.topic_by_kind,
        confluent_producer_config(settings),
        rate_per_s=args.rate,
        progress=not args.quiet,
    )
    print(
        f"sent {report.sent}, delivered {report.delivered}, failed {report.failed} in {report.seconds:.1f} s "
        f"({report.delivered / max(report.seconds, 1e-9):,.0f} msg/s)"
    )
    return 0 if report.failed == 0 else 1
