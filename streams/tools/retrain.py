"""``shoppulse retrain``: train on the archive's last N days and put the candidate on trial as the
challenger when it beats the champion; its options are ``models.retrain``'s. The archive defaults
to ``SHOPPULSE_ARCHIVE_DIR``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from streams.config import Settings


def retrain_argv(rest: Sequence[str], settings: Settings) -> list[str]:
    """The options for ``models.retrain``: ``--archive SHOPPULSE_ARCHIVE_DIR`` unless given."""
    if any(option == "--archive" or option.startswith("--archive=") for option in rest):
        return list(rest)
    return ["--archive", str(settings.archive_dir), *rest]


def run(args: argparse.Namespace, settings: Settings) -> int:
    from models.retrain import main as retrain_main

    return retrain_main(retrain_argv(args.rest, settings))
