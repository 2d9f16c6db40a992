"""Append a measured row, with the exact command, to a section of BENCHMARKS.md."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "BENCHMARKS.md"


def this_command() -> str:
    """The command line that ran this script, as a person would retype it from the repo root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return shlex.join([".venv/bin/python", str(shown), *sys.argv[1:]])


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime())


def append_row(section: str, header: str, row: str, path: Path = BENCHMARKS) -> None:
    """Add ``row`` at the end of ``section``'s table, creating the section (with ``header``) at the end if missing."""
    row = row.rstrip("\n") + "\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(section + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section + "\n\n" + header.rstrip("\n") + "\n" + row
    else:
        following = text.find("\n## ", start + len(section))
        end = len(text) if following < 0 else following + 1
        body = text[start:end].rstrip("\n") + "\n"
        text = text[:start] + body + row + ("\n" + text[end:] if following >= 0 else "")
    path.write_text(text if text.endswith("\n") else text + "\n")
