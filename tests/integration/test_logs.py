"""A real worker's log, redirected to a file as under systemd, Docker or Kubernetes: no terminal
escape codes (Faust's start-up spinner wrote some), and with SHOPPULSE_LOG_FORMAT=json nothing
but JSON objects, one per line."""

from __future__ import annotations

import dataclasses
import json

import pytest

from streams.kafka.clients import ensure_topics

from .kafka_helpers import WorkerProcess, isolated_settings

pytestmark = [pytest.mark.integration]

ESC = b"\x1b"


# Faust starts its spinner only at WARNING and above (below, it logs every step instead).
@pytest.mark.parametrize(("log_format", "log_level"), [("text", "WARNING"), ("json", "INFO")])
def test_a_redirected_worker_log_has_no_escape_codes(broker, tmp_path, log_format, log_level):
    settings = dataclasses.replace(
        isolated_settings(broker.bootstrap_servers, tmp_path / "worker"), log_format=log_format, log_level=log_level
    )
    ensure_topics(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready(90)
    finally:
        assert worker.stop() == 0, worker.log_tail()
    log = worker.log_path.read_bytes()
    escape = log.find(ESC)
    assert escape < 0, f"an escape code at byte {escape}: {log[max(0, escape - 200) : escape + 200]!r}"
    if log_format == "json":
        lines = log.decode().splitlines()
        for line in lines:
            doc = json.loads(line)  # raises on anything else in the log
            assert {"time", "level", "logger", "message"} <= set(doc), line
        assert any(json.loads(line)["message"].startswith("worker started") for line in lines), log[-2000:]
