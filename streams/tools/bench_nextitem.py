"""``shoppulse bench-nextitem``: the next-item benchmark; its options are ``models.bench_nextitem``'s."""

from __future__ import annotations

import argparse

from streams.config import Settings


def run(args: argparse.Namespace, settings: Settings) -> int:
    from models.bench_nextitem import main as bench_main

    return bench_main(args.rest)
