"""``shoppulse models ...``: the model registry; its options are ``models.train_cli.models_main``'s."""

from __future__ import annotations

import argparse

from streams.config import Settings


def run(args: argparse.Namespace, settings: Settings) -> int:
    from models.train_cli import models_main

    # `models compare` reads the local worker by default: where this configuration serves /metrics.
    host = "127.0.0.1" if settings.metrics_host in ("", "0.0.0.0", "::") else settings.metrics_host
    return models_main(args.rest, default_metrics_url=f"http://{host}:{settings.metrics_port}/metrics")
