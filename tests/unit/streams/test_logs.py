"""SHOPPULSE_LOG_FORMAT: text for people, one JSON object per line for collectors, for the tools
and (through mode's own logging set-up, run here for real) for the worker."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys

import pytest
from mode.utils.logging import setup_logging as mode_setup_logging

from streams.config import ConfigError, Settings
from streams.logs import JsonFormatter, formatter, setup_logging, worker_logging_config


@pytest.fixture
def root_logger():
    """The root logger, restored after the test (the set-ups under test replace its handlers)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def _record(message: str, *args: object, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("shoppulse.worker", logging.WARNING, __file__, 1, message, args, exc_info)


def test_json_lines_carry_time_level_logger_and_message():
    before = dt.datetime.now(dt.UTC)
    line = JsonFormatter().format(_record("lag of %d on %s\nsecond line: café", 12, "shop.cart"))
    assert "\n" not in line, "a record must stay on one line"
    doc = json.loads(line)
    assert set(doc) == {"time", "level", "logger", "message"}
    assert doc["level"] == "WARNING" and doc["logger"] == "shoppulse.worker"
    assert doc["message"] == "lag of 12 on shop.cart\nsecond line: café"
    logged = dt.datetime.fromisoformat(doc["time"])
    assert logged.utcoffset() == dt.timedelta(0)
    assert before - dt.timedelta(seconds=1) <= logged <= dt.datetime.now(dt.UTC)


def test_json_lines_carry_the_exception_with_its_traceback():
    try:
        raise RuntimeError("injected")
    except RuntimeError:
        record = _record("scoring stopped", exc_info=sys.exc_info())
    doc = json.loads(JsonFormatter().format(record))
    assert doc["message"] == "scoring stopped"
    assert doc["exception"].startswith("Traceback (most recent call last):")
    assert doc["exception"].rstrip().endswith("RuntimeError: injected")


def test_tools_log_in_the_chosen_format(root_logger, capsys):
    setup_logging("INFO", "json")
    logging.getLogger("shoppulse.generate").info("sent %d events", 3)
    logging.getLogger("shoppulse.generate").debug("not at INFO")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["sent 3 events"]

    setup_logging("WARNING", "text")
    logging.getLogger("shoppulse.tail").warning("no such topic")
    (line,) = capsys.readouterr().err.splitlines()
    assert line.endswith(" WARNING shoppulse.tail: no such topic")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_worker_config_replaces_modes_coloured_handler(root_logger, log_format):
    level = mode_setup_logging(loglevel="INFO", logging_config=worker_logging_config("INFO", log_format))
    assert level == logging.INFO
    (handler,) = root_logger.handlers
    assert type(handler) is logging.StreamHandler, "mode's colorlog handler is still there"
    assert handler.level == logging.INFO
    line = handler.format(_record("ready"))
    if log_format == "json":
        assert isinstance(handler.formatter, JsonFormatter) and json.loads(line)["message"] == "ready"
    else:
        assert line.endswith(" WARNING shoppulse.worker: ready") and "\x1b" not in line


def test_unknown_formats_are_refused():
    with pytest.raises(ValueError):
        formatter("xml")
    with pytest.raises(ValueError):
        worker_logging_config("INFO", "logfmt")
    with pytest.raises(ConfigError, match="SHOPPULSE_LOG_FORMAT"):
        Settings.from_env({"SHOPPULSE_LOG_FORMAT": "xml"})
    assert Settings.from_env({}).log_format == "text"
