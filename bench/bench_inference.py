"""Inference cost of one micro-batch: the served models (BatchScorer) on the CPU and, when present, CUDA.

Builds the two served models at their `shoppulse train` sizes (untrained weights: the cost of a
forward pass does not depend on the values), registers them in a temporary registry, and times
``BatchScorer.score`` — churn/propensity MLP plus next-item top-K — for batches of shoppers with
real feature rows and 50-item histories. Prints ms per batch and µs per shopper and appends them,
with this exact command, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.record import append_row, this_command, utc_now  # noqa: E402
from features.events import KIND_VIEW, Event  # noqa: E402
from features.spec import DEFAULT_FEATURE_SPEC  # noqa: E402
from features.state import ShopperState, StateConfig  # noqa: E402
from models.classifiers import ClassifierConfig, MultiTaskMLP, ShopperClassifier  # noqa: E402
from models.names import CLASSIFIER_MODEL, NEXTITEM_MODEL  # noqa: E402
from models.nextitem import NextItemConfig, NextItemRecommender, SASRec  # noqa: E402
from models.registry import ModelRegistry  # noqa: E402
from models.scoring import BatchScorer  # noqa: E402
from models.sequences import ItemVocab  # noqa: E402

SECTION = "## Inference per micro-batch (served models, BatchScorer.score)"
HEADER = (
    "| date (UTC) | device | batch | items in catalogue | ms / batch (median) | µs / shopper | command |\n"
    "|---|---|---|---|---|---|---|"
)


def shoppers(n: int, n_items: int, seed: int) -> list[ShopperState]:
    rng = np.random.default_rng(seed)
    states = []
    for u in range(n):
        state = ShopperState.new(f"u{u}")
        ts = 1_760_000_000_000
        for k in range(50):
            ts += int(rng.integers(1_000, 600_000))
            state.update(
                Event(
                    KIND_VIEW,
                    f"u{u}-{k}",
                    f"u{u}",
                    ts,
                    session_id="s",
                    item_id=f"i{rng.integers(n_items)}",
                    category=f"c{rng.integers(20)}",
                    price=10.0,
                    quantity=1,
                ),
                StateConfig(),
            )
        states.append(state)
    return states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--items", type=int, default=12_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    registry = ModelRegistry(Path(tempfile.mkdtemp(prefix="shoppulse-inference-")))
    vocab = ItemVocab([f"i{k}" for k in range(args.items)])
    ShopperClassifier(
        MultiTaskMLP(ClassifierConfig(input_dim=DEFAULT_FEATURE_SPEC.dim)), DEFAULT_FEATURE_SPEC.hash
    ).save(registry.version_dir(CLASSIFIER_MODEL, "bench"), "bench")
    NextItemRecommender(SASRec(NextItemConfig(num_items=len(vocab))), vocab).save(
        registry.version_dir(NEXTITEM_MODEL, "bench"), "bench"
    )
    registry.promote(CLASSIFIER_MODEL, "bench")
    registry.promote(NEXTITEM_MODEL, "bench")
    states = shoppers(args.batch, args.items, seed=1)
    features = DEFAULT_FEATURE_SPEC.matrix(states, np.array([s.last_event_ms for s in states]))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        scorer = BatchScorer(DEFAULT_FEATURE_SPEC, registry.root, device=device)
        scorer.score(states, features)  # warm-up (CUDA context, kernels)
        timings = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            scorer.score(states, features)
            if device == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - started)
        median_ms = statistics.median(timings) * 1000
        name = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
        print(
            f"{name}: {median_ms:.1f} ms per batch of {args.batch} ({median_ms * 1000 / args.batch:.0f} µs/shopper)",
            flush=True,
        )
        if not args.no_record:
            append_row(
                SECTION,
                HEADER,
                f"| {utc_now()} | {name} | {args.batch} | {args.items:,} | {median_ms:.1f} | "
                f"{median_ms * 1000 / args.batch:.0f} | `{this_command()}` |",
            )


if __name__ == "__main__":
    main()
