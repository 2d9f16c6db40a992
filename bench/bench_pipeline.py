"""The worker's per-batch logic alone: ``BatchProcessor.process`` over simulated batches, no broker.

``bench/bench_worker.py`` measures the whole worker, and on this machine its side-by-side rows
drift by tens of percent between runs minutes apart: the broker, the bench's own processes and
the worker share two cores. A change to the batch logic (validation, state, features, models,
live evaluation, output messages) is measured more steadily here:

* simulated events (the generator ``bench_worker.py`` uses) are cut into micro-batches of
  ``--batch`` messages, in time order, each message placed in its shopper's partition;
* a child process per run imports the code of one checkout (this one, or ``--compare-with``),
  builds its ``BatchProcessor`` with the models of ``--models`` on the CPU, and processes every
  batch against an in-memory store (a dict: the RocksDB reads and writes, the Kafka client and the
  commit are not in the figure);
* runs alternate between the checkouts ``--repeat`` times, and each prints the process CPU per
  event spent in ``process()``, the models' share, and the shoppers scored per event.

Prints the figures and appends them, with this exact command, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SECTION = "## Batch logic alone (BatchProcessor.process, no broker, one core)"
HEADER = (
    "| date (UTC) | events | shoppers | batch | code | CPU µs per event in process() | of it the models "
    "| shoppers scored per event | command |\n|---|---|---|---|---|---|---|---|---|"
)
PARTITIONS = 12


def run_child(checkout: Path, messages: Path, models: str, batch: int) -> dict[str, float]:
    """One run in a fresh process that imports ``checkout``'s code; its figures."""
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            str(checkout),
            "--messages",
            str(messages),
            "--models",
            models,
            "--batch",
            str(batch),
        ],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the run of {checkout} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(checkout: Path, messages: Path, models: str, batch_size: int) -> None:
    """Process every batch with ``checkout``'s code; print the figures as one JSON line."""
    sys.path.insert(0, str(checkout))
    import gc

    import torch

    from features.events import ValidationLimits
    from features.spec import DEFAULT_FEATURE_SPEC
    from features.state import StateConfig
    from models.scoring import BatchScorer
    from streams.worker.metrics import WorkerMetrics
    from streams.worker.pipeline import BatchProcessor, InputMessage

    torch.set_num_threads(1)  # the worker's default (SHOPPULSE_TORCH_THREADS)
    with open(messages, "rb") as source:
        generated: list[tuple[str, bytes, bytes]] = pickle.load(source)
    kinds = {"page_view": "page_view", "cart": "cart", "order": "order"}  # topic name -> contract kind
    registry = Path(models) if models else None
    processor = BatchProcessor(
        kinds,
        StateConfig(),
        DEFAULT_FEATURE_SPEC,
        BatchScorer(DEFAULT_FEATURE_SPEC, registry, device="cpu"),
        ValidationLimits(),
        WorkerMetrics(),
    )
    next_offset: dict[tuple[str, int], int] = {}
    batches = []
    for start in range(0, len(generated), batch_size):
        batch = []
        for topic, key, value in generated[start : start + batch_size]:
            partition = zlib.crc32(key) % PARTITIONS
            offset = next_offset.get((topic, partition), 0)
            next_offset[(topic, partition)] = offset + 1
            batch.append(InputMessage(topic, partition, offset, key, value))
        batches.append(batch)
    store: dict[bytes, bytes] = {}
    now_ms = int(time.time() * 1000)
    gc.freeze()  # as the worker does after start-up
    started = time.process_time()
    scored = 0
    for batch in batches:
        outcome = processor.process(batch, lambda _partition, key: store.get(key), now_ms=now_ms)
        scored += len(outcome.scored)
        for write in outcome.writes:
            if write.value is None:
                store.pop(write.key, None)
            else:
                store[write.key] = write.value
    cpu_s = time.process_time() - started
    models_s = sum(
        sample.value
        for metric in processor.metrics.inference_seconds.collect()
        for sample in metric.samples
        if sample.name.endswith("_sum")
    )
    events = len(generated)
    print(json.dumps({"cpu_us": cpu_s / events * 1e6, "models_us": models_s / events * 1e6, "scored": scored / events}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument(
        "--shoppers", type=int, default=52_000, help="default: 1M / 260k's ratio at a fifth of its size"
    )
    parser.add_argument("--days", type=float, default=0.5, help="simulated span (shorter: more shoppers per batch)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1000, help="messages per micro-batch (SHOPPULSE_MAX_BATCH)")
    parser.add_argument("--models", default="var/bench-models", help="model registry (empty: the heuristic)")
    parser.add_argument(
        "--compare-with", type=Path, metavar="CHECKOUT", help="another checkout (git worktree add DIR REV)"
    )
    parser.add_argument("--repeat", type=int, default=2, help="runs of each checkout, alternating")
    parser.add_argument("--no-record", action="store_true", help="print only; do not touch BENCHMARKS.md")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--messages", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = str(Path(args.models).resolve()) if args.models else ""
    if args.child is not None:
        child(args.child, args.messages, models, args.batch)
        return

    from bench.bench_worker import git_revision, simulated_messages
    from bench.record import append_row, this_command, utc_now

    print(f"generating {args.events:,} events from {args.shoppers:,} shoppers …", flush=True)
    generated = simulated_messages(args.events, args.shoppers, args.days, args.seed)
    arms = [REPO] if args.compare_with is None else [args.compare_with.resolve(), REPO]
    with tempfile.TemporaryDirectory(prefix="shoppulse-bench-pipeline-") as workdir:
        messages = Path(workdir) / "messages.pickle"
        with open(messages, "wb") as sink:
            pickle.dump([(m.topic_kind, m.key, m.value) for m in generated], sink)
        for repeat in range(args.repeat):
            for checkout in arms if repeat % 2 == 0 else arms[::-1]:  # ABBA: neither arm always goes first
                figures = run_child(checkout, messages, models, args.batch)
                code = f"{git_revision(checkout)}{' (this checkout)' if checkout == REPO else ''}"
                print(
                    f"{code}: {figures['cpu_us']:.1f} µs of CPU per event in process(), the models "
                    f"{figures['models_us']:.1f}; {figures['scored']:.2f} shoppers scored per event",
                    flush=True,
                )
                if not args.no_record:
                    append_row(
                        SECTION,
                        HEADER,
                        f"| {utc_now()} | {args.events:,} | {args.shoppers:,} | {args.batch} | {code} | "
                        f"{figures['cpu_us']:.1f} | {figures['models_us']:.1f} | {figures['scored']:.2f} | "
                        f"`{this_command()}` |",
                    )


if __name__ == "__main__":
    main()
