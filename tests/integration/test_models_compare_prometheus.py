"""`shoppulse models compare --prometheus`: a real Prometheus server scraping two /metrics pages gives
the same comparison as reading the pages directly."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, start_http_server

from models.live_compare import OPPORTUNITIES
from models.live_sources import prometheus_query
from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL
from models.registry import SHADOW
from models.train_cli import models_main
from models.variants import CHALLENGER, CHAMPION
from streams.kafka.broker import free_port
from tests.unit.models.test_live_compare import live_counters, record_recommendations, record_scores, trial_registry

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs the prometheus binary (make test)")


def wait_for_series(base: str, variant: str, want: float, timeout_s: float = 60.0) -> None:
    """Until Prometheus has scraped both pages (its sum of ``variant``'s opportunities reaches ``want``)."""
    query = urllib.parse.urlencode({"query": f'sum({OPPORTUNITIES}{{variant="{variant}"}})'})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/api/v1/query?{query}", timeout=2) as reply:
                result = json.loads(reply.read())["data"]["result"]
            if result and float(result[0]["value"][1]) >= want:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"Prometheus at {base} did not scrape the pages within {timeout_s} s")


def test_compare_through_prometheus_equals_the_pages(tmp_path: Path, capsys):
    registry = trial_registry(tmp_path / "registry", nextitem_mode=SHADOW)

    rng = np.random.default_rng(3)
    servers, targets, urls, workers = [], [], [], []
    for _ in range(2):
        metrics = CollectorRegistry()
        counters = live_counters(metrics)
        workers.append(counters)
        record_recommendations(counters, "r1", CHAMPION, rng.choice([1, 3, 30], 400))
        record_recommendations(counters, "r2", CHALLENGER, rng.choice([1, 2, 3, 5, 30], 400))
        p = rng.random(500)
        y = rng.random(500) < p
        record_scores(counters, "v1", CHAMPION, p, y)
        record_scores(counters, "v2", CHALLENGER, np.clip(p + rng.normal(0, 0.1, 500), 0, 0.999), y)
        server, _thread = start_http_server(0, addr="127.0.0.1", registry=metrics)
        servers.append(server)
        targets.append(f"127.0.0.1:{server.server_port}")
        urls.append(f"http://127.0.0.1:{server.server_port}/metrics")

    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: shoppulse, static_configs: [{{targets: {json.dumps(targets)}}}]}}]\n"
    )
    prometheus = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_series(base, CHALLENGER, 800)
        root = ["--registry", str(registry.root), "compare", "--json"]
        direct_status = models_main([*root, "--metrics-url", urls[0], "--metrics-url", urls[1]])
        direct = json.loads(capsys.readouterr().out)["models"]
        through_status = models_main([*root, "--prometheus", base])
        through = json.loads(capsys.readouterr().out)["models"]
        assert through_status == direct_status
        assert through == direct  # the same counts, so the same estimates, intervals and verdicts
        by_model = {m["model"]: m for m in through}
        assert by_model[NEXTITEM_MODEL]["metrics"][1]["challenger"]["n"] == 800
        assert {m["model"] for m in through} == {CLASSIFIER_MODEL, NEXTITEM_MODEL}
        # a window counts what was added within it: 2 x 300 more lists, not the lifetime's 2 x 1,100.
        # increase() extrapolates the change over the sampled span to the window's edges (at most about
        # one scrape interval each side): a few seconds of samples before the jump keep that factor small.
        time.sleep(4)
        for counters in workers:
            record_recommendations(counters, "r2", CHALLENGER, rng.choice([1, 2, 3, 5, 30], 300))
        wait_for_series(base, CHALLENGER, 1400)
        assert models_main([*root, "--prometheus", base, "--window", "1m", "--model", NEXTITEM_MODEL]) in (0, 1)
        (windowed,) = json.loads(capsys.readouterr().out)["models"]
        n = windowed["metrics"][1]["challenger"]["n"]
        assert 600 <= n < 1200, n
        assert "increase(" in prometheus_query(OPPORTUNITIES, "1m")
    finally:
        prometheus.terminate()
        prometheus.wait(30)
        for server in servers:
            server.shutdown()
            server.server_close()
