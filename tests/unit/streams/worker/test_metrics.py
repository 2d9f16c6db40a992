"""/metrics, /healthz and /readyz answer as an orchestrator and Prometheus expect."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from streams.worker.metrics import METRIC_NAMES, HealthState, MetricsServer, WorkerMetrics


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(params=[False, True], ids=["threads", "process"])
def server(request):
    metrics, health = WorkerMetrics(), HealthState()
    running = MetricsServer(metrics, health, "127.0.0.1", 0, process=request.param).start()
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


def test_metrics_answers_only_the_series_asked_for(server):
    running, metrics, _ = server
    metrics.dead_lettered.labels("bad_json").inc()
    metrics.batch_size.observe(3)
    status, body = get(f"{running.url}/metrics?name[]=shoppulse_dead_letter_total&name[]=shoppulse_batch_size_count")
    assert status == 200
    samples = sorted(line.split("{")[0].split(" ")[0] for line in body.splitlines() if not line.startswith("#"))
    assert samples == ["shoppulse_batch_size_count", "shoppulse_dead_letter_total"]
    assert 'shoppulse_dead_letter_total{reason="bad_json"} 1.0' in body


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


def test_concurrent_requests_are_answered_and_stop_ends_every_server_thread():
    metrics, health = WorkerMetrics(), HealthState()
    running = MetricsServer(metrics, health, "127.0.0.1", 0).start()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: get(f"{running.url}/healthz"), range(40)))
        assert answers == [(200, "ok\n")] * 40
    finally:
        running.stop()
    deadline = time.monotonic() + 5
    while any(t.name.startswith("shoppulse-http") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a server thread outlived stop()"
        time.sleep(0.01)
    with pytest.raises(urllib.error.URLError):
        get(f"{running.url}/healthz")
