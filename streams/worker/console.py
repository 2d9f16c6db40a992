"""The live console: ``GET /console`` (one page of plain HTML and JS, no CDN, no build step) and the
compact JSON it polls, ``GET /console/stats``.

Everything the page shows is read from what the worker already keeps: the Prometheus registry (by
metric name, so the live-evaluation counters of ``shoppulse_live_*`` show up as soon as a worker
exports them, and "no live outcomes yet" before) and :class:`AlertFeed`, the last churn alerts
delivered. Rates and latency quantiles are differences between two samples of the registry
:data:`STATS_WINDOW_S` apart, so they describe the last seconds, not the worker's whole life.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

if TYPE_CHECKING:  # metrics.py serves the console, so the console only names its HealthState
    from streams.worker.metrics import HealthState

#: Churn alerts the console keeps in memory, newest first (what the page lists).
CONSOLE_ALERTS_KEPT = 50
#: Seconds of history behind every rate and latency quantile the console shows.
STATS_WINDOW_S = 5.0
#: The page, a package file next to this module (``pyproject.toml`` ships it).
CONSOLE_PAGE = "console.html"

_LATENCY_BUCKET = "shoppulse_end_to_end_latency_seconds_bucket"
#: The live-evaluation counters of the loop contract (docs/console.md); absent until a worker exports them.
_LIVE_OPPORTUNITIES = "shoppulse_live_recommendation_opportunities_total"
_LIVE_HITS = "shoppulse_live_recommendation_hits_total"
_LIVE_GAIN = "shoppulse_live_recommendation_gain_total"
_LIVE_OUTCOMES = "shoppulse_live_score_outcomes_total"
_LIVE_BRIER = "shoppulse_live_score_brier_sum_total"
_LIVE_RETURNS = "shoppulse_live_alert_returns_total"

Samples = dict[str, list[tuple[dict[str, str], float]]]


def page() -> bytes:
    """The console page's bytes (read per request: it is small, and a changed file shows on reload)."""
    return resources.files("streams.worker").joinpath(CONSOLE_PAGE).read_bytes()


class AlertFeed:
    """The last :data:`CONSOLE_ALERTS_KEPT` churn alerts delivered, as published (pseudonymised ids).

    The publisher records an alert once the brokers acknowledged it, so the console lists exactly
    what subscribers of the churn-alert topic received. The HTTP thread reads while the worker appends.
    """

    def __init__(self, kept: int = CONSOLE_ALERTS_KEPT) -> None:
        self._recent: deque[dict[str, Any]] = deque(maxlen=kept)
        self._lock = threading.Lock()
        self.delivered = 0  # alerts recorded since the worker started

    def record(self, alert: bytes) -> None:
        """Keep a summary of one delivered alert message (the JSON of docs/outputs.md)."""
        doc = json.loads(alert)
        summary = {
            "alert_id": doc["alert_id"],
            "user_id": doc["user_id"],
            "churn_risk": doc["churn_risk"],
            "reasons": [reason["feature"] for reason in doc["reasons"]],
            "fired_at": doc["fired_at"],
            "variant": doc.get("variant"),  # carried once the challenger work lands (loop contract)
        }
        with self._lock:
            self._recent.appendleft(summary)
            self.delivered += 1

    def recent(self) -> list[dict[str, Any]]:
        """The kept summaries, newest first."""
        with self._lock:
            return list(self._recent)


@dataclass(frozen=True, slots=True)
class _Sample:
    """What the rates are computed from: counter totals at one moment (monotonic seconds)."""

    at_s: float
    events: float
    outputs_by_topic: dict[str, float]
    dead_by_reason: dict[str, float]
    latency_buckets: tuple[tuple[float, float], ...]  # (upper bound s, cumulative count), +Inf last


def read_samples(registry: CollectorRegistry) -> Samples:
    """Every sample of the registry by sample name (``..._total``, ``..._bucket``): labels and value."""
    samples: Samples = {}
    for family in registry.collect():
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def _sum_by(samples: Samples, name: str, label: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for labels, value in samples.get(name, ()):
        totals[labels[label]] = totals.get(labels[label], 0.0) + value
    return totals


def interval_quantile(buckets: Iterable[tuple[float, float]], q: float) -> float | None:
    """Quantile ``q`` of cumulative ``(upper bound, count)`` buckets, interpolated linearly within its
    bucket as Prometheus' ``histogram_quantile`` does; the last finite bound when it lies in +Inf,
    None without observations."""
    buckets = list(buckets)
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


class ConsoleStats:
    """Builds the ``/console/stats`` document from the registry, the health state and the alert feed.

    Each call samples the registry and compares with the newest earlier sample at least
    :data:`STATS_WINDOW_S` older (kept across calls, so any number of open pages share one history).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        health: HealthState,
        alerts: AlertFeed,
        window_s: float = STATS_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry, self.health, self.alerts = registry, health, alerts
        self.window_s, self.clock = window_s, clock
        self._history: deque[_Sample] = deque()
        self._lock = threading.Lock()

    def _sample(self, samples: Samples) -> _Sample:
        buckets = sorted((float(labels["le"]), value) for labels, value in samples.get(_LATENCY_BUCKET, ()))
        return _Sample(
            at_s=self.clock(),
            events=sum(_sum_by(samples, "shoppulse_events_consumed_total", "topic").values()),
            outputs_by_topic=_sum_by(samples, "shoppulse_results_published_total", "topic"),
            dead_by_reason=_sum_by(samples, "shoppulse_dead_letter_total", "reason"),
            latency_buckets=tuple(buckets),
        )

    def _base(self, now: _Sample) -> _Sample | None:
        """Remember ``now``; return the newest sample at least a window older (the oldest kept while there is
        none yet, None on the first call). Older samples are dropped: the history stays a few seconds long."""
        with self._lock:
            history = self._history
            history.append(now)
            while len(history) > 2 and history[1].at_s <= now.at_s - self.window_s:
                history.popleft()
            base = history[0]
        return None if base is now else base

    def snapshot(self) -> dict[str, Any]:
        samples = read_samples(self.registry)
        now = self._sample(samples)
        base = self._base(now)
        span_s = now.at_s - base.at_s if base is not None else 0.0

        def per_s(current: float, before: float) -> float | None:
            return (current - before) / span_s if base is not None and span_s > 0 else None

        outputs_before = base.outputs_by_topic if base is not None else {}
        dead_before = base.dead_by_reason if base is not None else {}
        latency = _interval_buckets(now, base)
        return {
            "at_ms": int(time.time() * 1000),
            "window_s": round(span_s, 3),
            "ready": self.health.ready,
            "status": self.health.reason,
            "events_per_s": per_s(now.events, base.events if base is not None else 0.0),
            "outputs_per_s": per_s(sum(now.outputs_by_topic.values()), sum(outputs_before.values())),
            "outputs_per_s_by_topic": {
                topic: per_s(total, outputs_before.get(topic, 0.0)) for topic, total in now.outputs_by_topic.items()
            },
            "latency_ms": {
                "p50": _ms(interval_quantile(latency, 0.50)),
                "p99": _ms(interval_quantile(latency, 0.99)),
                "observed": int(latency[-1][1]) if latency else 0,
            },
            "totals": {
                "events": int(now.events),
                "outputs": int(sum(now.outputs_by_topic.values())),
                "dead_letters": int(sum(now.dead_by_reason.values())),
                "alerts": self.alerts.delivered,
            },
            "dead_letters": [
                {"reason": reason, "total": int(total), "per_s": per_s(total, dead_before.get(reason, 0.0))}
                for reason, total in sorted(now.dead_by_reason.items(), key=lambda item: (-item[1], item[0]))
            ],
            "alerts": self.alerts.recent(),
            "models": sorted(
                (
                    {"model": labels["model"], "version": labels["version"]}
                    for labels, value in samples.get("shoppulse_model_info", ())
                    if value
                ),
                key=lambda model: (model["model"], model["version"]),
            ),
            "shoppers_in_state": int(sum(value for _, value in samples.get("shoppulse_shoppers_in_state", ()))),
            "consumer_lag": int(sum(value for _, value in samples.get("shoppulse_consumer_lag", ()))),
            "live": live_outcomes(samples),
        }


def _interval_buckets(now: _Sample, base: _Sample | None) -> list[tuple[float, float]]:
    """The latency histogram of the observations between ``base`` and ``now``; none without a base (the
    history since start would mix a start-up backlog into "the last seconds")."""
    if base is None:
        return []
    before = dict(base.latency_buckets)
    return [(upper, count - before.get(upper, 0.0)) for upper, count in now.latency_buckets]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _variant_order(row: dict[str, Any]) -> tuple[str, str, bool, str, str]:
    """Champion before challenger, per model (and score); alert-return rows by group."""
    return (
        row.get("model", ""),
        row.get("score", ""),
        row.get("variant") != "champion",
        row.get("version", ""),
        row.get("group", ""),
    )


#: The labels that tell the rows of each live panel apart.
_RECOMMENDATION_KEYS = ("model", "version", "variant")
_SCORE_KEYS = ("model", "version", "variant", "score")
_RETURN_KEYS = ("group",)

Table = dict[tuple[str, ...], dict[str, float]]


def _add(
    table: Table, samples: Samples, name: str, keys: tuple[str, ...], field: Callable[[dict[str, str]], str]
) -> None:
    """Sum the samples of ``name`` into ``table[their values of keys][field(their labels)]``."""
    for labels, value in samples.get(name, ()):
        row = table.setdefault(tuple(labels[key] for key in keys), {})
        row[field(labels)] = row.get(field(labels), 0.0) + value


def _rows(
    table: Table, keys: tuple[str, ...], total: tuple[str, Callable[[dict[str, float]], float]], ratios: dict[str, str]
) -> list[dict[str, Any]]:
    """One row per key with a non-zero ``total``: the key's labels, the total, and each ratio field / total."""
    total_name, total_of = total
    rows = []
    for key, sums in table.items():
        if count := total_of(sums):
            ratio_values = {name: sums.get(field, 0.0) / count for name, field in ratios.items()}
            rows.append({**dict(zip(keys, key, strict=True)), total_name: int(count), **ratio_values})
    return sorted(rows, key=_variant_order)


def live_outcomes(samples: Samples) -> dict[str, list[dict[str, Any]]] | None:
    """Live hit rate, calibration and alert returns per model version and variant, from the live-evaluation
    counters; None while they hold no outcome (or do not exist yet)."""
    recommendations: Table = {}
    _add(recommendations, samples, _LIVE_OPPORTUNITIES, _RECOMMENDATION_KEYS, lambda _: "opportunities")
    _add(recommendations, samples, _LIVE_HITS, _RECOMMENDATION_KEYS, lambda labels: f"hits@{labels['k']}")
    _add(recommendations, samples, _LIVE_GAIN, _RECOMMENDATION_KEYS, lambda _: "gain")
    scores: Table = {}
    _add(scores, samples, _LIVE_OUTCOMES, _SCORE_KEYS, lambda labels: labels["outcome"])  # positive / negative
    _add(scores, samples, _LIVE_BRIER, _SCORE_KEYS, lambda _: "brier_sum")
    returns: Table = {}
    _add(returns, samples, _LIVE_RETURNS, _RETURN_KEYS, lambda labels: labels["outcome"])  # returned / lapsed
    live = {
        "recommendations": _rows(
            recommendations,
            _RECOMMENDATION_KEYS,
            ("opportunities", lambda sums: sums.get("opportunities", 0.0)),
            {"hit_rate_at_5": "hits@5", "hit_rate_at_10": "hits@10", "ndcg_at_10": "gain"},
        ),
        "scores": _rows(
            scores,
            _SCORE_KEYS,
            ("outcomes", lambda sums: sums.get("positive", 0.0) + sums.get("negative", 0.0)),
            {"positive_rate": "positive", "brier": "brier_sum"},
        ),
        "alert_returns": _rows(
            returns,
            _RETURN_KEYS,
            ("shoppers", lambda sums: sums.get("returned", 0.0) + sums.get("lapsed", 0.0)),
            {"return_rate": "returned"},
        ),
    }
    return live if any(live.values()) else None
