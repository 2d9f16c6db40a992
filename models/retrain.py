"""``shoppulse retrain``: train on the archive's last N days, judge the candidate against the
champion, and put it on trial as the challenger only when it wins.

1. The archive's events from the last ``--days`` (default 28) are read like ``shoppulse train
   --archive`` reads them; a log too short for the label horizons stops here with a message that
   says how many days there are and how many are needed (exit status 3).
2. The candidate is trained exactly as ``shoppulse train`` trains (baselines, choice on
   validation, the report with its plots) into a staging registry inside the real one (a
   dot-folder the registry does not list), so nothing is registered yet.
3. Each model kind is compared with its champion on the SAME rows: the candidate's evaluation
   period (after its split time, which neither the candidate's training nor its choice saw).
   The champion may have trained on those days, which favours the champion: a candidate that
   wins anyway is better. Churn + purchase: the candidate wins when its mean log loss over the
   two tasks is lower and the 95% shopper-bootstrap interval of the difference lies below zero
   (the rule that chose between the MLP and the logistic regression, there on validation).
   Next item: when its NDCG@10 on each shopper's first interaction after the split is higher
   with the bootstrap interval above zero.
4. A winner is registered and set as the model's challenger (``--mode shadow`` by default, or
   ``split`` with ``--share``); a model without a champion gets the candidate as champion. A
   loser is not registered; the comparison says why. Either way the reports stay (paths printed).

Exit status: 0 done (whatever was decided), 1 training or the registry failed, 2 usage, 3 too
little data.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from features.spec import DEFAULT_FEATURE_SPEC

from .names import CLASSIFIER_MODEL, NEXTITEM_MODEL

if TYPE_CHECKING:
    from .classifiers import ShopperClassifier
    from .labels import LabelConfig
    from .nextitem import VocabRecommender
    from .registry import ModelRegistry
    from .training import TrainingConfig, TrainingResult

#: Exit status when the archive holds too little for the label horizons.
EXIT_TOO_LITTLE_DATA = 3
DEFAULT_DAYS = 28.0
#: Recommendations compared per shopper (HR@K, NDCG@K), and histories scored per batch.
TOP_K = 10
_BATCH = 512
CANDIDATE, CHAMPION = "candidate", "champion"
#: The staging registry's folder prefix inside the registry (a dot-name: the registry lists no such model).
STAGING_PREFIX = ".retrain-"
STALE_STAGING_S = 86_400.0


def _interval(diff: np.ndarray, n_boot: int, seed: int) -> list[float]:
    """95% bootstrap interval of the mean of ``diff`` (one value per shopper); [] without resamples."""
    if n_boot <= 0 or len(diff) == 0:
        return []
    rng = np.random.default_rng(seed)
    means = [float(diff[rng.integers(0, len(diff), len(diff))].mean()) for _ in range(n_boot)]
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def compare_classifiers(result: TrainingResult, champion: ShopperClassifier, n_boot: int, seed: int) -> dict[str, Any]:
    """Candidate against champion (both :class:`models.classifiers.ShopperClassifier`) on the candidate's
    evaluation rows; JSON-ready, with ``wins``, ``reason``, per-task metrics, deltas, intervals and curves."""
    from .binary_metrics import RankedScores, binary_metrics, bootstrap_deltas, reliability_bins
    from .labels import TASKS
    from .training.select import select_classifier

    ex, split = result.examples, result.split
    assert ex is not None and split is not None, "train_all keeps the rows and the split it judged on"
    users = np.asarray(ex.users)
    preds: dict[str, dict[str, np.ndarray]] = {CANDIDATE: {}, CHAMPION: {}}
    ys: dict[str, np.ndarray] = {}
    groups: dict[str, np.ndarray] = {}
    tasks: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    for t, task in enumerate(TASKS):
        rows = split.masks(ex.ts, task)["eval"] & ~np.isnan(ex.y[:, t])
        y = ex.y[rows, t].astype(np.float64)
        if len(y) == 0 or y.min() == y.max():
            return {
                "wins": False,
                "reason": f"the evaluation period has {len(y)} {task} rows, "
                f"{int(y.sum()) if len(y) else 0} positive: nothing to compare on; archive more days",
            }
        ys[task], groups[task] = y, users[rows]
        for name, model in ((CANDIDATE, result.classifier), (CHAMPION, champion)):
            preds[name][task] = model.predict_proba(ex.x[rows])[task].astype(np.float64)
        metrics = {name: binary_metrics(preds[name][task], y) for name in preds}
        delta = {k: metrics[CANDIDATE][k] - metrics[CHAMPION][k] for k in ("roc_auc", "pr_auc", "log_loss", "brier")}
        tasks[task] = {
            "rows": int(len(y)),
            "positives": int(y.sum()),
            "metrics": metrics,
            "delta": delta,
            "ci95": bootstrap_deltas(preds[CANDIDATE][task], preds[CHAMPION][task], y, groups[task], n_boot, seed + t),
        }
        curves[task] = {
            "roc": {name: RankedScores(preds[name][task], y).roc() for name in preds},
            "reliability": {name: reliability_bins(preds[name][task], y) for name in preds},
        }
    # The rule that chooses the MLP over the logistic regression, here on the evaluation rows.
    rule = select_classifier(CANDIDATE, CHAMPION, preds, ys, groups, n_boot, seed)
    wins, mean_delta, ci = rule["served"] == CANDIDATE, float(rule["delta_log_loss"]), rule["ci95"]
    shown = f"{mean_delta:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else " (no bootstrap)")
    if wins:
        reason = f"lower mean log loss than the champion on the evaluation period: {shown}"
    elif mean_delta < 0:
        reason = f"lower mean log loss by {-mean_delta:.4f}, but the 95% interval {shown} does not exclude zero"
    else:
        reason = f"no lower mean log loss than the champion: {shown}"
    return {
        "wins": wins,
        "reason": reason,
        "criterion": "mean log loss over churn and purchase on the candidate's evaluation period, 95% "
        "shopper-bootstrap interval of the difference below zero",
        "mean_log_loss_delta": mean_delta,
        "ci95": ci,
        "tasks": tasks,
        "curves": curves,
    }


def _gains(
    recommender: VocabRecommender, histories: list[list[str]], targets: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Per shopper: hit within the top :data:`TOP_K` (0/1) and the NDCG gain (1/log2(rank+1))."""
    hits = np.zeros(len(targets))
    gains = np.zeros(len(targets))
    for start in range(0, len(targets), _BATCH):
        rows = recommender.recommend(histories[start : start + _BATCH], k=TOP_K)
        for i, row in enumerate(rows, start=start):
            items = [item for item, _ in row]
            if targets[i] in items:
                hits[i] = 1.0
                gains[i] = 1.0 / np.log2(items.index(targets[i]) + 2)
    return hits, gains


def compare_recommenders(
    result: TrainingResult, champion: VocabRecommender, labels: LabelConfig, n_boot: int, seed: int
) -> dict[str, Any]:
    """Candidate against champion recommender on every shopper's first interaction after the candidate's
    split (history: the items before it, excluded from the lists as when serving); JSON-ready."""
    from .labels import item_sequences, next_item_split

    assert result.examples is not None and result.split is not None, "train_all keeps the rows and the split"
    targets = next_item_split(item_sequences(result.examples.applied, labels), result.split.split_ms).next
    if not len(targets):
        return {"wins": False, "reason": "no shopper has items on both sides of the split: nothing to compare on"}
    scored = {
        name: _gains(model, targets.history, targets.target)
        for name, model in ((CANDIDATE, result.recommender), (CHAMPION, champion))
    }
    metrics = {
        name: {f"HR@{TOP_K}": float(hits.mean()), f"NDCG@{TOP_K}": float(gains.mean())}
        for name, (hits, gains) in scored.items()
    }
    diff = scored[CANDIDATE][1] - scored[CHAMPION][1]
    delta, ci = float(diff.mean()), _interval(diff, n_boot, seed)
    wins = delta > 0 and (not ci or ci[0] > 0)
    shown = f"{delta:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else " (no bootstrap)")
    if wins:
        reason = f"higher NDCG@{TOP_K} than the champion: {shown}"
    elif delta > 0:
        reason = f"higher NDCG@{TOP_K} by {delta:.4f}, but the 95% interval {shown} does not exclude zero"
    else:
        reason = f"no higher NDCG@{TOP_K} than the champion: {shown}"
    return {
        "wins": wins,
        "reason": reason,
        "criterion": f"NDCG@{TOP_K} on each shopper's first interaction after the split, 95% bootstrap "
        "interval of the difference above zero",
        "shoppers": len(targets),
        "metrics": metrics,
        f"ndcg@{TOP_K}_delta": delta,
        "ci95": ci,
    }


def _load_champion(registry: ModelRegistry, model: str) -> tuple[str | None, Any, str | None]:
    """``(version, loaded model, why it cannot be compared)`` of ``model``'s champion."""
    from .artifacts import ArtifactError
    from .classifiers import ShopperClassifier
    from .recommenders import load_recommender

    version = registry.current(model)
    if version is None:
        return None, None, None
    try:
        if model == CLASSIFIER_MODEL:
            return version, ShopperClassifier.load(registry.current_dir(model), DEFAULT_FEATURE_SPEC.hash), None
        return version, load_recommender(registry.current_dir(model)), None
    except ArtifactError as exc:
        return version, None, str(exc)


def decide(registry: ModelRegistry, result: TrainingResult, cfg: TrainingConfig) -> dict[str, dict[str, Any]]:
    """Per model kind: the comparison with its champion and whether the candidate wins."""
    decisions: dict[str, dict[str, Any]] = {}
    for model in (CLASSIFIER_MODEL, NEXTITEM_MODEL):
        version, champion, unusable = _load_champion(registry, model)
        record: dict[str, Any] = {"candidate": result.served[model], "champion_version": version}
        if version is None:
            record |= {"wins": True, "reason": "there is no champion yet: the candidate becomes the champion"}
        elif champion is None:
            record |= {
                "wins": True,
                "reason": f"the champion {version} cannot serve this feature code ({unusable}); any loadable "
                "candidate beats it",
            }
        elif model == CLASSIFIER_MODEL:
            record |= compare_classifiers(result, champion, cfg.bootstrap, cfg.seed)
        else:
            record |= compare_recommenders(result, champion, cfg.labels, cfg.bootstrap, cfg.seed)
        decisions[model] = record
    return decisions


def apply_decisions(
    registry: ModelRegistry, result: TrainingResult, decisions: dict[str, dict[str, Any]], mode: str, share: float
) -> None:
    """Register each winner and make it the challenger (the champion when there is none); losers stay out."""
    for model, record in decisions.items():
        if not record["wins"]:
            record["action"] = "kept the champion; the candidate is not registered"
            continue
        version = registry.register(model, result.artifacts[model], result.version)
        record["registered_version"] = version
        if record["champion_version"] is None:
            registry.promote(model, version)
            record["action"] = f"registered {version} and made it the champion"
        else:
            challenger = registry.set_challenger(model, version, mode, share)
            record["action"] = (
                f"registered {version} as the challenger ({challenger.mode}"
                f"{'' if challenger.mode == 'shadow' else f', {challenger.share:.0%} of shoppers'})"
            )


def render(summary: dict[str, Any]) -> str:
    """The comparison in words (``comparison.txt``)."""
    lines = [
        f"ShopPulse retrain {summary['candidate_version']}: the last {summary['days']:g} days of "
        f"{summary['archive']} ({summary['events']:,} valid events, {summary['shoppers']:,} shoppers)",
        f"evaluation period: {summary['split']['split']} .. {summary['split']['end']} (the candidate's time split)",
        "",
    ]
    for model, record in summary["decisions"].items():
        champion = record["champion_version"] or "none"
        lines.append(f"{model}: candidate {record['candidate']} against champion {champion}")
        for task, t in (record.get("tasks") or {}).items():
            for metric in ("roc_auc", "pr_auc", "log_loss"):
                ci = t["ci95"].get(metric) if t["ci95"] else None
                lines.append(
                    f"  {task:<9}{metric:<9} candidate {t['metrics'][CANDIDATE][metric]:.4f}  champion "
                    f"{t['metrics'][CHAMPION][metric]:.4f}  delta {t['delta'][metric]:+.4f}"
                    + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")
                    + f"  ({t['rows']:,} rows)"
                )
        for name, values in (record.get("metrics") or {}).items():
            lines.append(f"  {name:<10} " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
        lines.append(f"  {'WINS' if record['wins'] else 'LOSES'}: {record['reason']}")
        lines.append(f"  -> {record.get('action', '')}")
        lines.append("")
    return "\n".join(lines)


def write_comparison(summary: dict[str, Any], out: Path, plots: bool) -> list[Path]:
    """``comparison.json``, ``comparison.txt`` and, for churn and purchase, ROC and reliability plots
    of candidate and champion (the training report's plot functions)."""
    from .report import plot_reliability, plot_roc

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "comparison.json", out / "comparison.txt"]
    paths[0].write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    paths[1].write_text(render(summary), encoding="utf-8")
    record = summary["decisions"][CLASSIFIER_MODEL]
    if plots and record.get("tasks"):
        for task, curves in record["curves"].items():
            metrics = record["tasks"][task]["metrics"]
            paths.append(plot_roc(task, curves, metrics, out / f"compare_roc_{task}.png"))
            paths.append(plot_reliability(task, curves, metrics, out / f"compare_reliability_{task}.png"))
    return paths


def _remove_stale_staging(root: Path) -> None:
    """Delete staging folders a killed run left (older than :data:`STALE_STAGING_S`; a run in progress
    elsewhere is younger: the CronJob forbids overlapping runs, and one takes far less)."""
    for folder in root.glob(f"{STAGING_PREFIX}*"):
        if time.time() - folder.stat().st_mtime > STALE_STAGING_S:
            shutil.rmtree(folder, ignore_errors=True)


def build_retrain_parser() -> argparse.ArgumentParser:
    """``shoppulse retrain``'s options: ``shoppulse train``'s, with the archive as the only source."""
    from .train_cli import build_parser

    parser = build_parser(
        "shoppulse retrain",
        "Train on the archive's last N days, compare the candidate with the champion on the same "
        "time split, and register it as the challenger only when it wins.",
    )
    parser.add_argument(
        "--mode", choices=("shadow", "split"), default="shadow", help="challenger mode (default shadow)"
    )
    parser.add_argument(
        "--share", type=float, default=0.1, help="with --mode split: the share of shoppers served it (default 0.1)"
    )
    parser.add_argument(
        "--reports",
        default=str(Path("var") / "reports"),
        help="without --report: each run writes its reports to retrain-<UTC time>/ under this folder "
        "(default var/reports)",
    )
    parser.add_argument(
        "--every-hours",
        type=float,
        default=0.0,
        help="run again this many hours after each run started, until stopped (compose's schedule); 0 = once",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``shoppulse retrain``; returns the exit status (see the module docstring)."""
    parser = build_retrain_parser()
    args = parser.parse_args(argv)
    if args.days is None:
        args.days = DEFAULT_DAYS
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    if args.every_hours <= 0:
        return retrain_once(args)
    while True:
        started = time.monotonic()
        status = retrain_once(copy.copy(args))
        wait_s = max(0.0, args.every_hours * 3600 - (time.monotonic() - started))
        print(f"retrain: exit status {status}; next run in {wait_s / 3600:.1f} h", flush=True)
        time.sleep(wait_s)


def retrain_once(args: argparse.Namespace) -> int:
    """One retrain run with parsed options; the exit status (see the module docstring)."""
    from .registry import ModelRegistry, RegistryError
    from .train_cli import config_from_args, load_events, train_and_report
    from .training.pipeline import _json_safe

    t0 = time.perf_counter()
    loaded = load_events(args)
    if isinstance(loaded, int):
        return loaded
    events, source = loaded
    cfg = config_from_args(args, source)
    needed_ms = cfg.warmup_ms + 2 * max(cfg.labels.horizons().values())
    span_ms = max(e.ts_ms for e in events) - min(e.ts_ms for e in events) if events else 0
    if span_ms <= needed_ms:
        print(
            f"retrain: too little data: the archive's last {args.days:g} days at {args.archive} hold "
            f"{len(events):,} valid events spanning {span_ms / 86_400_000:.1f} days; a candidate needs more than "
            f"{needed_ms / 86_400_000:.1f} days (warm-up + twice the longest label horizon: a training window whose "
            "labels end before the split and an evaluation window after it). Archive longer, raise --days, or "
            "shorten --churn-horizon-days. Nothing was registered.",
            file=sys.stderr,
        )
        return EXIT_TOO_LITTLE_DATA
    registry = ModelRegistry(args.registry)
    registry.root.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    if args.report is None:
        args.report = str(Path(args.reports) / f"retrain-{stamp}")
    args.no_promote = True
    _remove_stale_staging(registry.root)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=registry.root))
    try:
        result = train_and_report(events, args, source, time.perf_counter() - t0, registry=str(staging))
        if result is None:
            return 1
        decisions = decide(registry, result, cfg)
        try:
            apply_decisions(registry, result, decisions, args.mode, args.share)
        except RegistryError as exc:
            print(f"error: retrain could not register the candidate: {exc}", file=sys.stderr)
            return 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = _json_safe(
        {
            "candidate_version": result.version,
            "archive": args.archive,
            "days": args.days,
            "events": len(events),
            "shoppers": result.report["data"]["shoppers"],
            "split": result.report["data"]["split"],
            "mode": args.mode,
            "decisions": decisions,
            "training_report": {k: str(v) for k, v in result.report_paths.items()},
        }
    )
    paths = write_comparison(summary, Path(args.report), plots=not args.no_plots)
    print(render(summary))
    print(f"comparison: {', '.join(str(p) for p in paths)}")
    return 0


__all__ = ("main", "compare_classifiers", "compare_recommenders", "decide", "apply_decisions", "EXIT_TOO_LITTLE_DATA")
