"""The demo's live view: hit rate and champion/challenger table from a worker's real counters, and the
time compression it announces."""

from __future__ import annotations

import math

from prometheus_client import generate_latest

from models.live_compare import Sample
from models.live_sources import parse_exposition
from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL
from models.outcomes import Outcome, RecommendationOutcome, ScoreOutcome
from models.variants import CHALLENGER, CHAMPION
from streams.config import SETTINGS_DOC, Settings
from streams.tools.demo import DEMO_COMPRESSED, compress_for_demo, hit_rate_line, live_comparisons, live_report
from streams.worker.metrics import WorkerMetrics

VERSIONS = {
    (NEXTITEM_MODEL, CHAMPION): "v1",
    (NEXTITEM_MODEL, CHALLENGER): "v2",
    (CLASSIFIER_MODEL, CHAMPION): "c1",
    (CLASSIFIER_MODEL, CHALLENGER): "c2",
}


def _lists(version: str, variant: str, ranks: dict[int, int]) -> list[Outcome]:
    """``n`` resolved lists per rank (0: a miss) of one version."""
    return [RecommendationOutcome(NEXTITEM_MODEL, version, variant, r) for r, n in ranks.items() for _ in range(n)]


def _worker_samples() -> list[Sample]:
    """The live counters a worker exports after these outcomes, read back from its exposition text."""
    metrics = WorkerMetrics()
    outcomes: list[Outcome] = (
        _lists("v1", CHAMPION, {1: 60, 7: 40, 0: 100})
        + _lists("v2", CHALLENGER, {1: 20, 0: 180})
        + _lists("v0", CHAMPION, {1: 500})  # an earlier champion: not part of this trial
        + [ScoreOutcome(CLASSIFIER_MODEL, "c1", CHAMPION, "churn_risk", 0.8, True)] * 30
        + [ScoreOutcome(CLASSIFIER_MODEL, "c2", CHALLENGER, "churn_risk", 0.3, False)] * 20
    )
    metrics.count_live(outcomes, 0)
    return parse_exposition(generate_latest(metrics.registry).decode())


def test_the_hit_rate_line_shows_each_variants_live_hit_rates_of_the_trial_versions_only() -> None:
    line = hit_rate_line(live_comparisons(_worker_samples(), VERSIONS))
    ndcg_champion = (60 * 1.0 + 40 / math.log2(7 + 1)) / 200
    assert f"champion hit@5 {60 / 200:.3f} hit@10 {100 / 200:.3f} NDCG@10 {ndcg_champion:.3f} (200 lists)" in line
    assert f"challenger hit@5 {20 / 200:.3f} hit@10 {20 / 200:.3f} NDCG@10 {20 / 200:.3f} (200 lists)" in line
    assert "resolved scores: 50 churn_risk, 0 purchase_propensity" in line


def test_the_live_report_holds_the_models_compare_table() -> None:
    samples = _worker_samples()
    periodic = live_report(samples, VERSIONS, "the worker", calibration=False)
    assert periodic.startswith("live hit rate  champion hit@5")
    assert f"{NEXTITEM_MODEL}: champion v1 against challenger v2: verdict champion" in periodic
    hit5 = next(line for line in periodic.splitlines() if line.lstrip().startswith("hit@5"))
    assert "yes: champion better" in hit5
    assert f"{CLASSIFIER_MODEL}: champion c1 against challenger c2: verdict too few outcomes" in periodic
    assert "calibration per decile" not in periodic
    assert "churn_risk calibration per decile" in live_report(samples, VERSIONS, "the worker", calibration=True)


def test_without_counters_the_view_says_so_instead_of_failing() -> None:
    line = hit_rate_line(live_comparisons([], VERSIONS))
    assert "champion no resolved lists yet" in line and "challenger no resolved lists yet" in line


def test_the_demo_compresses_every_horizon_not_set_by_hand_and_says_so() -> None:
    settings = Settings.from_env({})
    compressed, said = compress_for_demo(settings, {})
    for field, value in DEMO_COMPRESSED.items():
        assert getattr(compressed, field) == value
    purchase_s, churn_s = (DEMO_COMPRESSED[f"live_{kind}_horizon_ms"] // 1000 for kind in ("purchase", "churn"))
    assert said.startswith(f"horizons compressed for the demo: live purchase horizon {purchase_s} s (default 1 d)")
    assert f"live churn horizon {churn_s} s (default 14 d)" in said

    variable = SETTINGS_DOC["live_churn_horizon_ms"][0]
    by_hand, said = compress_for_demo(settings, {variable: "60000"})
    assert by_hand.live_churn_horizon_ms == settings.live_churn_horizon_ms
    assert "churn horizon" not in said and "purchase horizon" in said
