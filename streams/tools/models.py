"""``shoppulse models ...``: the model registry; its options are ``models.train_cli.models_main``'s."""

from __future__ import annotations

import argparse

from streams.config import Settings


def run(args: argparse.Namespace, settings: Settings) -> int:
    from models.train_cli import models_main

    return models_main(args.rest)
