"""Next-item benchmark on Amazon Toys: leave-one-out, full ranking (``shoppulse bench-nextitem``).

Protocol (``../shared/data/README.md``; SASRec / S3-Rec / ICLRec): per user the last item is
the test target, the second-to-last the validation target (early stopping), everything before
is training input. The test input is everything but the last item. Every target is ranked
against **all** items; items in the user's history are excluded. HR@K and NDCG@K, K=5/10/20.

Compares our SASRec-CE model with popularity and co-occurrence baselines and the published
ICLRec figures; prints a table, writes a JSON report and appends rows with the exact command
to ``BENCHMARKS.md``. Example::

    python -m models.bench_nextitem --json var/bench_nextitem.json --device auto
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .artifacts import sha256_file
from .baselines import CooccurrenceRecommender, PopularityRecommender
from .metrics import DEFAULT_KS, evaluate_full_ranking, format_table
from .nextitem import NextItemConfig, NextItemRecommender, TrainConfig, num_parameters, resolve_device, train_nextitem
from .sequences import ItemVocab, leave_one_out, read_sequences

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SEQUENCES = REPO_ROOT.parent / "shared" / "data" / "amazon-toys" / "Toys_and_Games.txt"
DEFAULT_BENCHMARKS = REPO_ROOT / "BENCHMARKS.md"
SECTION = "## Next-item on Amazon Toys (leave-one-out, full ranking)"
TABLE_HEADER = (
    "| date (UTC) | method | HR@5 | HR@10 | HR@20 | NDCG@5 | NDCG@10 | NDCG@20 | device | train time | command |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)

# ICLRec (Chen et al., WWW 2022), released model, on exactly this file and protocol.
ICLREC_PUBLISHED: dict[str, float] = {
    "HR@5": 0.0598,
    "NDCG@5": 0.0404,
    "HR@10": 0.0834,
    "NDCG@10": 0.0480,
    "HR@20": 0.1138,
    "NDCG@20": 0.0557,
}


def build_parser(prog: str = "shoppulse bench-nextitem") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sequences", type=Path, default=DEFAULT_SEQUENCES, help="'user item item ...' file (default: %(default)s)"
    )
    p.add_argument("--json", type=Path, default=None, help="write the full report to this JSON file")
    p.add_argument("--epochs", type=int, default=200, help="maximum epochs (default %(default)s)")
    p.add_argument("--patience", type=int, default=20, help="early-stopping patience in epochs (default %(default)s)")
    p.add_argument("--monitor", default="NDCG@10", help="validation metric for early stopping (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--ffn-mult", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--attn-dropout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU work")
    p.add_argument("--limit-users", type=int, default=None, help="use only the first N users (quick runs)")
    p.add_argument("--no-baselines", action="store_true", help="skip popularity and co-occurrence")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument(
        "--benchmarks",
        type=Path,
        default=DEFAULT_BENCHMARKS,
        help="markdown file to append rows to (default %(default)s)",
    )
    p.add_argument("--no-append", action="store_true", help="do not append to the benchmarks file")
    p.add_argument("--label", default="SASRec-CE (ours)", help="method name for our model's row")
    p.add_argument(
        "--save-artifact", type=Path, default=None, help="save the trained model as an artifact directory here"
    )
    p.add_argument("--version", default=None, help="artifact version (default: UTC timestamp)")
    return p


def append_benchmark_rows(path: Path, rows: list[str], section: str = SECTION, header: str = TABLE_HEADER) -> None:
    """Append table rows under ``section`` (append-only; the section and its table ``header`` are
    added when it is missing or is not the file's last section)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    out = []
    if not text:
        out.append("# Benchmarks\n")
    last_section = None
    for line in text.splitlines():
        if line.startswith("## "):
            last_section = line.strip()
    if last_section != section:
        if text and not text.endswith("\n"):
            out.append("\n")
        out.append(f"\n{section}\n\n{header}\n")
    elif text and not text.endswith("\n"):
        out.append("\n")
    out.extend(r.rstrip("\n") + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(out))


def _row(date: str, method: str, m: Mapping[str, float], device: str, train_time: str, command: str) -> str:
    cells = [f"{m[f'HR@{k}']:.4f}" for k in DEFAULT_KS] + [f"{m[f'NDCG@{k}']:.4f}" for k in DEFAULT_KS]
    cmd = command.replace("|", "\\|")
    return f"| {date} | {method} | " + " | ".join(cells) + f" | {device} | {train_time} | `{cmd}` |"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None, *, prog: str = "shoppulse bench-nextitem") -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(args_list)
    command = " ".join([prog, shlex.join(args_list)]).strip()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.sequences.exists():
        print(
            f"error: sequences file {args.sequences} not found; pass --sequences PATH "
            "(the Amazon Toys file lives in ../shared/data/amazon-toys/Toys_and_Games.txt)",
            file=sys.stderr,
        )
        return 2
    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    raw = read_sequences(args.sequences, args.limit_users)
    vocab = ItemVocab.from_sequences(s for _, s in raw)
    encoded = [vocab.encode(s) for _, s in raw]
    split = leave_one_out([u for u, _ in raw], encoded)
    n_inter = sum(len(s) for s in encoded)
    print(
        f"data: {args.sequences} users={len(raw)} evaluated={len(split.users)} items={len(vocab)} "
        f"interactions={n_inter} device={_device_name(device)}",
        flush=True,
    )

    mcfg = NextItemConfig(
        num_items=len(vocab),
        max_len=args.max_len,
        dim=args.dim,
        layers=args.layers,
        heads=args.heads,
        ffn_mult=args.ffn_mult,
        dropout=args.dropout,
        attn_dropout=args.attn_dropout,
    )
    tcfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        patience=args.patience,
        monitor=args.monitor,
        seed=args.seed,
        device=str(device),
        label_smoothing=args.label_smoothing,
        progress=not args.no_progress,
    )
    model, report = train_nextitem(split.train, mcfg, tcfg, split.valid_input, split.valid_target)
    t_eval = time.perf_counter()
    results: dict[str, dict[str, float]] = {}
    results[args.label] = evaluate_full_ranking(model.score, split.test_input, split.test_target, len(vocab))
    eval_seconds = time.perf_counter() - t_eval
    baseline_seconds: dict[str, float] = {}
    if not args.no_baselines:
        for name, rec in (("popularity", PopularityRecommender()), ("co-occurrence", CooccurrenceRecommender())):
            t = time.perf_counter()
            rec.fit(split.train, len(vocab))
            results[name] = evaluate_full_ranking(rec.score, split.test_input, split.test_target, len(vocab))
            baseline_seconds[name] = time.perf_counter() - t
    table_rows: dict[str, Mapping[str, float | None]] = dict(results)
    table_rows["ICLRec (published)"] = ICLREC_PUBLISHED
    print()
    print(format_table(table_rows))
    ours = results[args.label]
    print(
        f"\n{args.label}: best epoch {report.best_epoch}/{report.epochs_run} "
        f"(valid {args.monitor} {report.best_metric:.4f}), train {report.train_seconds:.1f}s on {report.device}, "
        f"test eval {eval_seconds:.1f}s; coverage@10 {ours['coverage@10']:.3f}; "
        f"targets already in history: {int(ours['target_in_history'])}"
    )
    gap = {k: ours[k] - v for k, v in ICLREC_PUBLISHED.items()}
    print("vs ICLRec: " + ", ".join(f"{k} {v:+.4f}" for k, v in gap.items()))

    now = dt.datetime.now(dt.UTC)
    artifact_path = None
    if args.save_artifact is not None:
        recommender = NextItemRecommender(model.cpu(), vocab)
        version = args.version or now.strftime("%Y%m%dT%H%M%SZ")
        artifact_path = str(
            recommender.save(
                args.save_artifact,
                version,
                metrics={"test": ours, "valid": report.best_valid},
                training_data={
                    "path": str(args.sequences),
                    "sha256": sha256_file(args.sequences),
                    "users": len(raw),
                    "items": len(vocab),
                    "interactions": n_inter,
                    "split": "leave-one-out train part (seq[:-2])",
                },
                extra={"train_config": tcfg.to_dict(), "command": command},
            )
        )
        print(f"artifact: {artifact_path}")

    report_json: dict[str, Any] = {
        "benchmark": "nextitem-amazon-toys-loo-full-ranking",
        "created": now.isoformat(),
        "command": command,
        "dataset": {
            "path": str(args.sequences),
            "sha256": sha256_file(args.sequences),
            "users": len(raw),
            "evaluated_users": len(split.users),
            "items": len(vocab),
            "interactions": n_inter,
            "limit_users": args.limit_users,
        },
        "protocol": "leave-one-out: last=test, second-to-last=validation (early stopping), rest=training input; "
        "full ranking over all items, history items excluded; ties broken in expectation",
        "device": _device_name(device),
        "torch": torch.__version__,
        "model_config": mcfg.to_dict(),
        "train_config": tcfg.to_dict(),
        "parameters": num_parameters(model),
        "train": {k: v for k, v in report.to_dict().items()},
        "test_eval_seconds": eval_seconds,
        "baseline_seconds": baseline_seconds,
        "results": results,
        "published": {"ICLRec": ICLREC_PUBLISHED},
        "delta_vs_iclrec": gap,
        "artifact": artifact_path,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report_json, indent=2) + "\n", encoding="utf-8")
        print(f"json: {args.json}")
    if not args.no_append:
        date = now.strftime("%Y-%m-%d %H:%M")
        dev = _device_name(device)
        subset = f" [first {args.limit_users} users]" if args.limit_users else ""
        rows = [
            _row(
                date,
                args.label + subset,
                ours,
                dev,
                f"{report.train_seconds:.0f}s ({report.epochs_run} ep, best {report.best_epoch})",
                command,
            )
        ]
        for name in ("popularity", "co-occurrence"):
            if name in results:
                rows.append(
                    _row(
                        date, name + subset, results[name], "cpu", f"{baseline_seconds[name]:.0f}s (fit+eval)", command
                    )
                )
        append_benchmark_rows(args.benchmarks, rows)
        print(f"appended {len(rows)} rows to {args.benchmarks}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(prog="python -m models.bench_nextitem"))
