"""``shoppulse generate``: synthetic shop traffic to the input topics or a JSONL file."""

from __future__ import annotations

import argparse
import dataclasses
import time

from streams.config import Settings
from streams.tools.send import add_output_options, send


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--count", type=int, default=10_000, help="messages to send (0 = the whole simulated span, see --days)"
    )
    parser.add_argument("--days", type=float, default=28.0, help="simulated span in days")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--shoppers", type=int, default=5_000)
    parser.add_argument("--malformed-fraction", type=float, default=0.0, help="share of deliberately invalid messages")
    parser.add_argument(
        "--clock",
        choices=("live", "simulated"),
        default="live",
        help="live: stamp events with the wall clock; simulated: compressed event time",
    )
    add_output_options(parser)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from streams.sim.generator import GeneratorConfig, ShopSimulator

    config = GeneratorConfig(
        seed=args.seed,
        n_shoppers=args.shoppers,
        malformed_fraction=args.malformed_fraction,
        clock=args.clock,
        duration_days=args.days,
    )
    if args.clock == "simulated":  # end the simulated span at now: the worker rejects future event times
        config = dataclasses.replace(config, start_ms=int(time.time() * 1000) - config.span_ms)
    return send(ShopSimulator(config).messages(limit=args.count or None), args, settings)
