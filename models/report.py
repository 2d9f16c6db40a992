"""The training report a person reads: ``report.txt``, ``report.json`` and PNG plots.

:func:`write_report` renders the JSON-ready ``report`` dict of
:class:`models.training.TrainingResult` into a directory:

* ``report.json``: everything (metrics, deltas with bootstrap intervals, curves, data summary,
  split windows, configuration, timings);
* ``report.txt``: one table per task, the model against its baselines, deltas and a verdict on
  the evaluation period, and which candidate was registered and served, chosen on validation
  (:mod:`models.training.select`), with the numbers and the reason;
* ``reliability_churn.png`` / ``reliability_purchase.png``: reliability diagrams;
* ``roc_churn.png`` / ``roc_purchase.png``: ROC curves;
* ``nextitem.png``: HR@10 / NDCG@10 bar chart of SASRec against the baselines.

Plots use matplotlib's object API on the Agg canvas (no pyplot, no display, no global backend
switch). Without matplotlib the text and JSON are still written and the PNGs are skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TASK_TITLES = {"churn": "Churn", "purchase": "Purchase propensity"}
METHOD_LABELS = {
    "mlp": "MLP (ours)",
    "logistic_regression": "logistic regression",
    "recency_frequency_rule": "recency/frequency rule",
    "served_heuristic": "served heuristic",
    "sasrec": "SASRec (ours)",
    "cooccurrence": "co-occurrence",
    "popularity": "popularity",
    "blend": "blend (SASRec + co-occurrence)",
}
#: Reliability bins with fewer rows than this are left out of the plot (they stay in the JSON).
MIN_BIN_ROWS = 10
_COLOURS = {
    "mlp": "#1f77b4",
    "logistic_regression": "#ff7f0e",
    "recency_frequency_rule": "#2ca02c",
    "served_heuristic": "#9467bd",
    "sasrec": "#1f77b4",
    "cooccurrence": "#ff7f0e",
    "popularity": "#2ca02c",
    "blend": "#d62728",
}


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _f(v: Any, digits: int = 4, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(header))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i]) for i, c in enumerate(r)))
    return out


# ------------------------------------------------------------------------------ text
def _classifier_selection(sel: Mapping[str, Any]) -> list[str]:
    """Which churn/purchase model is registered, chosen on the validation rows (never the evaluation period)."""
    cand, base = sel["candidates"]
    ci = sel.get("ci95") or []
    interval = f" [{_f(ci[0], signed=True)}, {_f(ci[1], signed=True)}]" if len(ci) == 2 else ""
    lines = [
        "",
        f"SERVED (churn + purchase): {_label(sel['served'])}, chosen on the validation rows",
        f"  rule: {sel['criterion']}",
        f"  mean validation log loss: {_label(cand)} {_f(sel['mean_log_loss'][cand])}, {_label(base)} "
        f"{_f(sel['mean_log_loss'][base])}; difference {_f(sel['delta_log_loss'], signed=True)}{interval}",
    ]
    for task, per in sel["valid"].items():
        lines.append(
            f"  {task:9s} validation: "
            + ", ".join(
                f"{_label(m)} log loss {_f(v['log_loss'])} ROC-AUC {_f(v['roc_auc'], 3)}" for m, v in per.items()
            )
            + f" ({per[cand]['rows']:,} rows)"
        )
    lines.append(f"  why: {sel['reason']}")
    return lines


def _candidate(method: str, valid: Mapping[str, Any]) -> str:
    """A candidate's label, with the blend's SASRec weight when it has one."""
    weight = valid.get("sasrec_weight")
    return _label(method) if weight is None else f"{_label(method)} at SASRec weight {weight:g}"


def _recommender_selection(sel: Mapping[str, Any]) -> list[str]:
    """Which next-item recommender is registered, chosen on validation (never the test targets)."""
    lines = [
        "",
        f"  SERVED (next item): {_label(sel['served'])}, chosen on validation (each shopper's last item "
        "before the split)",
    ]
    if "criterion" in sel:
        lines.append(f"  rule: {sel['criterion']} among {', '.join(_label(c) for c in sel['candidates'])}")
        lines.append(
            "  validation: "
            + ", ".join(
                f"{_candidate(m, v)} HR@10 {_f(v['HR@10'])} NDCG@10 {_f(v['NDCG@10'])}" for m, v in sel["valid"].items()
            )
        )
    lines.append(f"  why: {sel['reason']}")
    return lines


def render_text(report: Mapping[str, Any]) -> str:
    """The human-readable report (also written as ``report.txt``)."""
    data = report["data"]
    split = data["split"]
    lines = [
        f"ShopPulse training report: version {report['version']}",
        f"created {report['created']}, feature spec {report['feature_spec_hash']}, device {report['device']}, "
        f"torch threads {report.get('torch_threads')}",
        "",
        "DATA",
        f"  {data['events']:,} events ({data['applied_events']:,} applied, {data['duplicates']:,} duplicates, "
        f"{data.get('late_events', 0):,} late: rejected as the worker rejects them), "
        f"{data['shoppers']:,} shoppers, {data['observed_from']} .. {data['observed_until']}",
        f"  scoring moments: {data['moments']['event']:,} after events (at most one per shopper per hour), "
        f"{data['moments']['sweep']:,} at the daily sweep",
        "",
        "LABELS",
    ]
    for name, text in data["label_definitions"].items():
        lines.append(f"  {name}: {text}")
    lines += ["", "CENSORING"]
    for task, c in report["censoring"].items():
        lines.append(
            f"  {task}: {c['censored_rows']:,} moments have no {task} label and were dropped from {task}: "
            "their label horizon runs past the end of the log"
        )
    lines += [
        "",
        "TIME SPLIT (train on the past, evaluate on the later period; never random rows)",
        f"  split at {split['split']}: evaluation moments are at or after it; every training label "
        "(moment + horizon) ends at or before it",
    ]
    if split.get("warmup_ms"):
        lines.append(
            f"  warm-up: no training moments in the first {split['warmup_ms'] / 86_400_000:g} days "
            "(feature windows still filling up)"
        )
    for task, w in split["windows"].items():
        lines.append(
            f"  {task:9s} fit {w['fit'][0]} .. {w['fit'][1]}   valid {w['valid'][0]} .. {w['valid'][1]}   "
            f"eval {w['eval'][0]} .. {w['eval'][1]}"
        )

    cls = report["classifiers"]
    for task, per in cls["metrics"].items():
        rows_info = cls["rows"][task]
        comp = cls["comparison"][task]
        model = per["mlp"]
        lines += [
            "",
            f"{TASK_TITLES.get(task, task).upper()}: evaluation {rows_info['rows']:,} rows, "
            f"{rows_info['positives']:,} positive (base rate {_f(model['base_rate'], 3)}); trained on "
            f"{rows_info['fit_rows']:,} + {rows_info['valid_rows']:,} validation rows",
        ]
        header = ["method", "ROC-AUC", "PR-AUC", "log loss", "Brier", "ECE", "dAUC", "dPR-AUC", "dLogLoss"]
        rows = []
        for method, m in per.items():
            if method == "mlp":
                d = ["", "", ""]
            else:
                b = comp["baselines"][method]
                d = [_f(b["roc_auc"], signed=True), _f(b["pr_auc"], signed=True), _f(b["log_loss"], signed=True)]
            rows.append(
                [_label(method), _f(m["roc_auc"]), _f(m["pr_auc"]), _f(m["log_loss"]), _f(m["brier"]), _f(m["ece"]), *d]
            )
        lines += ["  " + s for s in _table(header, rows)]
        lines.append(
            "  d* = MLP minus that baseline (higher AUC / PR-AUC and lower log loss are better); "
            "95% intervals from a shopper-level bootstrap:"
        )
        for method, b in comp["baselines"].items():
            ci = b.get("ci95") or {}
            parts = []
            for key, name in (("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC"), ("log_loss", "log loss")):
                iv = ci.get(key)
                interval = f" [{_f(iv[0], signed=True)}, {_f(iv[1], signed=True)}]" if iv and None not in iv else ""
                parts.append(f"{name} {_f(b[key], signed=True)}{interval}")
            verdict = "  -> MLP better" if b["beats"] else "  -> NOT better on all three"
            lines.append(f"    vs {_label(method)}: " + ", ".join(parts) + verdict)
        lines.append(
            f"  verdict: the MLP {'beats' if comp['beats_all'] else 'does NOT beat'} both required baselines "
            "(recency/frequency rule, logistic regression) on ROC-AUC, PR-AUC and log loss"
        )
        moment_bits = []
        for moment in ("event", "sweep"):
            parts = [
                f"{_label(meth)} {_f(m['by_moment'][moment]['roc_auc'], 3)}"
                for meth, m in per.items()
                if moment in m.get("by_moment", {})
            ]
            if parts:
                rows_m = per["mlp"]["by_moment"][moment]["rows"]
                moment_bits.append(f"  ROC-AUC at {moment} moments ({rows_m:,} rows): " + ", ".join(parts))
        lines += moment_bits
    lines += _classifier_selection(cls["selection"])
    lines.append("")
    lines.append(
        f"  MLP: hidden {cls['architecture']['hidden']}, dropout {cls['architecture']['dropout']}, best epoch "
        f"{cls['mlp_training']['best_epoch']} of {cls['mlp_training']['epochs_run']} (early stopping on "
        f"validation log loss), {cls['architecture']['calibration']} calibration on the validation rows"
    )
    lines.append(
        f"  recency/frequency rule: churn = {cls['rule']['churn']}; purchase = {cls['rule']['purchase']}; "
        f"{cls['rule']['calibration']}"
    )
    lines.append(
        "  logistic regression: one linear layer per task on the same standardised features, L-BFGS to "
        "convergence (L2), same calibration as the MLP"
    )
    if any("served_heuristic" in per for per in cls["metrics"].values()):
        lines.append("  served heuristic: models/heuristic.py as served today (hand-set weights, not calibrated)")

    ni = report["nextitem"]
    lines += [
        "",
        f"NEXT ITEM: {ni['data']['items']:,} items seen before the split, "
        f"{ni['data']['shoppers_with_history']:,} shoppers with history, "
        f"{ni['data']['train_interactions']:,} training interactions; full ranking of every item, "
        "history items excluded",
    ]
    ks = (5, 10, 20)
    for protocol, per in ni["metrics"].items():
        info = ni["data"].get(protocol, {})
        lines += [
            "",
            f"  protocol '{protocol}': {ni['protocols'][protocol]}",
            f"  {info.get('eval_shoppers', 0):,} shoppers; {info.get('cold_targets_dropped', 0):,} targets "
            f"unseen before the split dropped; {info.get('target_in_history', 0):,} targets already in the "
            "history",
        ]
        header = ["method"] + [f"HR@{k}" for k in ks] + [f"NDCG@{k}" for k in ks] + ["cov@10", "wHR@10", "wNDCG@10"]
        rows = []
        for method, m in per.items():
            w = m.get("weighted", {})
            rows.append(
                [_label(method)]
                + [_f(m[f"HR@{k}"]) for k in ks]
                + [_f(m[f"NDCG@{k}"]) for k in ks]
                + [_f(m.get("coverage@10"), 3), _f(w.get("HR@10")), _f(w.get("NDCG@10"))]
            )
        lines += ["  " + s for s in _table(header, rows)]
        if "sasrec" in per:
            best = max((m for m in per if m not in ("sasrec", "blend")), key=lambda m: per[m]["NDCG@10"], default=None)
            if best:
                d_hr = per["sasrec"]["HR@10"] - per[best]["HR@10"]
                d_nd = per["sasrec"]["NDCG@10"] - per[best]["NDCG@10"]
                lines.append(
                    f"  SASRec vs best baseline ({_label(best)}): HR@10 {_f(d_hr, signed=True)}, "
                    f"NDCG@10 {_f(d_nd, signed=True)}"
                )
    lines += _recommender_selection(ni["selection"])
    lines.append(
        "  cov@10 = share of the catalogue in at least one top-10 list; wHR/wNDCG = weighted by the target's "
        "interaction kind (view 1, cart 3, bought 5)"
    )
    t = ni["training"]
    lines.append(
        f"  SASRec: dim {ni['config']['dim']}, {ni['config']['layers']} layer(s), max_len "
        f"{ni['config']['max_len']}, best epoch {t['best_epoch']} of {t['epochs_run']} (early stopping on "
        f"validation {t['monitor']}), {t['seconds']:.1f} s"
    )

    lines += ["", "ARTIFACTS" + (" (promoted to current)" if report.get("promoted") else " (not promoted)")]
    for name, path in report["artifacts"].items():
        lines.append(f"  {name}/{report['version']}: {path}")
    lines += ["", "TIMINGS (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items())]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ plots
def _figure(width: float = 6.0, height: float = 4.5) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_reliability(task: str, curves: Mapping[str, Any], metrics: Mapping[str, Any], path: Path) -> Path:
    fig = _figure(6.0, 6.0)
    ax = fig.add_axes((0.14, 0.33, 0.81, 0.60))
    hx = fig.add_axes((0.14, 0.08, 0.81, 0.17), sharex=ax)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for method, all_bins in curves["reliability"].items():
        bins = [b for b in all_bins if b["count"] >= MIN_BIN_ROWS]
        if not bins:
            continue
        x = [b["mean_p"] for b in bins]
        y = [b["rate"] for b in bins]
        ece = metrics[method]["ece"]
        ax.plot(
            x,
            y,
            marker="o",
            markersize=4,
            color=_COLOURS.get(method),
            linewidth=1.5,
            label=f"{_label(method)} (ECE {_f(ece, 3)})",
        )
        if method == "mlp":
            hx.bar(
                [(b["lo"] + b["hi"]) / 2 for b in all_bins],
                [b["count"] for b in all_bins],
                width=all_bins[0]["hi"] - all_bins[0]["lo"],
                color=_COLOURS["mlp"],
                alpha=0.6,
            )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed rate")
    ax.set_title(f"{TASK_TITLES.get(task, task)}: reliability on the evaluation period")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    hx.set_xlabel(f"predicted probability (15 equal-width bins; bins with < {MIN_BIN_ROWS} rows not drawn)")
    hx.set_ylabel("MLP rows")
    hx.set_yscale("log")
    fig.savefig(path)
    return path


def plot_roc(task: str, curves: Mapping[str, Any], metrics: Mapping[str, Any], path: Path) -> Path:
    fig = _figure(6.0, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for method, roc in curves["roc"].items():
        ax.plot(
            roc["fpr"],
            roc["tpr"],
            color=_COLOURS.get(method),
            linewidth=1.5,
            label=f"{_label(method)} (AUC {_f(metrics[method]['roc_auc'], 3)})",
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{TASK_TITLES.get(task, task)}: ROC on the evaluation period")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_nextitem(nextitem: Mapping[str, Any], path: Path) -> Path:
    protocols = [p for p, per in nextitem["metrics"].items() if per]
    fig = _figure(4.2 * max(len(protocols), 1) + 0.5, 4.5)
    for i, protocol in enumerate(protocols):
        per = nextitem["metrics"][protocol]
        ax = fig.add_subplot(1, len(protocols), i + 1)
        methods = list(per)
        width = 0.8 / len(methods)
        for j, method in enumerate(methods):
            vals = [per[method]["HR@10"], per[method]["NDCG@10"]]
            xs = [g + (j - (len(methods) - 1) / 2) * width for g in range(2)]
            bars = ax.bar(xs, vals, width=width, color=_COLOURS.get(method), label=_label(method))
            for b, v in zip(bars, vals, strict=False):
                ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks([0, 1])
        ax.set_xticklabels(["HR@10", "NDCG@10"])
        n = nextitem["data"].get(protocol, {}).get("eval_shoppers", 0)
        ax.set_title(f"next item, protocol '{protocol}' ({n:,} shoppers)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------ entry point
def write_report(report: Mapping[str, Any], out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write ``report.json``, ``report.txt`` and (matplotlib permitting) the PNGs; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["json"] = out / "report.json"
    paths["json"].write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    paths["txt"] = out / "report.txt"
    paths["txt"].write_text(render_text(report), encoding="utf-8")
    if not plots:
        return paths
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        import warnings

        warnings.warn("matplotlib is not installed: report PNGs skipped (pip install 'matplotlib>=3.8')", stacklevel=2)
        return paths
    cls = report["classifiers"]
    for task in cls["curves"]:
        paths[f"reliability_{task}"] = plot_reliability(
            task, cls["curves"][task], cls["metrics"][task], out / f"reliability_{task}.png"
        )
        paths[f"roc_{task}"] = plot_roc(task, cls["curves"][task], cls["metrics"][task], out / f"roc_{task}.png")
    paths["nextitem"] = plot_nextitem(report["nextitem"], out / "nextitem.png")
    return paths


__all__ = ("write_report", "render_text", "plot_reliability", "plot_roc", "plot_nextitem")
