"""Which next-item recommender training would serve, on any event log, with a time split.

Runs exactly what ``shoppulse train`` runs for the next item
(:func:`models.training.fit_and_evaluate_nextitem`) on a message JSONL file, without the
churn/purchase labels (whose horizons need weeks of data that the REES46 and OTTO samples do
not have). The split is placed at the ``--split-fraction`` quantile of the event times:
validation is each shopper's last item before it (what the choice reads), test the first item
after it (reported, never read by the choice). Prints the table and appends one row per
candidate to ``BENCHMARKS.md``. Real samples go to our JSONL first with
``shoppulse replay FILE --format rees46|otto --keep-times --out FILE.jsonl``::

    python -m models.bench_selection --events var/rees46.jsonl --name "REES46 sample" --quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from features.offline import replay
from features.state import APPLIED

from .bench_nextitem import DEFAULT_BENCHMARKS, append_benchmark_rows
from .train_cli import read_events_jsonl
from .training import TrainingConfig
from .training.fit_nextitem import fit_and_evaluate_nextitem

SECTION = "## Next-item choice on validation, time split (what `shoppulse train` serves)"
TABLE_HEADER = (
    "| date (UTC) | data | events | valid / test shoppers | candidate | valid HR@10 | valid NDCG@10 | test HR@10 | "
    "test NDCG@10 | served | command |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=Path, required=True, help="message JSONL (shoppulse generate/replay --out)")
    p.add_argument("--name", default=None, help="data name in the table (default: the file name)")
    p.add_argument(
        "--split-fraction",
        type=float,
        default=0.8,
        help="split at this quantile of the event times (default %(default)s)",
    )
    p.add_argument("--quick", action="store_true", help="the demo-size SASRec (TrainingConfig.quick)")
    p.add_argument("--nextitem-epochs", type=int, default=None, help="max SASRec epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--benchmarks", type=Path, default=DEFAULT_BENCHMARKS, help="markdown file to append rows to")
    p.add_argument("--no-append", action="store_true", help="do not append to the benchmarks file")
    return p


def _cell(m: dict[str, Any] | None, key: str) -> str:
    return f"{m[key]:.4f}" if m else "-"


def main(argv: list[str] | None = None, *, prog: str = "python -m models.bench_selection") -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(args_list)
    command = " ".join([prog, shlex.join(args_list)]).strip()
    if not 0 < args.split_fraction < 1:
        print("error: --split-fraction must be in (0, 1)", file=sys.stderr)
        return 2
    events, stats = read_events_jsonl(args.events, now_ms=2**62)  # recorded logs: no future-time check
    if not events:
        print(f"error: no valid events in {args.events}", file=sys.stderr)
        return 1
    applied = [e for e, outcome, _ in replay(events) if outcome == APPLIED]
    split_ms = int(np.quantile(np.fromiter((e.ts_ms for e in applied), np.int64, len(applied)), args.split_fraction))
    base = TrainingConfig.quick() if args.quick else TrainingConfig()
    cfg = replace(
        base,
        seed=args.seed,
        device=args.device,
        progress=False,
        nextitem_epochs=args.nextitem_epochs or base.nextitem_epochs,
    )
    t0 = time.perf_counter()
    try:
        _, info = fit_and_evaluate_nextitem(applied, split_ms, cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    sel, test = info["selection"], info["metrics"].get("next", {})
    name = args.name or args.events.name
    shoppers = f"{info['data']['valid_shoppers']} / {info['data']['next']['eval_shoppers']}"
    split_iso = dt.datetime.fromtimestamp(split_ms / 1000, dt.UTC).isoformat(timespec="minutes")
    print(
        f"{name}: {stats['valid']:,} valid events ({len(applied):,} applied), split at {split_iso}; "
        f"validation / test shoppers {shoppers}; {info['data']['items']:,} items; {seconds:.1f} s"
    )
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    cmd = command.replace("|", "\\|")
    rows = []
    for cand, valid in sel.get("valid", {}).items():
        t = test.get(cand)
        print(
            f"  {cand:13s} valid HR@10 {valid['HR@10']:.4f} NDCG@10 {valid['NDCG@10']:.4f}   "
            f"test HR@10 {_cell(t, 'HR@10')} NDCG@10 {_cell(t, 'NDCG@10')}"
        )
        rows.append(
            f"| {date} | {name} | {len(applied):,} | {shoppers} | {cand} | {valid['HR@10']:.4f} | "
            f"{valid['NDCG@10']:.4f} | {_cell(t, 'HR@10')} | {_cell(t, 'NDCG@10')} | "
            f"{'**yes**' if cand == sel['served'] else ''} | `{cmd}` |"
        )
    print(f"served: {sel['served']} ({sel['reason']})")
    if rows and not args.no_append:
        append_benchmark_rows(args.benchmarks, rows, SECTION, TABLE_HEADER)
        print(f"appended {len(rows)} rows to {args.benchmarks}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    torch.set_num_threads(1)
    sys.exit(main())
