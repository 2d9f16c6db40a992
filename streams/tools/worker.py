"""``shoppulse worker``: the scoring worker; SIGINT/SIGTERM stop it gracefully.

Imports only the worker runtime: the simulator and the other tools stay unloaded.
"""

from __future__ import annotations

import argparse

from streams.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options: the worker takes all its settings from the environment."""


def run(args: argparse.Namespace, settings: Settings) -> int:
    from streams.worker.app import ScoringWorker

    return ScoringWorker(settings).run()
