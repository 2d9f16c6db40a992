"""Log records as text for people or as one JSON object per line for log collectors.

``SHOPPULSE_LOG_FORMAT`` picks the format (``text`` or ``json``) for every command. The tools
log through :func:`setup_logging`; the worker hands :func:`worker_logging_config` to Faust,
whose worker replaces the root logger's handlers with its own (coloured, in another layout)
when it starts, so both end up with the same handler and format.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (UTC, ISO 8601 with ms), ``level``,
    ``logger``, ``message``, and ``exception`` (the traceback text) when there is one.

    A collector then needs no pattern for our layout, and a traceback stays inside its record
    instead of spilling over lines a collector would take for records of their own.
    """

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of a ``SHOPPULSE_LOG_FORMAT`` value."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"log format {log_format!r}; use one of {LOG_FORMATS}")


def setup_logging(level: str, log_format: str) -> None:
    """Root logger of a tool: ``level``, records to stderr in ``log_format``."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def worker_logging_config(level: str, log_format: str) -> dict[str, Any]:
    """``logging_config`` for Faust's worker: its ``default`` handler (stderr) with our format.

    mode merges this into its own configuration (``merge``), so only the handler and its
    formatter change; the level stays the one the worker is given.
    """
    formatter(log_format)  # refuse an unknown format here, not inside Faust's start-up
    chosen = {"()": f"{__name__}.JsonFormatter"} if log_format == "json" else {"format": TEXT_FORMAT}
    return {
        "merge": True,
        "version": 1,
        "formatters": {"shoppulse": chosen},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "shoppulse", "level": level.upper()}},
    }
