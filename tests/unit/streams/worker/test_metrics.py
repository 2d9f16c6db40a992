"""/metrics, /healthz and /readyz answer as an orchestrator and Prometheus expect."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from streams.worker.metrics import METRIC_NAMES, HealthState, MetricsServer, WorkerMetrics


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def server():
    metrics, health = WorkerMetrics(), HealthState()
    running = MetricsServer(metrics, health, "127.0.0.1", 0).start()
    yield running, metrics, health
    running.stop()


def test_metrics_lists_every_declared_family(server):
    running, metrics, _ = server
    metrics.dead_lettered.labels("bad_json").inc()
    status, body = get(f"{running.url}/metrics")
    assert status == 200
    assert 'shoppulse_dead_letter_total{reason="bad_json"} 1.0' in body
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in body, name


def test_readiness_follows_the_worker(server):
    running, _, health = server
    assert get(f"{running.url}/healthz") == (200, "ok\n")
    status, body = get(f"{running.url}/readyz")
    assert status == 503 and "starting" in body
    health.ready, health.reason = True, "ready"
    assert get(f"{running.url}/readyz")[0] == 200
    health.alive = False
    assert get(f"{running.url}/healthz")[0] == 503
    assert get(f"{running.url}/nope")[0] == 404
