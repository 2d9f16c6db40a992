"""Real shop events end to end: the REES46 and OTTO samples, replayed with `shoppulse replay`,
are all accepted and every shopper in them is scored."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from streams.kafka.clients import ensure_topics
from streams.sim.replay import read_otto_jsonl, read_rees46_csv
from streams.tools.process import worker_environment

from .kafka_helpers import WorkerProcess, headers_of, isolated_settings, read_topic, value_of

pytestmark = pytest.mark.integration

SAMPLES = [
    ("rees46", "rees46-sample/2019-Oct-sample.csv", read_rees46_csv),
    ("otto", "otto-sample/train.jsonl", read_otto_jsonl),
]


@pytest.mark.parametrize("fmt, relative, reader", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_replayed_sample_is_scored_end_to_end(broker, tmp_path, shared_data, fmt, relative, reader):
    path = shared_data / relative
    users = {event.user_id for event in reader(path)}
    settings = isolated_settings(broker.bootstrap_servers, tmp_path / "worker")
    ensure_topics(settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.wait_ready()
        env = worker_environment(settings)
        replay = subprocess.run(
            [sys.executable, "-m", "streams.tools.cli", "replay", str(path), "--format", fmt, "--quiet"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert replay.returncode == 0, replay.stderr
        assert "failed 0" in replay.stdout
        scores = read_topic(
            settings,
            settings.topic_scores,
            until=lambda ms: users <= {json.loads(value_of(m))["user_id"] for m in ms},
            timeout_s=60,
        )
        dead = read_topic(settings, settings.topic_dead_letter, until=lambda ms: False, timeout_s=3)
    finally:
        assert worker.stop() == 0, worker.log_tail()
    assert {json.loads(value_of(m))["user_id"] for m in scores} == users
    assert dead == [], [headers_of(d) for d in dead]
