"""``shoppulse train``: train, evaluate and register the models; its options are ``models.train_cli``'s."""

from __future__ import annotations

import argparse

from streams.config import Settings


def run(args: argparse.Namespace, settings: Settings) -> int:
    from models.train_cli import main as train_main

    return train_main(args.rest)
