"""Champion against challenger on the worker's live outcome counters: estimates, 95 % intervals, tests.

Pure (no I/O, no numpy): :mod:`models.live_sources` reads the counters, ``shoppulse models
compare`` prints what this module computes. The counters are those of the loop contract
(``shoppulse_live_*``, labelled by model, version and variant); only sums are exported, so every
statistic here is one that sums allow, and where a variance needs a sum the worker does not keep,
the bound used instead is said below and in docs/models.md.

Per model kind and variant (champion, challenger):

* **hit@5, hit@10** (next-item): a proportion of resolved recommendation lists; Wilson score
  interval per variant.
* **NDCG@10**: mean gain (1/log2(rank+1), one relevant item). The counters hold the sum of gains
  but not of squared gains, so the standard error uses the largest variance a variable in [0, 1]
  with that mean can have, m(1-m): the interval is conservative (too wide, never too narrow).
* **Brier score** per classifier score (churn_risk, purchase_propensity): mean of (p - y)^2, with
  the same conservative [0, 1] bound on its variance. Lower is better.
* **AUC** per score from the decile outcome counts: the AUC of the score rounded down to its
  decile (ties count one half), which is at most the AUC of the raw score; its standard error is
  DeLong's, which on ten bins is computed exactly from the counts.
* **Calibration** per decile: mean predicted probability against observed positive rate (Wilson
  interval), and the expected calibration error over the ten deciles (no test).

Difference (challenger minus champion) of each metric: estimate ± 1.96 standard errors, with the
two variants' errors added as if independent, and a two-sided z-test at ``alpha`` (default 0.05);
"significant" means exactly that the difference's interval excludes 0 (at the default alpha). For
hit rates that is the unpooled two-proportion z-test with the Agresti-Caffo adjustment (one hit
and one miss added to each variant for the standard error; the same adjustment is applied to the
NDCG and Brier bounds), which keeps a variant with all hits or none from having zero error. In
split mode the variants see disjoint shoppers, so independence
holds; in shadow mode both judge the same opportunities, their errors are positively correlated,
and the test is conservative. No correction is made for testing several metrics at once.

Verdict per model kind: ``challenger`` when the challenger is significantly better on at least one
metric and significantly worse on none, ``champion`` the other way round, ``mixed`` when each wins
somewhere, ``no difference`` otherwise, ``too few outcomes`` while either variant has fewer
resolved outcomes than ``min_outcomes`` on every metric, ``no data`` without counters for a variant.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .names import CLASSIFIER_MODEL, NEXTITEM_MODEL
from .report import _table
from .variants import CHALLENGER, CHAMPION

#: The contract's counter names (exported by the worker, see docs/evaluation.md).
OPPORTUNITIES = "shoppulse_live_recommendation_opportunities_total"
HITS = "shoppulse_live_recommendation_hits_total"
GAIN = "shoppulse_live_recommendation_gain_total"
OUTCOMES = "shoppulse_live_score_outcomes_total"
PROBABILITY_SUM = "shoppulse_live_score_probability_sum_total"
BRIER_SUM = "shoppulse_live_score_brier_sum_total"
COUNTERS: tuple[str, ...] = (OPPORTUNITIES, HITS, GAIN, OUTCOMES, PROBABILITY_SUM, BRIER_SUM)
#: The labels that tell the counters' series apart (Prometheus sums over everything else).
LABELS: tuple[str, ...] = ("model", "version", "variant", "k", "score", "decile", "outcome")

SCORES: tuple[str, ...] = ("churn_risk", "purchase_propensity")
HIT_KS: tuple[str, ...] = ("5", "10")
DECILES = 10
POSITIVE, NEGATIVE = "positive", "negative"

#: Two-sided 95 %: the normal quantile 0.975.
Z_95 = 1.959963984540054
DEFAULT_ALPHA = 0.05
DEFAULT_MIN_OUTCOMES = 100

CHALLENGER_WINS, CHAMPION_WINS, MIXED, NO_DIFFERENCE = "challenger", "champion", "mixed", "no difference"
TOO_FEW, NO_DATA = "too few outcomes", "no data"


#: One counter series: (metric name, labels, value).
Sample = tuple[str, Mapping[str, str], float]


# ------------------------------------------------------------------------------ formulas
def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def two_sided_p(z: float) -> float:
    """P(|Z| >= |z|) for a standard normal Z."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def wilson_interval(successes: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion (good at small counts and near 0 or 1, unlike Wald)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    denominator = 1 + z * z / n
    return (max(0.0, (centre - spread) / denominator), min(1.0, (centre + spread) / denominator))


def bounded_mean_se(mean: float, n: float) -> float:
    """Standard error of the mean of ``n`` values in [0, 1] at the largest variance such values can have,
    m(1-m) (exact for 0/1 values), after the Agresti-Caffo adjustment: one 1 and one 0 added, so a
    variant with all hits or none still has an error above zero and cannot be "significant" by default."""
    adjusted = (mean * n + 1.0) / (n + 2.0)
    return math.sqrt(adjusted * (1.0 - adjusted) / (n + 2.0))


def binned_auc(positives: list[float], negatives: list[float]) -> tuple[float, float]:
    """AUC of a score known only by its bin (ties count one half) and DeLong's standard error.

    ``positives[d]`` / ``negatives[d]``: outcomes whose score fell in bin ``d`` (ascending). Every
    positive in a bin has the same DeLong placement value, so the variance is exact from counts.
    Returns ``(nan, nan)`` without both classes, and a NaN error with fewer than two of either.
    """
    n_pos, n_neg = sum(positives), sum(negatives)
    if n_pos <= 0 or n_neg <= 0:
        return (math.nan, math.nan)
    below_neg = 0.0
    v10 = []  # per bin: share of negatives a positive there outranks
    for neg in negatives:
        v10.append((below_neg + 0.5 * neg) / n_neg)
        below_neg += neg
    above_pos = 0.0
    v01 = [0.0] * len(negatives)  # per bin: share of positives that outrank a negative there
    for d in range(len(negatives) - 1, -1, -1):
        v01[d] = (above_pos + 0.5 * positives[d]) / n_pos
        above_pos += positives[d]
    auc = sum(pos * v for pos, v in zip(positives, v10, strict=True)) / n_pos
    if n_pos < 2 or n_neg < 2:
        return (auc, math.nan)
    s10 = sum(pos * (v - auc) ** 2 for pos, v in zip(positives, v10, strict=True)) / (n_pos - 1)
    s01 = sum(neg * (v - auc) ** 2 for neg, v in zip(negatives, v01, strict=True)) / (n_neg - 1)
    return (auc, math.sqrt(s10 / n_pos + s01 / n_neg))


# ------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class Estimate:
    """One variant's value of one metric, its 95 % interval and how many resolved outcomes it rests on."""

    value: float
    low: float
    high: float
    n: int
    se: float


@dataclass(frozen=True)
class MetricComparison:
    """Champion against challenger on one metric; ``difference`` is challenger minus champion."""

    metric: str
    higher_is_better: bool
    champion: Estimate | None
    challenger: Estimate | None
    difference: float = math.nan
    low: float = math.nan
    high: float = math.nan
    p_value: float = math.nan
    significant: bool = False
    better: str | None = None  # CHAMPION or CHALLENGER when significant
    enough: bool = False  # both variants have min_outcomes resolved outcomes


@dataclass(frozen=True)
class CalibrationRow:
    decile: int
    n: int
    mean_predicted: float
    observed: float
    low: float
    high: float


@dataclass
class ArmCounts:
    """The summed counters of one model kind and variant (over the versions selected)."""

    versions: set[str] = field(default_factory=set)
    opportunities: float = 0.0
    hits: dict[str, float] = field(default_factory=lambda: dict.fromkeys(HIT_KS, 0.0))
    gain: float = 0.0
    # score -> outcome -> per-decile count / probability sum
    outcomes: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {s: {POSITIVE: [0.0] * DECILES, NEGATIVE: [0.0] * DECILES} for s in SCORES}
    )
    probability_sum: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {s: {POSITIVE: [0.0] * DECILES, NEGATIVE: [0.0] * DECILES} for s in SCORES}
    )
    brier_sum: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SCORES, 0.0))

    def resolved(self, score: str) -> float:
        return sum(self.outcomes[score][POSITIVE]) + sum(self.outcomes[score][NEGATIVE])

    def add(self, name: str, labels: Mapping[str, str], value: float) -> None:
        """Add one counter series; series with labels outside the contract's values are ignored."""
        if name == OPPORTUNITIES:
            self.opportunities += value
        elif name == GAIN:
            self.gain += value
        elif name == HITS and labels.get("k") in self.hits:
            self.hits[labels["k"]] += value
        elif name == BRIER_SUM and labels.get("score") in self.brier_sum:
            self.brier_sum[labels["score"]] += value
        elif name in (OUTCOMES, PROBABILITY_SUM) and labels.get("score") in self.outcomes:
            decile, outcome = labels.get("decile", ""), labels.get("outcome")
            if outcome in (POSITIVE, NEGATIVE) and decile.isdigit() and int(decile) < DECILES:
                table = self.outcomes if name == OUTCOMES else self.probability_sum
                table[labels["score"]][outcome][int(decile)] += value


def collect(
    samples: Iterable[Sample], versions: Mapping[tuple[str, str], str] | None = None
) -> dict[str, dict[str, ArmCounts]]:
    """Sum the counter series per model and variant (over workers and label values alike).

    ``versions`` maps (model, variant) to the one version to count (the registry's champion and
    challenger); a pair absent from it counts every version.
    """
    arms: dict[str, dict[str, ArmCounts]] = defaultdict(dict)
    for name, labels, value in samples:
        if name not in COUNTERS or not math.isfinite(value):
            continue
        model, variant, version = labels.get("model"), labels.get("variant"), labels.get("version", "")
        if model is None or variant not in (CHAMPION, CHALLENGER):
            continue
        wanted = (versions or {}).get((model, variant))
        if wanted is not None and version != wanted:
            continue
        arm = arms[model].setdefault(variant, ArmCounts())
        arm.versions.add(version)
        arm.add(name, labels, value)
    return dict(arms)


def _estimate(value: float, se: float, n: float, interval: tuple[float, float] | None = None) -> Estimate:
    low, high = interval if interval is not None else (max(0.0, value - Z_95 * se), min(1.0, value + Z_95 * se))
    return Estimate(value, low, high, int(round(n)), se)


def compare_metric(
    metric: str,
    champion: Estimate | None,
    challenger: Estimate | None,
    higher_is_better: bool,
    alpha: float = DEFAULT_ALPHA,
    min_outcomes: int = DEFAULT_MIN_OUTCOMES,
) -> MetricComparison:
    """The difference of two independent estimates, its 95 % interval and a two-sided z-test at ``alpha``."""
    if champion is None or challenger is None:
        return MetricComparison(metric, higher_is_better, champion, challenger)
    difference = challenger.value - champion.value
    se = math.hypot(champion.se, challenger.se)
    enough = min(champion.n, challenger.n) >= min_outcomes
    if not math.isfinite(se):
        return MetricComparison(metric, higher_is_better, champion, challenger, difference, enough=enough)
    if se == 0.0:
        p_value = 1.0 if difference == 0 else 0.0
    else:
        p_value = two_sided_p(difference / se)
    significant = enough and p_value < alpha
    better = None
    if significant:
        better = CHALLENGER if (difference > 0) == higher_is_better else CHAMPION
    return MetricComparison(
        metric,
        higher_is_better,
        champion,
        challenger,
        difference,
        difference - Z_95 * se,
        difference + Z_95 * se,
        p_value,
        significant,
        better,
        enough,
    )


# ------------------------------------------------------------------------------ per arm
def hit_rate(arm: ArmCounts, k: str) -> Estimate | None:
    n = arm.opportunities
    if n <= 0:
        return None
    p = min(arm.hits[k] / n, 1.0)
    return _estimate(p, bounded_mean_se(p, n), n, wilson_interval(arm.hits[k], n))


def ndcg(arm: ArmCounts) -> Estimate | None:
    n = arm.opportunities
    if n <= 0:
        return None
    mean = min(arm.gain / n, 1.0)
    return _estimate(mean, bounded_mean_se(mean, n), n)


def brier(arm: ArmCounts, score: str) -> Estimate | None:
    n = arm.resolved(score)
    if n <= 0:
        return None
    mean = min(arm.brier_sum[score] / n, 1.0)
    return _estimate(mean, bounded_mean_se(mean, n), n)


def auc(arm: ArmCounts, score: str) -> Estimate | None:
    value, se = binned_auc(arm.outcomes[score][POSITIVE], arm.outcomes[score][NEGATIVE])
    if math.isnan(value):
        return None
    return _estimate(value, se, arm.resolved(score))


def calibration(arm: ArmCounts, score: str) -> tuple[list[CalibrationRow], float]:
    """Per decile with outcomes: mean predicted, observed rate and its Wilson interval; and the ECE."""
    rows, ece, total = [], 0.0, arm.resolved(score)
    for d in range(DECILES):
        pos, neg = arm.outcomes[score][POSITIVE][d], arm.outcomes[score][NEGATIVE][d]
        n = pos + neg
        if n <= 0:
            continue
        mean_p = (arm.probability_sum[score][POSITIVE][d] + arm.probability_sum[score][NEGATIVE][d]) / n
        low, high = wilson_interval(pos, n)
        rows.append(CalibrationRow(d, int(round(n)), mean_p, pos / n, low, high))
        ece += n / total * abs(pos / n - mean_p)
    return rows, (ece if total > 0 else math.nan)


# ------------------------------------------------------------------------------ per model kind
@dataclass(frozen=True)
class KindComparison:
    """Champion against challenger for one model kind."""

    model: str
    champion_versions: list[str]
    challenger_versions: list[str]
    metrics: list[MetricComparison]
    calibration: dict[str, dict[str, Any]]  # score -> variant -> {"rows": [...], "ece": float}
    verdict: str

    def to_json(self) -> dict[str, Any]:
        return _finite(asdict(self))


def _finite(value: Any) -> Any:
    """JSON has no NaN: NaN becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def verdict(metrics: list[MetricComparison]) -> str:
    """See the module docstring."""
    compared = [m for m in metrics if m.champion is not None and m.challenger is not None]
    if not compared:
        return NO_DATA
    if not any(m.enough for m in compared):
        return TOO_FEW
    wins = {m.better for m in compared if m.significant}
    if wins == {CHALLENGER}:
        return CHALLENGER_WINS
    if wins == {CHAMPION}:
        return CHAMPION_WINS
    return MIXED if wins else NO_DIFFERENCE


def compare_kind(
    model: str,
    arms: Mapping[str, ArmCounts],
    alpha: float = DEFAULT_ALPHA,
    min_outcomes: int = DEFAULT_MIN_OUTCOMES,
) -> KindComparison:
    """Every metric the counters of ``model``'s kind allow, champion against challenger."""
    champion, challenger = arms.get(CHAMPION), arms.get(CHALLENGER)

    def both(fn: Any, *args: str) -> tuple[Estimate | None, Estimate | None]:
        return (fn(champion, *args) if champion else None, fn(challenger, *args) if challenger else None)

    metrics: list[MetricComparison] = []
    cal: dict[str, dict[str, Any]] = {}
    # A model kind by its registry name; one with another name by what it was judged on.
    recommends = model == NEXTITEM_MODEL or (model != CLASSIFIER_MODEL and any(a.opportunities for a in arms.values()))
    if recommends:
        for k in HIT_KS:
            metrics.append(compare_metric(f"hit@{k}", *both(hit_rate, k), True, alpha, min_outcomes))
        metrics.append(compare_metric("ndcg@10", *both(ndcg), True, alpha, min_outcomes))
    else:
        for score in SCORES:
            metrics.append(compare_metric(f"{score} brier", *both(brier, score), False, alpha, min_outcomes))
            metrics.append(compare_metric(f"{score} auc", *both(auc, score), True, alpha, min_outcomes))
            cal[score] = {}
            for variant, arm in ((CHAMPION, champion), (CHALLENGER, challenger)):
                if arm is not None and arm.resolved(score) > 0:
                    rows, ece = calibration(arm, score)
                    cal[score][variant] = {"rows": [asdict(r) for r in rows], "ece": ece}
    return KindComparison(
        model,
        sorted(champion.versions) if champion else [],
        sorted(challenger.versions) if challenger else [],
        metrics,
        cal,
        verdict(metrics),
    )


# ------------------------------------------------------------------------------ text
def _interval(e: Estimate | None) -> str:
    return "-" if e is None else f"{e.value:.4f} [{e.low:.4f}, {e.high:.4f}]"


def render_text(comparisons: Iterable[KindComparison], source: str) -> str:
    """The report ``shoppulse models compare`` prints."""
    lines = [
        f"live outcomes from {source}; 95% intervals; difference = challenger - champion, "
        "two-sided z-test, significant = its interval excludes 0"
    ]
    for kc in comparisons:
        champion = ", ".join(kc.champion_versions) or "none"
        challenger = ", ".join(kc.challenger_versions) or "none"
        lines += ["", f"{kc.model}: champion {champion} against challenger {challenger}: verdict {kc.verdict}"]
        header = ["metric", "champion", "n", "challenger", "n", "difference [95% CI]", "p", "significant"]
        rows = []
        for m in kc.metrics:
            diff = "-"
            if math.isfinite(m.difference):
                diff = f"{m.difference:+.4f}" + (f" [{m.low:+.4f}, {m.high:+.4f}]" if math.isfinite(m.low) else "")
            mark = "no"
            if m.significant:
                mark = f"yes: {m.better} better"
            elif m.champion is not None and m.challenger is not None and not m.enough:
                mark = "too few outcomes"
            rows.append(
                [
                    m.metric + (" (lower is better)" if not m.higher_is_better else ""),
                    _interval(m.champion),
                    f"{m.champion.n:,}" if m.champion else "0",
                    _interval(m.challenger),
                    f"{m.challenger.n:,}" if m.challenger else "0",
                    diff,
                    f"{m.p_value:.3g}" if math.isfinite(m.p_value) else "-",
                    mark,
                ]
            )
        lines += _table(header, rows)
        for score, by_variant in kc.calibration.items():
            eces = ", ".join(f"{v} {c['ece']:.4f}" for v, c in by_variant.items())
            lines += ["", f"  {score} calibration per decile: mean predicted / observed [95% CI] (n); ECE {eces}"]
            cells: dict[int, dict[str, str]] = defaultdict(dict)
            for variant, cal in by_variant.items():
                for r in cal["rows"]:
                    observed = f"{r['observed']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"
                    cells[r["decile"]][variant] = f"{r['mean_predicted']:.3f} / {observed} ({r['n']:,})"
            table = [[str(d), cells[d].get(CHAMPION, "-"), cells[d].get(CHALLENGER, "-")] for d in sorted(cells)]
            lines += ["  " + line for line in _table(["decile", CHAMPION, CHALLENGER], table)]
    return "\n".join(lines)

