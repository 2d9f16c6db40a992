"""``shoppulse replay PATH``: recorded events (ours, REES46 CSV, OTTO JSONL) to the input topics."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from streams.config import Settings
from streams.tools.send import add_output_options, send


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path")
    parser.add_argument("--format", choices=("jsonl", "rees46", "otto"), default="jsonl")
    parser.add_argument("--speed", type=float, default=None, help="x recorded speed (default: as fast as possible)")
    parser.add_argument(
        "--keep-times",
        action="store_true",
        help="keep recorded event times (default: shift them to now, keeping the gaps)",
    )
    add_output_options(parser)


def run(args: argparse.Namespace, settings: Settings) -> int:
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
    return send(messages, args, settings)
