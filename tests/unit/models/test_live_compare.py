"""`models compare`: the statistics against published values and brute force, and the CLI on real /metrics pages."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from models.binary_metrics import roc_auc
from models.live_compare import (
    BRIER_SUM,
    CHALLENGER_WINS,
    CHAMPION_WINS,
    GAIN,
    HITS,
    MIXED,
    NO_DATA,
    NO_DIFFERENCE,
    OPPORTUNITIES,
    OUTCOMES,
    PROBABILITY_SUM,
    TOO_FEW,
    ArmCounts,
    Estimate,
    MetricComparison,
    binned_auc,
    brier,
    collect,
    compare_metric,
    hit_rate,
    ndcg,
    normal_cdf,
    two_sided_p,
    verdict,
    wilson_interval,
)
from models.live_sources import SourceError, parse_exposition, prometheus_query, query_prometheus
from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL
from models.registry import SHADOW, SPLIT, ModelRegistry
from models.train_cli import models_main
from models.variants import CHALLENGER, CHAMPION
from streams.config import Settings
from streams.tools import models as models_tool

from .test_challenger import save_classifier, save_recommender


# ------------------------------------------------------------------------------ formulas
@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    # Newcombe (1998), Statistics in Medicine 17:857, table II, method 3 (Wilson score, no continuity correction)
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_interval_matches_newcombe(successes, n, low, high):
    got = wilson_interval(successes, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_normal_tail_values():
    assert normal_cdf(0.0) == 0.5
    assert normal_cdf(1.959963984540054) == pytest.approx(0.975, abs=1e-12)
    assert two_sided_p(1.959963984540054) == pytest.approx(0.05, abs=1e-12)
    assert two_sided_p(-2.575829303548901) == pytest.approx(0.01, abs=1e-12)


def arm(opportunities: int = 0, hits5: int = 0, hits10: int = 0, gain: float = 0.0) -> ArmCounts:
    counts = ArmCounts()
    counts.opportunities, counts.hits["5"], counts.hits["10"], counts.gain = opportunities, hits5, hits10, gain
    return counts


def test_hit_rate_difference_is_the_adjusted_two_proportion_test():
    """Newcombe (1998b), Statistics in Medicine 17:873, example (a): 56/70 against 48/80. Its simple
    asymptotic (Wald) interval is 0.0575 to 0.3425; with the Agresti-Caffo errors (57/72 and 49/82)
    it moves by less than 0.003."""
    champion, challenger = hit_rate(arm(80, 0, 48), "10"), hit_rate(arm(70, 0, 56), "10")
    assert champion is not None and challenger is not None
    assert (challenger.low, challenger.high) == pytest.approx(wilson_interval(56, 70))
    result = compare_metric("hit@10", champion, challenger, True, min_outcomes=50)
    se = math.sqrt((57 / 72) * (15 / 72) / 72 + (49 / 82) * (33 / 82) / 82)
    assert se == pytest.approx(0.072273, abs=1e-6)
    assert result.difference == pytest.approx(0.2)
    assert (result.low, result.high) == pytest.approx((0.2 - 1.959964 * se, 0.2 + 1.959964 * se), abs=1e-6)
    assert (result.low, result.high) == pytest.approx((0.0575, 0.3425), abs=3e-3)
    assert result.p_value == pytest.approx(math.erfc(0.2 / se / math.sqrt(2)))
    assert result.significant and result.better == CHALLENGER and result.enough
    assert not compare_metric("hit@10", champion, challenger, True, min_outcomes=71).significant
    perfect, never = hit_rate(arm(12, 0, 12), "10"), hit_rate(arm(12, 0, 0), "10")
    assert perfect is not None and never is not None and perfect.se > 0 and never.se > 0


def brute_force_delong(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """DeLong, DeLong and Clarke-Pearson (1988) from every positive-negative pair."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = float(psi.mean())
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return auc, math.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))


def test_binned_auc_and_its_delong_error_equal_the_pairwise_computation():
    rng = np.random.default_rng(4)
    p = rng.beta(2, 5, 3000)
    y = (rng.random(3000) < p).astype(int)
    deciles = np.minimum(np.floor(p * 10), 9).astype(int)
    positives = np.bincount(deciles[y == 1], minlength=10).astype(float).tolist()
    negatives = np.bincount(deciles[y == 0], minlength=10).astype(float).tolist()
    got_auc, got_se = binned_auc(positives, negatives)
    want_auc, want_se = brute_force_delong(deciles.astype(float), y)
    assert got_auc == pytest.approx(want_auc, abs=1e-12) and got_se == pytest.approx(want_se, rel=1e-9)
    assert got_auc == pytest.approx(roc_auc(deciles, y), abs=1e-12)  # the project's cross-checked AUC
    assert got_auc < roc_auc(p, y)  # binning ties neighbours: never above the raw score's AUC
    assert binned_auc([0, 0, 5], [5, 0, 0])[0] == 1.0
    assert math.isnan(binned_auc([3, 0], [0, 0])[0]) and math.isnan(binned_auc([1, 0], [0, 4])[1])


def test_the_bounded_errors_of_ndcg_and_brier_never_understate_the_real_one():
    rng = np.random.default_rng(9)
    ranks = rng.integers(1, 40, 5000)  # rank of the next item among all items, 1-based
    gains = np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0.0)
    counts = arm(len(ranks), int((ranks <= 5).sum()), int((ranks <= 10).sum()), float(gains.sum()))
    estimate = ndcg(counts)
    assert estimate is not None and estimate.value == pytest.approx(gains.mean())
    assert estimate.se >= gains.std(ddof=1) / math.sqrt(len(gains))
    assert estimate.low <= gains.mean() <= estimate.high

    p = rng.random(5000)
    y = (rng.random(5000) < p).astype(float)
    counts = ArmCounts()
    counts.outcomes["churn_risk"]["positive"][0] = float(y.sum())
    counts.outcomes["churn_risk"]["negative"][0] = float(len(y) - y.sum())
    counts.brier_sum["churn_risk"] = float(((p - y) ** 2).sum())
    estimate = brier(counts, "churn_risk")
    assert estimate is not None and estimate.value == pytest.approx(((p - y) ** 2).mean())
    assert estimate.se >= ((p - y) ** 2).std(ddof=1) / math.sqrt(len(y))


def metric(better: str | None, enough: bool = True) -> MetricComparison:
    e = Estimate(0.5, 0.4, 0.6, 500, 0.05)
    return MetricComparison("m", True, e, e, significant=better is not None, better=better, enough=enough)


def test_verdicts():
    assert verdict([metric(CHALLENGER), metric(None)]) == CHALLENGER_WINS
    assert verdict([metric(CHAMPION), metric(None)]) == CHAMPION_WINS
    assert verdict([metric(CHAMPION), metric(CHALLENGER)]) == MIXED
    assert verdict([metric(None), metric(None)]) == NO_DIFFERENCE
    assert verdict([metric(None, enough=False)]) == TOO_FEW
    assert verdict([MetricComparison("m", True, None, None)]) == NO_DATA


def test_collect_sums_workers_and_keeps_the_selected_versions():
    labels = {"model": NEXTITEM_MODEL, "variant": CHAMPION, "version": "r1"}
    samples = [
        (OPPORTUNITIES, labels, 10.0),
        (OPPORTUNITIES, labels, 5.0),  # a second worker
        (OPPORTUNITIES, {**labels, "version": "r0"}, 100.0),  # the champion before the last promotion
        (HITS, {**labels, "k": "10"}, 4.0),
        (HITS, {**labels, "k": "20"}, 9.0),  # not a contract label value: ignored
        (GAIN, {**labels, "variant": "other"}, 3.0),  # not a variant
        ("shoppulse_events_total", labels, 7.0),
    ]
    arms = collect(samples, {(NEXTITEM_MODEL, CHAMPION): "r1"})
    champion = arms[NEXTITEM_MODEL][CHAMPION]
    assert champion.versions == {"r1"} and champion.opportunities == 15 and champion.hits == {"5": 0, "10": 4}
    assert collect(samples)[NEXTITEM_MODEL][CHAMPION].opportunities == 115


# ------------------------------------------------------------------------------ the CLI, on real /metrics pages
def live_counters(registry: CollectorRegistry) -> dict[str, Counter]:
    labels = ["model", "version", "variant"]
    score = [*labels, "score", "decile", "outcome"]
    return {
        OPPORTUNITIES: Counter(OPPORTUNITIES, "resolved lists", labels, registry=registry),
        HITS: Counter(HITS, "hits", [*labels, "k"], registry=registry),
        GAIN: Counter(GAIN, "gains", labels, registry=registry),
        OUTCOMES: Counter(OUTCOMES, "outcomes", score, registry=registry),
        PROBABILITY_SUM: Counter(PROBABILITY_SUM, "sum of p", score, registry=registry),
        BRIER_SUM: Counter(BRIER_SUM, "sum of (p-y)^2", [*labels, "score"], registry=registry),
    }


def record_recommendations(counters, version, variant, ranks) -> None:
    labels = {"model": NEXTITEM_MODEL, "version": version, "variant": variant}
    for rank in ranks:
        counters[OPPORTUNITIES].labels(**labels).inc()
        for k in (5, 10):
            if rank <= k:
                counters[HITS].labels(**labels, k=str(k)).inc()
        if rank <= 10:
            counters[GAIN].labels(**labels).inc(1 / math.log2(rank + 1))


def record_scores(counters, version, variant, p, y) -> None:
    labels = {"model": CLASSIFIER_MODEL, "version": version, "variant": variant}
    for score in ("churn_risk", "purchase_propensity"):
        for prob, outcome in zip(p, y, strict=True):
            outcome_label = "positive" if outcome else "negative"
            cell = {"score": score, "decile": str(min(int(prob * 10), 9)), "outcome": outcome_label}
            counters[OUTCOMES].labels(**labels, **cell).inc()
            counters[PROBABILITY_SUM].labels(**labels, **cell).inc(prob)
            counters[BRIER_SUM].labels(**labels, score=score).inc((prob - outcome) ** 2)


@pytest.fixture
def workers() -> Iterator[tuple[list[str], list[dict[str, Counter]]]]:
    """Two /metrics servers as the workers run them (prometheus_client), each with its own counters."""
    servers, urls, counters = [], [], []
    for _ in range(2):
        registry = CollectorRegistry()
        counters.append(live_counters(registry))
        server, _thread = start_http_server(0, addr="127.0.0.1", registry=registry)
        servers.append(server)
        urls.append(f"http://127.0.0.1:{server.server_port}/metrics")
    yield urls, counters
    for server in servers:
        server.shutdown()
        server.server_close()


def trial_registry(root: Path, nextitem_mode: str = SPLIT) -> ModelRegistry:
    """A registry with champions v1 / r1 and challengers v2 (shadow) / r2 (``nextitem_mode``, half the shoppers)."""
    reg = ModelRegistry(root)
    for version, seed in (("v1", 1), ("v2", 2)):
        save_classifier(reg, version, seed)
        save_recommender(reg, f"r{version[1]}", seed, [f"sku{i}" for i in range(20)])
    reg.promote(CLASSIFIER_MODEL, "v1")
    reg.promote(NEXTITEM_MODEL, "r1")
    reg.set_challenger(CLASSIFIER_MODEL, "v2", SHADOW)
    reg.set_challenger(NEXTITEM_MODEL, "r2", nextitem_mode, 0.5)
    return reg


@pytest.fixture
def trial(tmp_path) -> ModelRegistry:
    return trial_registry(tmp_path / "registry")


def test_compare_reads_every_worker_and_ranks_the_better_model(trial, workers, capsys):
    urls, counters = workers
    rng = np.random.default_rng(1)
    for worker in counters:
        # the champion recommends well, the challenger badly; the champion is calibrated, the challenger guesses
        record_recommendations(worker, "r1", CHAMPION, rng.choice([1, 2, 3, 8, 30], 600))
        record_recommendations(worker, "r2", CHALLENGER, rng.choice([2, 7, 30, 30, 40], 600))
        record_recommendations(worker, "r0", CHAMPION, [40] * 500)  # an old champion: not counted
        p = rng.random(800)
        y = rng.random(800) < p
        record_scores(worker, "v1", CHAMPION, p, y)
        record_scores(worker, "v2", CHALLENGER, rng.random(800), y)
    root = ["--registry", str(trial.root)]

    assert models_main([*root, "compare", "--json", "--metrics-url", urls[0], "--metrics-url", urls[1]]) == 1
    report = {m["model"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    nextitem, classifier = report[NEXTITEM_MODEL], report[CLASSIFIER_MODEL]
    assert nextitem["champion_versions"] == ["r1"] and nextitem["challenger_versions"] == ["r2"]
    assert nextitem["verdict"] == CHAMPION_WINS and classifier["verdict"] == CHAMPION_WINS
    hit10 = next(m for m in nextitem["metrics"] if m["metric"] == "hit@10")
    assert hit10["champion"]["n"] == 1200 and hit10["challenger"]["n"] == 1200
    assert hit10["significant"] and hit10["better"] == CHAMPION and hit10["high"] < 0
    brier_row = next(m for m in classifier["metrics"] if m["metric"] == "churn_risk brier")
    assert brier_row["better"] == CHAMPION and brier_row["difference"] > 0
    churn_cal = classifier["calibration"]["churn_risk"]
    assert churn_cal[CHAMPION]["ece"] < churn_cal[CHALLENGER]["ece"]
    assert sum(row["n"] for row in churn_cal[CHAMPION]["rows"]) == 1600

    assert models_main([*root, "compare", "--model", NEXTITEM_MODEL, "--metrics-url", urls[0]]) == 1
    text = capsys.readouterr().out
    assert "nextitem: champion r1 against challenger r2: verdict champion" in text and "yes: champion better" in text
    assert CLASSIFIER_MODEL not in text

    # gating: the challenger loses, so it is not promoted; with the roles swapped it wins and is
    gate = [*root, "promote-challenger", NEXTITEM_MODEL, "--require-significant", "--metrics-url"]
    assert models_main([*gate, urls[0]]) == 1
    assert trial.current(NEXTITEM_MODEL) == "r1" and trial.challenger(NEXTITEM_MODEL) is not None
    capsys.readouterr()
    trial.promote(NEXTITEM_MODEL, "r2")
    trial.set_challenger(NEXTITEM_MODEL, "r1", SPLIT, 0.5)
    for worker in counters:
        record_recommendations(worker, "r2", CHAMPION, rng.choice([2, 7, 30, 30, 40], 600))
        record_recommendations(worker, "r1", CHALLENGER, rng.choice([1, 2, 3, 8, 30], 600))
    assert models_main([*root, "compare", "--model", NEXTITEM_MODEL, "--metrics-url", urls[1]]) == 0
    assert "verdict challenger" in capsys.readouterr().out
    assert models_main([*gate, urls[1]]) == 0
    assert trial.current(NEXTITEM_MODEL) == "r1" and trial.challenger(NEXTITEM_MODEL) is None
    assert "rollback to: r2" in capsys.readouterr().out


def test_compare_with_too_few_outcomes_or_no_source_does_not_pass(trial, workers, capsys):
    urls, counters = workers
    record_recommendations(counters[0], "r1", CHAMPION, [1] * 30)
    record_recommendations(counters[0], "r2", CHALLENGER, [40] * 30)
    root = ["--registry", str(trial.root)]
    assert models_main([*root, "compare", "--model", NEXTITEM_MODEL, "--metrics-url", urls[0]]) == 1
    assert f"verdict {TOO_FEW}" in capsys.readouterr().out
    low = [*root, "compare", "--model", NEXTITEM_MODEL, "--min-outcomes", "20", "--metrics-url", urls[0]]
    assert models_main(low) == 1
    assert "verdict champion" in capsys.readouterr().out
    assert models_main([*root, "compare", "--metrics-url", "http://127.0.0.1:9/metrics", "--timeout-s", "2"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert models_main([*root, "compare", "--window", "1h", "--metrics-url", urls[0]]) == 2
    assert models_main([*root, "promote-challenger", NEXTITEM_MODEL]) == 0  # ungated: promoted as asked


def test_sources_refuse_what_they_cannot_read():
    with pytest.raises(SourceError, match="duration"):
        query_prometheus("http://127.0.0.1:9", window="1 hour")
    with pytest.raises(SourceError, match="only http"):
        query_prometheus("file:///etc/passwd")
    with pytest.raises(SourceError, match="Prometheus text"):
        parse_exposition("shoppulse_live_recommendation_gain_total{model=} nope\n")
    assert prometheus_query(GAIN, "6h") == (
        f"sum by (model, version, variant, k, score, decile, outcome) (increase({GAIN}[6h]))"
    )


def test_shoppulse_models_compare_reads_the_local_worker_by_default(trial, workers, capsys):
    """`shoppulse models compare` without a source reads the worker this configuration runs."""
    urls, counters = workers
    record_recommendations(counters[1], "r1", CHAMPION, [1] * 150)
    record_recommendations(counters[1], "r2", CHALLENGER, [2] * 150)
    port = int(urls[1].rsplit(":", 1)[1].split("/")[0])
    settings = Settings.from_env({}, metrics_host="0.0.0.0", metrics_port=port)
    args = argparse.Namespace(rest=["--registry", str(trial.root), "compare", "--model", NEXTITEM_MODEL, "--json"])
    assert models_tool.run(args, settings) == 1
    (nextitem,) = json.loads(capsys.readouterr().out)["models"]
    assert nextitem["metrics"][0]["champion"]["n"] == 150 and nextitem["verdict"] == CHAMPION_WINS
