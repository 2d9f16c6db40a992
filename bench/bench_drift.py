"""Feature drift on simulated traffic: how high PSI runs when nothing changed, how high when something did,
and what the drift window costs per micro-batch.

Trains the classifier as `shoppulse train --simulate --quick` does (same simulator, seed and log;
few epochs: the reference distribution depends on the rows, not on the weights),
then replays that log at every event (the rows the worker scores: one per event, not the training's
at-most-one-per-hour sample) and measures, over consecutive windows of ``--window-h`` hours of event
time in the evaluation period (after the training split, unseen by training) that hold at least
``--min-rows`` rows:

* unchanged traffic: each feature's median PSI over the windows; above 0.2 (the alert threshold) it
  would be a standing false alarm, unless the log itself is not stationary (a simulated log starts
  with every shopper new, so tenure and lifetime totals only grow);
* the same traffic with every price tripled: the PSI of the money features.

Plus the cost of :meth:`models.drift.PsiWindow.add` for a 1000-row batch. Prints the figures and
appends them, with this exact command, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.record import append_row, this_command, utc_now  # noqa: E402
from features.events import Event  # noqa: E402
from features.offline import replay  # noqa: E402
from features.spec import DEFAULT_FEATURE_SPEC  # noqa: E402
from features.state import APPLIED  # noqa: E402
from models.classifiers import ShopperClassifier  # noqa: E402
from models.drift import PsiWindow, population_stability_index  # noqa: E402
from models.names import CLASSIFIER_MODEL  # noqa: E402
from models.registry import ModelRegistry  # noqa: E402
from models.train_cli import main as train_main  # noqa: E402
from streams.sim.generator import GeneratorConfig, ShopSimulator  # noqa: E402

SECTION = "## Feature drift (PSI) on simulated traffic"
HEADER = (
    "| date (UTC) | shoppers x days | windows | unchanged: features whose median PSI > 0.2 "
    "| unchanged: median PSI of the others (highest) | prices x3: PSI of revenue_30d, avg_order_value "
    "| window add, 1000 rows (µs) | command |\n"
    "|---|---|---|---|---|---|---|---|"
)
MONEY = ("revenue_30d", "avg_order_value")


def event_rows(events: list[Event]) -> tuple[np.ndarray, np.ndarray]:
    """Every applied event's row and time, as the worker would score it."""
    rows, ts = [], []
    for event, outcome, row in replay(events, spec=DEFAULT_FEATURE_SPEC):
        if outcome == APPLIED:
            rows.append(row)
            ts.append(event.ts_ms)
    return np.asarray(rows), np.asarray(ts)


def tripled_prices(events: list[Event]) -> list[Event]:
    out = []
    for event in events:
        e = copy.copy(event)
        e.price, e.total = event.price * 3, event.total * 3
        e.order_lines = tuple(dataclasses.replace(line, price=line.price * 3) for line in event.order_lines)
        out.append(e)
    return out


def window_psi(dist, rows: np.ndarray, ts: np.ndarray, start_ms: int, window_ms: int, min_rows: int) -> np.ndarray:
    """PSI per feature (columns) of each full window from ``start_ms`` on with ``min_rows`` rows (rows)."""
    found = []
    for begin in range(start_ms, int(ts.max()) - window_ms + 1, window_ms):
        inside = (ts >= begin) & (ts < begin + window_ms)
        if inside.sum() >= min_rows:
            found.append(population_stability_index(dist.shares, dist.bin_counts(rows[inside])))
    return np.asarray(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shoppers", type=int, default=2000)
    parser.add_argument("--days", type=float, default=28.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--window-h", type=float, default=1.0, help="window span in hours of event time")
    parser.add_argument("--min-rows", type=int, default=1000)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        registry = ModelRegistry(Path(tmp) / "registry")
        code = train_main(
            ["--simulate", str(args.shoppers), "--days", str(args.days), "--quick", "--seed", str(args.seed),
             "--registry", str(registry.root), "--report", str(Path(tmp) / "report"), "--device", "cpu",
             "--no-progress", "--no-plots", "--version", "drift", "--epochs", "5", "--nextitem-epochs", "1"]
        )  # fmt: skip
        if code != 0:
            raise SystemExit(f"training failed ({code})")
        classifier = ShopperClassifier.load(registry.current_dir(CLASSIFIER_MODEL), DEFAULT_FEATURE_SPEC.hash)
        split_ms = int(registry.describe(CLASSIFIER_MODEL, "drift")["training_data"]["split"]["split_ms"])
    dist = classifier.training_distribution
    assert dist is not None
    events = list(
        ShopSimulator(GeneratorConfig(seed=args.seed, n_shoppers=args.shoppers, duration_days=args.days)).events()
    )
    window_ms = int(args.window_h * 3_600_000)
    rows, ts = event_rows(events)
    same = window_psi(dist, rows, ts, split_ms, window_ms, args.min_rows)
    rows3, ts3 = event_rows(tripled_prices(events))
    shifted = window_psi(dist, rows3, ts3, split_ms, window_ms, args.min_rows)
    if not len(same):
        per_hour = (ts >= split_ms).sum() / max((ts.max() - split_ms) / 3_600_000, 1e-9)
        raise SystemExit(f"no {args.window_h} h window after the split holds {args.min_rows} rows ({per_hour:.0f}/h)")
    median = np.median(same, axis=0)
    drifting = [f"{dist.names[j]} {median[j]:.2f}" for j in np.argsort(-median) if median[j] > 0.2]
    calm = [j for j in np.argsort(-median) if median[j] <= 0.2]
    calm_text = f"{median[calm[0]]:.3f} ({dist.names[calm[0]]})" if calm else "none"
    money = [float(np.median(shifted[:, DEFAULT_FEATURE_SPEC.index(name)])) for name in MONEY]

    window = PsiWindow(dist, window_s=3600.0)
    batch = rows[:1000]
    started = time.perf_counter()
    for i in range(200):
        window.add(batch, float(i))
    add_us = (time.perf_counter() - started) / 200 * 1e6

    print(f"{len(same)} windows of {args.window_h} h with >= {args.min_rows} rows after the split")
    print("unchanged traffic, median PSI over the windows, per feature:")
    for j in np.argsort(-median):
        print(f"  {dist.names[j]:28s} {median[j]:.3f}  (max {same[:, j].max():.3f})")
    print("prices x3, median PSI: " + ", ".join(f"{n} {v:.2f}" for n, v in zip(MONEY, money, strict=True)))
    print(f"PsiWindow.add, 1000 rows: {add_us:.0f} µs")
    if not args.no_record:
        append_row(
            SECTION,
            HEADER,
            f"| {utc_now()} | {args.shoppers} x {args.days:g} | {len(same)} "
            f"| {', '.join(drifting) or 'none'} | {calm_text} | {money[0]:.2f}, {money[1]:.2f} "
            f"| {add_us:.0f} | `{this_command()}` |",
        )


if __name__ == "__main__":
    main()
