"""Feature updates per second on one core, pure (no broker), and bytes per stored shopper.

Builds a seeded synthetic event log (or, with ``--source shop``, the project's
``streams.sim.generator.ShopSimulator``), then measures on one CPU core:

* ``ShopperState.update`` throughput over the whole log (best of ``--repeat``);
* ``encode_state`` / ``decode_state`` time and encoded bytes per shopper;
* ``FeatureSpec.matrix`` time per state in batches of ``--batch``;
* ``parse_event`` (validation, as the worker runs it) per message, over the generator's valid
  messages of the same size of log; with ``--validation-baseline REV`` also the parser of
  ``features/events.py`` at git revision REV, the two alternating round by round, so that a
  change to validation is measured against its predecessor in one run on one core.

It prints the figures and appends dated rows, with the exact command, to ``BENCHMARKS.md``
under ``## Feature updates (pure, one core)`` and ``## Validation (pure, one core)`` (each
section is created if missing; nothing else in the file is touched).

    .venv/bin/python bench/bench_features.py --events 200000
    .venv/bin/python bench/bench_features.py --source shop --users 4000 --validation-baseline 28f623d
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
import types
from collections import deque
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.record import append_row  # noqa: E402
from features.encoding import decode_state, encode_state  # noqa: E402
from features.events import KIND_CART_ADD, KIND_CART_REMOVE, KIND_ORDER, KIND_VIEW, Event, OrderLine  # noqa: E402
from features.spec import DEFAULT_FEATURE_SPEC  # noqa: E402
from features.state import DAY_MS, ShopperState, StateConfig  # noqa: E402

BENCHMARKS = REPO / "BENCHMARKS.md"
SECTION = "## Feature updates (pure, one core)"
TABLE_HEADER = (
    "| date (UTC) | source | events | shoppers | updates/s | µs/update | encode µs | decode µs | matrix µs/state "
    "| bytes/shopper median / mean / p90 | python | command |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)
VALIDATION_SECTION = "## Validation (pure, one core)"
VALIDATION_HEADER = (
    "| date (UTC) | messages | µs/message | baseline revision | baseline µs/message | change | rounds | python "
    "| command |\n"
    "|---|---|---|---|---|---|---|---|---|\n"
)
START_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
Parser = Callable[[str, bytes | None, bytes | None, int], Event]


def synthetic_events(n_events: int, n_users: int, days: float, seed: int) -> list[Event]:
    """A seeded shop log: shoppers with sessions of views, cart adds/removes and some orders,
    spread over ``days``, sorted by event time."""
    rng = random.Random(seed)
    items = [f"i{n:06d}" for n in range(5_000)]
    categories = [f"cat{n:02d}" for n in range(40)]
    span_ms = int(days * DAY_MS)
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(n_users)]  # a few shoppers are very active
    scale = n_events / sum(weights)
    events: list[Event] = []
    counter = 0
    for u, weight in enumerate(weights):
        user_id = f"u{u:06d}"
        budget = max(1, round(weight * scale))
        ts = START_MS + rng.randrange(span_ms)
        favourite = rng.sample(categories, 3)
        while budget > 0:
            cart: list[tuple[str, float]] = []
            for _ in range(min(budget, 1 + int(rng.expovariate(1 / 8)))):
                ts += rng.randint(3_000, 90_000)
                counter += 1
                budget -= 1
                item = rng.choice(items)
                price = round(rng.uniform(2, 300), 2)
                r = rng.random()
                if r < 0.05 and cart:
                    lines = tuple(OrderLine(i, 1, p) for i, p in cart)
                    events.append(
                        Event(
                            KIND_ORDER,
                            f"e{counter}",
                            user_id,
                            ts,
                            order_id=f"o{counter}",
                            order_lines=lines,
                            total=round(sum(p for _, p in cart), 2),
                        )
                    )
                    cart = []
                elif r < 0.12 and cart:
                    removed, price = cart.pop()
                    events.append(
                        Event(KIND_CART_REMOVE, f"e{counter}", user_id, ts, item_id=removed, price=price, quantity=1)
                    )
                elif r < 0.30:
                    cart.append((item, price))
                    events.append(
                        Event(
                            KIND_CART_ADD,
                            f"e{counter}",
                            user_id,
                            ts,
                            item_id=item,
                            category=rng.choice(favourite),
                            price=price,
                            quantity=1,
                        )
                    )
                else:
                    events.append(
                        Event(
                            KIND_VIEW,
                            f"e{counter}",
                            user_id,
                            ts,
                            item_id=item,
                            category=rng.choice(favourite),
                            price=price,
                            quantity=1,
                        )
                    )
            ts += int(rng.expovariate(1 / (2 * DAY_MS)))
    events.sort(key=lambda e: e.ts_ms)
    return events


def shop_events(n_events: int, n_users: int, days: float, seed: int) -> list[Event]:
    """Events from the project's ShopSimulator (streams/sim/generator.py)."""
    from streams.sim.generator import GeneratorConfig, ShopSimulator

    return list(ShopSimulator(GeneratorConfig(seed=seed, n_shoppers=n_users, duration_days=days)).events(n_events))


def fold_all(events: list[Event], config: StateConfig) -> tuple[float, dict[str, ShopperState]]:
    states: dict[str, ShopperState] = {}
    started = time.perf_counter()
    for event in events:
        state = states.get(event.user_id)
        if state is None:
            state = states[event.user_id] = ShopperState(event.user_id)
        state.update(event, config)
    return time.perf_counter() - started, states


def parser_of(source: str, label: str) -> Parser:
    """``parse_event`` of a text of ``features/events.py``, built as its own module (it imports
    the standard library only). This code's parser is built so too, so that the two sides differ
    in their text alone: with the imported module on one side, the same text on both read +2.4%."""
    name = f"events_of_{label}"
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses look up their class's module while building it
    exec(compile(source, f"{label}:features/events.py", "exec"), module.__dict__)
    return module.parse_event


def events_source_at(revision: str) -> tuple[str, str]:
    """``features/events.py`` at a git revision, and the revision's short commit id."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout

    commit = git("rev-parse", "--short", f"{revision}^{{commit}}").strip()
    return git("show", f"{commit}:features/events.py"), commit


def time_validation(parsers: list[Parser], events: list[Event], rounds: int, block: int = 1000) -> list[float]:
    """Seconds per parser for one pass over the events' Kafka messages.

    The parsers take turns block by block (``block`` messages, the first of each turn
    alternating), and each block's best of ``rounds`` counts: on a shared host the load changes
    within a second, so whole passes one after the other differed by 15% for the same code.
    Every message must be valid for every parser (a rejection raises).
    """
    from streams.sim.generator import message_of

    messages = [message_of(event) for event in events]
    blocks = [messages[i : i + block] for i in range(0, len(messages), block)]
    now_ms = max(event.ts_ms for event in events)
    best = [[float("inf")] * len(blocks) for _ in parsers]
    gc.collect()
    gc.disable()  # a collection of the log's millions of objects would land on one parser's turn
    try:
        for round_index in range(rounds):
            for block_index, chunk in enumerate(blocks):
                order = range(len(parsers)) if (round_index + block_index) % 2 else reversed(range(len(parsers)))
                for index in order:
                    parse = parsers[index]
                    started = time.perf_counter()
                    for message in chunk:
                        parse(message.topic_kind, message.key, message.value, now_ms)
                    best[index][block_index] = min(best[index][block_index], time.perf_counter() - started)
    finally:
        gc.enable()
    return [sum(per_block) for per_block in best]


def best_of(repeat: int, work) -> float:
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        timings.append(time.perf_counter() - started)
    return min(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events in the log (default 200000)")
    parser.add_argument("--users", type=int, default=20_000, help="shoppers (default 20000)")
    parser.add_argument("--days", type=float, default=28.0, help="event-time span in days (default 28)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--source",
        choices=("synthetic", "shop"),
        default="synthetic",
        help="synthetic: this script's generator; shop: streams.sim.generator.ShopSimulator",
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions, best kept (default 3)")
    parser.add_argument("--batch", type=int, default=500, help="states per FeatureSpec.matrix call (default 500)")
    parser.add_argument(
        "--validation-baseline",
        metavar="REV",
        default=None,
        help="also time features/events.py of this git revision, alternating with this code's",
    )
    parser.add_argument("--no-record", action="store_true", help="print only; do not touch BENCHMARKS.md")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    make = synthetic_events if args.source == "synthetic" else shop_events
    events = make(args.events, args.users, args.days, args.seed)
    config = StateConfig()

    update_s = min(fold_all(events, config)[0] for _ in range(args.repeat))
    _, states = fold_all(events, config)
    shoppers = list(states.values())
    blobs = [encode_state(state) for state in shoppers]
    sizes = sorted(len(blob) for blob in blobs)
    encode_s = best_of(args.repeat, lambda: [encode_state(state) for state in shoppers])
    decode_s = best_of(args.repeat, lambda: deque(map(decode_state, blobs), maxlen=0))  # as a worker: load, drop
    now_ms = events[-1].ts_ms
    batches = [shoppers[i : i + args.batch] for i in range(0, len(shoppers), args.batch)]
    matrix_s = best_of(args.repeat, lambda: [DEFAULT_FEATURE_SPEC.matrix(batch, now_ms) for batch in batches])

    # Validation runs on the generator's messages: the synthetic log leaves ids the contract requires empty.
    valid_events = events if args.source == "shop" else shop_events(args.events, args.users, args.days, args.seed)
    parsers = [parser_of((REPO / "features" / "events.py").read_text(encoding="utf-8"), "worktree")]
    if args.validation_baseline:
        baseline_source, baseline_commit = events_source_at(args.validation_baseline)
        parsers.append(parser_of(baseline_source, baseline_commit))
    validation_s = time_validation(parsers, valid_events, args.repeat)
    validate_us = [seconds / len(valid_events) * 1e6 for seconds in validation_s]

    n, m = len(events), len(shoppers)
    figures = {
        "updates_per_s": n / update_s,
        "us_per_update": update_s / n * 1e6,
        "encode_us": encode_s / m * 1e6,
        "decode_us": decode_s / m * 1e6,
        "matrix_us": matrix_s / m * 1e6,
        "bytes_median": statistics.median(sizes),
        "bytes_mean": statistics.mean(sizes),
        "bytes_p90": sizes[int(0.9 * (m - 1))],
    }
    print(
        f"{n} events, {m} shoppers ({args.source}), one core, {platform.python_implementation()} "
        f"{platform.python_version()}"
    )
    print(f"  update        {figures['updates_per_s']:>10,.0f} events/s  ({figures['us_per_update']:.2f} µs each)")
    print(f"  encode_state  {figures['encode_us']:>10.1f} µs/shopper")
    print(f"  decode_state  {figures['decode_us']:>10.1f} µs/shopper")
    print(f"  spec.matrix   {figures['matrix_us']:>10.1f} µs/state (batches of {args.batch})")
    print(
        f"  bytes/shopper median {figures['bytes_median']:.0f}, mean {figures['bytes_mean']:.0f}, "
        f"p90 {figures['bytes_p90']}, max {sizes[-1]}"
    )
    print(f"  parse_event   {validate_us[0]:>10.2f} µs/message ({len(valid_events)} generator messages)")
    if args.validation_baseline:
        print(
            f"    at {baseline_commit:<9} {validate_us[1]:>10.2f} µs/message "
            f"({validate_us[0] / validate_us[1] - 1:+.1%} now)"
        )
    if args.no_record:
        return
    command = shlex.join(sys.orig_argv)
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
    row = (
        f"| {date} | {args.source} | {n} | {m} | {figures['updates_per_s']:,.0f} | {figures['us_per_update']:.2f} "
        f"| {figures['encode_us']:.1f} | {figures['decode_us']:.1f} | {figures['matrix_us']:.1f} "
        f"| {figures['bytes_median']:.0f} / {figures['bytes_mean']:.0f} / {figures['bytes_p90']} "
        f"| {platform.python_version()} | `{command}` |\n"
    )
    append_row(SECTION, TABLE_HEADER, row)
    baseline = (
        (f"{baseline_commit} | {validate_us[1]:.2f} | {validate_us[0] / validate_us[1] - 1:+.1%}")
        if args.validation_baseline
        else "- | - | -"
    )
    append_row(
        VALIDATION_SECTION,
        VALIDATION_HEADER,
        f"| {date} | {len(valid_events)} | {validate_us[0]:.2f} | {baseline} | {args.repeat} "
        f"| {platform.python_version()} | `{command}` |\n",
    )
    print(f"recorded in {BENCHMARKS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
