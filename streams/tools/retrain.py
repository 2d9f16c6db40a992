"""``shoppulse retrain``: train on the archive's last N days and put the candidate on trial as the
challenger when it beats the champion; its options are ``models.retrain``'s. The archive defaults
to ``SHOPPULSE_ARCHIVE_DIR``."""

from __future__ import annotations

import argparse

from streams.config import Settings


def run(args: argparse.Namespace, settings: Settings) -> int:
    from models.retrain import main as retrain_main

    rest = list(args.rest)
    if not any(option == "--archive" or option.startswith("--archive=") for option in rest):
        rest = ["--archive", str(settings.archive_dir), *rest]
    return retrain_main(rest)
