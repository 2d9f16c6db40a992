"""The console's figures come from the worker's own registry and alert feed, over the last seconds;
its page is self-contained and its live-evaluation panel reads the loop contract's metric names."""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from streams.worker.console import AlertFeed, ConsoleStats, interval_quantile, page
from streams.worker.metrics import HealthState, MetricsServer, WorkerMetrics


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def alert(n: int, risk: float = 0.8) -> bytes:
    """An alert message as the pipeline publishes it (docs/outputs.md)."""
    return json.dumps(
        {
            "schema_version": 1,
            "alert_id": f"u{n}:{1000 + n}",
            "user_id": f"u{n}",
            "churn_risk": risk,
            "threshold": 0.7,
            "reasons": [{"feature": "days_since_last_order", "risk_contribution": 0.3}],
            "last_activity_ts": 1000 + n,
            "orders_lifetime": 2,
            "value_to_date": 12.5,
            "model_version": "v1",
            "fired_at": 2000 + n,
        }
    ).encode()


@pytest.fixture
def stats():
    metrics, clock = WorkerMetrics(), Clock()
    console = ConsoleStats(metrics.registry, HealthState(), AlertFeed(kept=3), window_s=5.0, clock=clock)
    return console, metrics, clock


def test_rates_are_over_the_last_window_not_since_start(stats):
    console, metrics, clock = stats
    metrics.events_consumed.labels("shop.page_views").inc(1000)  # before the console's first look
    first = console.snapshot()
    assert first["events_per_s"] is None and first["outputs_per_s"] is None  # nothing to compare with yet
    assert first["totals"]["events"] == 1000

    for _ in range(5):  # 200 events/s over 5 s, 150 outputs/s on two topics
        clock.now_s += 1.0
        metrics.events_consumed.labels("shop.page_views").inc(150)
        metrics.events_consumed.labels("shop.orders").inc(50)
        metrics.results_published.labels("shoppulse.scores").inc(100)
        metrics.results_published.labels("shoppulse.recommendations").inc(50)
        snap = console.snapshot()
    assert snap["window_s"] == 5.0
    assert snap["events_per_s"] == pytest.approx(200.0)
    assert snap["outputs_per_s"] == pytest.approx(150.0)
    assert snap["outputs_per_s_by_topic"] == {
        "shoppulse.scores": pytest.approx(100.0),
        "shoppulse.recommendations": pytest.approx(50.0),
    }

    for _ in range(5):  # traffic stops: the window forgets it
        clock.now_s += 1.0
        snap = console.snapshot()
    assert snap["events_per_s"] == 0.0 and snap["totals"]["events"] == 2000


def test_latency_quantiles_cover_only_the_window(stats):
    console, metrics, clock = stats
    for _ in range(1000):  # an old, slow stretch
        metrics.end_to_end_seconds.observe(4.0)
    first = console.snapshot()
    assert first["latency_ms"] == {"p50": None, "p99": None, "observed": 0}  # no window yet
    clock.now_s += 1.0
    for _ in range(98):
        metrics.end_to_end_seconds.observe(0.004)  # in the (2.5 ms, 5 ms] bucket
    for _ in range(2):
        metrics.end_to_end_seconds.observe(0.2)  # in (100 ms, 250 ms]
    snap = console.snapshot()
    assert snap["latency_ms"]["observed"] == 100
    assert 2.5 < snap["latency_ms"]["p50"] <= 5.0
    assert snap["latency_ms"]["p99"] == pytest.approx(175.0)  # halfway into (100 ms, 250 ms], as Prometheus says


def test_interval_quantile_interpolates_as_prometheus_does():
    buckets = [(0.1, 10.0), (0.2, 30.0), (float("inf"), 40.0)]
    assert interval_quantile(buckets, 0.125) == pytest.approx(0.05)
    assert interval_quantile(buckets, 0.5) == pytest.approx(0.15)
    assert interval_quantile(buckets, 0.99) == 0.2  # in +Inf: the last finite bound
    assert interval_quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.5) is None


def test_dead_letters_by_reason_most_first(stats):
    console, metrics, clock = stats
    metrics.dead_lettered.labels("bad_json").inc(3)
    console.snapshot()
    clock.now_s += 2.0
    metrics.dead_lettered.labels("missing_field").inc(10)
    metrics.dead_lettered.labels("bad_json").inc(2)
    snap = console.snapshot()
    assert snap["dead_letters"] == [
        {"reason": "missing_field", "total": 10, "per_s": 5.0},
        {"reason": "bad_json", "total": 5, "per_s": 1.0},
    ]
    assert snap["totals"]["dead_letters"] == 15


def test_the_alert_feed_keeps_the_newest_alerts_first(stats):
    console, _, _ = stats
    for n in range(5):
        console.alerts.record(alert(n))
    snap = console.snapshot()
    assert [a["user_id"] for a in snap["alerts"]] == ["u4", "u3", "u2"]
    assert snap["alerts"][0] == {
        "alert_id": "u4:1004",
        "user_id": "u4",
        "churn_risk": 0.8,
        "reasons": ["days_since_last_order"],
        "fired_at": 2004,
        "variant": None,
    }
    assert snap["totals"]["alerts"] == 5


def test_live_outcomes_absent_until_the_loop_counters_hold_outcomes():
    # The counters by the loop contract's names and labels, on a registry of their own: the console
    # reads whatever registry it is given, with or without a worker that exports them.
    r = CollectorRegistry()
    console = ConsoleStats(r, HealthState(), AlertFeed())
    assert console.snapshot()["live"] is None
    opportunities = Counter(
        "shoppulse_live_recommendation_opportunities_total", "", ["model", "version", "variant"], registry=r
    )
    hits = Counter("shoppulse_live_recommendation_hits_total", "", ["model", "version", "variant", "k"], registry=r)
    gain = Counter("shoppulse_live_recommendation_gain_total", "", ["model", "version", "variant"], registry=r)
    outcomes = Counter(
        "shoppulse_live_score_outcomes_total",
        "",
        ["model", "version", "variant", "score", "decile", "outcome"],
        registry=r,
    )
    brier = Counter("shoppulse_live_score_brier_sum_total", "", ["model", "version", "variant", "score"], registry=r)
    returns = Counter("shoppulse_live_alert_returns_total", "", ["group", "outcome"], registry=r)
    opportunities.labels("nextitem", "v2", "challenger")  # a label set with no outcome yet
    assert console.snapshot()["live"] is None

    opportunities.labels("nextitem", "v1", "champion").inc(200)
    hits.labels("nextitem", "v1", "champion", "5").inc(50)
    hits.labels("nextitem", "v1", "champion", "10").inc(80)
    gain.labels("nextitem", "v1", "champion").inc(40.0)
    opportunities.labels("nextitem", "v2", "challenger").inc(100)
    hits.labels("nextitem", "v2", "challenger", "5").inc(30)
    hits.labels("nextitem", "v2", "challenger", "10").inc(45)
    gain.labels("nextitem", "v2", "challenger").inc(25.0)
    outcomes.labels("classifier", "v3", "champion", "churn_risk", "8", "positive").inc(30)
    outcomes.labels("classifier", "v3", "champion", "churn_risk", "1", "negative").inc(70)
    brier.labels("classifier", "v3", "champion", "churn_risk").inc(12.0)
    returns.labels("alerted", "returned").inc(6)
    returns.labels("alerted", "lapsed").inc(4)
    returns.labels("holdout", "lapsed").inc(5)

    live = console.snapshot()["live"]
    assert live["recommendations"] == [
        {
            "model": "nextitem",
            "version": "v1",
            "variant": "champion",
            "opportunities": 200,
            "hit_rate_at_5": 0.25,
            "hit_rate_at_10": 0.4,
            "ndcg_at_10": 0.2,
        },
        {
            "model": "nextitem",
            "version": "v2",
            "variant": "challenger",
            "opportunities": 100,
            "hit_rate_at_5": 0.3,
            "hit_rate_at_10": 0.45,
            "ndcg_at_10": 0.25,
        },
    ]
    assert live["scores"] == [
        {
            "model": "classifier",
            "version": "v3",
            "variant": "champion",
            "score": "churn_risk",
            "outcomes": 100,
            "positive_rate": 0.3,
            "brier": 0.12,
        }
    ]
    assert live["alert_returns"] == [
        {"group": "alerted", "shoppers": 10, "return_rate": 0.6},
        {"group": "holdout", "shoppers": 5, "return_rate": 0.0},
    ]


def test_the_page_needs_nothing_but_the_worker():
    html = page().decode()
    # No CDN, no external script, style or font: every URL it names is one of the worker's own paths.
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", html)
    assert "http://" not in html and "https://" not in html
    assert '"/console/stats"' in html and '"/shoppers/"' in html


def test_the_worker_serves_the_console_and_its_stats():
    metrics, health, feed = WorkerMetrics(), HealthState(), AlertFeed()
    server = MetricsServer(metrics, health, "127.0.0.1", 0, alerts=feed).start()
    try:
        feed.record(alert(1))
        metrics.events_consumed.labels("shop.cart").inc(7)
        with urllib.request.urlopen(f"{server.url}/console", timeout=5) as reply:
            assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/html")
            assert reply.read() == page()
        with urllib.request.urlopen(f"{server.url}/console/stats", timeout=5) as reply:
            assert reply.headers["Content-Type"] == "application/json"
            stats = json.load(reply)
        assert stats["totals"]["events"] == 7
        assert stats["alerts"][0]["user_id"] == "u1"
        assert stats["ready"] is False and stats["status"] == "starting"
    finally:
        server.stop()
